package daemon

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/hatchery/hatchery/internal/atomicfile"
	"github.com/hatchery/hatchery/internal/edge/agent"
	"github.com/hatchery/hatchery/internal/edge/config"
	"github.com/hatchery/hatchery/internal/edge/identity"
	"github.com/hatchery/hatchery/internal/edge/mgmt"
	"github.com/hatchery/hatchery/internal/hubdevice"
	"github.com/hatchery/hatchery/internal/tpm"
	"github.com/hatchery/hatchery/internal/twindoc"
)

// runner is the agent with one identity.
type runner struct {
	d    *Daemon
	cfg  *config.Config
	ids  *identity.Manager
	devP atomic.Pointer[identity.Device] // read by workload requests too
	rec  *agent.Reconciler
	tls  *tls.Config
	// modKeys are the module keys of an X.509 device.
	modKeys *moduleKeys

	manifest *agent.Manifest
	// manifestErr is why the hub's desired document was rejected; nil
	// when manifest is the hub's.
	manifestErr error
	reported    []byte // last report sent
}

const (
	manifestFile = "manifest.json"
	// ownerFile names the identity (hub/device) whose deployment
	// manifestFile is, and whose environment its modules were made with.
	ownerFile = "manifest.owner"
	// stoppedFile lists the modules the runtime stopped when it shut down.
	stoppedFile = "stopped.json"
)

// run reconciles the modules, from the hub's twin when connected and from
// the last manifest when not, so modules keep running offline.
func (a *runner) run(ctx context.Context) error {
	a.manifest = a.d.savedManifest()
	a.forgetOtherOwner(ctx)
	a.resume()
	kick := make(chan struct{}, 1)
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	var hub hubConn
	retry := time.After(0)
	backoff := time.Second
	defer hub.drop()
	defer func() {
		// However the run ended (a reprovision that was waiting for DPS
		// returns the context's error), a shutdown stops the modules.
		if ctx.Err() != nil {
			a.stopModules()
		}
	}()
	for {
		a.apply(ctx, hub.client)
		select {
		case <-ctx.Done():
			return nil
		case <-a.d.reloadCh:
			return errReload
		case <-a.d.reprovCh:
			hub.drop()
			if err := a.reprovision(ctx); err != nil {
				return err
			}
			retry = time.After(0)
		case <-tick.C:
			a.d.checkEngine(ctx)
		case <-kick:
			if hub.client != nil {
				a.fetch(ctx, hub.client)
			}
		case <-hub.renew:
			slog.Info("connecting to the hub again with a new token")
			hub.drop()
			retry = time.After(0)
		case <-hub.done:
			err := hub.client.Err()
			slog.Warn("lost the connection to the hub", "error", err)
			a.d.setStatus(func(s *mgmt.Status) { s.Hub = conn(fmt.Errorf("disconnected: %v", err)) })
			hub.drop()
			retry = time.After(backoff)
		case <-retry:
			retry = nil
			c, err := a.connect(ctx, kick)
			if err != nil {
				slog.Warn("cannot connect to the hub; modules keep running", "hub", a.dev().HubHostName, "error", err)
				a.d.setStatus(func(s *mgmt.Status) { s.Hub = conn(err) })
				if why := a.reprovisionFor(err); why != "" {
					slog.Warn(why+": provisioning again", "deviceId", a.dev().DeviceID)
					if err := a.reprovision(ctx); err != nil {
						return err
					}
				}
				retry = time.After(backoff)
				backoff = min(backoff*2, time.Minute)
				continue
			}
			backoff = time.Second
			hub = hubConn{client: c, done: c.Done()}
			if a.dev().Method != "x509" {
				hub.renew = time.After(a.tokenLifetime() * 3 / 4)
			}
			a.d.setStatus(func(s *mgmt.Status) { s.Hub = conn(nil) })
			a.reported = nil // report afresh on each connection, over what the twin holds (fetch)
			a.fetch(ctx, hub.client)
		}
	}
}

// savedManifest is the last good deployment, kept for starting without the
// hub; nil if there is none.
func (d *Daemon) savedManifest() *agent.Manifest {
	raw, err := os.ReadFile(filepath.Join(d.opts.StateDir, manifestFile))
	if err != nil {
		return nil
	}
	m, err := agent.ParseManifest(raw)
	if err != nil {
		return nil
	}
	return m
}

