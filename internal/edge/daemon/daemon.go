// Package daemon is the edge runtime's daemon: it reads config.toml,
// provisions the device, runs the edge agent (the $edgeAgent twin
// reconciled onto the Moby engine), serves modules their workload API
// and the CLI its management API.
package daemon

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/edge/agent"
	"github.com/hatchery/hatchery/internal/edge/config"
	"github.com/hatchery/hatchery/internal/edge/identity"
	"github.com/hatchery/hatchery/internal/edge/mgmt"
	"github.com/hatchery/hatchery/internal/edge/moby"
	"github.com/hatchery/hatchery/internal/pki"
	"github.com/hatchery/hatchery/internal/provisioning"
	"github.com/hatchery/hatchery/internal/tpm"
	"github.com/hatchery/hatchery/internal/tpmservice"
)

// Options locate the daemon's files.
type Options struct {
	ConfigPath string // /etc/aziot/config.toml
	StateDir   string // identity backup, last manifest
	RunDir     string // management and workload sockets
	// TPMSocket is aziot-tpmd's socket; empty opens the TPM in this process.
	TPMSocket string
	Logs      *LogBuffer
	Level     *slog.LevelVar
	// HubPort and HubHTTPSPort override the hub's MQTT (8883) and HTTPS
	// (443) ports, for tests.
	HubPort, HubHTTPSPort int
	// EngineOwner labels the containers this daemon owns (default "agent");
	// two runtimes sharing one engine need different owners.
	EngineOwner string
	// HubTokenLifetime is how long the agent's hub tokens last (default an
	// hour): the hub ends a connection when its token expires, so the
	// agent connects again with a new one after three quarters of it.
	HubTokenLifetime time.Duration
}

// Daemon is the running runtime.
type Daemon struct {
	opts Options

	mu      sync.Mutex
	status  mgmt.Status
	modules []mgmt.Module
	// stopped are the modules the deployment wants stopped: a restart
	// on request would only be undone by the next reconcile.
	stopped  map[string]bool
	engine   *moby.Engine
	reloadCh chan struct{}
	reprovCh chan struct{}
	stopCh   chan struct{}
	workload *workload

	// resume lists the modules the runtime stopped when it last shut down
	// and has not started since (stoppedFile); nil until read. It outlives
	// a cycle, as a reload or a cycle that ends before an Apply starts
	// them must not lose it. Only Run's goroutine uses it.
	resume []string
	// previous is the deployment saved when the process started: the one
	// that containers of an earlier agent, without version labels, were
	// made from (agent.Reconciler.Previous). Later cycles save newer ones.
	previous *agent.Manifest
	// provisioned says a cycle of this process had an identity. Only Run's
	// goroutine uses it.
	provisioned bool
}

// New makes a daemon.
func New(o Options) *Daemon {
	d := &Daemon{opts: o, reloadCh: make(chan struct{}, 1), reprovCh: make(chan struct{}, 1), stopCh: make(chan struct{}, 1)}
	d.status = mgmt.Status{State: "starting", Since: time.Now().UTC(), ConfigPath: o.ConfigPath,
		Services: []mgmt.Service{{Name: "iotedged", Status: "running"}}}
	return d
}

func (d *Daemon) setStatus(f func(s *mgmt.Status)) {
	d.mu.Lock()
	defer d.mu.Unlock()
	f(&d.status)
}

// signal wakes a loop without blocking.
func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// errReload ends a cycle so that the configuration is read again.
var errReload = errors.New("configuration reload requested")

