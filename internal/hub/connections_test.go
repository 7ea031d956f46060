package hub

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/store"
)

// sqliteHub opens a hub on a new SQLite store; more replicas of it (as in
// two runs of one server) come from openHub on the same store.
func sqliteHub(t *testing.T) *Service {
	t.Helper()
	st, err := store.OpenSQLite(filepath.Join(t.TempDir(), "hatchery.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return openHub(t, st)
}

func openHub(t *testing.T, st store.Store) *Service {
	t.Helper()
	s, err := Open(context.Background(), st, "hub.test")
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func newIdentity(t *testing.T, s *Service, r Ref) *Device {
	t.Helper()
	d, err := s.PutIdentity(context.Background(), r, "", &Device{})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func connectionState(t *testing.T, s *Service, r Ref) string {
	t.Helper()
	d, err := s.GetIdentity(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	return d.ConnectionState
}

// attach connects r as a device authenticated a moment ago would be.
func attach(t *testing.T, s *Service, r Ref, drop func()) (detach func()) {
	t.Helper()
	dev, id, err := s.connecting(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	detach, err = s.Attach(context.Background(), r, grantOf(dev, id), drop)
	if err != nil {
		t.Fatal(err)
	}
	return detach
}

// dropCounter is a connection's drop function that counts its calls.
type dropCounter chan struct{}

func (d dropCounter) drop() { d <- struct{}{} }

func (d dropCounter) dropped() bool {
	select {
	case <-d:
		return true
	default:
		return false
	}
}

// An older connection closing (here, or on another replica) does not mark
// a device that has connected again as disconnected.
func TestOlderConnectionCloses(t *testing.T) {
	s := sqliteHub(t)
	r := Ref{Device: "d1"}
	newIdentity(t, s, r)
	first := attach(t, s, r, func() {})
	second := attach(t, s, r, func() {})
	first()
	if st := connectionState(t, s, r); st != "Connected" {
		t.Fatalf("after the older connection closed: %s", st)
	}
	second()
	if st := connectionState(t, s, r); st != "Disconnected" {
		t.Fatalf("after the latest connection closed: %s", st)
	}
}

// A server whose first beats could not be written (its database full or
// out of reach as it started) has not been taken for dead once it can write
// them: it keeps its connections. And its first beat that works still
// records disconnected at once the devices of the run before it.
func TestFirstBeatFailing(t *testing.T) {
	killed := sqliteHub(t)
	old := Ref{Device: "old"}
	newIdentity(t, killed, old)
	attach(t, killed, old, func() {})
	if err := (&beater{s: killed, seen: map[string]stillBeat{}}).beat(context.Background()); err != nil {
		t.Fatal(err)
	}

	s := openHub(t, killed.store)
	r := Ref{Device: "d1"}
	newIdentity(t, s, r)
	drops := make(dropCounter, 1)
	defer attach(t, s, r, drops.drop)()
	b := &beater{s: s, seen: map[string]stillBeat{}}
	failing, cancel := context.WithCancel(context.Background())
	cancel()
	if err := b.beat(failing); err == nil {
		t.Fatal("a beat with its context ended was written")
	}
	if err := b.beat(context.Background()); err != nil {
		t.Fatal(err)
	}
	if drops.dropped() {
		t.Fatal("a server whose first beat failed took itself for dead and dropped its connections")
	}
	if st := connectionState(t, s, old); st != "Disconnected" {
		t.Errorf("the previous run's device after the first beat that worked: %s", st)
	}
}

// A server killed with its devices connected leaves them recorded
// "Connected"; its next run records them disconnected at its first beat,
// and leaves alone those connected to itself. The killed one, were it to
// beat again, learns it was taken for dead and closes its connections.
func TestStoppedReplicaDisconnects(t *testing.T) {
	ctx := context.Background()
	killed := sqliteHub(t)
	d1, m1, d2 := Ref{Device: "d1"}, Ref{Device: "d1", Module: "m1"}, Ref{Device: "d2"}
	newIdentity(t, killed, d1)
	newIdentity(t, killed, m1)
	newIdentity(t, killed, d2)
	old := make(dropCounter, 10)
	attach(t, killed, d1, old.drop)
	attach(t, killed, m1, old.drop)
	oldBeat := &beater{s: killed, seen: map[string]stillBeat{}}
	if err := oldBeat.beat(ctx); err != nil {
		t.Fatal(err)
	}

	next := openHub(t, killed.store)
	defer attach(t, next, d2, func() {})()
	for _, r := range []Ref{d1, m1, d2} {
		if st := connectionState(t, next, r); st != "Connected" {
			t.Fatalf("%s before the next run's first beat: %s", r, st)
		}
	}
	if err := (&beater{s: next, seen: map[string]stillBeat{}}).beat(ctx); err != nil {
		t.Fatal(err)
	}
	for r, want := range map[Ref]string{d1: "Disconnected", m1: "Disconnected", d2: "Connected"} {
		if st := connectionState(t, next, r); st != want {
			t.Errorf("%s after the next run's first beat: %s, want %s", r, st, want)
		}
	}
	if old.dropped() {
		t.Fatal("connections dropped before their replica learnt it was taken for dead")
	}
	if err := oldBeat.beat(ctx); err != nil {
		t.Fatal(err)
	}
	for _, r := range []Ref{d1, m1} {
		if !old.dropped() {
			t.Fatalf("a replica taken for dead kept its connection of %s", r)
		}
	}
}

// What the relay would have said, a replica that missed it learns from
// the store: connections whose identity was disabled, re-keyed, deleted or
// connected elsewhere end; the others stay. Here the second replica never
// hears the first (two services on one SQLite store, as if every signal
// were lost).
func TestCatchUpAfterLostSignals(t *testing.T) {
	ctx := context.Background()
	a := sqliteHub(t)
	b := openHub(t, a.store)
	refs := map[string]Ref{"disabled": {Device: "d1"}, "rekeyed": {Device: "d2"}, "deleted": {Device: "d3"},
		"elsewhere": {Device: "d4"}, "device disabled": {Device: "d5", Module: "m"}, "kept": {Device: "d6"}, "kept module": {Device: "d6", Module: "m"},
		"device rekeyed": {Device: "d7", Module: "m"}}
	devs := map[string]*Device{}
	drops := map[string]dropCounter{}
	newIdentity(t, a, Ref{Device: "d5"}) // not connected; their modules are
	d7 := newIdentity(t, a, Ref{Device: "d7"})
	for _, modules := range []bool{false, true} {
		for name, r := range refs {
			if (r.Module != "") == modules {
				devs[name] = newIdentity(t, a, r)
			}
		}
	}
	for name, r := range refs {
		drops[name] = make(dropCounter, 1)
		attach(t, b, r, drops[name].drop)
	}
	disable := func(r Ref) {
		d, err := a.GetIdentity(ctx, r)
		if err != nil {
			t.Fatal(err)
		}
		d.Status = "disabled"
		if _, err := a.PutIdentity(ctx, r, "*", d); err != nil {
			t.Fatal(err)
		}
	}
	disable(refs["disabled"])
	disable(Ref{Device: "d5"})
	rekeyed := devs["rekeyed"]
	rekeyed.Authentication.SymmetricKey.PrimaryKey, rekeyed.Authentication.SymmetricKey.SecondaryKey = rekeyed.Authentication.SymmetricKey.SecondaryKey, rekeyed.Authentication.SymmetricKey.PrimaryKey
	if _, err := a.PutIdentity(ctx, refs["rekeyed"], "*", rekeyed); err != nil {
		t.Fatal(err)
	}
	d7.Authentication.SymmetricKey.PrimaryKey = d7.Authentication.SymmetricKey.SecondaryKey // modules may sign with it
	if _, err := a.PutIdentity(ctx, Ref{Device: "d7"}, "*", d7); err != nil {
		t.Fatal(err)
	}
	if err := a.DeleteIdentity(ctx, refs["deleted"], "*"); err != nil {
		t.Fatal(err)
	}
	attach(t, a, refs["elsewhere"], func() {})
	for name, d := range drops {
		if d.dropped() {
			t.Fatalf("%s: dropped before b caught up", name)
		}
	}

	desired := make(chan int64, 1)
	defer b.FollowDesired(refs["kept"], func(_ []byte, v int64) { desired <- v }, func() {})()
	if _, err := a.UpdateTwin(ctx, refs["kept"], "*", &TwinPatch{Properties: &DesiredPatch{Desired: map[string]any{"x": 1}}}, false); err != nil {
		t.Fatal(err)
	}
	c2d := make(chan struct{}, 1)
	defer b.WatchC2D("d6", func() { c2d <- struct{}{} })()

	b.catchUp(ctx)
	for name, d := range drops {
		if want := name != "kept" && name != "kept module"; d.dropped() != want {
			t.Errorf("%s: dropped %v, want %v", name, !want, want)
		}
	}
	select {
	case v := <-desired:
		if v != 2 {
			t.Errorf("desired $version %d after catching up, want 2", v)
		}
	case <-time.After(5 * time.Second):
		t.Error("no desired patch after catching up")
	}
	select {
	case <-c2d:
	default:
		t.Error("cloud-to-device watchers not woken when catching up")
	}
}

// What changes between a connection's authentication and its Attach —
// new keys, a disabled or deleted device — had no connection to cut off:
// Attach refuses it.
func TestAttachChecksTheGrant(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	for name, change := range map[string]func(r Ref, d *Device){
		"rekeyed": func(r Ref, d *Device) {
			d.Authentication.SymmetricKey.PrimaryKey = d.Authentication.SymmetricKey.SecondaryKey
			if _, err := s.PutIdentity(ctx, r, "*", d); err != nil {
				t.Fatal(err)
			}
		},
		"disabled": func(r Ref, d *Device) {
			d.Status = "disabled"
			if _, err := s.PutIdentity(ctx, r, "*", d); err != nil {
				t.Fatal(err)
			}
		},
		"deleted": func(r Ref, _ *Device) {
			if err := s.DeleteIdentity(ctx, r, "*"); err != nil {
				t.Fatal(err)
			}
		},
	} {
		r := Ref{Device: name}
		d := newIdentity(t, s, r)
		dev, id, err := s.connecting(ctx, r)
		if err != nil {
			t.Fatal(err)
		}
		change(r, d)
		if _, err := s.Attach(ctx, r, grantOf(dev, id), func() {}); !azerr.HasStatus(err, 401) {
			t.Errorf("%s between authentication and Attach: %v", name, err)
		}
		if name != "deleted" && connectionState(t, s, r) != "Disconnected" {
			t.Errorf("%s: the refused connection is recorded", name)
		}
	}
	// A module: its own record, and its device's.
	for name, change := range map[string]func(dev, mod Ref){
		"module rekeyed": func(_, mod Ref) {
			m, _ := s.GetIdentity(ctx, mod)
			m.Authentication.SymmetricKey.PrimaryKey = m.Authentication.SymmetricKey.SecondaryKey
			if _, err := s.PutIdentity(ctx, mod, "*", m); err != nil {
				t.Fatal(err)
			}
		},
		"device disabled": func(dev, _ Ref) {
			d, _ := s.GetIdentity(ctx, dev)
			d.Status = "disabled"
			if _, err := s.PutIdentity(ctx, dev, "*", d); err != nil {
				t.Fatal(err)
			}
		},
		"device deleted": func(dev, _ Ref) {
			if err := s.DeleteIdentity(ctx, dev, "*"); err != nil {
				t.Fatal(err)
			}
		},
	} {
		dev, mod := Ref{Device: strings.ReplaceAll(name, " ", "-")}, Ref{Device: strings.ReplaceAll(name, " ", "-"), Module: "m1"}
		newIdentity(t, s, dev)
		newIdentity(t, s, mod)
		devRec, modRec, err := s.connecting(ctx, mod)
		if err != nil {
			t.Fatal(err)
		}
		change(dev, mod)
		if _, err := s.Attach(ctx, mod, grantOf(devRec, modRec), func() {}); !azerr.HasStatus(err, 401) {
			t.Errorf("%s between the module's authentication and Attach: %v", name, err)
		}
	}
}

// grantOf is a grant of dev's and id's credentials that does not expire.
func grantOf(dev, id *record) Grant {
	return Grant{device: dev.Device.Authentication, identity: id.Device.Authentication, until: time.Now().Add(time.Hour)}
}
