package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/moby"
)

// fakeEngine keeps containers in memory and records the calls made.
type fakeEngine struct {
	mu         sync.Mutex
	now        func() time.Time
	containers map[string]*moby.ModuleState
	specs      map[string]moby.ModuleSpec
	fail       map[string]error // "create c" → the error that call returns
	calls      []string
}

func newFakeEngine(now func() time.Time) *fakeEngine {
	return &fakeEngine{now: now, containers: map[string]*moby.ModuleState{}, specs: map[string]moby.ModuleSpec{}, fail: map[string]error{}}
}

func (f *fakeEngine) record(call string) error {
	f.calls = append(f.calls, call)
	return f.fail[call]
}

func (f *fakeEngine) EnsureNetwork(_ context.Context, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.record("network " + name)
}

func (f *fakeEngine) List(context.Context) ([]moby.ModuleState, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []moby.ModuleState
	for _, c := range f.containers {
		out = append(out, *c)
	}
	slices.SortFunc(out, func(a, b moby.ModuleState) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

func (f *fakeEngine) EnsureImage(_ context.Context, s moby.ModuleSpec, update bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if update {
		return f.record("pull " + s.Image + " (update)")
	}
	return f.record("pull " + s.Image)
}

func (f *fakeEngine) Create(_ context.Context, s moby.ModuleSpec) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record("create " + s.Name); err != nil {
		return err
	}
	if f.containers[s.Name] != nil {
		return fmt.Errorf("conflict: %s exists", s.Name)
	}
	f.containers[s.Name] = &moby.ModuleState{Name: s.Name, Image: s.Image, State: "created", ConfigHash: s.ConfigHash,
		Version: s.Version, HasVersion: true}
	f.specs[s.Name] = s
	return nil
}

func (f *fakeEngine) op(call, name string, change func(*moby.ModuleState)) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record(call + " " + name); err != nil {
		return err
	}
	c := f.containers[name]
	if c == nil {
		return fmt.Errorf("%s: %w", name, moby.ErrNotFound)
	}
	change(c)
	return nil
}

func (f *fakeEngine) Start(_ context.Context, name string) error {
	return f.op("start", name, func(c *moby.ModuleState) {
		if c.State != "running" {
			c.State, c.StartedAt, c.ExitCode = "running", f.now(), 0
		}
	})
}

func (f *fakeEngine) Stop(_ context.Context, name string, _ time.Duration) error {
	return f.op("stop", name, func(c *moby.ModuleState) {
		if c.State == "running" {
			c.State, c.FinishedAt = "exited", f.now()
		}
	})
}

func (f *fakeEngine) Remove(_ context.Context, name string) error {
	return f.op("remove", name, func(*moby.ModuleState) { delete(f.containers, name) })
}

// exit makes the module's process exit with code.
func (f *fakeEngine) exit(name string, code int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.containers[name]
	c.State, c.ExitCode, c.FinishedAt = "exited", code, f.now()
}

func (f *fakeEngine) takeCalls() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := strings.Join(f.calls, ", ")
	f.calls = nil
	return s
}

// reportedModule digs modules.<name> out of a report, through JSON as a
// twin would carry it.
func reportedModule(t *testing.T, rep map[string]any, name string) map[string]any {
	t.Helper()
	b, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct{ Modules map[string]map[string]any }
	json.Unmarshal(b, &doc)
	return doc.Modules[name]
}