// Run serves until ctx ends or Stop is requested.
func (d *Daemon) Run(ctx context.Context) error {
	if err := os.MkdirAll(d.opts.RunDir, 0o755); err != nil {
		return err
	}
	mgmtLn, err := listenUnix(filepath.Join(d.opts.RunDir, "mgmt.sock"), 0o660)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: d.mgmtHandler(), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(mgmtLn) }()
	defer srv.Close()
	d.workload = newWorkload(filepath.Join(d.opts.RunDir, "workload"))
	defer d.workload.close()
	d.previous = d.savedManifest()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-d.stopCh:
			cancel()
		case <-ctx.Done():
		}
	}()
	for ctx.Err() == nil {
		err := d.cycle(ctx)
		switch {
		case ctx.Err() != nil:
		case errors.Is(err, errReload):
			slog.Info("reloading the configuration", "path", d.opts.ConfigPath)
		case err != nil:
			slog.Error("the runtime cannot start", "error", err)
			d.setStatus(func(s *mgmt.Status) { s.State, s.Since = "failed: "+err.Error(), time.Now().UTC() })
			select { // wait for a fix, or retry a little later
			case <-ctx.Done():
			case <-d.reloadCh:
			case <-time.After(30 * time.Second):
			}
		}
	}
	return nil
}

// cycle runs the runtime with one reading of the configuration.
func (d *Daemon) cycle(ctx context.Context) error {
	// Only a cycle's runner connects to the hub, and its connection ends
	// with the cycle.
	notConnected := func() {
		d.setStatus(func(s *mgmt.Status) { s.Hub = mgmt.Connection{Error: "not connected", Since: time.Now().UTC()} })
	}
	notConnected()
	defer notConnected()
	cfg, warnings, err := config.Load(d.opts.ConfigPath)
	var ws []string
	for _, w := range warnings {
		slog.Warn("config", "warning", w.String())
		ws = append(ws, w.String())
	}
	d.setStatus(func(s *mgmt.Status) {
		s.Warnings, s.ConfigError = ws, ""
		if err != nil {
			s.ConfigError = err.Error()
		}
	})
	if err != nil {
		d.setStatus(func(s *mgmt.Status) { s.State, s.Since = "config error", time.Now().UTC() })
		slog.Error("configuration is not valid: fix it and run `iotedge config apply`", "error", err)
		select {
		case <-ctx.Done():
			return nil
		case <-d.reloadCh:
			return errReload
		}
	}
	if cfg.Provisioning.Source == config.SourceNone || cfg.Provisioning.Source == "" {
		d.setStatus(func(s *mgmt.Status) {
			s.State, s.Since, s.Provisioning = "not configured", time.Now().UTC(), mgmt.Provisioning{Source: "none"}
		})
		select {
		case <-ctx.Done():
			return nil
		case <-d.reloadCh:
			return errReload
		}
	}

	engine, err := moby.New(cfg.MobyRuntime.URI)
	if err != nil {
		return fmt.Errorf("moby_runtime.uri: %w", err)
	}
	if d.opts.EngineOwner != "" {
		engine.Owner = d.opts.EngineOwner
	}
	d.mu.Lock()
	d.engine = engine
	d.mu.Unlock()
	d.checkEngine(ctx)

	httpClient, tlsConf, err := trust(cfg)
	if err != nil {
		return err
	}
	ids := &identity.Manager{Config: cfg, StateDir: d.opts.StateDir, HTTP: httpClient}
	if cfg.Provisioning.Source == config.SourceDPS && cfg.Provisioning.Attestation.Method == config.MethodTPM {
		t, closeTPM, err := d.openTPM(cfg)
		d.setStatus(func(s *mgmt.Status) { s.TPM = conn(err) })
		if err != nil {
			return err
		}
		defer closeTPM()
		ids.TPM = t
	}

	d.setStatus(func(s *mgmt.Status) { s.State, s.Since = "provisioning", time.Now().UTC() })
	// AlwaysOnStartup provisions when the process starts; a reload (`iotedge
	// restart edgeAgent`, a cycle after a failed one) keeps the identity
	// while the provisioning settings do.
	start := ids.Start
	if d.provisioned {
		start = ids.Resume
	}
	dev, err := d.provision(ctx, ids, start)
	if err != nil {
		return err
	}
	d.provisioned = true
	a := &runner{d: d, cfg: cfg, ids: ids, tls: tlsConf}
	a.devP.Store(dev)
	a.modKeys = &moduleKeys{dev: a.dev, tls: a.deviceTLS, httpsPort: cmp.Or(d.opts.HubHTTPSPort, 443)}
	a.rec = &agent.Reconciler{Engine: decorated{Engine: engine, w: d.workload, env: a.moduleEnv}, Network: cfg.MobyRuntime.Network.Name,
		Previous: d.previous, DenyElevated: !cfg.AllowElevatedDockerPermissions}
	bundle, _ := os.ReadFile(config.FilePath(cfg.TrustBundleCert))
	d.workload.configure(a.signModule, a.moduleResource, bundle)
	return a.run(ctx)
}

