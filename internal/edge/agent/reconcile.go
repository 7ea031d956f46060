package agent

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/edge/moby"
)

// Engine is what the reconciler needs of the container engine; *moby.Engine
// has it.
type Engine interface {
	EnsureNetwork(ctx context.Context, name string) error
	List(ctx context.Context) ([]moby.ModuleState, error)
	EnsureImage(ctx context.Context, s moby.ModuleSpec, update bool) error
	Create(ctx context.Context, s moby.ModuleSpec) error
	Start(ctx context.Context, name string) error
	Stop(ctx context.Context, name string, timeout time.Duration) error
	Remove(ctx context.Context, name string) error
}

// Reconciler brings the engine to a manifest, one Apply at a time. Call
// Apply whenever the manifest changes and periodically (every few
// seconds), which is when exited modules get restarted.
type Reconciler struct {
	Engine      Engine
	Now         func() time.Time // nil: time.Now; tests move it to skip backoffs
	Network     string           // "": moby.DefaultNetwork
	StopTimeout time.Duration    // before a stop kills; 0: 10 s
	Log         *slog.Logger     // nil: slog.Default()
	// Previous is the deployment the engine's containers were made from,
	// when known (the runtime's saved one): a container made before
	// versions were labelled is at its module's version there, if the
	// configuration matches, else at the version first applied to it.
	Previous *Manifest
	// DenyElevated is config.toml's allow_elevated_docker_permissions =
	// false: modules' containers are made without the createOptions
	// HostConfig.Privileged and HostConfig.CapAdd, as Azure IoT Edge makes
	// them. Their config hash is that of what is created, so that a change
	// of the setting recreates the modules it concerns.
	DenyElevated bool

	mu      sync.Mutex
	hist    map[string]*History
	dropped map[string][]string // this Apply's modules' dropped properties, for do's warning
}

// Apply plans and carries out the changes that bring the engine to m, and
// returns the $edgeAgent reported properties afterwards. A module whose
// action fails is left for the next Apply; the others go on. A module
// whose image cannot be had keeps its container, if it has one, and its
// create or recreate waits out a backoff (History.Held), as does one
// whose container the engine would not create. The error joins this Apply's
// failures; the report has code 500 for them and for waiting recreates.
func (r *Reconciler) Apply(ctx context.Context, m *Manifest) (map[string]any, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.hist == nil {
		r.hist = map[string]*History{}
	}
	if m == nil { // no deployment yet: leave the engine alone
		return Reported(nil, nil, r.hist, nil), nil
	}
	m, r.dropped = r.effective(m)
	now := r.now()
	network := cmp.Or(r.Network, moby.DefaultNetwork)
	if err := r.Engine.EnsureNetwork(ctx, network); err != nil {
		return Reported(m, nil, r.hist, err), err
	}
	current, err := r.Engine.List(ctx)
	if err != nil {
		return Reported(m, nil, r.hist, err), err
	}

	var errs []error
	failed := map[string]bool{}
	tried := map[string]bool{} // held recreates tried again
	byName := map[string]moby.ModuleState{}
	for _, st := range current {
		byName[st.Name] = st
		if mod, ok := m.Modules[st.Name]; ok && !st.HasVersion {
			r.adopt(st, mod)
		}
	}
	acts := plan(m, current, r.hist, now)
	for i := 0; i < len(acts); i++ {
		a := acts[i]
		if failed[a.Name] {
			continue // its later steps depend on the failed one
		}
		r.log().Info("reconcile", "action", string(a.Kind), "module", a.Name, "reason", a.Reason)
		var prev *Held // do may start a new history: the hold's count must outlive it
		if a.Module != nil {
			prev = held(a.Module, r.hist[a.Name])
		}
		err := r.do(ctx, m, a, network, now)
		if err != nil {
			r.log().Error("reconcile", "action", string(a.Kind), "module", a.Name, "err", err)
			errs = append(errs, err)
		}
		var ie *imageError
		var ce *createError
		switch {
		case errors.As(err, &ie), errors.As(err, &ce):
			// After an image failure nothing was stopped: the old
			// container runs on, and is started, restarted or resumed as
			// if nothing had changed. After a create failure there is no
			// container.
			h := r.hold(m, a, prev, err, ce != nil, now)
			tried[a.Name] = true
			var then []Action // what the old container, if any, needs meanwhile
			if st, exists := byName[a.Name]; exists && ce == nil {
				then = keep(a.Module, st, h, now)
			}
			acts = replaceRest(acts, i, then)
		case err != nil:
			failed[a.Name] = true
			if a.Kind != Remove {
				r.history(a.Name).Err = err.Error()
			}
		default:
			if h := r.hist[a.Name]; h != nil {
				h.Err = ""
			}
		}
	}

	current, err = r.Engine.List(ctx)
	if err != nil {
		errs = append(errs, err)
	}
	r.settle(m, current, now)
	// A held recreate fails the deployment until it is done, but is an
	// error of Apply (which callers log) only when it was tried.
	repErrs := slices.Clone(errs)
	for _, mod := range m.Ordered() {
		if hd := held(mod, r.hist[mod.Name]); hd != nil && !tried[mod.Name] {
			repErrs = append(repErrs, errors.New(hd.Err))
		}
	}
	return Reported(m, current, r.hist, errors.Join(repErrs...)), errors.Join(errs...)
}

