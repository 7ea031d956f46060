package hub

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"testing"

	"github.com/hatchery/hatchery/internal/store"
)

// Modules and messages of deleted devices, left by earlier versions, are
// removed once; a live device's stay, and a second start does not walk.
func TestSweepLeftovers(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	st := s.store
	unrecordSweep(t, st)
	leave := func(kind, id string) {
		t.Helper()
		if _, err := st.Create(ctx, store.Doc{Kind: kind, ID: id, Body: []byte(`{}`)}); err != nil {
			t.Fatal(err)
		}
	}
	leave(kindModule, "gone/m1")
	leave(kindModule, "gone/m2")
	leave(kindC2D, "gone/msg1")
	leave(kindC2D, "zgone/msg1")
	newIdentity(t, s, Ref{Device: "live"})
	newIdentity(t, s, Ref{Device: "live", Module: "m1"})
	if _, err := s.SendC2D(ctx, "live", nil, []byte("hi")); err != nil {
		t.Fatal(err)
	}

	if err := s.sweepLeftovers(ctx); err != nil {
		t.Fatal(err)
	}
	for _, doc := range []struct{ kind, id string }{{kindModule, "gone/m1"}, {kindModule, "gone/m2"}, {kindC2D, "gone/msg1"}, {kindC2D, "zgone/msg1"}} {
		if _, err := st.Get(ctx, doc.kind, doc.id); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("leftover %s %s: %v", doc.kind, doc.id, err)
		}
	}
	if _, err := s.GetIdentity(ctx, Ref{Device: "live", Module: "m1"}); err != nil {
		t.Errorf("the live device's module: %v", err)
	}
	if msgs, err := st.List(ctx, kindC2D, "live/", 10); err != nil || len(msgs) != 1 {
		t.Errorf("the live device's messages: %d %v", len(msgs), err)
	}
	// Recorded: the next start (another replica's too) does not walk.
	leave(kindModule, "gone/m3")
	if err := openHub(t, st).sweepLeftovers(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Get(ctx, kindModule, "gone/m3"); err != nil {
		t.Errorf("a second sweep walked again: %v", err)
	}
	// The settings' policies were kept.
	if s2 := openHub(t, st); len(s2.settings.Policies) != len(s.settings.Policies) || !s2.settings.LeftoversSwept {
		t.Errorf("settings after the sweep: %+v", s2.settings)
	}
}

// listHook runs after, once, before the second listing of modules.
type listHook struct {
	store.Store
	calls int
	after func()
}

func (l *listHook) List(ctx context.Context, kind, after string, limit int) ([]store.Doc, error) {
	if kind == kindModule {
		if l.calls++; l.calls == 2 {
			l.after()
		}
	}
	return l.Store.List(ctx, kind, after, limit)
}

// A device created under a leftover's ID while the sweep walks (by a
// replica serving meanwhile) keeps the modules listed after that: the
// sweep asks again, for each, whether their device exists.
func TestSweepLeftoversSparesADeviceCreatedMeanwhile(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	st := s.store
	other := openHub(t, st)
	for i := range docPage + 1 { // two pages
		if _, err := st.Create(ctx, store.Doc{Kind: kindModule, ID: fmt.Sprintf("gone/m%04d", i), Body: []byte(`{}`)}); err != nil {
			t.Fatal(err)
		}
	}
	s.store = &listHook{Store: st, after: func() {
		newIdentity(t, other, Ref{Device: "gone"})
		newIdentity(t, other, Ref{Device: "gone", Module: "zz"})
	}}
	unrecordSweep(t, st)
	if err := s.sweepLeftovers(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := other.GetIdentity(ctx, Ref{Device: "gone", Module: "zz"}); err != nil {
		t.Errorf("the module of the device created meanwhile: %v", err)
	}
	if _, err := st.Get(ctx, kindModule, "gone/m0000"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("a leftover listed before the device came: %v", err)
	}
}

// unrecordSweep makes the hub's settings in st as an earlier version wrote
// them, without the sweep recorded, after checking that a new hub's do
// record it.
func unrecordSweep(t *testing.T, st store.Store) {
	t.Helper()
	ctx := context.Background()
	d, err := st.Get(ctx, kindSettings, "hub")
	if err != nil {
		t.Fatal(err)
	}
	var settings map[string]json.RawMessage
	if err := json.Unmarshal(d.Body, &settings); err != nil || settings[leftoversSwept] == nil {
		t.Fatalf("a new hub's settings %s do not record the sweep (%v)", d.Body, err)
	}
	delete(settings, leftoversSwept)
	d.Body, _ = json.Marshal(settings)
	if _, err := st.Put(ctx, d, d.ETag); err != nil {
		t.Fatal(err)
	}
}
