package identity

import (
	"context"
	"encoding/base64"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/config"
	"github.com/hatchery/hatchery/internal/sas"
)

const connString = "HostName=hub.example;DeviceId=dev-1;SharedAccessKey=MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="

func manual(t *testing.T) *Manager {
	cfg, err := config.FromConnectionString(connString)
	if err != nil {
		t.Fatal(err)
	}
	return &Manager{Config: cfg, StateDir: t.TempDir()}
}

func TestManualIdentityAndBackup(t *testing.T) {
	m := manual(t)
	if _, err := m.Backup(); err == nil {
		t.Fatal("a backup before provisioning")
	}
	d, err := m.Start(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if d.HubHostName != "hub.example" || d.DeviceID != "dev-1" || d.Method != "sas" {
		t.Fatalf("identity %+v", d)
	}
	b, err := m.Backup()
	if err != nil || b.DeviceID != "dev-1" {
		t.Fatalf("backup %+v %v", b, err)
	}
	// A token the signer makes verifies with the device key.
	tok, err := m.Token(d, "hub.example/devices/dev-1", time.Now().Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	p, err := sas.Parse(tok)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := base64.StdEncoding.DecodeString("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
	if err := p.Verify(time.Now(), key); err != nil {
		t.Fatal(err)
	}
	// Changed provisioning settings invalidate the backup.
	m.Config.Provisioning.ConnectionString = strings.Replace(connString, "dev-1", "dev-2", 1)
	if _, err := m.Backup(); err == nil || !strings.Contains(err.Error(), "changed") {
		t.Fatalf("backup after a settings change: %v", err)
	}
}

func TestProvisioningErrors(t *testing.T) {
	m := &Manager{Config: config.Default(), StateDir: t.TempDir()}
	if _, err := m.Provision(context.Background()); err == nil || !strings.Contains(err.Error(), "iotedge config apply") {
		t.Fatalf("no provisioning configured: %v", err)
	}
	m.Config.Provisioning = config.Provisioning{Source: config.SourceDPS, GlobalEndpoint: "https://127.0.0.1:1", IDScope: "0ne1",
		Attestation: config.Attestation{Method: config.MethodTPM, RegistrationID: "r"}}
	if _, err := m.Provision(context.Background()); err == nil || !strings.Contains(err.Error(), "TPM service") {
		t.Fatalf("TPM without the service: %v", err)
	}
	m.Config.Provisioning.Attestation = config.Attestation{Method: config.MethodSymmetricKey, RegistrationID: "r",
		SymmetricKey: config.SymmetricKey{Value: "MDEyMzQ1Njc4OWFiY2RlZg=="}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := m.Provision(ctx); err == nil || !strings.Contains(err.Error(), "unreachable") {
		t.Fatalf("DPS unreachable: %v", err)
	}
}