// hold holds back a's create or recreate, which failed with err for want
// of its image or, once it had it (pulled), in the engine's create: it is
// tried again after a backoff, not at the next pass, as each try may pull
// and logs its failure.
func (r *Reconciler) hold(m *Manifest, a Action, prev *Held, err error, pulled bool, now time.Time) *History {
	h := r.history(a.Name)
	fails, auth := 1, authKey(m, a.Module)
	if prev != nil && prev.Auth == auth {
		fails = prev.Fails + 1
	}
	h.Held = &Held{For: heldKey(a.Module), Auth: auth, Err: err.Error(), Fails: fails, Retry: now.Add(Backoff(fails - 1)), Pulled: pulled}
	h.Err = ""
	return h
}

// replaceRest replaces the actions after acts[i] for the same module,
// which depended on it, with then.
func replaceRest(acts []Action, i int, then []Action) []Action {
	j := i + 1
	for j < len(acts) && acts[j].Name == acts[i].Name {
		j++
	}
	return slices.Replace(acts, i+1, j, then...)
}

// settle brings the histories up to date after a pass, from the containers
// as they now are: restart counts reset after a long run, resumes done,
// and modules no longer desired forgotten.
func (r *Reconciler) settle(m *Manifest, current []moby.ModuleState, now time.Time) {
	for _, st := range current {
		h := r.hist[st.Name]
		if h != nil && ranLong(st, now) {
			h.Restarts = 0
		}
		if h != nil && active(st.State) {
			h.Resume = false // running again, whatever started it
		}
	}
	for name, h := range r.hist {
		mod, ok := m.Modules[name]
		switch {
		case !ok:
			delete(r.hist, name)
			continue
		case mod.Status == StatusStopped:
			h.Resume = false
		}
		if held(mod, h) == nil {
			h.Held = nil // for what is no longer desired: it starts afresh if it is again
		}
	}
}

// Report returns the reported properties for the modules of m as they run
// now, without changing anything; err is as for Reported. It is for
// reporting a rejected desired document while m, the last good manifest,
// keeps running.
func (r *Reconciler) Report(ctx context.Context, m *Manifest, err error) map[string]any {
	r.mu.Lock()
	defer r.mu.Unlock()
	if m != nil {
		m, _ = r.effective(m) // held creates are keyed on the effective config
	}
	current, lerr := r.Engine.List(ctx)
	if lerr != nil && err == nil {
		err = lerr
	}
	return Reported(m, current, r.hist, err)
}

// StopAll stops every running module, each with the stop timeout, as the
// runtime does when it shuts down; it returns those it stopped, for Resume
// after the next start.
func (r *Reconciler) StopAll(ctx context.Context) ([]string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	current, err := r.Engine.List(ctx)
	if err != nil {
		return nil, err
	}
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		stopped []string
		errs    []error
	)
	for _, st := range current {
		if !active(st.State) {
			continue
		}
		wg.Go(func() { // at once: a shutdown has a deadline, and modules are many
			err := r.Engine.Stop(ctx, st.Name, r.stopTimeout())
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
				return
			}
			stopped = append(stopped, st.Name)
		})
	}
	wg.Wait()
	slices.Sort(stopped)
	return stopped, errors.Join(errs...)
}

