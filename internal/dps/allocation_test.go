package dps

import (
	"fmt"
	"math"
	"net/netip"
	"strings"
	"testing"
)

func TestWeightedHash(t *testing.T) {
	a, b := &LinkedHub{HostName: "a", AllocationWeight: 1}, &LinkedHub{HostName: "b", AllocationWeight: 3}
	counts := map[string]int{}
	const n = 8000
	for i := range n {
		id := fmt.Sprintf("device-%d", i)
		h := weightedHash(id, []*LinkedHub{a, b})
		if weightedHash(id, []*LinkedHub{b, a}) != h {
			t.Fatalf("%s: the choice depends on the order of the hubs", id)
		}
		counts[h.HostName]++
	}
	if share := float64(counts["b"]) / n; math.Abs(share-0.75) > 0.03 {
		t.Fatalf("weight 3 of 4 got %.3f of the devices", share)
	}
	// A new hub takes devices only for itself: no device moves between a and b.
	c := &LinkedHub{HostName: "c", AllocationWeight: 4}
	moved := 0
	for i := range n {
		id := fmt.Sprintf("device-%d", i)
		before, after := weightedHash(id, []*LinkedHub{a, b}), weightedHash(id, []*LinkedHub{a, b, c})
		if after != c && after != before {
			t.Fatalf("%s moved from %s to %s", id, before.HostName, after.HostName)
		}
		if after == c {
			moved++
		}
	}
	if share := float64(moved) / n; math.Abs(share-0.5) > 0.03 {
		t.Fatalf("weight 4 of 8 took %.3f of the devices", share)
	}
}

func TestNearest(t *testing.T) {
	eu := &LinkedHub{HostName: "eu", LatencyMs: map[string]int{"10.0.0.0/8": 60, "10.1.0.0/16": 8}}
	us := &LinkedHub{HostName: "us", LatencyMs: map[string]int{"10.0.0.0/8": 30}}
	other := &LinkedHub{HostName: "other"}
	hubs := []*LinkedHub{eu, us, other}
	for _, tc := range []struct {
		addr string
		want []string
	}{
		{"10.1.2.3", []string{"eu"}},                 // eu's most specific entry, 8 ms
		{"10.2.0.1", []string{"us"}},                 // 30 ms against 60
		{"192.0.2.1", []string{"eu", "us", "other"}}, // nobody knows: all stay
		{"::ffff:10.1.2.3", []string{"eu"}},          // IPv4-mapped addresses match IPv4 networks
		{"", []string{"eu", "us", "other"}},
	} {
		addr, _ := netip.ParseAddr(tc.addr)
		var got []string
		for _, h := range nearest(hubs, addr) {
			got = append(got, h.HostName)
		}
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("%s: %v, want %v", tc.addr, got, tc.want)
		}
	}
}

// The API shows a linked hub without its key, wherever the key stands in
// its connection string and however its name is written; only that form
// keeps the stored key when sent back.
func TestRedactedLinkedHub(t *testing.T) {
	for in, want := range map[string]string{
		"HostName=h;SharedAccessKeyName=p;SharedAccessKey=abc=": "HostName=h;SharedAccessKeyName=p;SharedAccessKey=" + HiddenKey,
		"HostName=h;sharedaccesskey=abc=;SharedAccessKeyName=p": "HostName=h;sharedaccesskey=" + HiddenKey + ";SharedAccessKeyName=p",
		"HostName=h;SharedAccessKeyName=p":                      "HostName=h;SharedAccessKeyName=p",
	} {
		got := LinkedHub{ConnectionString: in}.Redacted().ConnectionString
		if got != want {
			t.Errorf("%s shown as %s, want %s", in, got, want)
		}
		if hidesKey(in) || hidesKey(got) != strings.Contains(want, HiddenKey) {
			t.Errorf("hidesKey wrong for %s or %s", in, got)
		}
	}
}