// stopModules stops the modules as the runtime shuts down (`iotedge system
// stop`, systemd's SIGTERM), and notes which for resume, with those still
// to resume from the last shutdown. A reload does not come here: its
// modules run on.
func (a *runner) stopModules() {
	// The run's context is over; the stop has the modules' stop timeout
	// and a little more.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stopped, err := a.rec.StopAll(ctx)
	if err != nil {
		slog.Warn("stopping the modules", "error", err)
	}
	if len(stopped) > 0 {
		slog.Info("stopped the modules", "modules", stopped)
	}
	names := slices.Compact(slices.Sorted(slices.Values(append(stopped, a.d.resume...))))
	if !slices.Equal(names, a.d.resume) {
		a.d.noteResume(names)
	}
}

// resume has the reconciler start again the modules the runtime stopped
// when it last shut down, as Azure's runtime does when it starts.
func (a *runner) resume() {
	if a.d.resume == nil {
		a.d.resume = []string{}
		path := filepath.Join(a.d.opts.StateDir, stoppedFile)
		if b, err := os.ReadFile(path); err == nil {
			var names []string
			if err := json.Unmarshal(b, &names); err != nil {
				// Kept, it would be warned of at every start.
				slog.Warn("the list of the modules stopped at the last shutdown is corrupt: removing it; they start only by their restartPolicy",
					"path", path, "error", err)
				if err := os.Remove(path); err != nil {
					slog.Warn("removing a corrupt file", "path", path, "error", err)
				}
				names = nil // what it read before the error is not to be trusted either
			}
			a.d.resume = slices.Compact(slices.Sorted(slices.Values(names)))
		}
	}
	a.rec.Resume(a.d.resume...)
}

// resumed forgets, on disk too, the modules the reconciler has started
// since (or that left the deployment or were stopped by it); stoppedFile
// goes once none is left.
func (a *runner) resumed() {
	if len(a.d.resume) == 0 {
		return
	}
	if left := a.rec.Resuming(); !slices.Equal(left, a.d.resume) {
		a.d.noteResume(left)
	}
}

// noteResume keeps names as the modules to start at the next start.
func (d *Daemon) noteResume(names []string) {
	d.resume = names
	path := filepath.Join(d.opts.StateDir, stoppedFile)
	var err error
	if len(names) == 0 {
		if err = os.Remove(path); errors.Is(err, fs.ErrNotExist) {
			err = nil
		}
	} else {
		b, _ := json.Marshal(names)
		err = atomicfile.WritePrivate(path, b)
	}
	if err != nil {
		slog.Warn("noting the modules to start again at the next start: those stopped at shutdown may start only by their restartPolicy", "path", path, "error", err)
	}
}

// hubConn is the agent's connection to the hub and what ends it.
type hubConn struct {
	client *hubdevice.Client
	done   <-chan struct{}
	// renew fires for a new token before the hub ends the connection at
	// the old one's expiry.
	renew <-chan time.Time
}

// drop closes the connection, if any, with its renewal: a renewal left
// armed would close a connection that is no longer there.
func (h *hubConn) drop() {
	if h.client != nil {
		h.client.Close()
	}
	*h = hubConn{}
}

func (a *runner) tokenLifetime() time.Duration { return cmp.Or(a.d.opts.HubTokenLifetime, time.Hour) }

// connect opens the $edgeAgent session and subscribes to desired changes.
func (a *runner) connect(ctx context.Context, kick chan struct{}) (*hubdevice.Client, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	port := cmp.Or(a.d.opts.HubPort, 8883)
	a.d.setStatus(func(s *mgmt.Status) { s.HubAddress = net.JoinHostPort(a.dev().HubHostName, strconv.Itoa(port)) })
	o := hubdevice.Options{Host: a.dev().HubHostName, Port: port, DeviceID: a.dev().DeviceID, ModuleID: "$edgeAgent", TLS: a.tls,
		TokenLifetime: a.tokenLifetime(), Sign: func(aud string, exp time.Time) (string, error) { return a.ids.Token(a.dev(), aud, exp) }}
	if a.dev().Method == "x509" {
		// The device's certificate authenticates its agent.
		tlsConf, err := a.deviceTLS()
		if err != nil {
			return nil, err
		}
		o.TLS, o.Sign = tlsConf, nil
	}
	c, err := hubdevice.Dial(ctx, o)
	if err != nil {
		return nil, err
	}
	if err := c.OnDesired(ctx, func([]byte) { signal(kick) }); err != nil {
		c.Close()
		return nil, err
	}
	slog.Info("connected to the hub", "hub", a.dev().HubHostName, "deviceId", a.dev().DeviceID)
	return c, nil
}

