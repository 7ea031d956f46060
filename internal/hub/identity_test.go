package hub

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/store"
)

// An identity admits only the credentials of its type: keys read back
// with a device and sent again with a new X.509 type, or sent with a
// device of type none, admit no SAS token, for the device or its modules.
func TestOnlyTheTypesCredentials(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	token := func(key, resource string) string {
		k, _ := base64.StdEncoding.DecodeString(key)
		return sas.Build(k, "hub.test/devices/"+resource, "", time.Now().Add(time.Hour))
	}
	d := newIdentity(t, s, Ref{Device: "moved"})
	newIdentity(t, s, Ref{Device: "moved", Module: "m"})
	old := d.Authentication.SymmetricKey.PrimaryKey
	if _, err := s.Authenticate(ctx, Ref{Device: "moved", Module: "m"}, token(old, "moved"), nil); err != nil {
		t.Fatalf("a device-scoped token for a module: %v", err)
	}

	tp := "0123456789abcdef0123456789abcdef01234567"
	d.Authentication.Type, d.Authentication.X509Thumbprint.PrimaryThumbprint = "selfSigned", &tp
	moved, err := s.PutIdentity(ctx, Ref{Device: "moved"}, "*", d)
	if err != nil {
		t.Fatal(err)
	}
	if k := moved.Authentication.SymmetricKey; k != (SymmetricKey{}) {
		t.Errorf("an X.509 device kept its keys: %+v", k)
	}
	for _, r := range []Ref{{Device: "moved"}, {Device: "moved", Module: "m"}} {
		if _, err := s.Authenticate(ctx, r, token(old, "moved"), nil); !azerr.HasStatus(err, 401) {
			t.Errorf("%s with the key it had before X.509: %v", r, err)
		}
	}

	key := sas.NewKey()
	if _, err := s.PutIdentity(ctx, Ref{Device: "none"}, "", &Device{Authentication: Authentication{Type: "none", SymmetricKey: SymmetricKey{key, key}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Authenticate(ctx, Ref{Device: "none"}, token(key, "none"), nil); !azerr.HasStatus(err, 401) {
		t.Errorf("a device of type none with a key sent along: %v", err)
	}

	// A record stored with keys and another type (before they were
	// dropped) admits no token either.
	if _, err := s.update(ctx, Ref{Device: "none"}, func(rec *record) error {
		rec.Device.Authentication.SymmetricKey = SymmetricKey{key, key}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Authenticate(ctx, Ref{Device: "none"}, token(key, "none"), nil); !azerr.HasStatus(err, 401) {
		t.Errorf("stored keys of a device of type none: %v", err)
	}
}

// A request with neither a token nor a certificate is told so, not that an
// empty token is malformed.
func TestNoCredentials(t *testing.T) {
	s := sqliteHub(t)
	newIdentity(t, s, Ref{Device: "d"})
	_, err := s.Authenticate(context.Background(), Ref{Device: "d"}, "", nil)
	if !azerr.HasStatus(err, 401) || !strings.Contains(err.Error(), `no client certificate and no SAS token for "d"`) {
		t.Fatalf("no credentials: %v", err)
	}
}

// A device's key signs for all its modules, so a token made with it names
// its module exactly: modules whose IDs differ by case alone stay apart
// (the edge runtime signs each module's token with the device's key). A
// key of the identity's own still admits a token lower-cased throughout,
// as Azure's documentation has clients write it.
func TestModuleIDsDifferingByCase(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	token := func(key, resource string) string {
		k, _ := base64.StdEncoding.DecodeString(key)
		return sas.Build(k, resource, "", time.Now().Add(time.Hour))
	}
	gw := newIdentity(t, s, Ref{Device: "gw"}).Authentication.SymmetricKey.PrimaryKey
	newIdentity(t, s, Ref{Device: "gw", Module: "sensor"})
	upper := newIdentity(t, s, Ref{Device: "gw", Module: "Sensor"}).Authentication.SymmetricKey.PrimaryKey
	for _, c := range []struct {
		ref      Ref
		key, aud string
		ok       bool
	}{
		{Ref{Device: "gw", Module: "sensor"}, gw, "hub.test/devices/gw/modules/sensor", true},
		{Ref{Device: "gw", Module: "Sensor"}, gw, "hub.test/devices/gw/modules/sensor", false},
		{Ref{Device: "gw", Module: "Sensor"}, gw, "HUB.test/devices/gw/modules/Sensor", true},
		{Ref{Device: "gw", Module: "Sensor"}, gw, "hub.test/devices/GW", false},
		{Ref{Device: "gw", Module: "Sensor"}, upper, "hub.test/devices/gw/modules/sensor", true},
	} {
		_, err := s.Authenticate(ctx, c.ref, token(c.key, c.aud), nil)
		if (err == nil) != c.ok {
			t.Errorf("%s with a token for %s: %v", c.ref, c.aud, err)
		}
	}
}

// Deleting a device takes its queued messages with it, so that a device
// created again under its ID does not receive them; and a twin written
// meanwhile does not make a delete without If-Match fail halfway, the
// modules gone and the device left.
func TestDeleteDevice(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	newIdentity(t, s, Ref{Device: "d"})
	if _, err := s.SendC2D(ctx, "d", nil, []byte("for the old d")); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteIdentity(ctx, Ref{Device: "d"}, ""); err != nil {
		t.Fatal(err)
	}
	newIdentity(t, s, Ref{Device: "d"})
	if msgs, err := s.PendingC2D(ctx, "d"); err != nil || len(msgs) != 0 {
		t.Fatalf("the new d's queue: %v %v", msgs, err)
	}

	// The device's document changes (a reported property) between the
	// delete reading it and deleting it.
	hooked := &beforeDelete{Store: s.store}
	s.store = hooked
	newIdentity(t, s, Ref{Device: "busy"})
	newIdentity(t, s, Ref{Device: "busy", Module: "m"})
	hooked.kind, hooked.hook = kindDevice, func() {
		if _, err := s.UpdateReported(ctx, Ref{Device: "busy"}, map[string]any{"x": 1}); err != nil {
			t.Error(err)
		}
	}
	if err := s.DeleteIdentity(ctx, Ref{Device: "busy"}, "*"); err != nil {
		t.Fatalf("deleting a device whose twin was written meanwhile: %v", err)
	}
	if _, err := s.GetIdentity(ctx, Ref{Device: "busy"}); !azerr.HasStatus(err, 404) {
		t.Fatalf("the device is still there: %v", err)
	}
}

// A device has at most MaxModules module identities, whether created one
// by one or in bulk; deleting it deletes every module it has, however many
// a store written before that limit holds, so that none comes back, keys
// and all, when the device ID is used again.
func TestModuleLimit(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	newIdentity(t, s, Ref{Device: "d"})
	for i := range MaxModules {
		newIdentity(t, s, Ref{Device: "d", Module: fmt.Sprint("m", i)})
	}
	_, err := s.PutIdentity(ctx, Ref{Device: "d", Module: "one-more"}, "", &Device{})
	if e := azerr.As(err); e.Status() != 413 || e.Name != "TooManyModulesOnDevice" || !strings.Contains(e.Message, fmt.Sprint(MaxModules)) {
		t.Fatalf("module %d: %v", MaxModules+1, err)
	}
	res, err := s.BulkIdentities(ctx, []ImportDevice{{ID: "d", Device: Device{ModuleID: "bulk"}, ImportMode: "create"}})
	if err != nil || len(res.Errors) != 1 || res.Errors[0].ErrorCode != "TooManyModulesOnDevice" {
		t.Fatalf("bulk module %d: %v %+v", MaxModules+1, err, res)
	}
	if mods, err := s.ListModules(ctx, "d"); err != nil || len(mods) != MaxModules {
		t.Fatalf("%d modules, %v", len(mods), err)
	}

	// More modules than a page of any listing, as an older store may hold.
	newIdentity(t, s, Ref{Device: "old"})
	const many = 1100
	for i := range many {
		body, _ := json.Marshal(&record{Device: Device{DeviceID: "old", ModuleID: fmt.Sprintf("m%04d", i),
			Authentication: Authentication{Type: "sas", SymmetricKey: SymmetricKey{PrimaryKey: sas.NewKey(), SecondaryKey: sas.NewKey()}}}})
		if _, err := s.store.Create(ctx, store.Doc{Kind: kindModule, ID: fmt.Sprintf("old/m%04d", i), Body: body}); err != nil {
			t.Fatal(err)
		}
	}
	if mods, err := s.ListModules(ctx, "old"); err != nil || len(mods) != many {
		t.Errorf("listed %d of %d modules: %v", len(mods), many, err)
	}
	if err := s.DeleteIdentity(ctx, Ref{Device: "old"}, ""); err != nil {
		t.Fatal(err)
	}
	newIdentity(t, s, Ref{Device: "old"})
	if mods, err := s.ListModules(ctx, "old"); err != nil || len(mods) != 0 {
		t.Fatalf("the device created again has %d modules: %v", len(mods), err)
	}
}

// beforeDelete runs hook, once, before the first deletion of a document of
// kind (of any kind, when kind is empty).
type beforeDelete struct {
	store.Store
	kind string
	hook func()
}

func (b *beforeDelete) Delete(ctx context.Context, kind, id, etag string) error {
	b.before(kind)
	return b.Store.Delete(ctx, kind, id, etag)
}

func (b *beforeDelete) DeleteTree(ctx context.Context, kind, id, etag string, under ...string) ([]store.Doc, error) {
	b.before(kind)
	return b.Store.DeleteTree(ctx, kind, id, etag, under...)
}

func (b *beforeDelete) before(kind string) {
	if (b.kind == "" || kind == b.kind) && b.hook != nil {
		h := b.hook
		b.hook = nil
		h()
	}
}

// beforeCreateUnder runs hook, once, before the first CreateUnder.
type beforeCreateUnder struct {
	store.Store
	hook func()
}

func (b *beforeCreateUnder) CreateUnder(ctx context.Context, d store.Doc, parentKind, parentID string) (store.Doc, error) {
	if h := b.hook; h != nil {
		b.hook = nil
		h()
	}
	return b.Store.CreateUnder(ctx, d, parentKind, parentID)
}

// A module or a cloud-to-device message created while its device is being
// deleted (after the create found the device, before it stored anything)
// is refused, not left for a device created again under the same ID.
func TestCreateUnderADeviceBeingDeleted(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	hooked := &beforeCreateUnder{Store: s.store}
	s.store = hooked
	for name, create := range map[string]func() error{
		"a module": func() error {
			_, err := s.PutIdentity(ctx, Ref{Device: "d", Module: "m"}, "", &Device{})
			return err
		},
		"a message": func() error {
			_, err := s.SendC2D(ctx, "d", nil, []byte("for the old d"))
			return err
		},
	} {
		newIdentity(t, s, Ref{Device: "d"})
		hooked.hook = func() {
			if err := s.DeleteIdentity(ctx, Ref{Device: "d"}, ""); err != nil {
				t.Error(err)
			}
		}
		if err := create(); !azerr.HasStatus(err, 404) {
			t.Fatalf("%s created under a device deleted meanwhile: %v", name, err)
		}
		newIdentity(t, s, Ref{Device: "d"})
		if mods, err := s.ListModules(ctx, "d"); err != nil || len(mods) != 0 {
			t.Fatalf("the new d has modules %v: %v", mods, err)
		}
		if msgs, err := s.PendingC2D(ctx, "d"); err != nil || len(msgs) != 0 {
			t.Fatalf("the new d's queue: %v %v", msgs, err)
		}
		if err := s.DeleteIdentity(ctx, Ref{Device: "d"}, ""); err != nil {
			t.Fatal(err)
		}
	}
}

// An edge device whose module identities cannot be stored is not created
// at all, so that creating it again, once the store takes writes, gives it
// its $edgeAgent and $edgeHub; a device someone else made under its ID
// meanwhile is left as it is.
func TestEdgeDeviceCreateFailingHalfway(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	st := failWrites(s.store, kindModule, "edge1/$edgeHub") // $edgeAgent is stored, $edgeHub not
	s.store = st
	edge := &Device{Capabilities: Capabilities{IoTEdge: true}}
	if _, err := s.PutIdentity(ctx, Ref{Device: "edge1"}, "", edge); err == nil {
		t.Fatal("the create succeeded without $edgeHub")
	}
	if _, err := s.GetIdentity(ctx, Ref{Device: "edge1"}); !azerr.HasStatus(err, 404) {
		t.Fatalf("the device created halfway stays: %v", err)
	}
	if _, err := st.Get(ctx, kindModule, "edge1/$edgeAgent"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("its $edgeAgent stays: %v", err)
	}
	st.failing.Store(false)
	if _, err := s.PutIdentity(ctx, Ref{Device: "edge1"}, "", edge); err != nil {
		t.Fatalf("creating it again: %v", err)
	}
	for _, m := range []string{"$edgeAgent", "$edgeHub"} {
		if _, err := s.GetIdentity(ctx, Ref{Device: "edge1", Module: m}); err != nil {
			t.Errorf("%s: %v", m, err)
		}
	}

	// Another client deletes the device and creates its own under that ID
	// while the create is under way.
	st = failWrites(st.Store, kindModule, "edge2/$edgeAgent")
	s.store = st
	other := openHub(t, st.Store)
	var theirs *Device
	st.before = func() {
		if err := other.DeleteIdentity(ctx, Ref{Device: "edge2"}, ""); err != nil {
			t.Error(err)
		}
		theirs = newIdentity(t, other, Ref{Device: "edge2"})
	}
	if _, err := s.PutIdentity(ctx, Ref{Device: "edge2"}, "", edge); err == nil {
		t.Fatal("the create succeeded without $edgeAgent")
	}
	if d, err := s.GetIdentity(ctx, Ref{Device: "edge2"}); err != nil || d.GenerationID != theirs.GenerationID {
		t.Fatalf("the device another client created meanwhile: %+v %v", d, err)
	}
}

// The undo of an edge device's failed create leaves the device, and its
// modules with it, when another client updates the device before the undo
// deletes anything: that client was told the device has its $edgeAgent
// and $edgeHub, and an edge device without them never runs.
func TestUndoneCreateKeepsTheModulesOfTheDeviceItKeeps(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	st := failWrites(s.store, kindModule, "e/$edgeHub") // $edgeAgent is stored, $edgeHub not
	bd := &beforeDelete{Store: st}
	s.store = bd
	other := openHub(t, st.Store)
	edge := &Device{Capabilities: Capabilities{IoTEdge: true}}
	bd.hook = func() {
		st.failing.Store(false)
		if _, err := other.PutIdentity(ctx, Ref{Device: "e"}, "*", edge); err != nil {
			t.Errorf("the other client's update: %v", err)
		}
	}
	if _, err := s.PutIdentity(ctx, Ref{Device: "e"}, "", edge); err == nil {
		t.Fatal("the create succeeded without $edgeHub")
	}
	if _, err := other.GetIdentity(ctx, Ref{Device: "e"}); err != nil {
		t.Fatalf("the device the other client updated: %v", err)
	}
	for _, m := range []string{"$edgeAgent", "$edgeHub"} {
		if _, err := other.GetIdentity(ctx, Ref{Device: "e", Module: m}); err != nil {
			t.Errorf("the device kept has no %s: %v", m, err)
		}
	}
}
