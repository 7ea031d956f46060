package hubclient

import (
	"context"
	"encoding/base64"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/store"
)

// The hub of this process, reached in process, behaves as its REST API:
// a connection string it would refuse is refused; a device registering
// again keeps the secondary key the hub gave it, and its connections.
func TestLocalHubAsOverREST(t *testing.T) {
	ctx := context.Background()
	st, err := store.OpenSQLite(filepath.Join(t.TempDir(), "hatchery.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	h, err := hub.Open(ctx, st, "hub.local")
	if err != nil {
		t.Fatal(err)
	}
	p := &Pool{Local: h}
	service, _ := h.PolicyConnectionString("service")
	for name, cs := range map[string]string{
		"unknown policy":   "HostName=hub.local;SharedAccessKeyName=nobody;SharedAccessKey=" + sas.NewKey(),
		"wrong key":        "HostName=hub.local;SharedAccessKeyName=iothubowner;SharedAccessKey=" + sas.NewKey(),
		"no RegistryWrite": service,
	} {
		lh := dps.LinkedHub{HostName: "hub.local", ConnectionString: cs}
		if err := p.Check(ctx, lh); azerr.As(err).Status() != http.StatusUnauthorized {
			t.Errorf("%s: Check gave %v, want 401", name, err)
		}
		if _, err := p.UpsertDevice(ctx, lh, dps.HubDevice{DeviceID: "d0", PrimaryKey: sas.NewKey()}); azerr.As(err).Status() != http.StatusUnauthorized {
			t.Errorf("%s: UpsertDevice gave %v, want 401", name, err)
		}
	}
	if _, err := h.GetIdentity(ctx, hub.Ref{Device: "d0"}); azerr.As(err).Status() != http.StatusNotFound {
		t.Fatalf("a refused connection string created a device: %v", err)
	}
	// Twins need ServiceConnect, as over REST: a registry policy's string
	// writes devices, not their tags and desired properties.
	registry, _ := h.PolicyConnectionString("registryReadWrite")
	rw := dps.LinkedHub{HostName: "hub.local", ConnectionString: registry}
	if err := p.Check(ctx, rw); azerr.As(err).Status() != http.StatusUnauthorized {
		t.Errorf("registryReadWrite: Check gave %v, want 401", err)
	}
	if _, err := p.UpsertDevice(ctx, rw, dps.HubDevice{DeviceID: "d2", PrimaryKey: sas.NewKey()}); err != nil {
		t.Fatalf("registryReadWrite writing a device: %v", err)
	}
	if _, err := p.UpsertDevice(ctx, rw, dps.HubDevice{DeviceID: "d3", PrimaryKey: sas.NewKey(), Tags: []byte(`{"owner":"dps"}`)}); azerr.As(err).Status() != http.StatusUnauthorized {
		t.Errorf("registryReadWrite writing a new device's tags: %v, want 401", err)
	}
	if err := p.ReplaceTwin(ctx, rw, "d2", &dps.InitialTwin{Tags: []byte(`{"owner":"dps"}`)}); azerr.As(err).Status() != http.StatusUnauthorized {
		t.Errorf("registryReadWrite replacing a twin: %v, want 401", err)
	}
	if _, err := p.ReadTwin(ctx, rw, "d2"); azerr.As(err).Status() != http.StatusUnauthorized {
		t.Errorf("registryReadWrite reading a twin: %v, want 401", err)
	}
	for _, id := range []string{"d2", "d3"} {
		if tw, err := h.GetTwin(ctx, hub.Ref{Device: id}); err != nil || strings.Contains(string(tw.Tags), "dps") {
			t.Errorf("%s's twin after refused writes: %s %v", id, tw.Tags, err)
		}
	}

	lh := dps.LinkedHub{HostName: "hub.local", ConnectionString: h.OwnerConnectionString()}
	if err := p.Check(ctx, lh); err != nil {
		t.Fatal(err)
	}
	d := dps.HubDevice{DeviceID: "d1", PrimaryKey: sas.NewKey()}
	gen, err := p.UpsertDevice(ctx, lh, d)
	if err != nil {
		t.Fatal(err)
	}
	first, err := h.GetIdentity(ctx, hub.Ref{Device: "d1"})
	if err != nil {
		t.Fatal(err)
	}
	if gen == "" || gen != first.GenerationID {
		t.Fatalf("UpsertDevice gave generation ID %q, the device has %q", gen, first.GenerationID)
	}
	dropped := false
	key, _ := base64.StdEncoding.DecodeString(first.Authentication.SymmetricKey.PrimaryKey)
	grant, err := h.Authenticate(ctx, hub.Ref{Device: "d1"}, sas.Build(key, "hub.local/devices/d1", "", time.Now().Add(time.Hour)), nil)
	if err != nil {
		t.Fatal(err)
	}
	detach, err := h.Attach(ctx, hub.Ref{Device: "d1"}, grant, func() { dropped = true })
	if err != nil {
		t.Fatal(err)
	}
	defer detach()
	if again, err := p.UpsertDevice(ctx, lh, d); err != nil || again != gen {
		t.Fatalf("updating the device: generation ID %q (was %q): %v", again, gen, err)
	}
	second, err := h.GetIdentity(ctx, hub.Ref{Device: "d1"})
	if err != nil {
		t.Fatal(err)
	}
	if a, b := first.Authentication.SymmetricKey.SecondaryKey, second.Authentication.SymmetricKey.SecondaryKey; a != b || a == "" {
		t.Errorf("secondary key %q became %q when the device registered again", a, b)
	}
	if dropped {
		t.Error("registering again with the same keys cut the device's connection off")
	}
}
