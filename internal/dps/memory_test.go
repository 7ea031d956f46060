package dps

import (
	"errors"
	"fmt"
	"testing"
	"time"
)

func TestRecent(t *testing.T) {
	const recentTTL = time.Minute
	r := newRecent[int](recentTTL)
	now := time.Unix(1_800_000_000, 0)
	r.put("a", 1, now)
	if v, ok := r.get("a", now.Add(recentTTL-time.Second)); !ok || v != 1 {
		t.Fatalf("a = %d, %v", v, ok)
	}
	if _, ok := r.get("a", now.Add(recentTTL)); ok {
		t.Fatal("an entry outlived its TTL")
	}
	r.forget("a")
	if _, ok := r.get("a", now); ok {
		t.Fatal("a forgotten entry is remembered")
	}

	// Capacity: the oldest entries make room, but a key put again since
	// keeps its newer value when its old slot is reused.
	r.put("b", 1, now)
	r.put("c", 1, now)
	r.put("b", 2, now)
	for i := range recentCapacity - 1 { // up to the slot before b's newer one
		r.put(fmt.Sprint("x", i), i, now)
	}
	if _, ok := r.get("c", now); ok {
		t.Fatal("the oldest entry was kept beyond capacity")
	}
	if v, ok := r.get("b", now); !ok || v != 2 {
		t.Fatalf("b put again = %d, %v; want its newer value", v, ok)
	}
	if len(r.items) > recentCapacity {
		t.Fatalf("%d entries held, capacity %d", len(r.items), recentCapacity)
	}
}

func TestListCache(t *testing.T) {
	var c listCache[int]
	reads := 0
	read := func() ([]*int, error) {
		reads++
		if reads == 3 {
			return nil, errors.New("store down")
		}
		return []*int{&reads}, nil
	}
	for range 3 {
		if _, err := c.get(read); err != nil {
			t.Fatal(err)
		}
	}
	if reads != 1 {
		t.Fatalf("%d reads within the TTL, want 1", reads)
	}
	c.forget()
	c.get(read)
	if reads != 2 {
		t.Fatal("forget did not make the next get read")
	}
	c.forget()
	if _, err := c.get(read); err == nil {
		t.Fatal("a failed read was not reported")
	}
	if _, err := c.get(read); err != nil || reads != 4 {
		t.Fatalf("after a failed read: %v, %d reads; want a fresh read", err, reads)
	}
}

// Operations carrying large payloads or certificates are not remembered.
func TestRememberedSize(t *testing.T) {
	a := answered{op: Operation{RegistrationState: &RegistrationState{Payload: []byte(`{"a":1}`)}}}
	if !a.small() {
		t.Fatal("a small operation is not remembered")
	}
	a.op.RegistrationState.Payload = make([]byte, maxRemembered+1)
	if a.small() {
		t.Fatal("an operation with a large payload is remembered")
	}
}
