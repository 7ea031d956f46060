package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/agent"
	"github.com/hatchery/hatchery/internal/edge/config"
	"github.com/hatchery/hatchery/internal/edge/identity"
	"github.com/hatchery/hatchery/internal/edge/moby"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/mqtt"
	"github.com/hatchery/hatchery/internal/pki"
	"github.com/hatchery/hatchery/internal/server"
	"github.com/hatchery/hatchery/internal/store"
)

// A reprovision drops the hub connection; the token renewal armed for it
// must go with it. It used to stay armed, and when it fired while the
// agent could not connect again (here: the new identity's hub does not
// answer), the daemon closed a nil client and crashed.
func TestReprovisionDisarmsTheTokenRenewal(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir := t.TempDir()
	st, err := store.OpenSQLite(filepath.Join(dir, "hub.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	h, err := hub.Open(ctx, st, "localhost")
	if err != nil {
		t.Fatal(err)
	}
	dev, err := h.PutIdentity(ctx, hub.Ref{Device: "edge-1"}, "", &hub.Device{Capabilities: hub.Capabilities{IoTEdge: true}})
	if err != nil {
		t.Fatal(err)
	}
	files := pki.FilesIn(dir)
	if err := pki.Ensure(files, []string{"localhost"}); err != nil {
		t.Fatal(err)
	}
	cert, err := tls.LoadX509KeyPair(files.ServerCert, files.ServerKey)
	if err != nil {
		t.Fatal(err)
	}
	roots, err := pki.Pool(files.CACert)
	if err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	port := 17000 + rand.IntN(1000)
	for tries := 0; ; tries++ {
		if ln, err = tls.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{Certificates: []tls.Certificate{cert}}); err == nil {
			break
		} else if tries == 20 {
			t.Fatal(err)
		}
		port = 17000 + rand.IntN(1000)
	}
	srv := &mqtt.Server{Handler: server.NewDeviceEndpoint(h)}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()

	key := dev.Authentication.SymmetricKey.PrimaryKey
	cfg := &config.Config{Provisioning: config.Provisioning{Source: config.SourceManual,
		ConnectionString: "HostName=localhost;DeviceId=edge-1;SharedAccessKey=" + key}}
	ids := &identity.Manager{Config: cfg, StateDir: dir}
	first, err := ids.Provision(ctx)
	if err != nil {
		t.Fatal(err)
	}
	d := New(Options{StateDir: dir, HubPort: port, HubTokenLifetime: time.Second}) // renewed after 750 ms
	a := &runner{d: d, cfg: cfg, ids: ids, tls: &tls.Config{RootCAs: roots},
		rec: &agent.Reconciler{Engine: &engineStub{}, Log: slog.New(slog.DiscardHandler)}}
	a.devP.Store(first)
	done := make(chan error, 1)
	go func() { done <- a.run(ctx) }()
	connected := func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.status.Hub.OK
	}
	for deadline := time.Now().Add(10 * time.Second); !connected(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the agent did not connect to the hub")
		}
	}
	// The reprovision gives a hub that does not answer (nothing listens on
	// 127.0.0.2), so the agent stays without a connection.
	cfg.Provisioning.ConnectionString = "HostName=127.0.0.2;DeviceId=edge-1;SharedAccessKey=" + key
	signal(d.reprovCh)
	select {
	case err := <-done:
		t.Fatalf("the run ended: %v", err)
	case <-time.After(2 * time.Second): // past the renewal, which must not fire
	}
	if a.dev().HubHostName != "127.0.0.2" {
		t.Errorf("the reprovision did not happen: the hub is %s", a.dev().HubHostName)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("run: %v", err)
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

// The list of stopped modules is written at shutdown, when power may go:
// it replaces the old file rather than writing over it, and a list that
// cannot be read (torn by an earlier agent) is removed, not warned of at
// every start.
func TestStoppedFileReplacedNotOverwritten(t *testing.T) {
	state := t.TempDir()
	path := filepath.Join(state, stoppedFile)
	// Torn, or of the wrong shape (which decodes in part).
	for _, corrupt := range []string{`["sens`, `["a",1,"b"]`} {
		if err := os.WriteFile(path, []byte(corrupt), 0o600); err != nil {
			t.Fatal(err)
		}
		d := New(Options{StateDir: state})
		a := &runner{d: d, rec: &agent.Reconciler{Engine: &engineStub{}, Log: slog.New(slog.DiscardHandler)}}
		a.resume()
		if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) || len(d.resume) != 0 {
			t.Errorf("a corrupt %s (%s): %v, resuming %q; want it removed and nothing resumed", stoppedFile, corrupt, err, d.resume)
		}
	}

	// A link to the file sees no write: the file is a new one.
	old := filepath.Join(t.TempDir(), "old")
	if err := os.WriteFile(old, []byte(`["a"]`), 0o600); err != nil {
		t.Fatal(err)
	}
	os.Remove(path)
	if err := os.Link(old, path); err != nil {
		t.Fatal(err)
	}
	New(Options{StateDir: state}).noteResume([]string{"a", "b"})
	if b, err := os.ReadFile(old); err != nil || string(b) != `["a"]` {
		t.Errorf("the old %s was written over: %s, %v", stoppedFile, b, err)
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != `["a","b"]` {
		t.Errorf("%s: %s, %v", stoppedFile, b, err)
	}
	if files, _ := os.ReadDir(state); len(files) != 1 {
		t.Errorf("the state directory holds %v, want only %s", files, stoppedFile)
	}
}

// A device given another identity while the runtime was stopped does not
// start the old identity's modules again: their containers carry its hub
// and device ID, whose tokens the workload socket no longer signs. The new
// identity's twin brings the deployment back.
func TestIdentityChangedWhileStoppedRecreatesModules(t *testing.T) {
	state := t.TempDir()
	desired := []byte(`{"$version": 3, "schemaVersion": "1.1", "runtime": {"type": "docker", "settings": {}},
		"modules": {"sensor": {"version": "1.0", "type": "docker", "status": "running", "restartPolicy": "always", "settings": {"image": "img:1"}}}}`)
	d := New(Options{StateDir: state})
	stub := &engineStub{containers: []string{"sensor"}, started: map[string]bool{}}
	a := &runner{d: d, rec: &agent.Reconciler{Engine: stub, Log: slog.New(slog.DiscardHandler)}}
	a.devP.Store(&identity.Device{DeviceID: "edge-a", HubHostName: "hub.test"})
	if rep := a.takeDesired(context.Background(), desired); rep != nil {
		t.Fatalf("the deployment was rejected: %v", rep)
	}

	// The same identity keeps its deployment and its modules.
	a = &runner{d: d, rec: &agent.Reconciler{Engine: stub, Log: slog.New(slog.DiscardHandler)}}
	a.devP.Store(&identity.Device{DeviceID: "edge-a", HubHostName: "hub.test"})
	a.manifest = d.savedManifest()
	a.forgetOtherOwner(context.Background())
	if a.manifest == nil || len(stub.containers) != 1 {
		t.Fatalf("the same identity lost its deployment (%v) or modules (%v)", a.manifest, stub.containers)
	}
	// Another one does not.
	a = &runner{d: d, rec: &agent.Reconciler{Engine: stub, Log: slog.New(slog.DiscardHandler)}}
	a.devP.Store(&identity.Device{DeviceID: "edge-b", HubHostName: "hub.test"})
	a.manifest = d.savedManifest()
	a.forgetOtherOwner(context.Background())
	if a.manifest != nil || d.savedManifest() != nil || len(stub.containers) != 0 {
		t.Errorf("after the identity changed: deployment %v, saved %v, containers %v; want none", a.manifest, d.savedManifest(), stub.containers)
	}
}
