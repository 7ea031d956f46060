// Package ratelimit holds the token buckets that throttle devices: one
// bucket, or one per key (a registration ID, a device) that is forgotten
// once it has filled up again.
package ratelimit

import (
	"math"
	"sync"
	"time"
)

// Bucket is a token bucket; a zero rate admits everything. It is not safe
// for concurrent use: Keyed guards its own.
type Bucket struct {
	rate, burst, tokens float64
	last                time.Time
}

// NewBucket fills at rate tokens per second up to burst, and starts full.
func NewBucket(rate, burst float64) *Bucket {
	return &Bucket{rate: rate, burst: burst, tokens: burst}
}

// Take removes cost tokens if there are as many, else says how long until
// there will be.
func (b *Bucket) Take(now time.Time, cost float64) (bool, time.Duration) {
	if b.rate <= 0 {
		return true, 0
	}
	b.refill(now)
	if b.tokens >= cost {
		b.tokens -= cost
		return true, 0
	}
	return false, time.Duration((cost - b.tokens) / b.rate * float64(time.Second))
}

func (b *Bucket) refill(now time.Time) {
	if !b.last.IsZero() {
		b.tokens = math.Min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	}
	b.last = now
}

// full reports whether the bucket will have filled up by now.
func (b *Bucket) full(now time.Time) bool {
	return b.tokens+now.Sub(b.last).Seconds()*b.rate >= b.burst
}

// Keyed is a bucket per key, all of the same rate and burst.
type Keyed struct {
	rate, burst float64
	mu          sync.Mutex
	buckets     map[string]*Bucket
	swept       time.Time
}

// NewKeyed makes buckets of rate and burst for each key; a zero rate admits
// everything.
func NewKeyed(rate, burst float64) *Keyed {
	return &Keyed{rate: rate, burst: burst, buckets: map[string]*Bucket{}}
}

// Take is Bucket.Take on key's bucket.
func (k *Keyed) Take(key string, now time.Time, cost float64) (bool, time.Duration) {
	if k == nil || k.rate <= 0 {
		return true, 0
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if now.Sub(k.swept) > time.Minute {
		k.sweep(now)
	}
	b := k.buckets[key]
	if b == nil {
		b = NewBucket(k.rate, k.burst)
		k.buckets[key] = b
	}
	return b.Take(now, cost)
}

// sweep forgets buckets that have filled up again: they are as good as new.
func (k *Keyed) sweep(now time.Time) {
	k.swept = now
	for key, b := range k.buckets {
		if b.full(now) {
			delete(k.buckets, key)
		}
	}
}

// Len is how many keys have a bucket that has not filled up again.
func (k *Keyed) Len() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.buckets)
}