// provision obtains the identity with get (Start or Provision), retrying
// while it fails with no backup to fall back on; the runtime is running
// again once it has one, also after `iotedge system reprovision`.
func (d *Daemon) provision(ctx context.Context, ids *identity.Manager, get func(context.Context) (*identity.Device, error)) (*identity.Device, error) {
	for wait := 5 * time.Second; ; wait = min(wait*2, 2*time.Minute) {
		asked := time.Now()
		dev, err := get(ctx)
		p := mgmt.Provisioning{Source: string(ids.Config.Provisioning.Source)}
		if dev != nil {
			p.Method, p.HubHostName, p.DeviceID, p.Provisioned = dev.Method, dev.HubHostName, dev.DeviceID, dev.Provisioned
		}
		if err != nil {
			p.Error = err.Error()
			p.FromBackup = dev != nil
			slog.Error("provisioning", "error", err)
		} else if dev.Provisioned.Before(asked) {
			slog.Info("running with the identity backup", "hub", dev.HubHostName, "deviceId", dev.DeviceID, "method", dev.Method, "provisioned", dev.Provisioned)
		} else {
			slog.Info("provisioned", "hub", dev.HubHostName, "deviceId", dev.DeviceID, "method", dev.Method)
		}
		d.setStatus(func(s *mgmt.Status) { s.Provisioning = p })
		if dev != nil {
			d.setStatus(func(s *mgmt.Status) { s.State, s.Since = "running", time.Now().UTC() })
			return dev, nil
		}
		d.setStatus(func(s *mgmt.Status) { s.State, s.Since = "provisioning failed", time.Now().UTC() })
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-d.reloadCh:
			return nil, errReload
		case <-d.reprovCh:
		case <-time.After(wait):
		}
	}
}

// openTPM reaches the TPM through aziot-tpmd, or directly when no socket
// is configured.
func (d *Daemon) openTPM(cfg *config.Config) (provisioning.TPM, func(), error) {
	if d.opts.TPMSocket != "" {
		return tpmservice.Dial(d.opts.TPMSocket), func() {}, nil
	}
	dev, err := tpm.Open(cfg.TPM.TCTI)
	if err != nil {
		return nil, nil, fmt.Errorf("opening the TPM (tpm.tcti %q): %w", cfg.TPM.TCTI, err)
	}
	return dev, func() { dev.Close() }, nil
}

func (d *Daemon) checkEngine(ctx context.Context) {
	d.mu.Lock()
	e := d.engine
	d.mu.Unlock()
	if e == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err := e.Ping(ctx)
	d.setStatus(func(s *mgmt.Status) {
		if s.Engine.OK != (err == nil) {
			s.Engine.Since = time.Now().UTC()
		}
		s.Engine.OK, s.Engine.Error = err == nil, errText(err)
	})
}

func conn(err error) mgmt.Connection {
	return mgmt.Connection{OK: err == nil, Error: errText(err), Since: time.Now().UTC()}
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// trust builds the TLS settings devices use: the system roots plus
// trust_bundle_cert.
func trust(cfg *config.Config) (*http.Client, *tls.Config, error) {
	var bundle string
	if cfg.TrustBundleCert != "" {
		bundle = config.FilePath(cfg.TrustBundleCert)
	}
	roots, err := pki.Roots(bundle)
	if err != nil {
		return nil, nil, fmt.Errorf("trust_bundle_cert: %w", err)
	}
	tlsConf := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = tlsConf
	return &http.Client{Transport: tr, Timeout: time.Minute}, tlsConf, nil
}
