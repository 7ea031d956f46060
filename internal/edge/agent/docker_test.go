package agent_test

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/agent"
	"github.com/hatchery/hatchery/internal/edge/moby"
	"github.com/hatchery/hatchery/internal/edge/moby/mobytest"
)

// deployment builds a manifest of modules name → (image, restartPolicy,
// Cmd, env), as the hub would send it.
type module struct {
	image, policy string
	cmd           []string
	env           map[string]string
}

func deployment(t *testing.T, version int, mods map[string]module) *agent.Manifest {
	t.Helper()
	ms := map[string]any{}
	for name, m := range mods {
		opts, _ := json.Marshal(map[string]any{"Cmd": m.cmd})
		env := map[string]any{}
		for k, v := range m.env {
			env[k] = map[string]any{"value": v}
		}
		ms[name] = map[string]any{"version": "1.0", "type": "docker", "status": "running", "restartPolicy": m.policy,
			"settings": map[string]any{"image": m.image, "createOptions": string(opts)}, "env": env}
	}
	b, _ := json.Marshal(map[string]any{"$version": version, "schemaVersion": "1.1",
		"runtime": map[string]any{"type": "docker", "settings": map[string]any{"minDockerVersion": "v1.25"}}, "modules": ms})
	m, err := agent.ParseManifest(b)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func reported(rep map[string]any, name string) map[string]any {
	m, _ := rep["modules"].(map[string]any)[name].(map[string]any)
	return m
}

// waitFor polls the engine until ok holds for the module's state.
func waitFor(t *testing.T, e *mobytest.Env, name, what string, ok func(moby.ModuleState) bool) moby.ModuleState {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		states, err := e.List(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range states {
			if s.Name == name && ok(s) {
				return s
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("module %s: %s did not happen: %+v", name, what, states)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func exited(s moby.ModuleState) bool { return s.State == "exited" }

func TestApplyDocker(t *testing.T) {
	e := mobytest.New(t)
	img1, img2 := e.Image(""), e.Image("")
	network := e.Network()
	var skew atomic.Int64 // how far the agent's clock runs ahead
	r := &agent.Reconciler{
		Engine:      e.Engine,
		Now:         func() time.Time { return time.Now().Add(time.Duration(skew.Load())) },
		Network:     network,
		StopTimeout: 5 * time.Second,
		Log:         slog.New(slog.DiscardHandler),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	apply := func(m *agent.Manifest) map[string]any {
		t.Helper()
		rep, err := r.Apply(ctx, m)
		if err != nil {
			t.Fatalf("Apply: %v", err)
		}
		if rep["lastDesiredStatus"].(map[string]any)["code"] != 200 || rep["lastDesiredVersion"] != m.Version {
			t.Errorf("report: %v %v", rep["lastDesiredVersion"], rep["lastDesiredStatus"])
		}
		return rep
	}
	id := mobytest.ID()
	svc, flaky, once := "svc-"+id, "flaky-"+id, "once-"+id
	mods := map[string]module{
		svc:   {image: img1, policy: agent.Always, cmd: []string{"-env", "GREETING"}, env: map[string]string{"GREETING": "hello"}},
		flaky: {image: img1, policy: agent.OnFailure, cmd: []string{"-exit", "1"}},
		once:  {image: img1, policy: agent.Never, cmd: []string{"-exit", "1"}},
	}

	// Deployed: svc runs; the two others exit 1.
	apply(deployment(t, 1, mods))
	first := waitFor(t, e, flaky, "exit", exited)
	onceRun := waitFor(t, e, once, "exit", exited)
	rep := apply(deployment(t, 1, mods))
	if got := reported(rep, svc); got["runtimeStatus"] != "running" {
		t.Errorf("%s: %v", svc, got)
	}
	if got := reported(rep, flaky); got["runtimeStatus"] != "backoff" || got["exitCode"] != 1 || got["restartCount"] != 0 {
		t.Errorf("%s before its backoff ends: %v", flaky, got)
	}
	if got := reported(rep, once); got["runtimeStatus"] != "failed" || got["exitCode"] != 1 {
		t.Errorf("%s: %v", once, got)
	}

	// 11 s later on the agent's clock: on-failure restarts, never does not.
	skew.Store(int64(11 * time.Second))
	rep = apply(deployment(t, 1, mods))
	if got := reported(rep, flaky); got["restartCount"] != 1 {
		t.Errorf("%s after 10 s: %v", flaky, got)
	}
	second := waitFor(t, e, flaky, "a second run", func(s moby.ModuleState) bool { return exited(s) && s.StartedAt.After(first.StartedAt) })
	if got := reported(rep, once); got["runtimeStatus"] != "failed" || got["restartCount"] != 0 {
		t.Errorf("%s with restartPolicy never: %v", once, got)
	}
	// The second restart waits 20 s from the first.
	rep = apply(deployment(t, 1, mods))
	if got := reported(rep, flaky); got["runtimeStatus"] != "backoff" || got["restartCount"] != 1 {
		t.Errorf("%s in its second backoff: %v", flaky, got)
	}
	skew.Store(int64(32 * time.Second))
	rep = apply(deployment(t, 1, mods))
	if got := reported(rep, flaky); got["restartCount"] != 2 {
		t.Errorf("%s after 20 s more: %v", flaky, got)
	}
	waitFor(t, e, flaky, "a third run", func(s moby.ModuleState) bool { return s.StartedAt.After(second.StartedAt) })
	if s := waitFor(t, e, once, "stay exited", exited); !s.StartedAt.Equal(onceRun.StartedAt) {
		t.Errorf("%s was restarted", once)
	}

	// A changed env, then a changed image tag, recreate svc.
	before := waitFor(t, e, svc, "run", func(s moby.ModuleState) bool { return s.State == "running" })
	waitLogs(t, e, svc, "GREETING=hello\n")
	m := mods[svc]
	m.env = map[string]string{"GREETING": "bonjour"}
	mods[svc] = m
	apply(deployment(t, 2, mods))
	after := waitFor(t, e, svc, "run again", func(s moby.ModuleState) bool { return s.State == "running" })
	if after.ContainerID == before.ContainerID {
		t.Errorf("%s was not recreated for its new env", svc)
	}
	waitLogs(t, e, svc, "GREETING=bonjour\n")
	m.image = img2
	mods[svc] = m
	rep = apply(deployment(t, 3, mods))
	last := waitFor(t, e, svc, "run on the new image", func(s moby.ModuleState) bool { return s.State == "running" && s.Image == img2 })
	if last.ContainerID == after.ContainerID || reported(rep, svc)["settings"].(map[string]any)["image"] != img2 {
		t.Errorf("%s was not recreated for its new image", svc)
	}

	// Taken out of the deployment, the modules' containers go.
	rep = apply(deployment(t, 4, map[string]module{}))
	if states, err := e.List(ctx); err != nil || len(states) != 0 {
		t.Errorf("after removing every module: %+v, %v", states, err)
	}
	if len(rep["modules"].(map[string]any)) != 0 {
		t.Errorf("modules still reported: %v", rep["modules"])
	}
}

// waitLogs waits until the module's output contains want.
func waitLogs(t *testing.T, e *mobytest.Env, name, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var buf bytes.Buffer
		if err := e.Logs(context.Background(), name, moby.LogOptions{}, &buf); err != nil {
			t.Fatal(err)
		}
		if strings.Contains(buf.String(), want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s's logs lack %q: %q", name, want, buf.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}
