package store

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func open(t *testing.T) *SQLite {
	s, err := OpenSQLite(filepath.Join(t.TempDir(), "h.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestDocLifecycle(t *testing.T) {
	ctx := context.Background()
	s := open(t)
	d, err := s.Create(ctx, Doc{Kind: "k", ID: "a", Body: []byte(`{"v":1}`)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(ctx, Doc{Kind: "k", ID: "a", Body: []byte(`{}`)}); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate create: %v", err)
	}
	if _, err := s.Put(ctx, Doc{Kind: "k", ID: "a", Body: []byte(`{"v":2}`)}, "stale"); !errors.Is(err, ErrPrecondition) {
		t.Fatalf("stale etag: %v", err)
	}
	if _, err := s.Put(ctx, Doc{Kind: "k", ID: "zz", Body: []byte(`{}`)}, "*"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("put * on missing: %v", err)
	}
	d2, err := s.Put(ctx, Doc{Kind: "k", ID: "a", Body: []byte(`{"v":2}`)}, d.ETag)
	if err != nil || d2.ETag == d.ETag {
		t.Fatalf("conditional put: %v %q", err, d2.ETag)
	}
	got, err := s.Get(ctx, "k", "a")
	if err != nil || string(got.Body) != `{"v":2}` || got.ETag != d2.ETag {
		t.Fatalf("get: %+v %v", got, err)
	}
	if _, err := s.Put(ctx, Doc{Kind: "k", ID: "b", Body: []byte(`{}`)}, ""); err != nil {
		t.Fatal(err)
	}
	list, _ := s.List(ctx, "k", "", 10)
	if len(list) != 2 || list[0].ID != "a" || list[1].ID != "b" {
		t.Fatalf("list: %+v", list)
	}
	if page, _ := s.List(ctx, "k", "a", 10); len(page) != 1 || page[0].ID != "b" {
		t.Fatalf("list after a: %+v", page)
	}
	if n, _ := s.Count(ctx, "k"); n != 2 {
		t.Fatalf("count %d", n)
	}
	if err := s.Delete(ctx, "k", "a", "stale"); !errors.Is(err, ErrPrecondition) {
		t.Fatalf("delete stale: %v", err)
	}
	if err := s.Delete(ctx, "k", "a", d2.ETag); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, "k", "a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after delete: %v", err)
	}
	if err := s.Delete(ctx, "k", "a", ""); !errors.Is(err, ErrNotFound) {
		t.Fatalf("delete missing: %v", err)
	}
}

// Concurrent creates of one ID: exactly one wins.
func TestCreateRace(t *testing.T) {
	s := open(t)
	var wg sync.WaitGroup
	var mu sync.Mutex
	wins := 0
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := s.Create(context.Background(), Doc{Kind: "k", ID: "x", Body: []byte(`{}`)}); err == nil {
				mu.Lock()
				wins++
				mu.Unlock()
			} else if !errors.Is(err, ErrExists) {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if wins != 1 {
		t.Fatalf("%d creates won", wins)
	}
}

func TestEvents(t *testing.T) {
	ctx := context.Background()
	s := open(t)
	for i, dev := range []string{"d1", "d2", "d1"} {
		if _, err := s.AppendEvent(ctx, Event{DeviceID: dev, Properties: map[string]string{"i": string(rune('0' + i))}, Body: []byte("x"), Enqueued: time.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	all, _ := s.Events(ctx, "", 0, 10)
	d1, _ := s.Events(ctx, "d1", 0, 10)
	if len(all) != 3 || len(d1) != 2 || d1[1].Properties["i"] != "2" {
		t.Fatalf("all=%+v d1=%+v", all, d1)
	}
	if rest, _ := s.Events(ctx, "", all[0].Seq, 10); len(rest) != 2 {
		t.Fatalf("after: %+v", rest)
	}
}
