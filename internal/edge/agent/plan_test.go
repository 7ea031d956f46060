package agent

import (
	"encoding/json"
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/moby"
)

var t0 = time.Date(2025, 1, 1, 12, 0, 0, 0, time.UTC)

func mod(name, status, policy string, order uint32) *Module {
	return &Module{Name: name, Type: "docker", Status: status, RestartPolicy: policy, ImagePullPolicy: PullOnCreate,
		StartupOrder: order, Image: "img:1", Env: map[string]string{}}
}

func manifest(mods ...*Module) *Manifest {
	m := &Manifest{SchemaVersion: "1.1", Version: 3, Runtime: Runtime{Type: "docker"}, Modules: map[string]*Module{}}
	for _, x := range mods {
		m.Modules[x.Name] = x
	}
	return m
}

// exited is the state of m's container after a run from started to finished.
func exited(m *Module, code int, started, finished time.Time) moby.ModuleState {
	return moby.ModuleState{Name: m.Name, Image: m.Image, State: "exited", ExitCode: code, StartedAt: started, FinishedAt: finished, ConfigHash: m.ConfigHash(),
		Version: m.Version, HasVersion: true}
}

func running(m *Module, started time.Time) moby.ModuleState {
	return moby.ModuleState{Name: m.Name, Image: m.Image, State: "running", StartedAt: started, ConfigHash: m.ConfigHash(),
		Version: m.Version, HasVersion: true}
}

func with(s moby.ModuleState, f func(*moby.ModuleState)) moby.ModuleState {
	f(&s)
	return s
}

func changed(m *Module, f func(*Module)) *Module {
	c := *m
	c.Env = maps.Clone(m.Env)
	f(&c)
	return &c
}

func actions(acts []Action) string {
	var s []string
	for _, a := range acts {
		x := string(a.Kind) + " " + a.Name
		if a.Restart > 0 {
			x += fmt.Sprintf(" #%d", a.Restart)
		}
		if a.Update {
			x += " (update)"
		}
		s = append(s, x)
	}
	return strings.Join(s, ", ")
}

func TestBackoff(t *testing.T) {
	want := []time.Duration{10, 20, 40, 80, 160, 300, 300, 300}
	for n, w := range want {
		if got := Backoff(n); got != w*time.Second {
			t.Errorf("Backoff(%d) = %v, want %v", n, got, w*time.Second)
		}
	}
	if Backoff(1000) != BackoffMax {
		t.Error("Backoff(1000) overflows")
	}
}

