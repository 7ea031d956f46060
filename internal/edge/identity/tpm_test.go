package identity

import (
	"context"
	"encoding/base64"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/edge/config"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/hubclient"
	"github.com/hatchery/hatchery/internal/server"
	"github.com/hatchery/hatchery/internal/softtpm"
	"github.com/hatchery/hatchery/internal/store"
)

// A TPM device whose registration fails after its challenge was imported
// (here: its enrollment disabled) runs from its identity backup, whose hub
// key is back in the TPM: the tokens it signs are still the hub's. Under
// AlwaysOnStartup only a start registers again, not a reload (Resume).
func TestFailedTPMRegistrationKeepsBackupKey(t *testing.T) {
	ctx := context.Background()
	st, err := store.OpenSQLite(filepath.Join(t.TempDir(), "hatchery.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	const host = "example.com" // the httptest certificate's name
	h, err := hub.Open(ctx, st, host)
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewUnstartedServer(nil)
	ts.StartTLS()
	defer ts.Close()
	d, err := dps.Open(ctx, st, &hubclient.Pool{Local: h}, host)
	if err != nil {
		t.Fatal(err)
	}
	ts.Config.Handler = server.New(d, h, nil)
	if err := d.LinkHub(ctx, dps.LinkedHub{HostName: host, ConnectionString: h.OwnerConnectionString(), ApplyAllocationPolicy: true}); err != nil {
		t.Fatal(err)
	}

	keys, err := softtpm.NewKeys()
	if err != nil {
		t.Fatal(err)
	}
	tpm := &countingTPM{TPM: softtpm.New(keys)}
	ek, _ := tpm.EndorsementKey()
	regID := attest.RegistrationID(ek)
	enrollment := &dps.Enrollment{RegistrationID: regID, DeviceID: "edge-1",
		Attestation: dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EndorsementKey: base64.StdEncoding.EncodeToString(ek)}}}
	if _, err := d.PutEnrollment(ctx, regID, "", enrollment); err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.AutoReprovisioningMode = config.AlwaysOnStartup
	cfg.Provisioning = config.Provisioning{Source: config.SourceDPS, GlobalEndpoint: ts.URL, IDScope: d.IDScope(),
		Attestation: config.Attestation{Method: config.MethodTPM, RegistrationID: regID}}
	m := &Manager{Config: cfg, StateDir: t.TempDir(), TPM: tpm, HTTP: ts.Client()}
	accepted := func(dev *Device) error {
		tok, err := m.Token(dev, host+"/devices/edge-1", time.Now().Add(time.Minute))
		if err != nil {
			return err
		}
		_, err = h.Authenticate(ctx, hub.Ref{Device: "edge-1"}, tok, nil)
		return err
	}
	dev, err := m.Start(ctx)
	if err != nil || dev.DeviceID != "edge-1" || dev.HubKeyBlob == "" {
		t.Fatalf("first start: %+v %v", dev, err)
	}
	if err := accepted(dev); err != nil {
		t.Fatalf("the hub refuses the provisioned device's token: %v", err)
	}

	cur, err := d.GetEnrollment(ctx, regID)
	if err != nil {
		t.Fatal(err)
	}
	cur.ProvisioningStatus = "disabled"
	if _, err := d.PutEnrollment(ctx, regID, "*", cur); err != nil {
		t.Fatal(err)
	}
	// A reload resumes with the backup, without registering again.
	if dev, err := m.Resume(ctx); err != nil || dev.DeviceID != "edge-1" {
		t.Fatalf("resuming: %+v %v", dev, err)
	}
	dev, err = m.Start(ctx)
	if err == nil || !strings.Contains(err.Error(), "identity backup") || dev == nil {
		t.Fatalf("start while the registration fails: %+v %v", dev, err)
	}
	if err := accepted(dev); err != nil {
		t.Fatalf("the backup's tokens are refused after a failed registration: %v", err)
	}
	// A registration that fails before its challenge leaves the TPM alone.
	ts.Close()
	before := tpm.imports
	if dev, err := m.Start(ctx); err == nil || dev == nil || tpm.imports != before {
		t.Fatalf("start with the service gone: %+v %v; %d imports into the TPM, want none", dev, err, tpm.imports-before)
	}
}

// countingTPM counts the keys imported into the TPM.
type countingTPM struct {
	*softtpm.TPM
	imports int
}

func (c *countingTPM) ImportActivationBlob(blob []byte, handle uint32) error {
	c.imports++
	return c.TPM.ImportActivationBlob(blob, handle)
}
