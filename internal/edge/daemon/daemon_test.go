package daemon

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/agent"
	"github.com/hatchery/hatchery/internal/edge/config"
	"github.com/hatchery/hatchery/internal/edge/identity"
	"github.com/hatchery/hatchery/internal/edge/moby"
)

// A connection dropped (as `iotedge system reprovision` drops it) takes its
// token renewal along: a renewal firing with no connection closed a nil
// client and took the daemon down.
func TestDroppedHubConnNeverRenews(t *testing.T) {
	h := hubConn{done: make(chan struct{}), renew: time.After(0)}
	h.drop()
	h.drop() // dropping what is already dropped is harmless
	select {
	case <-h.renew:
		t.Fatal("the renewal of a dropped connection fired")
	case <-h.done:
		t.Fatal("a dropped connection still reports its end")
	case <-time.After(50 * time.Millisecond):
	}
}

func (e *engineStub) EnsureNetwork(context.Context, string) error { return nil }

// A rejected desired document stays the deployment's status while the last
// good deployment runs on: the agent's next pass used to report that one's
// success over it. An empty document (417) is rejected as the others are.
func TestRejectedManifestStaysReported(t *testing.T) {
	good, err := agent.ParseManifest([]byte(`{"$version": 3, "schemaVersion": "1.1", "runtime": {"type": "docker", "settings": {}},
		"modules": {}}`))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		desired string
		code    int
	}{
		{`{"$version": 4, "schemaVersion": "9.0", "modules": {}}`, 412},
		{`{"$version": 4}`, 417},
	} {
		d := New(Options{})
		a := &runner{d: d, manifest: good, rec: &agent.Reconciler{Engine: &engineStub{}}}
		a.takeDesired(context.Background(), []byte(tc.desired))
		for range 2 { // the loop applies again and again
			a.apply(context.Background(), nil)
		}
		if dep := d.status.Deployment; dep.Code != tc.code || dep.Version != 4 {
			t.Errorf("%s: deployment status %+v, want the rejected document's %d for version 4", tc.desired, dep, tc.code)
		}
		if a.manifest != good {
			t.Errorf("%s: the last good deployment no longer runs", tc.desired)
		}
	}
}

// A provisioning that failed before it succeeded (as a reprovision while
// DPS is away) leaves the runtime running, not "provisioning failed".
func TestProvisionRecoversTheRunningState(t *testing.T) {
	d := New(Options{})
	ids := &identity.Manager{Config: &config.Config{}}
	tries := 0
	get := func(context.Context) (*identity.Device, error) {
		if tries++; tries == 1 {
			signal(d.reprovCh) // try again at once, not after the backoff
			return nil, errors.New("DPS is unreachable")
		}
		return &identity.Device{DeviceID: "edge-1", HubHostName: "hub.test", Provisioned: time.Now()}, nil
	}
	if _, err := d.provision(context.Background(), ids, get); err != nil {
		t.Fatal(err)
	}
	if tries != 2 || d.status.State != "running" {
		t.Errorf("after %d tries the state is %q, want running", tries, d.status.State)
	}
}

func (e *engineStub) Stop(_ context.Context, name string, _ time.Duration) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.stopped = append(e.stopped, name)
	return nil
}

// Stopping the runtime while a reprovision waits for DPS stops the modules
// as any other shutdown does, and notes them for the next start.
func TestShutdownDuringReprovisionStopsModules(t *testing.T) {
	state := t.TempDir()
	d := New(Options{StateDir: state, HubPort: 17391}) // nothing listens there
	stub := &engineStub{containers: []string{"sensor"}}
	// Provisioning is not configured: the reprovision fails and waits to retry.
	a := &runner{d: d, cfg: &config.Config{}, ids: &identity.Manager{Config: &config.Config{}, StateDir: state},
		rec: &agent.Reconciler{Engine: stub, Log: slog.New(slog.DiscardHandler)}}
	a.devP.Store(&identity.Device{DeviceID: "edge-1", HubHostName: "127.0.0.1", Method: "sas"})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	signal(d.reprovCh)
	done := make(chan error, 1)
	go func() { done <- a.run(ctx) }()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		d.mu.Lock()
		state := d.status.State
		d.mu.Unlock()
		if state == "provisioning failed" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the reprovision did not start: state %q", state)
		}
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return after the shutdown")
	}
	if stub.stoppedNames() != "sensor" {
		t.Errorf("stopped %q at the shutdown, want sensor", stub.stoppedNames())
	}
	if b, err := os.ReadFile(filepath.Join(state, stoppedFile)); err != nil || string(b) != `["sensor"]` {
		t.Errorf("%s: %s, %v; want the stopped module noted", stoppedFile, b, err)
	}
}

// The modules stopped at the last shutdown stay noted until they have been
// started: a cycle that ends before it could start them (a reload while no
// deployment is known yet) leaves them to the next, and a crash then to
// the next process.
func TestStoppedModulesKeptUntilStarted(t *testing.T) {
	state := t.TempDir()
	path := filepath.Join(state, stoppedFile)
	if err := os.WriteFile(path, []byte(`["sensor"]`), 0o600); err != nil {
		t.Fatal(err)
	}
	m, err := agent.ParseManifest([]byte(`{"$version": 3, "schemaVersion": "1.1", "runtime": {"type": "docker", "settings": {}},
		"modules": {"sensor": {"version": "1.0", "type": "docker", "status": "running", "restartPolicy": "never", "settings": {"image": "img:1"}}}}`))
	if err != nil {
		t.Fatal(err)
	}
	sensor := m.Modules["sensor"]
	// Exited cleanly when the runtime stopped it: restartPolicy never
	// leaves it so; only the resume starts it.
	stub := &engineStub{containers: []string{"sensor"}, started: map[string]bool{}, states: map[string]moby.ModuleState{
		"sensor": {Name: "sensor", State: "exited", StartedAt: time.Now().Add(-time.Hour), FinishedAt: time.Now().Add(-time.Minute),
			ConfigHash: sensor.ConfigHash(), Version: sensor.Version, HasVersion: true}}}
	d := New(Options{StateDir: state})
	cycle := func(m *agent.Manifest) {
		a := &runner{d: d, manifest: m, rec: &agent.Reconciler{Engine: stub, Log: slog.New(slog.DiscardHandler)}}
		a.resume()
		a.apply(context.Background(), nil)
	}

	cycle(nil) // no deployment known yet; then a reload
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("%s after a cycle that started nothing: %v; want it kept", stoppedFile, err)
	}
	cycle(m)
	if !stub.started["sensor"] {
		t.Error("the module stopped at the last shutdown was not started after a reload")
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s once every module in it started: %v; want it gone", stoppedFile, err)
	}
}
