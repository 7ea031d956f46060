package loadgen

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"
	"testing"
	"time"
)

// At a rate, each device is due at its own time whether or not a worker is
// free then, and a rate the workers cannot keep up with shows.
func TestDispatchAtRate(t *testing.T) {
	devs := make([]*simDevice, 5)
	jobs := make(chan job)
	start := time.Now()
	done := make(chan time.Time)
	go func() { done <- dispatch(context.Background(), devs, 100, start, jobs) }()
	i := 0
	for j := range jobs {
		if want := start.Add(time.Duration(i) * 10 * time.Millisecond); !j.due.Equal(want) {
			t.Errorf("device %d due %v after the start, want %v", i, j.due.Sub(start), want.Sub(start))
		}
		i++
		time.Sleep(30 * time.Millisecond) // one worker, slower than the rate
	}
	last := <-done
	r := &FleetResult{Rate: 100, StartedPerS: float64(len(devs)-1) / last.Sub(start).Seconds()}
	if i != len(devs) || !r.BehindRate() {
		t.Errorf("%d devices, started at %.0f/s: behind the rate %v", i, r.StartedPerS, r.BehindRate())
	}
	if (&FleetResult{Rate: 100, StartedPerS: 96}).BehindRate() || (&FleetResult{StartedPerS: 50}).BehindRate() {
		t.Error("behind a rate it kept, or that was not set")
	}
}

// A hub connection's failure is a hub failure, whatever caused it.
func TestErrorKindHub(t *testing.T) {
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
	for err, want := range map[error]string{
		refused:                        "connection refused or reset",
		fmt.Errorf("hub: %w", refused): "hub: connection refused or reset",
		fmt.Errorf("hub: %w", errors.New("x: not authorized")): "hub: not authorized",
		fmt.Errorf("hub: %w", context.DeadlineExceeded):        "hub: timeout",
	} {
		if got := errorKind(err); got != want {
			t.Errorf("errorKind(%v) = %q, want %q", err, got, want)
		}
	}
}