func TestPlan(t *testing.T) {
	a := mod("a", StatusRunning, Always, 1)
	never := mod("never", StatusRunning, Never, 1)
	onFailure := mod("onfail", StatusRunning, OnFailure, 1)
	unhealthy := mod("unhealthy", StatusRunning, OnUnhealthy, 1)
	stopped := mod("stopped", StatusStopped, Always, 1)
	failedStart := func(m *Module) moby.ModuleState {
		return moby.ModuleState{Name: m.Name, State: "created", ExitCode: 127, Error: `exec: "/x": no such file`, ConfigHash: m.ConfigHash(),
			Version: m.Version, HasVersion: true}
	}
	a2 := changed(a, func(m *Module) { m.Version = "2" })
	heldA2 := func(retry time.Time) map[string]*History {
		return map[string]*History{"a": {Held: &Held{For: heldKey(a2), Auth: authKey(manifest(a2), a2), Err: "registry down", Retry: retry}}}
	}
	for _, tc := range []struct {
		name    string
		desired *Manifest
		current []moby.ModuleState
		hist    map[string]*History
		now     time.Time
		want    string // the actions
		status  string // runtimeStatus of the first desired module, when set
	}{
		{name: "nil manifest", current: []moby.ModuleState{running(a, t0)}, want: ""},
		{name: "new running", desired: manifest(a), want: "create a, start a", status: RuntimeUnknown},
		{name: "new stopped", desired: manifest(stopped), want: "create stopped"},
		{name: "up to date", desired: manifest(a), current: []moby.ModuleState{running(a, t0)}, want: "", status: RuntimeRunning},
		{name: "image changed", desired: manifest(changed(a, func(m *Module) { m.Image = "img:2" })), current: []moby.ModuleState{running(a, t0)},
			want: "recreate a, start a"},
		{name: "env changed", desired: manifest(changed(a, func(m *Module) { m.Env["X"] = "1" })), current: []moby.ModuleState{running(a, t0)},
			want: "recreate a, start a"},
		{name: "createOptions changed", desired: manifest(changed(a, func(m *Module) { m.CreateOptions = json.RawMessage(`{"Cmd":["x"]}`) })),
			current: []moby.ModuleState{running(a, t0)}, want: "recreate a, start a"},
		{name: "policy changed only", desired: manifest(changed(a, func(m *Module) { m.RestartPolicy = Never })),
			current: []moby.ModuleState{running(a, t0)}, want: ""},
		{name: "version changed", desired: manifest(changed(a, func(m *Module) { m.Version = "2" })), current: []moby.ModuleState{running(a, t0)},
			want: "recreate a (update), start a"},
		{name: "version set", desired: manifest(changed(a, func(m *Module) { m.Version = "1" })), current: []moby.ModuleState{running(a, t0)},
			want: "recreate a (update), start a"},
		{name: "version and env changed", desired: manifest(changed(a, func(m *Module) { m.Version, m.Env["X"] = "2", "1" })),
			current: []moby.ModuleState{with(running(a, t0), func(s *moby.ModuleState) { s.Image = "docker.io/library/img:1" })}, want: "recreate a (update), start a"},
		// An image pinned by digest is the one the engine has, if it has it.
		{name: "version changed, image by digest", desired: manifest(changed(a, func(m *Module) { m.Version, m.Image = "2", "img@sha256:ab" })),
			current: []moby.ModuleState{with(running(a, t0), func(s *moby.ModuleState) { s.Image = "img@sha256:ab" })}, want: "recreate a, start a"},
		// A new image may be a copy loaded on the device (docker load).
		{name: "version and image changed", desired: manifest(changed(a, func(m *Module) { m.Version, m.Image = "2", "img:2" })),
			current: []moby.ModuleState{running(a, t0)}, want: "recreate a, start a"},
		// A new version whose image could not be pulled waits out its backoff.
		{name: "held update, waiting", desired: manifest(a2), current: []moby.ModuleState{exited(a, 1, t0, t0)}, hist: heldA2(t0.Add(time.Hour)),
			now: t0.Add(time.Minute), want: "start a #1", status: RuntimeBackoff},
		{name: "held update, due", desired: manifest(a2), current: []moby.ModuleState{running(a, t0)}, hist: heldA2(t0.Add(time.Hour)),
			now: t0.Add(time.Hour), want: "recreate a (update), start a"},
		{name: "held update, another version", desired: manifest(changed(a, func(m *Module) { m.Version = "3" })), current: []moby.ModuleState{running(a, t0)},
			hist: heldA2(t0.Add(time.Hour)), now: t0.Add(time.Minute), want: "recreate a (update), start a"},
		{name: "held update, new credentials", desired: func() *Manifest {
			m := manifest(a2)
			m.Runtime.RegistryCredentials = map[string]RegistryCredential{"hub": {Username: "u", Password: "p", Address: "docker.io"}}
			return m
		}(), current: []moby.ModuleState{running(a, t0)}, hist: heldA2(t0.Add(time.Hour)), now: t0.Add(time.Minute), want: "recreate a (update), start a"},
		// A container made before versions were labelled is left alone.
		{name: "no version label", desired: manifest(changed(a, func(m *Module) { m.Version = "2" })),
			current: []moby.ModuleState{with(running(a, t0), func(s *moby.ModuleState) { s.Version, s.HasVersion = "", false })}, want: ""},
		// ... unless the agent knows which version it was made from.
		{name: "no version label, version known", desired: manifest(changed(a, func(m *Module) { m.Version = "2" })),
			current: []moby.ModuleState{with(running(a, t0), func(s *moby.ModuleState) { s.Version, s.HasVersion = "", false })},
			hist:    map[string]*History{"a": {Version: "1", HasVersion: true}}, want: "recreate a (update), start a"},
		{name: "no version label, same version", desired: manifest(changed(a, func(m *Module) { m.Version = "2" })),
			current: []moby.ModuleState{with(running(a, t0), func(s *moby.ModuleState) { s.Version, s.HasVersion = "", false })},
			hist:    map[string]*History{"a": {Version: "2", HasVersion: true}}, want: ""},
		{name: "stopped changed", desired: manifest(changed(stopped, func(m *Module) { m.Image = "img:2" })), current: []moby.ModuleState{running(stopped, t0)},
			want: "recreate stopped"},
		{name: "dead", desired: manifest(a), current: []moby.ModuleState{with(running(a, t0), func(s *moby.ModuleState) { s.State = "dead" })},
			want: "recreate a, start a", status: RuntimeFailed},
		{name: "removed", desired: manifest(a), current: []moby.ModuleState{running(never, t0), running(a, t0), running(onFailure, t0)},
			want: "remove never, remove onfail"},
		{name: "removed before created", desired: manifest(a), current: []moby.ModuleState{running(never, t0)}, want: "remove never, create a, start a"},
		{name: "startup order", desired: manifest(mod("z", StatusRunning, Always, 0), mod("b", StatusRunning, Always, 2), mod("a", StatusRunning, Always, 2),
			mod("c", StatusStopped, Always, 1), mod("d", StatusRunning, Always, DefaultStartupOrder)),
			want: "create z, start z, create c, create a, start a, create b, start b, create d, start d"},
		{name: "stop", desired: manifest(stopped), current: []moby.ModuleState{running(stopped, t0)}, want: "stop stopped", status: RuntimeRunning},
		{name: "stays stopped", desired: manifest(stopped), current: []moby.ModuleState{exited(stopped, 1, t0, t0)}, now: t0.Add(time.Hour), want: "", status: RuntimeStopped},
		{name: "first start", desired: manifest(a), current: []moby.ModuleState{{Name: "a", State: "created", ConfigHash: a.ConfigHash()}}, want: "start a", status: RuntimeStopped},

		{name: "never, failed", desired: manifest(never), current: []moby.ModuleState{exited(never, 1, t0, t0)}, now: t0.Add(time.Hour), want: "", status: RuntimeFailed},
		{name: "never, done", desired: manifest(never), current: []moby.ModuleState{exited(never, 0, t0, t0)}, now: t0.Add(time.Hour), want: "", status: RuntimeStopped},
		{name: "never, failed start", desired: manifest(never), current: []moby.ModuleState{failedStart(never)}, now: t0.Add(time.Hour), want: "", status: RuntimeFailed},
		{name: "on-failure, waiting", desired: manifest(onFailure), current: []moby.ModuleState{exited(onFailure, 1, t0.Add(-time.Second), t0)},
			now: t0.Add(10*time.Second - 1), want: "", status: RuntimeBackoff},
		{name: "on-failure, restart", desired: manifest(onFailure), current: []moby.ModuleState{exited(onFailure, 1, t0.Add(-time.Second), t0)},
			now: t0.Add(10 * time.Second), want: "start onfail #1", status: RuntimeBackoff},
		{name: "on-failure, crash", desired: manifest(onFailure), current: []moby.ModuleState{exited(onFailure, 2, t0, t0)}, now: t0.Add(time.Minute), want: "start onfail #1"},
		{name: "on-failure, done", desired: manifest(onFailure), current: []moby.ModuleState{exited(onFailure, 0, t0, t0)}, now: t0.Add(time.Hour), want: "", status: RuntimeStopped},
		{name: "on-failure, failed start", desired: manifest(onFailure), current: []moby.ModuleState{failedStart(onFailure)},
			hist: map[string]*History{"onfail": {LastStart: t0}}, now: t0.Add(10 * time.Second), want: "start onfail #1", status: RuntimeBackoff},
		{name: "always, exit 0", desired: manifest(a), current: []moby.ModuleState{exited(a, 0, t0, t0)}, now: t0.Add(10 * time.Second), want: "start a #1", status: RuntimeBackoff},
		{name: "backoff 4th, waiting", desired: manifest(a), current: []moby.ModuleState{exited(a, 1, t0, t0)},
			hist: map[string]*History{"a": {Restarts: 3, LastStart: t0}}, now: t0.Add(80*time.Second - 1), want: ""},
		{name: "backoff 4th", desired: manifest(a), current: []moby.ModuleState{exited(a, 1, t0, t0)},
			hist: map[string]*History{"a": {Restarts: 3, LastStart: t0}}, now: t0.Add(80 * time.Second), want: "start a #4"},
		{name: "backoff cap, waiting", desired: manifest(a), current: []moby.ModuleState{exited(a, 1, t0, t0)},
			hist: map[string]*History{"a": {Restarts: 12}}, now: t0.Add(300*time.Second - 1), want: ""},
		{name: "backoff cap", desired: manifest(a), current: []moby.ModuleState{exited(a, 1, t0, t0)},
			hist: map[string]*History{"a": {Restarts: 12}}, now: t0.Add(300 * time.Second), want: "start a #13"},
		{name: "backoff from a later start attempt", desired: manifest(a), current: []moby.ModuleState{exited(a, 1, t0, t0)},
			hist: map[string]*History{"a": {Restarts: 1, LastStart: t0.Add(5 * time.Second)}}, now: t0.Add(25*time.Second - 1), want: ""},
		{name: "reset after a long run", desired: manifest(a), current: []moby.ModuleState{exited(a, 1, t0.Add(-HealthyRun), t0)},
			hist: map[string]*History{"a": {Restarts: 9}}, now: t0.Add(10 * time.Second), want: "start a #1"},
		{name: "no reset after a shorter run", desired: manifest(a), current: []moby.ModuleState{exited(a, 1, t0.Add(-HealthyRun+time.Second), t0)},
			hist: map[string]*History{"a": {Restarts: 9}}, now: t0.Add(10 * time.Second), want: ""},
		{name: "on-unhealthy, unhealthy", desired: manifest(unhealthy), current: []moby.ModuleState{with(running(unhealthy, t0), func(s *moby.ModuleState) { s.Health = "unhealthy" })},
			now: t0.Add(time.Minute), want: "stop unhealthy, start unhealthy #1", status: RuntimeRunning},
		{name: "on-unhealthy, healthy", desired: manifest(unhealthy), current: []moby.ModuleState{with(running(unhealthy, t0), func(s *moby.ModuleState) { s.Health = "healthy" })},
			now: t0.Add(time.Minute), want: ""},
		// As on-failure once it has exited: a clean exit is no failure.
		{name: "on-unhealthy, failed", desired: manifest(unhealthy), current: []moby.ModuleState{exited(unhealthy, 1, t0, t0)}, now: t0.Add(time.Minute),
			want: "start unhealthy #1", status: RuntimeBackoff},
		{name: "on-unhealthy, done", desired: manifest(unhealthy), current: []moby.ModuleState{exited(unhealthy, 0, t0, t0)}, now: t0.Add(time.Hour),
			want: "", status: RuntimeStopped},
		{name: "always ignores health", desired: manifest(a), current: []moby.ModuleState{with(running(a, t0), func(s *moby.ModuleState) { s.Health = "unhealthy" })},
			now: t0.Add(time.Minute), want: ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // plan must only read its arguments: -race checks it
			if got := actions(plan(tc.desired, tc.current, tc.hist, tc.now)); got != tc.want {
				t.Errorf("plan = %q, want %q", got, tc.want)
			}
			if tc.status == "" {
				return
			}
			m := tc.desired.Ordered()[0]
			var st *moby.ModuleState
			for i := range tc.current {
				if tc.current[i].Name == m.Name {
					st = &tc.current[i]
				}
			}
			if got, desc := Status(m, st, tc.hist[m.Name]); got != tc.status {
				t.Errorf("Status = %s (%s), want %s", got, desc, tc.status)
			}
		})
	}
}

