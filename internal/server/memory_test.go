package server

import (
	"context"
	"encoding/base64"
	"sync"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/store"
	"github.com/hatchery/hatchery/internal/tpm"
)

// readCounter counts a store's reads by document kind.
type readCounter struct {
	store.Store
	mu    sync.Mutex
	reads map[string]int
}

func (c *readCounter) Get(ctx context.Context, kind, id string) (store.Doc, error) {
	c.mu.Lock()
	c.reads[kind]++
	c.mu.Unlock()
	return c.Store.Get(ctx, kind, id)
}

func (c *readCounter) take() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.reads
	c.reads = map[string]int{}
	return r
}

// A TPM device's signed PUT and its poll, coming back to the replica that
// answered its previous request, are checked against what that replica
// remembers instead of documents read back from the store, and just as
// strictly: a wrong key or another device's token are refused, and after
// its enrollment is changed or its registration deleted through this
// replica, the poll is answered from the store again.
func TestRegistrationRemembersDeviceState(t *testing.T) {
	e := newEnv(t)
	st := &readCounter{Store: e.st, reads: map[string]int{}}
	svc := e.replica(t, st, e.pool())
	dev, regID, body := e.enrollSoftTPM()
	scope := svc.IDScope()
	req := dps.RegisterRequest{IDScope: scope, RegistrationID: regID, Body: []byte(body)}
	_, ch, err := svc.Register(ctx, req)
	if err != nil || ch == nil {
		t.Fatalf("challenge: %v %v", ch, err)
	}
	blob, _ := base64.StdEncoding.DecodeString(ch.AuthenticationKey)
	handle := tpm.IdentityHandle(tpm.DefaultAuthKeyIndex)
	if err := dev.ImportActivationBlob(blob, handle); err != nil {
		t.Fatal(err)
	}
	sign := func(aud string) string {
		tok, _ := sas.BuildSigned(func(d []byte) ([]byte, error) { return dev.HMAC(handle, d) }, aud, "registration", time.Now().Add(time.Minute))
		return tok
	}
	tok := sign(scope + "/registrations/" + regID)
	st.take()
	req.Authorization = tok
	op, _, err := svc.Register(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if r := st.take(); r["dps.challenge"] != 0 || r["dps.registration"] != 1 {
		t.Fatalf("signed PUT read %v: want the registration record once and no challenge", r)
	}

	poll := func(auth string) (*dps.Operation, error) {
		return svc.OperationStatus(ctx, scope, regID, op.OperationID, dps.Credentials{Authorization: auth})
	}
	got, err := poll(tok)
	if err != nil || got.Status != dps.StatusAssigned || got.RegistrationState.TPM == nil {
		t.Fatalf("poll: %+v %v", got, err)
	}
	if r := st.take(); len(r) != 0 {
		t.Fatalf("poll read %v: want nothing", r)
	}

	// Tokens the device's key did not sign, or signed for another device.
	forged := sas.Build([]byte("not the challenge key, 32 bytes!"), scope+"/registrations/"+regID, "registration", time.Now().Add(time.Minute))
	for name, auth := range map[string]string{"forged": forged, "another audience": sign(scope + "/registrations/other-device")} {
		if _, err := poll(auth); azerr.As(err).Status() != 401 {
			t.Errorf("%s token: %v, want 401", name, err)
		}
	}
	en, err := svc.GetEnrollment(ctx, regID)
	if err != nil {
		t.Fatal(err)
	}
	en.ProvisioningStatus = "disabled"
	if _, err := svc.PutEnrollment(ctx, regID, "", en); err != nil {
		t.Fatal(err)
	}
	st.take()
	if _, err := poll(tok); err != nil {
		t.Fatal(err)
	}
	if r := st.take(); r["dps.registration"] != 1 {
		t.Fatalf("poll after the enrollment changed read %v: want the registration record from the store", r)
	}
	if err := svc.DeleteRegistration(ctx, regID, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := poll(tok); azerr.As(err).Status() != 404 {
		t.Fatalf("poll after the registration was deleted: %v, want 404", err)
	}
}
