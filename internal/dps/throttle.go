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
	mu     sync.Mutex // guards global
	global *ratelimit.Bucket
	perID  *ratelimit.Keyed
}

// NewThrottle allows registrationsPerSecond registrations in total (bursts
// of a second's worth) and perDevicePerSecond requests per registration ID
// (bursts of deviceBurst).
func NewThrottle(registrationsPerSecond, perDevicePerSecond float64, deviceBurst int) *Throttle {
	return &Throttle{
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
	ok, wait := t.global.Take(now, 1)
	t.mu.Unlock()
	if !ok {
		return azerr.Throttled("the provisioning service is at its registration rate limit", wait)
	}
	return nil
}

// device admits one authenticated request of regID.
func (t *Throttle) device(regID string, now time.Time) error {
	if t == nil {
		return nil
	}
	if ok, wait := t.perID.Take(regID, now, 1); !ok {
		return azerr.Throttled("registration "+regID+" sends requests too often", wait)
	}
	return nil
}