// plan leaves its inputs alone.
func TestPlanPure(t *testing.T) {
	a := mod("a", StatusRunning, Always, 1)
	current := []moby.ModuleState{{Name: "old", State: "running"}, exited(a, 1, t0, t0)} // unsorted
	hist := map[string]*History{"a": {Restarts: 2, LastStart: t0}}
	before := fmt.Sprint(current, *hist["a"])
	for range 2 {
		if got := actions(plan(manifest(a), current, hist, t0.Add(time.Hour))); got != "remove old, start a #3" {
			t.Fatalf("plan = %q", got)
		}
	}
	if after := fmt.Sprint(current, *hist["a"]); after != before {
		t.Errorf("plan changed its arguments:\n%s\n%s", before, after)
	}
}

// The hash is what existing containers are labelled with: a change of its
// formula recreates every module on every device that upgrades. This is
// the value the agent has labelled containers with since it was written.
func TestConfigHashUnchanged(t *testing.T) {
	m := mod("a", StatusRunning, Always, 1)
	m.Version = "1.0"
	m.Env["X"] = "1"
	m.CreateOptions = json.RawMessage(`{"Cmd":["x"]}`)
	if got, want := m.ConfigHash(), "cda0149ee97a07052ba5e5c71de3ce92"; got != want {
		t.Errorf("ConfigHash() = %s, want %s: containers labelled by earlier agents would all be recreated", got, want)
	}
}
