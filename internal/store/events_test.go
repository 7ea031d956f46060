package store

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Concurrent appends are batched into shared transactions: every event is
// stored once, sequence numbers are unique and increasing per appender, and
// each caller gets the sequence number its own event was stored under.
func TestAppendEventGroupCommit(t *testing.T) {
	ctx := context.Background()
	s := open(t)
	const appenders, each = 64, 100
	seqs := make([][]int64, appenders)
	var wg sync.WaitGroup
	for a := range appenders {
		wg.Go(func() {
			for i := range each {
				seq, err := s.AppendEvent(ctx, Event{DeviceID: fmt.Sprintf("d%02d", a),
					Properties: map[string]string{"i": strconv.Itoa(i)}, Body: []byte(strconv.Itoa(i)), Enqueued: time.Now()})
				if err != nil {
					t.Error(err)
					return
				}
				seqs[a] = append(seqs[a], seq)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	all, err := s.Events(ctx, "", 0, appenders*each+1)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != appenders*each {
		t.Fatalf("%d events stored, want %d", len(all), appenders*each)
	}
	bySeq := map[int64]Event{}
	for i, e := range all {
		if i > 0 && e.Seq <= all[i-1].Seq {
			t.Fatalf("events out of order: %d after %d", e.Seq, all[i-1].Seq)
		}
		bySeq[e.Seq] = e
	}
	seen := map[int64]bool{}
	for a, ss := range seqs {
		for i, seq := range ss {
			if seen[seq] {
				t.Fatalf("sequence number %d returned twice", seq)
			}
			seen[seq] = true
			if i > 0 && seq <= ss[i-1] {
				t.Fatalf("appender %d: seq %d after %d", a, seq, ss[i-1])
			}
			e, ok := bySeq[seq]
			if !ok || e.DeviceID != fmt.Sprintf("d%02d", a) || e.Properties["i"] != strconv.Itoa(i) || string(e.Body) != strconv.Itoa(i) {
				t.Fatalf("appender %d event %d: seq %d holds %+v", a, i, seq, e)
			}
		}
	}
}

// An append whose context has ended before its batch is written is not stored.
func TestAppendEventCanceled(t *testing.T) {
	s := open(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.AppendEvent(ctx, Event{DeviceID: "d", Enqueued: time.Now()}); !errors.Is(err, context.Canceled) {
		t.Fatalf("append with a canceled context: %v", err)
	}
	time.Sleep(10 * time.Millisecond) // the writer may still have the batch
	if evs, _ := s.Events(context.Background(), "", 0, 10); len(evs) != 0 {
		t.Fatalf("stored %+v", evs)
	}
}

// Close waits for queued appends; appends after Close fail.
func TestAppendEventClose(t *testing.T) {
	s := open(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			if _, err := s.AppendEvent(ctx, Event{DeviceID: "d", Enqueued: time.Now()}); err != nil && !errors.Is(err, errStoreClosed) {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.AppendEvent(ctx, Event{DeviceID: "d", Enqueued: time.Now()}); !errors.Is(err, errStoreClosed) {
		t.Fatalf("append after close: %v", err)
	}
}

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
