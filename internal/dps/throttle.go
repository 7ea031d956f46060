package dps

import (
	"math"
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
)

// Throttle bounds device traffic so that an overloaded or misbehaving fleet
// is told to come back later (429 with Retry-After, which the SDKs honour)
// instead of slowing everyone: registrations in total per second, and the
// authenticated requests of each registration ID. A zero rate is no limit.
type Throttle struct {
	global  bucket
	perID   map[string]*bucket
	idRate  float64
	idBurst float64
	mu      sync.Mutex
	swept   time.Time
}

// NewThrottle allows registrationsPerSecond registrations in total (bursts
// of a second's worth) and perDevicePerSecond requests per registration ID
// (bursts of deviceBurst).
func NewThrottle(registrationsPerSecond, perDevicePerSecond float64, deviceBurst int) *Throttle {
	return &Throttle{
		global: bucket{rate: registrationsPerSecond, burst: max(registrationsPerSecond, 1), tokens: max(registrationsPerSecond, 1)},
		perID:  map[string]*bucket{}, idRate: perDevicePerSecond, idBurst: float64(max(deviceBurst, 1)),
	}
}

// bucket is a token bucket.
type bucket struct {
	rate, burst, tokens float64
	last                time.Time
}

// take removes a token if there is one, else says when there will be.
func (b *bucket) take(now time.Time) (bool, time.Duration) {
	if b.rate <= 0 {
		return true, 0
	}
	if !b.last.IsZero() {
		b.tokens = math.Min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	}
	b.last = now
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	return false, time.Duration((1 - b.tokens) / b.rate * float64(time.Second))
}

func throttled(what string, wait time.Duration) error {
	e := azerr.New(429001, "ThrottlingException", "%s: retry after %s", what, wait.Round(time.Second).String())
	e.RetryAfter = max(wait, time.Second)
	return e
}

// registration admits one registration attempt that will do real work: an
// authenticated one, or a challenge for an enrolled TPM.
func (t *Throttle) registration(now time.Time) error {
	if t == nil {
		return nil
	}
	t.mu.Lock()
	ok, wait := t.global.take(now)
	t.mu.Unlock()
	if !ok {
		return throttled("the provisioning service is at its registration rate limit", wait)
	}
	return nil
}

// device admits one authenticated request of regID.
func (t *Throttle) device(regID string, now time.Time) error {
	if t == nil || t.idRate <= 0 {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if now.Sub(t.swept) > time.Minute {
		t.sweep(now)
	}
	b := t.perID[regID]
	if b == nil {
		b = &bucket{rate: t.idRate, burst: t.idBurst, tokens: t.idBurst}
		t.perID[regID] = b
	}
	if ok, wait := b.take(now); !ok {
		return throttled("registration "+regID+" sends requests too often", wait)
	}
	return nil
}

// sweep forgets buckets that have filled up again: they are as good as new.
func (t *Throttle) sweep(now time.Time) {
	t.swept = now
	for id, b := range t.perID {
		if b.tokens+now.Sub(b.last).Seconds()*b.rate >= b.burst {
			delete(t.perID, id)
		}
	}
}
