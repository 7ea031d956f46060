package moby_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/moby"
	"github.com/hatchery/hatchery/internal/edge/moby/mobytest"
)

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// waitState polls List until the module's container is in state.
func waitState(t *testing.T, e *mobytest.Env, name, state string) moby.ModuleState {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		states, err := e.List(ctxFor(t))
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range states {
			if s.Name == name && s.State == state {
				return s
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("module %s did not reach state %s: %+v", name, state, states)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func logs(t *testing.T, e *mobytest.Env, name string, opts moby.LogOptions) string {
	t.Helper()
	var buf bytes.Buffer
	if err := e.Logs(ctxFor(t), name, opts, &buf); err != nil {
		t.Fatal(err)
	}
	return buf.String()
}

func TestLifecycle(t *testing.T) {
	e := mobytest.New(t)
	ctx := ctxFor(t)
	image, network := e.Image(""), e.Network()
	dir := t.TempDir()
	name := "lifecycle-" + mobytest.ID()
	opts, _ := json.Marshal(map[string]any{
		"Cmd":    []string{"-print", "hello", "-stderr", "oops", "-env", "A,B,C", "-write", "/data/out=written"},
		"Env":    []string{"A=from-options", "B=kept"},
		"Labels": map[string]string{"com.example.role": "sensor"},
		"HostConfig": map[string]any{
			"Binds":         []string{dir + ":/data"},
			"RestartPolicy": map[string]any{"Name": "always"},
		},
	})
	spec := moby.ModuleSpec{
		Name: name, Image: image, CreateOptions: opts, Network: network,
		Env:        map[string]string{"A": "from-deployment", "C": "c"},
		PullPolicy: "on-create", // present locally: no pull is tried
		ConfigHash: "hash-1",
		Version:    "1.0",
	}
	if err := e.Create(ctx, spec); err != nil {
		t.Fatal(err)
	}
	s := waitState(t, e, name, "created")
	if s.Image != image || s.ConfigHash != "hash-1" || s.Version != "1.0" || !s.HasVersion || !s.StartedAt.IsZero() {
		t.Errorf("created: %+v", s)
	}
	if err := e.Start(ctx, name); err != nil {
		t.Fatal(err)
	}
	s = waitState(t, e, name, "running")
	if s.StartedAt.IsZero() || time.Since(s.StartedAt) > time.Minute {
		t.Errorf("running: StartedAt %v", s.StartedAt)
	}
	if err := e.Start(ctx, name); err != nil {
		t.Errorf("starting a running module: %v", err)
	}

	// The bind mount is written through.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if b, _ := os.ReadFile(filepath.Join(dir, "out")); string(b) == "written" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the module did not write to its bind mount")
		}
		time.Sleep(50 * time.Millisecond)
	}
	out := logs(t, e, name, moby.LogOptions{})
	for _, want := range []string{"hello\n", "oops\n", "A=from-deployment\n", "B=kept\n", "C=c\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("logs lack %q:\n%s", want, out)
		}
	}
	// stdout and stderr interleave as the engine read them: the tail is
	// the last line of the whole log, whichever stream it came from.
	lines := strings.SplitAfter(out, "\n")
	if got := logs(t, e, name, moby.LogOptions{Tail: "1"}); got != lines[len(lines)-2] {
		t.Errorf("logs --tail 1 = %q, want the last line of %q", got, out)
	}
	if got := logs(t, e, name, moby.LogOptions{Timestamps: true, Since: "1h"}); !strings.Contains(got, "Z hello\n") {
		t.Errorf("logs with timestamps = %q", got)
	}

	in, err := e.InspectRaw(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	labels := in["Config"].(map[string]any)["Labels"].(map[string]any)
	if labels["com.example.role"] != "sensor" || labels[moby.OwnerLabel] != e.Owner || labels[moby.ModuleLabel] != name {
		t.Errorf("labels: %v", labels)
	}
	if rp := in["HostConfig"].(map[string]any)["RestartPolicy"].(map[string]any)["Name"]; rp != "" && rp != "no" {
		t.Errorf("engine restart policy %v: the agent restarts modules, not the engine", rp)
	}
	if _, ok := in["NetworkSettings"].(map[string]any)["Networks"].(map[string]any)[network]; !ok {
		t.Errorf("not attached to %s: %v", network, in["NetworkSettings"])
	}

	// A follower returns when the module stops; SIGTERM ends modbin with 0.
	followed := make(chan error, 1)
	go func() { followed <- e.Logs(ctx, name, moby.LogOptions{Follow: true}, &bytes.Buffer{}) }()
	if err := e.Stop(ctx, name, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-followed:
		if err != nil {
			t.Errorf("following logs: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("following logs did not end when the module stopped")
	}
	s = waitState(t, e, name, "exited")
	if s.ExitCode != 0 || s.FinishedAt.Before(s.StartedAt) {
		t.Errorf("stopped: %+v", s)
	}
	if err := e.Stop(ctx, name, time.Second); err != nil {
		t.Errorf("stopping a stopped module: %v", err)
	}
	if err := e.Remove(ctx, name); err != nil {
		t.Fatal(err)
	}
	if states, err := e.List(ctx); err != nil || len(states) != 0 {
		t.Errorf("after Remove: %v, %v", states, err)
	}
	if err := e.Remove(ctx, name); !errors.Is(err, moby.ErrNotFound) {
		t.Errorf("removing a removed module: %v, want ErrNotFound", err)
	}
}

func TestExitCodes(t *testing.T) {
	e := mobytest.New(t)
	ctx := ctxFor(t)
	image := e.Image("")
	for cmd, want := range map[string]int{
		`["-exit","3"]`:             3,
		`["-crash","-after","1ms"]`: 2, // a Go panic
		`["-exit","0"]`:             0,
	} {
		name := "exit-" + mobytest.ID()
		err := e.Create(ctx, moby.ModuleSpec{Name: name, Image: image, CreateOptions: json.RawMessage(`{"Cmd":` + cmd + `}`)})
		if err != nil {
			t.Fatal(err)
		}
		if err := e.Start(ctx, name); err != nil {
			t.Fatal(err)
		}
		if s := waitState(t, e, name, "exited"); s.ExitCode != want || s.FinishedAt.IsZero() {
			t.Errorf("Cmd %s: %+v, want exit code %d", cmd, s, want)
		}
	}
	// The exit code can come from the deployment's env too (MODBIN_EXIT).
	name := "exit-env-" + mobytest.ID()
	if err := e.Create(ctx, moby.ModuleSpec{Name: name, Image: image, Env: map[string]string{"MODBIN_EXIT": "7"}}); err != nil {
		t.Fatal(err)
	}
	if err := e.Start(ctx, name); err != nil {
		t.Fatal(err)
	}
	if s := waitState(t, e, name, "exited"); s.ExitCode != 7 {
		t.Errorf("MODBIN_EXIT=7: exit code %d", s.ExitCode)
	}
}

func TestMissingImage(t *testing.T) {
	e := mobytest.New(t)
	ctx := ctxFor(t)
	absent := "hatchery-test/absent:" + mobytest.ID()
	err := e.Create(ctx, moby.ModuleSpec{Name: "absent-" + mobytest.ID(), Image: absent, PullPolicy: "never"})
	if !errors.Is(err, moby.ErrNotFound) || !strings.Contains(err.Error(), absent) || !strings.Contains(err.Error(), "not found on this device, and its imagePullPolicy is never") {
		t.Errorf("pull policy never: %v", err)
	}
	t.Log(err)
	// No registry answers on localhost:1: the pull fails, naming both.
	remote := "localhost:1/hatchery-test/absent:1"
	auth := &moby.RegistryAuth{Username: "someone", Password: "secret", Address: "localhost:1"}
	err = e.Create(ctx, moby.ModuleSpec{Name: "absent-" + mobytest.ID(), Image: remote, PullPolicy: "on-create", Auth: auth})
	if err == nil || !strings.Contains(err.Error(), remote) || !strings.Contains(err.Error(), "registry localhost:1") || strings.Contains(err.Error(), "secret") {
		t.Errorf("pull from an absent registry: %v", err)
	}
	t.Log(err)
	if states, _ := e.List(ctx); len(states) != 0 {
		t.Errorf("a failed create left containers: %+v", states)
	}
}

// Containers without this agent's owner label are invisible and untouchable.
func TestForeignContainers(t *testing.T) {
	e := mobytest.New(t)
	ctx := ctxFor(t)
	image := e.Image("")
	foreign := map[string]map[string]string{
		"foreign-" + mobytest.ID(): nil,
		"other-" + mobytest.ID():   {moby.OwnerLabel: "another-agent", moby.ModuleLabel: "x"},
	}
	for name, labels := range foreign {
		if err := e.CreateForeign(ctx, name, image, labels); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { e.RemoveAny(context.Background(), name) })
	}
	mine := "mine-" + mobytest.ID()
	if err := e.Create(ctx, moby.ModuleSpec{Name: mine, Image: image}); err != nil {
		t.Fatal(err)
	}
	states, err := e.List(ctx)
	if err != nil || len(states) != 1 || states[0].Name != mine {
		t.Fatalf("List = %+v, %v; want only %s", states, err, mine)
	}
	for name := range foreign {
		for op, err := range map[string]error{
			"Remove": e.Remove(ctx, name),
			"Stop":   e.Stop(ctx, name, time.Second),
			"Start":  e.Start(ctx, name),
			"Logs":   e.Logs(ctx, name, moby.LogOptions{}, &bytes.Buffer{}),
		} {
			if !errors.Is(err, moby.ErrForeign) {
				t.Errorf("%s(%s) = %v, want ErrForeign", op, name, err)
			}
		}
		if _, err := e.InspectRaw(ctx, name); err != nil {
			t.Errorf("foreign container %s is gone: %v", name, err)
		}
	}
}

func TestEnsureNetwork(t *testing.T) {
	e := mobytest.New(t)
	name := e.Network()
	if err := e.EnsureNetwork(ctxFor(t), name); err != nil {
		t.Errorf("second EnsureNetwork: %v", err)
	}
}
