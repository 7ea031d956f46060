package ratelimit

import (
	"testing"
	"time"
)

func TestBucket(t *testing.T) {
	now := time.Now()
	b := NewBucket(1000, 2000) // bytes per second, say
	if ok, _ := b.Take(now, 1500); !ok {
		t.Fatal("a full bucket refused 1500 of 2000")
	}
	ok, wait := b.Take(now, 1000)
	if ok || wait != 500*time.Millisecond {
		t.Fatalf("500 left, 1000 asked: ok %v, wait %v; want a 500 ms wait", ok, wait)
	}
	if ok, _ := b.Take(now.Add(500*time.Millisecond), 1000); !ok {
		t.Fatal("refused after the wait it gave")
	}
	if ok, _ := NewBucket(0, 0).Take(now, 1e9); !ok {
		t.Fatal("a zero rate limits")
	}
}

func TestKeyed(t *testing.T) {
	now := time.Now()
	k := NewKeyed(1, 2)
	for range 2 {
		if ok, _ := k.Take("a", now, 1); !ok {
			t.Fatal("burst refused")
		}
	}
	if ok, _ := k.Take("a", now, 1); ok {
		t.Fatal("third in the same instant admitted")
	}
	if ok, _ := k.Take("b", now, 1); !ok {
		t.Fatal("another key shares a's bucket")
	}
	// Idle buckets are forgotten: an hour on, only the key just used has one.
	k.Take("c", now.Add(time.Hour), 1)
	if n := k.Len(); n != 1 {
		t.Fatalf("%d buckets kept after an hour idle", n)
	}
	var none *Keyed
	if ok, _ := none.Take("a", now, 1); !ok {
		t.Fatal("a nil limiter limits")
	}
}