func TestReconciler(t *testing.T) {
	clock := t0
	fe := newFakeEngine(func() time.Time { return clock })
	r := &Reconciler{Engine: fe, Now: func() time.Time { return clock }, Log: slog.New(slog.DiscardHandler)}
	ctx := context.Background()

	a := mod("a", StatusRunning, Always, 2)
	b := mod("b", StatusRunning, OnFailure, 1)
	b.Image = "myacr.azurecr.io/b:1"
	m := manifest(a, b)
	m.Runtime.RegistryCredentials = map[string]RegistryCredential{
		"hub": {Username: "u1", Password: "p1", Address: "https://index.docker.io/v1/"},
		"acr": {Username: "u2", Password: "p2", Address: "myacr.azurecr.io"},
	}

	rep, err := r.Apply(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	// Each new container's image is pulled (imagePullPolicy on-create).
	if got := fe.takeCalls(); got != "network azure-iot-edge, pull myacr.azurecr.io/b:1, create b, start b, pull img:1, create a, start a" {
		t.Errorf("calls: %s", got)
	}
	if auth := fe.specs["b"].Auth; auth == nil || auth.Username != "u2" {
		t.Errorf("b's registry credentials: %+v", auth)
	}
	if auth := fe.specs["a"].Auth; auth == nil || auth.Username != "u1" {
		t.Errorf("a (a Docker Hub image) got credentials %+v, want Docker Hub's", auth)
	}
	if rep["lastDesiredVersion"] != int64(3) || rep["lastDesiredStatus"].(map[string]any)["code"] != 200 {
		t.Errorf("report: %v", rep)
	}
	if got := reportedModule(t, rep, "a"); got["runtimeStatus"] != RuntimeRunning || got["restartCount"] != 0.0 || got["lastStartTimeUtc"] != "2025-01-01T12:00:00Z" ||
		got["settings"].(map[string]any)["image"] != "img:1" || got["status"] != "running" || got["restartPolicy"] != "always" {
		t.Errorf("module a reported: %v", got)
	}

	// b fails: it waits 10 s, then is restarted; the next wait is 20 s.
	fe.exit("b", 1)
	clock = clock.Add(9 * time.Second)
	rep, _ = r.Apply(ctx, m)
	if got := reportedModule(t, rep, "b"); got["runtimeStatus"] != RuntimeBackoff || got["exitCode"] != 1.0 || fe.takeCalls() != "network azure-iot-edge" {
		t.Errorf("b during backoff: %v", got)
	}
	clock = clock.Add(time.Second)
	rep, _ = r.Apply(ctx, m)
	if got := reportedModule(t, rep, "b"); got["runtimeStatus"] != RuntimeRunning || got["restartCount"] != 1.0 || got["lastRestartTimeUtc"] != "2025-01-01T12:00:10Z" {
		t.Errorf("b after its restart: %v", got)
	}
	fe.exit("b", 1)
	clock = clock.Add(19 * time.Second)
	r.Apply(ctx, m)
	clock = clock.Add(time.Second)
	rep, _ = r.Apply(ctx, m)
	if got := fe.takeCalls(); !strings.HasSuffix(got, "start b") || reportedModule(t, rep, "b")["restartCount"] != 2.0 {
		t.Errorf("second restart: calls %s, report %v", got, reportedModule(t, rep, "b"))
	}

	// A module that cannot be created is reported failed, and the others
	// carry on; it is retried after a backoff, without pulling again.
	c := mod("c", StatusRunning, Always, 0)
	m = manifest(a, b, c)
	fe.fail["create c"] = errors.New("module c: pulling image img:1 from registry docker.io: no route")
	rep, err = r.Apply(ctx, m)
	if err == nil || rep["lastDesiredStatus"].(map[string]any)["code"] != 500 {
		t.Errorf("failed create: %v, %v", err, rep["lastDesiredStatus"])
	}
	if got := reportedModule(t, rep, "c"); got["runtimeStatus"] != RuntimeFailed || !strings.Contains(got["statusDescription"].(string), "no route") {
		t.Errorf("c: %v", got)
	}
	delete(fe.fail, "create c")
	fe.takeCalls()
	rep, _ = r.Apply(ctx, m)
	if got := fe.takeCalls(); strings.Contains(got, " c") || reportedModule(t, rep, "c")["runtimeStatus"] != RuntimeFailed {
		t.Errorf("c during its backoff: calls %s, %v", got, reportedModule(t, rep, "c"))
	}
	clock = clock.Add(BackoffBase)
	rep, err = r.Apply(ctx, m)
	if got := reportedModule(t, rep, "c"); err != nil || got["runtimeStatus"] != RuntimeRunning || got["statusDescription"] != "running" {
		t.Errorf("c retried: %v, %v", err, got)
	}
	if got := fe.takeCalls(); got != "network azure-iot-edge, create c, start c" {
		t.Errorf("c retried: calls %s", got)
	}

	// A new version whose image cannot be pulled leaves the module running
	// the old one; once it can be, the module is recreated with it.
	a.Version = "2"
	fe.fail["pull img:1 (update)"] = errors.New("pulling image img:1 from registry docker.io: no route")
	rep, err = r.Apply(ctx, m)
	if got := fe.takeCalls(); err == nil || got != "network azure-iot-edge, pull img:1 (update)" || fe.containers["a"].State != "running" || fe.containers["a"].Version != "" {
		t.Errorf("a new version that cannot be pulled: %v; calls %s; a %+v", err, got, fe.containers["a"])
	}
	if st := rep["lastDesiredStatus"].(map[string]any); st["code"] != 500 {
		t.Errorf("the failed pull's report: %v", st)
	}
	delete(fe.fail, "pull img:1 (update)")
	clock = clock.Add(BackoffBase) // the pull is tried again after a backoff
	if _, err = r.Apply(ctx, m); err != nil || fe.containers["a"].Version != "2" {
		t.Errorf("a once its image can be pulled: %v; %+v", err, fe.containers["a"])
	}
	if got := fe.takeCalls(); got != "network azure-iot-edge, pull img:1 (update), stop a, remove a, create a, start a" {
		t.Errorf("recreating a: calls %s", got)
	}
	// A new image with a new version may be a copy the engine has.
	a.Image, a.Version = "img:2", "3"
	if _, err = r.Apply(ctx, m); err != nil || fe.containers["a"].Image != "img:2" {
		t.Errorf("a new image: %v; %+v", err, fe.containers["a"])
	}
	if got := fe.takeCalls(); got != "network azure-iot-edge, pull img:2, stop a, remove a, create a, start a" {
		t.Errorf("recreating a with a new image: calls %s", got)
	}

	// Taken out of the deployment: stopped, removed, forgotten.
	m = manifest(a, c)
	rep, err = r.Apply(ctx, m)
	if got := fe.takeCalls(); err != nil || got != "network azure-iot-edge, stop b, remove b" {
		t.Errorf("removing b: %v; calls %s", err, got)
	}
	if reportedModule(t, rep, "b") != nil || r.hist["b"] != nil {
		t.Errorf("b is still reported or remembered")
	}

	// A rejected document is reported against its own $version, with the
	// modules of the manifest still applied.
	_, perr := ParseManifest([]byte(`{"$version": 9, "schemaVersion": "1.5"}`))
	rep = r.Report(ctx, m, perr)
	if st := rep["lastDesiredStatus"].(map[string]any); rep["lastDesiredVersion"] != int64(9) || st["code"] != 412 || !strings.Contains(st["description"].(string), "1.5") {
		t.Errorf("rejected document: %v", rep)
	}
	if got := reportedModule(t, rep, "a"); got["runtimeStatus"] != RuntimeRunning {
		t.Errorf("module a in the report of a rejected document: %v", got)
	}
}

func TestReportedShape(t *testing.T) {
	rep := Reported(nil, nil, nil, nil)
	if rep["lastDesiredStatus"].(map[string]any)["code"] != 417 {
		t.Errorf("no deployment: %v", rep)
	}
	b, _ := json.Marshal(Reported(&Manifest{SchemaVersion: "1.1", Version: 5, SystemModules: map[string]*Module{
		"edgeAgent": {Name: "edgeAgent", Image: "agent:1"}, "edgeHub": {Name: "edgeHub", Image: "hub:1", Status: "running", RestartPolicy: "always"},
	}, Runtime: Runtime{RegistryCredentials: map[string]RegistryCredential{"r": {"u", "secret-password", "r.io"}}}}, nil, nil, nil))
	var doc map[string]any
	json.Unmarshal(b, &doc)
	for _, key := range []string{"schemaVersion", "version", "lastDesiredVersion", "lastDesiredStatus", "runtime", "systemModules", "modules"} {
		if _, ok := doc[key]; !ok {
			t.Errorf("report lacks %s: %s", key, b)
		}
	}
	if strings.Contains(string(b), "secret-password") {
		t.Errorf("report leaks registry credentials: %s", b)
	}
	if !strings.Contains(string(b), `"platform":{"architecture":`) || !strings.Contains(string(b), `"edgeAgent":{"runtimeStatus":"running"`) {
		t.Errorf("report: %s", b)
	}
}

// The runtime stops its modules when it shuts down and starts them again
// when it starts, whatever their restartPolicy (never here) and without a
// restart's backoff; a module the deployment stopped meanwhile stays so.
func TestStopAllAndResume(t *testing.T) {
	clock := t0
	fe := newFakeEngine(func() time.Time { return clock })
	r := &Reconciler{Engine: fe, Now: func() time.Time { return clock }, Log: slog.New(slog.DiscardHandler)}
	ctx := context.Background()
	a, b, c := mod("a", StatusRunning, Never, 0), mod("b", StatusRunning, OnFailure, 0), mod("c", StatusStopped, Always, 0)
	m := manifest(a, b, c)
	if _, err := r.Apply(ctx, m); err != nil {
		t.Fatal(err)
	}
	stopped, err := r.StopAll(ctx)
	if err != nil || strings.Join(stopped, ",") != "a,b" {
		t.Fatalf("StopAll: %v, %v; want a and b (c never ran)", stopped, err)
	}
	for _, n := range stopped {
		if st := fe.containers[n].State; st != "exited" {
			t.Errorf("%s after StopAll: %s", n, st)
		}
	}

	// The next start: a new reconciler, as in a new process.
	clock = clock.Add(time.Second)
	r = &Reconciler{Engine: fe, Now: func() time.Time { return clock }, Log: slog.New(slog.DiscardHandler)}
	r.Resume(stopped...)
	// No deployment yet (offline, none kept): both are still to resume.
	if _, err := r.Apply(ctx, nil); err != nil || strings.Join(r.Resuming(), ",") != "a,b" {
		t.Errorf("resuming without a deployment: %v, %v; want a and b", r.Resuming(), err)
	}
	b.Status = StatusStopped
	fe.takeCalls()
	if _, err := r.Apply(ctx, manifest(a, b, c)); err != nil {
		t.Fatal(err)
	}
	if got := fe.takeCalls(); got != "network azure-iot-edge, start a" {
		t.Errorf("calls after the restart: %s, want a started and b (now stopped) left", got)
	}
	if left := r.Resuming(); len(left) != 0 {
		t.Errorf("still to resume: %v, want none (a started, b stopped by the deployment)", left)
	}
	fe.exit("a", 0)
	if _, err := r.Apply(ctx, manifest(a, b, c)); err != nil || fe.containers["a"].State != "exited" {
		t.Errorf("a resumed once, then kept to restartPolicy never: %v, %s", err, fe.containers["a"].State)
	}
}

// A module whose new version cannot be pulled keeps its old container, which
// restartPolicy still restarts and a restart of the runtime still resumes,
// with the failed pull as the module's status, until the pull succeeds.
func TestUpdateWithoutImageKeepsOldContainer(t *testing.T) {
	clock := t0
	fe := newFakeEngine(func() time.Time { return clock })
	r := &Reconciler{Engine: fe, Now: func() time.Time { return clock }, Log: slog.New(slog.DiscardHandler)}
	ctx := context.Background()
	a := mod("a", StatusRunning, Always, 0)
	a.Version = "1"
	if _, err := r.Apply(ctx, manifest(a)); err != nil {
		t.Fatal(err)
	}
	a2 := changed(a, func(m *Module) { m.Version = "2" })
	fe.fail["pull img:1 (update)"] = errors.New("registry down")
	fe.exit("a", 1)
	clock = clock.Add(time.Minute)
	fe.takeCalls()
	rep, err := r.Apply(ctx, manifest(a2))
	if got := fe.takeCalls(); err == nil || got != "network azure-iot-edge, pull img:1 (update), start a" {
		t.Errorf("the old container, crashed, while the update cannot be pulled: %v; calls %s", err, got)
	}
	if got := reportedModule(t, rep, "a"); got["runtimeStatus"] != RuntimeRunning || !strings.Contains(got["statusDescription"].(string), "registry down") {
		t.Errorf("a reported: %v", got)
	}

	// The runtime stops and starts again: the module is resumed although
	// its restartPolicy is never.
	stopped, err := r.StopAll(ctx)
	if err != nil {
		t.Fatal(err)
	}
	clock = clock.Add(time.Minute)
	r = &Reconciler{Engine: fe, Now: func() time.Time { return clock }, Log: slog.New(slog.DiscardHandler)}
	r.Resume(stopped...)
	a2.RestartPolicy = Never
	fe.takeCalls()
	if _, err := r.Apply(ctx, manifest(a2)); err == nil || fe.containers["a"].State != "running" || len(r.Resuming()) != 0 {
		t.Errorf("resuming while the update cannot be pulled: %v; calls %s; a is %s", err, fe.takeCalls(), fe.containers["a"].State)
	}

	delete(fe.fail, "pull img:1 (update)")
	clock = clock.Add(time.Minute)
	fe.takeCalls()
	rep, err = r.Apply(ctx, manifest(a2))
	if got := fe.takeCalls(); err != nil || got != "network azure-iot-edge, pull img:1 (update), stop a, remove a, create a, start a" || fe.containers["a"].Version != "2" {
		t.Errorf("once the update can be pulled: %v; calls %s", err, got)
	}
	if got := reportedModule(t, rep, "a"); got["statusDescription"] != "running" {
		t.Errorf("a reported after the update: %v", got)
	}
}

// An update whose image cannot be pulled is tried again after 10 s, 20 s,
// ... 5 min, and at once for another version; it fails the deployment's
// status meanwhile, but only an attempt is an error of Apply.
func TestUpdateWithoutImageBacksOff(t *testing.T) {
	clock := t0
	fe := newFakeEngine(func() time.Time { return clock })
	r := &Reconciler{Engine: fe, Now: func() time.Time { return clock }, Log: slog.New(slog.DiscardHandler)}
	ctx := context.Background()
	a := mod("a", StatusRunning, Always, 0)
	if _, err := r.Apply(ctx, manifest(a)); err != nil {
		t.Fatal(err)
	}
	a2 := changed(a, func(m *Module) { m.Version = "2" })
	fe.fail["pull img:1 (update)"] = errors.New("registry down")
	var pulls []string
	for range 80 { // 400 s
		fe.takeCalls()
		rep, err := r.Apply(ctx, manifest(a2))
		calls := fe.takeCalls()
		if strings.Contains(calls, "pull") != (err != nil) {
			t.Errorf("at %v: calls %s, error %v: want an error with each pull only", clock.Sub(t0), calls, err)
		}
		if strings.Contains(calls, "pull") {
			pulls = append(pulls, clock.Sub(t0).String())
		}
		if st := rep["lastDesiredStatus"].(map[string]any); st["code"] != 500 || !strings.Contains(st["description"].(string), "registry down") {
			t.Errorf("at %v: lastDesiredStatus %v", clock.Sub(t0), st)
		}
		clock = clock.Add(5 * time.Second)
	}
	if got, want := strings.Join(pulls, " "), "0s 10s 30s 1m10s 2m30s 5m10s"; got != want {
		t.Errorf("update pulls at %s, want %s", got, want)
	}
	a3 := changed(a, func(m *Module) { m.Version = "3" })
	fe.takeCalls()
	r.Apply(ctx, manifest(a3))
	if got := fe.takeCalls(); !strings.Contains(got, "pull img:1 (update)") {
		t.Errorf("another version is not pulled at once: %s", got)
	}
	// Back to the version that runs, then forward again: the hold was for
	// what is no longer desired, and the new attempt starts afresh.
	for range 6 { // held to its longest wait
		clock = clock.Add(BackoffMax)
		r.Apply(ctx, manifest(a3))
	}
	r.Apply(ctx, manifest(a))
	fe.takeCalls()
	clock = clock.Add(5 * time.Second)
	r.Apply(ctx, manifest(a3))
	if got := fe.takeCalls(); !strings.Contains(got, "pull img:1 (update)") {
		t.Errorf("a version held before, desired again after going back, is not pulled at once: %s", got)
	}
	// A new way to get the image is tried at once too.
	a3never := changed(a3, func(m *Module) { m.ImagePullPolicy = "never" })
	fe.takeCalls()
	r.Apply(ctx, manifest(a3never))
	if got := fe.takeCalls(); !strings.Contains(got, "img:1") {
		t.Errorf("a held recreate with another imagePullPolicy is not tried at once: %s", got)
	}
}

// A new module whose image cannot be had is tried again after 10 s, 20 s,
// ... 5 min, as an update is, and reported failed with why meanwhile.
func TestNewModuleWithoutImageBacksOff(t *testing.T) {
	clock := t0
	fe := newFakeEngine(func() time.Time { return clock })
	r := &Reconciler{Engine: fe, Now: func() time.Time { return clock }, Log: slog.New(slog.DiscardHandler)}
	ctx := context.Background()
	a := mod("a", StatusRunning, Always, 0)
	fe.fail["pull img:1"] = errors.New("registry down")
	var pulls []string
	for range 80 { // 400 s
		fe.takeCalls()
		rep, err := r.Apply(ctx, manifest(a))
		calls := fe.takeCalls()
		if strings.Contains(calls, "pull") != (err != nil) || strings.Contains(calls, "create") {
			t.Errorf("at %v: calls %s, error %v: want an error with each pull only, and no create", clock.Sub(t0), calls, err)
		}
		if strings.Contains(calls, "pull") {
			pulls = append(pulls, clock.Sub(t0).String())
		}
		if got := reportedModule(t, rep, "a"); got["runtimeStatus"] != RuntimeFailed || !strings.Contains(got["statusDescription"].(string), "registry down") {
			t.Errorf("at %v: a reported %v", clock.Sub(t0), got)
		}
		clock = clock.Add(5 * time.Second)
	}
	if got, want := strings.Join(pulls, " "), "0s 10s 30s 1m10s 2m30s 5m10s"; got != want {
		t.Errorf("pulls at %s, want %s", got, want)
	}
	delete(fe.fail, "pull img:1")
	clock = clock.Add(BackoffMax)
	fe.takeCalls()
	if _, err := r.Apply(ctx, manifest(a)); err != nil || fe.containers["a"] == nil || fe.containers["a"].State != "running" {
		t.Errorf("once the image can be had: %v; calls %s", err, fe.takeCalls())
	}
}

// A container made by an earlier agent has no version label: it is taken
// to be at the version of the deployment it was made from (Previous), or
// else of the first one applied to it, so that it is not recreated by the
// upgrade but is by a later new version.
func TestUnlabelledContainerVersion(t *testing.T) {
	clock := t0
	ctx := context.Background()
	v := func(version string) *Module {
		m := mod("a", StatusRunning, Always, 0)
		m.Version = version
		return m
	}
	for _, tc := range []struct {
		name     string
		previous *Manifest
		applied  []string // the versions applied in turn
		want     []string // the calls of each Apply after the first's network
	}{
		{name: "previous deployment, new version", previous: manifest(v("1")), applied: []string{"2"},
			want: []string{"pull img:1 (update), stop a, remove a, create a, start a"}},
		{name: "previous deployment, same version", previous: manifest(v("2")), applied: []string{"2"}, want: []string{""}},
		{name: "previous deployment of another image", previous: manifest(changed(v("1"), func(m *Module) { m.Image = "img:0" })), applied: []string{"2", "3"},
			want: []string{"", "pull img:1 (update), stop a, remove a, create a, start a"}},
		{name: "no previous deployment", applied: []string{"1", "1", "2"},
			want: []string{"", "", "pull img:1 (update), stop a, remove a, create a, start a"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fe := newFakeEngine(func() time.Time { return clock })
			fe.containers["a"] = &moby.ModuleState{Name: "a", Image: "img:1", State: "running", StartedAt: t0, ConfigHash: v("").ConfigHash()}
			r := &Reconciler{Engine: fe, Now: func() time.Time { return clock }, Log: slog.New(slog.DiscardHandler), Previous: tc.previous}
			for i, version := range tc.applied {
				if _, err := r.Apply(ctx, manifest(v(version))); err != nil {
					t.Fatal(err)
				}
				got := strings.TrimPrefix(strings.TrimPrefix(fe.takeCalls(), "network azure-iot-edge"), ", ")
				if got != tc.want[i] {
					t.Errorf("version %s applied: calls %q, want %q", version, got, tc.want[i])
				}
			}
		})
	}
}

// A module whose container the engine will not create (its name taken by
// a container not the runtime's, createOptions it rejects) is held with
// the backoff of a missing image: not pulled and logged every pass. The
// retries create without pulling again; a new config is tried at once.
func TestFailedCreateBacksOff(t *testing.T) {
	clock := t0
	fe := newFakeEngine(func() time.Time { return clock })
	r := &Reconciler{Engine: fe, Now: func() time.Time { return clock }, Log: slog.New(slog.DiscardHandler)}
	ctx := context.Background()
	a := mod("a", StatusRunning, Always, 0)
	fe.fail["create a"] = errors.New("module a: a container named a exists")
	var creates []string
	pulls := 0
	for range 80 { // 400 s
		rep, err := r.Apply(ctx, manifest(a))
		calls := fe.takeCalls()
		if strings.Contains(calls, "create") != (err != nil) {
			t.Errorf("at %v: calls %s, error %v: want an error with each create only", clock.Sub(t0), calls, err)
		}
		if strings.Contains(calls, "create") {
			creates = append(creates, clock.Sub(t0).String())
		}
		pulls += strings.Count(calls, "pull")
		if got := reportedModule(t, rep, "a"); got["runtimeStatus"] != RuntimeFailed || !strings.Contains(got["statusDescription"].(string), "a container named a exists") {
			t.Errorf("at %v: a reported %v", clock.Sub(t0), got)
		}
		clock = clock.Add(5 * time.Second)
	}
	if got, want := strings.Join(creates, " "), "0s 10s 30s 1m10s 2m30s 5m10s"; got != want {
		t.Errorf("creates at %s, want %s", got, want)
	}
	if pulls != 1 {
		t.Errorf("%d pulls, want 1: a retried create has its image", pulls)
	}
	a2 := changed(a, func(m *Module) { m.Env = map[string]string{"X": "1"} })
	r.Apply(ctx, manifest(a2))
	if got := fe.takeCalls(); !strings.Contains(got, "pull img:1, create a") {
		t.Errorf("a new config is not tried at once: %s", got)
	}

	// A recreate whose create fails leaves no container, and is held too.
	b := mod("b", StatusRunning, Always, 0)
	if _, err := r.Apply(ctx, manifest(b)); err != nil {
		t.Fatal(err)
	}
	b2 := changed(b, func(m *Module) { m.Env = map[string]string{"X": "1"} })
	fe.fail["create b"] = errors.New("module b: bad createOptions")
	fe.takeCalls()
	if _, err := r.Apply(ctx, manifest(b2)); err == nil {
		t.Error("a failed recreate is no error")
	}
	clock = clock.Add(5 * time.Second)
	fe.takeCalls()
	rep, _ := r.Apply(ctx, manifest(b2))
	if got := fe.takeCalls(); got != "network azure-iot-edge" || reportedModule(t, rep, "b")["runtimeStatus"] != RuntimeFailed {
		t.Errorf("a recreate that failed, within its backoff: calls %s, %v", got, reportedModule(t, rep, "b"))
	}
	delete(fe.fail, "create b")
	clock = clock.Add(5 * time.Second)
	if _, err := r.Apply(ctx, manifest(b2)); err != nil || fe.containers["b"] == nil || fe.containers["b"].State != "running" {
		t.Errorf("b after its backoff: %v; calls %s", err, fe.takeCalls())
	}
}

// allow_elevated_docker_permissions = false: containers are made without
// Privileged and CapAdd, with a warning at each create (not each pass);
// turning it on or off recreates the modules that ask for them, and only
// those.
func TestDenyElevated(t *testing.T) {
	clock := t0
	fe := newFakeEngine(func() time.Time { return clock })
	var logs bytes.Buffer
	r := &Reconciler{Engine: fe, Now: func() time.Time { return clock }, DenyElevated: true,
		Log: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))}
	ctx := context.Background()
	priv := mod("priv", StatusRunning, Always, 0)
	priv.CreateOptions = json.RawMessage(`{"HostConfig":{"Binds":["/data:/data"],"CapAdd":["NET_ADMIN"],"Memory":9007199254740993,"Privileged":true}}`)
	plain := mod("plain", StatusRunning, Always, 0)
	plain.CreateOptions = json.RawMessage(`{"HostConfig":{"CapAdd":[],"Privileged":false}}`)
	m := manifest(priv, plain)
	for range 3 {
		if _, err := r.Apply(ctx, m); err != nil {
			t.Fatal(err)
		}
		clock = clock.Add(5 * time.Second)
	}
	if got := string(fe.specs["priv"].CreateOptions); got != `{"HostConfig":{"Binds":["/data:/data"],"Memory":9007199254740993}}` {
		t.Errorf("priv created with %s", got)
	}
	if got := string(fe.specs["plain"].CreateOptions); got != string(plain.CreateOptions) {
		t.Errorf("plain created with %s", got)
	}
	if n := strings.Count(logs.String(), "allow_elevated_docker_permissions"); n != 1 ||
		!strings.Contains(logs.String(), "HostConfig.Privileged and HostConfig.CapAdd") || !strings.Contains(logs.String(), "module=priv") {
		t.Errorf("want one warning naming priv and what was dropped; got:\n%s", logs.String())
	}
	if m.Modules["priv"] != priv || !strings.Contains(string(priv.CreateOptions), "Privileged") {
		t.Error("the deployment itself was changed")
	}

	// The setting turned on (a new reconciler, as after a config apply).
	fe.takeCalls()
	r = &Reconciler{Engine: fe, Now: func() time.Time { return clock }, Log: slog.New(slog.DiscardHandler)}
	if _, err := r.Apply(ctx, m); err != nil {
		t.Fatal(err)
	}
	if got := fe.takeCalls(); got != "network azure-iot-edge, pull img:1, stop priv, remove priv, create priv, start priv" {
		t.Errorf("allowing elevated permissions: calls %s", got)
	}
	if got := string(fe.specs["priv"].CreateOptions); !strings.Contains(got, `"Privileged":true`) {
		t.Errorf("priv recreated with %s", got)
	}
}

