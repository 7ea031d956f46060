package store

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkAppendEventParallel appends from many goroutines at once, as the
// MQTT endpoint does with thousands of devices sending telemetry.
func BenchmarkAppendEventParallel(b *testing.B) {
	s, err := OpenSQLite(b.TempDir() + "/h.db")
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	body := []byte(`{"temperature":21.5,"humidity":40,"seq":12345}`)
	props := map[string]string{"$.ct": "application/json", "$.ce": "utf-8"}
	b.SetParallelism(256)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := s.AppendEvent(ctx, Event{DeviceID: "bench-000123", Properties: props, Body: body, Enqueued: time.Now()}); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkAppendEventManyDevices is BenchmarkAppendEventParallel with the
// senders spread over 19,000 devices and 380,000 events already stored, so
// that each insert lands on its own page of the per-device index.
func BenchmarkAppendEventManyDevices(b *testing.B) {
	s, err := OpenSQLite(b.TempDir() + "/h.db")
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	const devices = 19000
	ids := make([]string, devices)
	for i := range ids {
		ids[i] = fmt.Sprintf("bench-%06d", i)
	}
	body := []byte(`{"temperature":21.5,"humidity":40,"seq":12345}`)
	props := map[string]string{"$.ct": "application/json", "$.ce": "utf-8", "benchRun": "0123456789ab"}
	var wg sync.WaitGroup
	for g := range 256 {
		wg.Go(func() {
			for i := g; i < 20*devices; i += 256 {
				if _, err := s.AppendEvent(ctx, Event{DeviceID: ids[i%devices], Properties: props, Body: body, Enqueued: time.Now()}); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	var next atomic.Int64
	b.SetParallelism(512)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			id := ids[next.Add(7919)%devices]
			if _, err := s.AppendEvent(ctx, Event{DeviceID: id, Properties: props, Body: body, Enqueued: time.Now()}); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// A batch takes at most max events, and at most maxBatchBytes of bodies,
// but always one.
func TestBatchLen(t *testing.T) {
	events := func(sizes ...int) []*pendingEvent {
		var q []*pendingEvent
		for _, n := range sizes {
			q = append(q, &pendingEvent{Event: Event{Body: make([]byte, n)}})
		}
		return q
	}
	const big = maxBatchBytes / 2
	for _, c := range []struct {
		sizes []int
		max   int
		want  int
	}{
		{[]int{1, 1, 1}, 2, 2},
		{[]int{1, 1, 1}, 10, 3},
		{[]int{big, big, 1}, 10, 2},
		{[]int{big, big + 1, 1}, 10, 1},
		{[]int{3 * big, 1}, 10, 1},
		{nil, 10, 0},
	} {
		if got := batchLen(events(c.sizes...), c.max); got != c.want {
			t.Errorf("batchLen(%v, %d) = %d, want %d", c.sizes, c.max, got, c.want)
		}
	}
}
