package hubid

import (
	"strings"
	"testing"
)

func TestValid(t *testing.T) {
	for id, want := range map[string]bool{
		"cam-1": true, "Edge.Device_01": true, "$edgeAgent": true, "a+b%c#d*e?f!g(h),i:j=k@l'm": true,
		strings.Repeat("a", 128): true, strings.Repeat("a", 129): false,
		"": false, "bad device": false, "a/b": false, "ünï": false, "a\nb": false,
	} {
		if Valid(id) != want {
			t.Errorf("Valid(%q) = %v, want %v", id, !want, want)
		}
	}
}
