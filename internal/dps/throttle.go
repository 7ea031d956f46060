package dps

import (
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/ratelimit"
)

// Throttle bounds device traffic so that an overloaded or misbehaving fleet
// is told to come back later (429 with Retry-After, which the SDKs honour)
// instead of slowing everyone: registrations in total per second, and the
// authenticated requests of each registration ID. A zero rate is no limit.
type Throttle struct {
	mu     sync.Mutex // guards global and retrySlot
	global *ratelimit.Bucket
	// retrySlot is the latest time a refused registration was told to
	// come back at: each one refused is told a later one, so that they
	// return spread over time at the rate instead of all at once.
	retrySlot time.Time
	rate      float64
	perID     *ratelimit.Keyed
}

// maxRegistrationWait bounds how far ahead refused registrations are sent.
const maxRegistrationWait = time.Minute

// NewThrottle allows registrationsPerSecond registrations in total (bursts
// of a second's worth) and perDevicePerSecond requests per registration ID
// (bursts of deviceBurst).
func NewThrottle(registrationsPerSecond, perDevicePerSecond float64, deviceBurst int) *Throttle {
	return &Throttle{
		rate:   registrationsPerSecond,
		global: ratelimit.NewBucket(registrationsPerSecond, max(registrationsPerSecond, 1)),
		perID:  ratelimit.NewKeyed(perDevicePerSecond, float64(max(deviceBurst, 1))),
	}
}

// registration admits one registration attempt that will do real work: an
// authenticated one, or a challenge for an enrolled TPM.
func (t *Throttle) registration(now time.Time) error {
	if t == nil {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	ok, wait := t.global.Take(now, 1)
	if ok {
		return nil
	}
	slot := now.Add(wait)
	if !t.retrySlot.Before(slot) { // taken: the next one after it
		slot = t.retrySlot.Add(time.Duration(float64(time.Second) / t.rate))
	}
	if limit := now.Add(maxRegistrationWait); slot.After(limit) {
		slot = limit
	}
	t.retrySlot = slot
	return azerr.Throttled("the provisioning service is at its registration rate limit", t.retrySlot.Sub(now))
}

// device admits one authenticated request of regID.
func (t *Throttle) device(regID string, now time.Time) error {
	return t.take(regID, regID, now)
}

// challenge admits one request for a TPM challenge of regID. It has an
// allowance of its own: anyone who knows the TPM's public EK may spend it,
// but not the device's own, with which it answers the challenge and polls.
func (t *Throttle) challenge(regID string, now time.Time) error {
	return t.take("challenge/"+regID, regID, now) // '/' is in no registration ID
}

func (t *Throttle) take(key, regID string, now time.Time) error {
	if t == nil {
		return nil
	}
	if ok, wait := t.perID.Take(key, now, 1); !ok {
		return azerr.Throttled("registration "+regID+" sends requests too often", wait)
	}
	return nil
}
