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

// Registrations refused in a crowd are told to come back spread over time
// at the rate, not all after the same second.
func TestThrottleSpreadsRetries(t *testing.T) {
	th := NewThrottle(5, 0, 1)
	now := time.Unix(1_800_000_000, 0)
	var waits []time.Duration
	for range 5 + 20 {
		if err := th.registration(now); err != nil {
			waits = append(waits, azerr.As(err).RetryAfter)
		}
	}
	if len(waits) != 20 {
		t.Fatalf("%d refused, want 20", len(waits))
	}
	for i := 1; i < len(waits); i++ {
		if waits[i] < waits[i-1] {
			t.Fatalf("waits go back: %v", waits)
		}
	}
	if first, last := waits[0], waits[len(waits)-1]; first > time.Second || last < 3*time.Second || last > 5*time.Second {
		t.Fatalf("20 refused at 5/s are told %v … %v, want about 0.2 s … 4 s", first, last)
	}
	for range 1000 {
		th.registration(now)
	}
	if err := th.registration(now); azerr.As(err).RetryAfter > maxRegistrationWait {
		t.Fatalf("told to wait %v", azerr.As(err).RetryAfter)
	}
}