// Resume has the next Apply start the named modules at once, whatever
// their restartPolicy, if the deployment still wants them running: they
// are the ones StopAll stopped when the runtime last shut down.
func (r *Reconciler) Resume(names ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.hist == nil {
		r.hist = map[string]*History{}
	}
	for _, n := range names {
		r.history(n).Resume = true
	}
}

// Resuming returns, sorted, the modules given to Resume that have not been
// started since, and that the deployment still wants running.
func (r *Reconciler) Resuming() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var names []string
	for name, h := range r.hist {
		if h.Resume {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names
}

func (r *Reconciler) do(ctx context.Context, m *Manifest, a Action, network string, now time.Time) error {
	e := r.Engine
	switch a.Kind {
	case Create:
		r.warnDropped(a.Name)
		spec := r.spec(m, a.Module, network)
		if !r.pulled(m, a.Module) {
			if err := e.EnsureImage(ctx, spec, false); err != nil {
				return &imageError{err}
			}
		}
		r.hist[a.Name] = &History{}
		if err := e.Create(ctx, spec); err != nil {
			return &createError{err}
		}
		return nil
	case Recreate:
		// The new image first: a module whose new image cannot be had
		// keeps running the old one until a later Apply tries again.
		r.warnDropped(a.Name)
		spec := r.spec(m, a.Module, network)
		if err := e.EnsureImage(ctx, spec, a.Update); err != nil {
			return &imageError{err}
		}
		r.hist[a.Name] = &History{} // a new container starts a new history
		if err := e.Stop(ctx, a.Name, r.stopTimeout()); err != nil && !errors.Is(err, moby.ErrNotFound) {
			return err
		}
		if err := e.Remove(ctx, a.Name); err != nil && !errors.Is(err, moby.ErrNotFound) {
			return err
		}
		if err := e.Create(ctx, spec); err != nil {
			return &createError{err}
		}
		return nil
	case Start:
		// Recorded before the attempt: a start that fails waits out the
		// backoff too.
		h := r.history(a.Name)
		h.LastStart, h.Resume = now, false
		if a.Restart > 0 {
			h.Restarts, h.LastRestart = a.Restart, now
		}
		return e.Start(ctx, a.Name)
	case Stop:
		return e.Stop(ctx, a.Name, r.stopTimeout())
	case Remove:
		delete(r.hist, a.Name)
		// Stop first so the module gets its SIGTERM and grace time.
		if err := e.Stop(ctx, a.Name, r.stopTimeout()); err != nil && !errors.Is(err, moby.ErrNotFound) {
			return err
		}
		return e.Remove(ctx, a.Name)
	}
	return nil
}

// adopt notes the version of a container without the version label, so
// that a later new version updates it, while one made from the desired
// version is left as it is.
func (r *Reconciler) adopt(st moby.ModuleState, mod *Module) {
	h := r.history(st.Name)
	if h.HasVersion {
		return
	}
	h.Version, h.HasVersion = mod.Version, true
	if r.Previous != nil {
		if prev, ok := r.Previous.Modules[st.Name]; ok && r.unprivileged(prev).ConfigHash() == st.ConfigHash {
			h.Version = prev.Version
		}
	}
}

// elevated are the HostConfig properties DenyElevated drops: they give a
// container the host's devices or kernel capabilities.
var elevated = []string{"Privileged", "CapAdd"}

// effective returns m as its containers are made: with DenyElevated, the
// modules that ask for elevated properties are copies without them, and
// dropped names those properties by module. m itself is not changed.
func (r *Reconciler) effective(m *Manifest) (*Manifest, map[string][]string) {
	if !r.DenyElevated {
		return m, nil
	}
	var out *Manifest
	dropped := map[string][]string{}
	for name, mod := range m.Modules {
		c, d := unprivileged(mod)
		if d == nil {
			continue
		}
		if out == nil {
			cp := *m
			cp.Modules = maps.Clone(m.Modules)
			out = &cp
		}
		out.Modules[name], dropped[name] = c, d
	}
	if out == nil {
		return m, nil
	}
	return out, dropped
}

// unprivileged is mod as DenyElevated has it made.
func (r *Reconciler) unprivileged(mod *Module) *Module {
	if !r.DenyElevated {
		return mod
	}
	c, _ := unprivileged(mod)
	return c
}

// unprivileged returns mod without the elevated properties it asks for,
// and their names; mod itself and nil when it asks for none. A false
// Privileged or an empty CapAdd grants nothing and is kept, so that such
// a module is not recreated for the setting.
func unprivileged(mod *Module) (*Module, []string) {
	if len(mod.CreateOptions) == 0 {
		return mod, nil
	}
	opts, err := moby.DecodeCreateOptions(mod.CreateOptions)
	if err != nil {
		return mod, nil // the create refuses it, saying why
	}
	hc, _ := opts["HostConfig"].(map[string]any)
	var dropped []string
	for _, k := range elevated {
		switch v := hc[k].(type) {
		case nil:
			continue
		case bool:
			if !v {
				continue
			}
		case []any:
			if len(v) == 0 {
				continue
			}
		}
		delete(hc, k)
		dropped = append(dropped, k)
	}
	if dropped == nil {
		return mod, nil
	}
	b, err := json.Marshal(opts)
	if err != nil {
		return mod, nil
	}
	c := *mod
	c.CreateOptions = b
	return &c, dropped
}

// warnDropped says, at each create of a module, which of its properties
// DenyElevated dropped.
func (r *Reconciler) warnDropped(name string) {
	if d := r.dropped[name]; d != nil {
		r.log().Warn("allow_elevated_docker_permissions = false in config.toml: the module's container is created without createOptions' "+
			"HostConfig."+strings.Join(d, " and HostConfig."), "module", name)
	}
}

// imageError is a Create's or Recreate's failure to get the image, before
// it touched any container.
type imageError struct{ error }

func (e *imageError) Unwrap() error { return e.error }

// createError is a Create's or Recreate's failure to make the container
// once it had the image (a name taken by a container not the runtime's,
// createOptions the engine rejects); a Recreate's old container is gone.
type createError struct{ error }

func (e *createError) Unwrap() error { return e.error }

// pulled: mod's create is held after a failure that came after its image
// was got, one backoff ago at most, so the retry need not pull again (the
// engine's Create still pulls an image that went missing meanwhile).
func (r *Reconciler) pulled(m *Manifest, mod *Module) bool {
	hd := held(mod, r.hist[mod.Name])
	return hd != nil && hd.Pulled && hd.Auth == authKey(m, mod)
}

// spec is the container of module mod of manifest m.
func (r *Reconciler) spec(m *Manifest, mod *Module, network string) moby.ModuleSpec {
	return moby.ModuleSpec{
		Name:          mod.Name,
		Image:         mod.Image,
		CreateOptions: mod.CreateOptions,
		Env:           mod.Env,
		Network:       network,
		PullPolicy:    mod.ImagePullPolicy,
		Auth:          registryAuth(m.Runtime.RegistryCredentials, mod.Image),
		ConfigHash:    mod.ConfigHash(),
		Version:       mod.Version,
	}
}

// registryAuth picks the credentials whose address is the image's registry.
func registryAuth(creds map[string]RegistryCredential, image string) *moby.RegistryAuth {
	reg := moby.Registry(image)
	for _, name := range slices.Sorted(maps.Keys(creds)) {
		c := creds[name]
		if registryHost(c.Address) == reg {
			return &moby.RegistryAuth{Username: c.Username, Password: c.Password, Address: c.Address}
		}
	}
	return nil
}

// registryHost reduces a credential's address (which users write as a
// host, a URL or Docker Hub's index URL) to the host Registry returns.
func registryHost(addr string) string {
	addr = strings.TrimPrefix(strings.TrimPrefix(addr, "https://"), "http://")
	addr, _, _ = strings.Cut(addr, "/")
	switch addr {
	case "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com":
		return "docker.io"
	}
	return addr
}

func (r *Reconciler) history(name string) *History {
	h := r.hist[name]
	if h == nil {
		h = &History{}
		r.hist[name] = h
	}
	return h
}

func (r *Reconciler) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

func (r *Reconciler) stopTimeout() time.Duration {
	if r.StopTimeout > 0 {
		return r.StopTimeout
	}
	return 10 * time.Second
}

func (r *Reconciler) log() *slog.Logger {
	if r.Log != nil {
		return r.Log
	}
	return slog.Default()
}