// fetch reads the $edgeAgent twin's desired properties as the manifest.
func (a *runner) fetch(ctx context.Context, c *hubdevice.Client) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	tw, err := c.GetTwin(ctx)
	if err != nil {
		slog.Warn("reading the $edgeAgent twin", "error", err)
		return
	}
	// The next report replaces what the twin holds, so that what an agent
	// reported before a restart or a lost connection does not linger.
	if a.reported == nil {
		a.reported = withoutVersion(tw.Reported)
	}
	if rep := a.takeDesired(ctx, tw.Desired); rep != nil {
		a.report(ctx, c, rep)
	}
}

// takeDesired makes the twin's desired document the manifest, or, when it
// is rejected, keeps running the last good one and returns the report of
// the rejection; that stays the deployment's status (apply) until a valid
// document arrives.
func (a *runner) takeDesired(ctx context.Context, desired []byte) map[string]any {
	m, err := agent.ParseManifest(desired)
	if err != nil {
		var me *agent.Error
		if errors.As(err, &me) && me.Code == 417 {
			slog.Info("no deployment targets this device yet")
		} else {
			slog.Error("the deployment manifest is not valid", "error", err)
		}
		a.manifestErr = err
		return a.rec.Report(ctx, a.manifest, err)
	}
	a.manifest, a.manifestErr = m, nil
	// Kept for starting without the hub; without it, a restart while the
	// hub is away runs nothing until it is back.
	err = atomicfile.WritePrivate(filepath.Join(a.d.opts.StateDir, manifestFile), desired)
	if err == nil {
		err = atomicfile.WritePrivate(filepath.Join(a.d.opts.StateDir, ownerFile), []byte(owner(a.dev())))
	}
	if err != nil {
		slog.Warn("keeping the deployment for offline restarts", "error", err)
	}
	return nil
}

// owner names the identity modules made for dev carry in their environment.
func owner(dev *identity.Device) string { return dev.HubHostName + "/" + dev.DeviceID }

// forgetOtherOwner removes the modules and the saved deployment of an
// identity the device no longer has: one it was given while the runtime
// was stopped (a new connection string, another registration ID, a move to
// another hub under AlwaysOnStartup). Their containers carry the old
// identity, whose tokens the workload socket no longer signs.
func (a *runner) forgetOtherOwner(ctx context.Context) {
	saved, err := os.ReadFile(filepath.Join(a.d.opts.StateDir, ownerFile))
	if err != nil || string(saved) == owner(a.dev()) {
		return // none recorded (an earlier runtime's deployment): kept
	}
	slog.Info("the device's identity changed while the runtime was stopped: recreating its modules",
		"was", string(saved), "hub", a.dev().HubHostName, "deviceId", a.dev().DeviceID)
	a.forgetModules(ctx)
}

// forgetModules removes every module and the saved deployment, which the
// twin of the device's new identity replaces.
func (a *runner) forgetModules(ctx context.Context) {
	if _, err := a.rec.Apply(ctx, &agent.Manifest{Modules: map[string]*agent.Module{}}); err != nil {
		slog.Warn("removing the old identity's modules", "error", err)
	}
	a.manifest = nil
	for _, f := range []string{manifestFile, ownerFile} {
		_ = os.Remove(filepath.Join(a.d.opts.StateDir, f))
	}
}

// apply reconciles and reports what changed.
func (a *runner) apply(ctx context.Context, c *hubdevice.Client) {
	reported, err := a.rec.Apply(ctx, a.manifest)
	if err != nil {
		slog.Warn("applying the deployment", "error", err)
	}
	a.resumed()
	if a.manifestErr != nil {
		// The hub's document was rejected: that stays its status, over
		// the last good deployment's that still runs, until a valid one
		// arrives.
		reported = a.rec.Report(ctx, a.manifest, a.manifestErr)
	}
	a.d.setModules(reported)
	if c != nil {
		a.report(ctx, c, reported)
	}
}

