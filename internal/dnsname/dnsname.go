// Package dnsname checks host names as RFC 1123 writes them, for the
// settings that name a host: a linked hub, an edge device's hostname.
package dnsname

import "strings"

// Valid reports whether name is dot-separated labels of 1 to 63 letters,
// digits and inner hyphens, 253 characters in all (an IPv4 address is
// one too).
func Valid(name string) bool {
	if len(name) > 253 {
		return false
	}
	for l := range strings.SplitSeq(name, ".") {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for _, r := range l {
			if r != '-' && !('0' <= r && r <= '9') && !('a' <= r && r <= 'z') && !('A' <= r && r <= 'Z') {
				return false
			}
		}
	}
	return true
}
