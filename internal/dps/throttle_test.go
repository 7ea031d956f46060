package dps

import (
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
)

func TestThrottle(t *testing.T) {
	th := NewThrottle(2, 1, 3)
	now := time.Unix(1_800_000_000, 0)
	// Each registration ID gets its burst, then one request a second.
	for i := range 3 {
		if err := th.device("a", now); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
	}
	err := th.device("a", now)
	if e := azerr.As(err); e.Status() != 429 || e.RetryAfter != time.Second {
		t.Fatalf("over the burst: %v (retry after %v)", err, e.RetryAfter)
	}
	if err := th.device("b", now); err != nil {
		t.Fatalf("another device is not slowed by the first: %v", err)
	}
	if err := th.device("a", now.Add(time.Second)); err != nil {
		t.Fatalf("a second later: %v", err)
	}
	// The global registration rate.
	for range 2 {
		if err := th.registration(now); err != nil {
			t.Fatal(err)
		}
	}
	if err := th.registration(now); azerr.As(err).Status() != 429 {
		t.Fatalf("third registration in the same instant: %v", err)
	}
	if err := th.registration(now.Add(500 * time.Millisecond)); err != nil {
		t.Fatalf("half a second later, at 2/s: %v", err)
	}
	var none *Throttle
	if none.registration(now) != nil || none.device("a", now) != nil {
		t.Fatal("a nil throttle limits")
	}
}