// The engine reads createOptions' keys whatever their case, so the setting
// does too: "hostConfig": {"privileged": true} is dropped as
// HostConfig.Privileged is.
func TestDenyElevatedWhateverTheCase(t *testing.T) {
	for _, opts := range []string{
		`{"hostConfig":{"privileged":true}}`,
		`{"HOSTCONFIG":{"Privileged":true,"capAdd":["SYS_ADMIN"]}}`,
		`{"HostConfig":{"PRIVILEGED":true,"Binds":["/d:/d"]}}`,
	} {
		m := mod("m", StatusRunning, Always, 0)
		m.CreateOptions = json.RawMessage(opts)
		c, dropped := unprivileged(m)
		if len(dropped) == 0 || strings.Contains(strings.ToLower(string(c.CreateOptions)), "privileged") ||
			strings.Contains(strings.ToLower(string(c.CreateOptions)), "capadd") {
			t.Errorf("%s: created with %s, dropped %v", opts, c.CreateOptions, dropped)
		}
	}
	// Two spellings of HostConfig are the create's to refuse: nothing is
	// dropped from either here, and the engine is never asked.
	m := mod("m", StatusRunning, Always, 0)
	m.CreateOptions = json.RawMessage(`{"HostConfig":{},"hostConfig":{"Privileged":true}}`)
	if _, err := moby.DecodeCreateOptions(m.CreateOptions); err == nil || !strings.Contains(err.Error(), `keep one, spelled "HostConfig"`) {
		t.Errorf("two spellings of HostConfig: %v", err)
	}
}