// report sends the reported properties when they changed. What the last
// report had and this one lacks (a module that left the manifest, an error's
// description) is set to null, so that it leaves the twin too.
func (a *runner) report(ctx context.Context, c *hubdevice.Client, rep map[string]any) {
	body, _ := json.Marshal(rep)
	if bytes.Equal(body, a.reported) {
		return
	}
	var patch any = rep
	if a.reported != nil {
		var prev, now map[string]any
		_ = json.Unmarshal(a.reported, &prev)
		_ = json.Unmarshal(body, &now)
		patch = twindoc.ReplacePatch(prev, now)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := c.PatchReported(ctx, patch); err != nil {
		slog.Warn("reporting to the hub", "error", err)
		return
	}
	a.reported = body
}

// withoutVersion is a twin's reported document without its $version, as
// report compares and patches it; nil if it does not read.
func withoutVersion(reported []byte) []byte {
	var doc map[string]any
	if json.Unmarshal(reported, &doc) != nil || doc == nil {
		return nil
	}
	b, _ := json.Marshal(twindoc.WithoutMeta(doc))
	return b
}

// reprovisionFor says why a failed connection calls for provisioning
// again, or "" when it does not.
func (a *runner) reprovisionFor(err error) string {
	switch {
	case a.cfg.Provisioning.Source != config.SourceDPS:
		return ""
	case errors.Is(err, tpm.ErrNoIdentityKey):
		// In every mode: the identity backup names a key that is gone.
		return "the TPM no longer holds the device's identity key (was it cleared?)"
	case errors.Is(err, hubdevice.ErrNotAuthorized) && a.cfg.AutoReprovisioningMode == config.Dynamic:
		// The device may have been disabled or moved to another hub.
		return "the hub refused the device's identity"
	}
	return ""
}

// reprovision runs DPS again; if the identity changed, the modules are
// recreated under the new one.
func (a *runner) reprovision(ctx context.Context) error {
	old := *a.dev()
	dev, err := a.d.provision(ctx, a.ids, a.ids.Provision)
	if err != nil {
		return err
	}
	a.devP.Store(dev)
	if owner(dev) != owner(&old) {
		slog.Info("the device's identity changed: recreating its modules", "hub", dev.HubHostName, "deviceId", dev.DeviceID)
		a.forgetModules(ctx)
	}
	return nil
}

// setModules keeps the rows of `iotedge list` from a report.
func (d *Daemon) setModules(rep map[string]any) {
	var rows []mgmt.Module
	stopped := map[string]bool{}
	mods, _ := rep["modules"].(map[string]any)
	for name, v := range mods {
		m, _ := v.(map[string]any)
		if m["status"] == agent.StatusStopped {
			stopped[name] = true
		}
		image, _ := m["settings"].(map[string]any)["image"].(string)
		status, _ := m["runtimeStatus"].(string)
		desc, _ := m["statusDescription"].(string)
		rows = append(rows, mgmt.Module{Name: name, Status: status, Description: desc, Config: image})
	}
	status, _ := rep["lastDesiredStatus"].(map[string]any)
	code, _ := status["code"].(int)
	desc, _ := status["description"].(string)
	version, _ := rep["lastDesiredVersion"].(int64)
	d.mu.Lock()
	d.modules, d.stopped = rows, stopped
	d.status.Deployment = mgmt.Deployment{Version: version, Code: code, Description: desc}
	d.mu.Unlock()
}

func (a *runner) dev() *identity.Device { return a.devP.Load() }

// moduleEnv is what the Azure IoT SDKs' ModuleClient.fromEnvironment reads.
// With no local edge hub, modules reach the hub itself.
func (a *runner) moduleEnv(module string) map[string]string {
	return map[string]string{
		"IOTEDGE_IOTHUBHOSTNAME":     a.dev().HubHostName,
		"IOTEDGE_GATEWAYHOSTNAME":    a.dev().HubHostName,
		"IOTEDGE_DEVICEID":           a.dev().DeviceID,
		"IOTEDGE_MODULEID":           module,
		"IOTEDGE_MODULEGENERATIONID": "1",
		"IOTEDGE_WORKLOADURI":        "unix://" + workloadInContainer,
		"IOTEDGE_APIVERSION":         workloadAPIVersion,
		"IOTEDGE_AUTHSCHEME":         "sasToken",
	}
}

// moduleResource is the audience of a module's hub tokens.
func (a *runner) moduleResource(module string) string {
	return a.dev().HubHostName + "/devices/" + a.dev().DeviceID + "/modules/" + module
}

// signModule signs a module's token with the device's key (inside the TPM
// for TPM devices), which the hub accepts for the device's modules; an
// X.509 device has no key, so its modules sign with their own.
func (a *runner) signModule(module string, data []byte) ([]byte, error) {
	if a.dev().Method == "x509" {
		return a.modKeys.sign(module, data)
	}
	return a.ids.Signer(a.dev())(data)
}
