package dnsname

import (
	"strings"
	"testing"
)

func TestValid(t *testing.T) {
	label := strings.Repeat("a", 63)
	for name, want := range map[string]bool{
		"hub1.example.com": true, "Edge-Lab": true, "10.0.0.1": true, label: true,
		label + "a": false, "": false, "a..b": false, "-a": false, "a-": false, "a.": false,
		"bad host": false, "a_b": false, "hü": false,
		strings.Repeat(label+".", 3) + strings.Repeat("a", 61): true, // 253
		strings.Repeat(label+".", 3) + strings.Repeat("a", 62): false,
	} {
		if Valid(name) != want {
			t.Errorf("Valid(%.20q…) = %v, want %v", name, !want, want)
		}
	}
}
