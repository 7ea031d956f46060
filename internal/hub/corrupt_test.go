package hub

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/store"
)

// A record that cannot be decoded (damaged, or written by a version with
// looser rules) is left out of lists, queries and statistics: it alone
// fails, not the whole hub.
func TestCorruptRecordLeftOutOfLists(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	newIdentity(t, s, Ref{Device: "good"})
	if _, err := s.store.Create(ctx, store.Doc{Kind: kindDevice, ID: "bad", Body: []byte(`{"deviceId":"bad","properties":[[[`)}); err != nil {
		t.Fatal(err)
	}
	if ds, err := s.ListDevices(ctx, 100); err != nil || len(ds) != 1 || ds[0].DeviceID != "good" {
		t.Errorf("list with a corrupt record: %v %v", ds, err)
	}
	if rows, _, err := s.Query(ctx, "SELECT deviceId FROM devices", "", 100); err != nil || len(rows) != 1 {
		t.Errorf("query with a corrupt record: %v %v", rows, err)
	}
	if _, err := s.Statistics(ctx); err != nil {
		t.Errorf("statistics with a corrupt record: %v", err)
	}
	// Deleting a device deletes its corrupt modules too: they would come
	// back, keys and all, with a device made again under its ID.
	if _, err := s.store.Create(ctx, store.Doc{Kind: kindModule, ID: "good/m1", Body: []byte(`{"moduleId":`)}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteIdentity(ctx, Ref{Device: "good"}, "*"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.store.Get(ctx, kindModule, "good/m1"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("a corrupt module of a deleted device: %v, want it gone", err)
	}
}

// A corrupt record can be deleted unconditionally (If-Match: *), with what
// is under it, so that its ID can be used again; a delete on an etag, which
// nobody can have read from it, is refused.
func TestCorruptRecordDeleted(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	if _, err := s.store.Create(ctx, store.Doc{Kind: kindDevice, ID: "bad", Body: []byte(`{"deviceId":"bad","properties":[[[`)}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.store.Create(ctx, store.Doc{Kind: kindModule, ID: "bad/m1", Body: []byte(`{"moduleId":"m1"}`)}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetIdentity(ctx, Ref{Device: "bad"}); err == nil || !strings.Contains(err.Error(), "If-Match: *") {
		t.Fatalf("reading a corrupt device: %v, want it said how to delete it", err)
	}
	if err := s.DeleteIdentity(ctx, Ref{Device: "bad"}, `"some-etag"`); err == nil {
		t.Fatal("a corrupt device was deleted on an etag")
	}
	if err := s.DeleteIdentity(ctx, Ref{Device: "bad"}, "*"); err != nil {
		t.Fatalf("deleting a corrupt device unconditionally: %v", err)
	}
	for _, d := range []struct{ kind, id string }{{kindDevice, "bad"}, {kindModule, "bad/m1"}} {
		if _, err := s.store.Get(ctx, d.kind, d.id); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("%s %s after the delete: %v, want it gone", d.kind, d.id, err)
		}
	}
	newIdentity(t, s, Ref{Device: "bad"})
}
