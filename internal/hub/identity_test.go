package hub

import (
	"context"
	"encoding/base64"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/sas"
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
