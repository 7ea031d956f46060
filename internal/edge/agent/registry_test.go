package agent_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/agent"
	"github.com/hatchery/hatchery/internal/edge/moby"
	"github.com/hatchery/hatchery/internal/edge/moby/mobytest"
)

// registryDeployment is a manifest of one module, name, whose image comes
// from a registry, with runtime.settings.registryCredentials creds.
func registryDeployment(t *testing.T, version int, name, image string, creds map[string]any) *agent.Manifest {
	t.Helper()
	opts, _ := json.Marshal(map[string]any{"Cmd": []string{"-print", "pulled"}})
	b, _ := json.Marshal(map[string]any{"$version": version, "schemaVersion": "1.1",
		"runtime": map[string]any{"type": "docker", "settings": map[string]any{"minDockerVersion": "v1.25", "registryCredentials": creds}},
		"modules": map[string]any{name: map[string]any{"version": "1.0", "type": "docker", "status": "running",
			"restartPolicy": agent.Always, "imagePullPolicy": agent.PullOnCreate,
			"settings": map[string]any{"image": image, "createOptions": string(opts)}}}})
	m, err := agent.ParseManifest(b)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestApplyRegistryCredentials deploys a module whose image is only in a
// real private registry with htpasswd auth: without matching credentials,
// then with a wrong password, the pull fails and is reported (code 500,
// the module failed with the pull error); with the registry's
// registryCredentials the module runs. No report shows a password.
func TestApplyRegistryCredentials(t *testing.T) {
	e := mobytest.New(t)
	addr, user, password := mobytest.StartRegistry(t)
	image := e.PushImage(addr, user, password)
	r := &agent.Reconciler{Engine: e.Engine, Network: e.Network(), StopTimeout: 5 * time.Second, Log: slog.New(slog.DiscardHandler)}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	name := "pulled-" + mobytest.ID()
	// Another registry's credentials, sorted first: only the image's
	// registry's may be used.
	other := map[string]any{"username": "someone", "password": "other-secret", "address": "example.azurecr.io"}
	secrets := []string{password, "other-secret"}

	// check applies m and checks the report's status code, that its
	// description and the module's have each of want, and that no password
	// shows.
	check := func(m *agent.Manifest, code int, want ...string) map[string]any {
		t.Helper()
		rep, err := r.Apply(ctx, m)
		if (err != nil) != (code != 200) {
			t.Fatalf("Apply of version %d: %v", m.Version, err)
		}
		status := rep["lastDesiredStatus"].(map[string]any)
		if status["code"] != code || rep["lastDesiredVersion"] != m.Version {
			t.Errorf("version %d: lastDesiredVersion %v, lastDesiredStatus %v", m.Version, rep["lastDesiredVersion"], status)
		}
		mod := reported(rep, name)
		desc, _ := status["description"].(string)
		modDesc, _ := mod["statusDescription"].(string)
		for _, w := range want {
			if !strings.Contains(desc, w) || !strings.Contains(modDesc, w) {
				t.Errorf("version %d: lastDesiredStatus %q or the module's statusDescription %q lacks %q", m.Version, desc, modDesc, w)
			}
		}
		b, _ := json.Marshal(rep)
		for _, s := range secrets {
			if strings.Contains(string(b), s) {
				t.Errorf("version %d: the report shows the password %q: %s", m.Version, s, b)
			}
		}
		return mod
	}
	noContainer := func(when string) {
		t.Helper()
		if states, err := e.List(ctx); err != nil || len(states) != 0 {
			t.Errorf("%s: containers %+v, %v", when, states, err)
		}
	}

	// Only another registry's credentials: pulled without any.
	mod := check(registryDeployment(t, 1, name, image, map[string]any{"aaa": other}),
		500, "pulling image "+image, "registry "+addr, "without credentials")
	if mod["runtimeStatus"] != agent.RuntimeFailed {
		t.Errorf("module without credentials: %v", mod)
	}
	noContainer("without credentials")

	// The registry's credentials with a wrong password.
	wrong := "wrong-" + mobytest.ID()
	secrets = append(secrets, wrong)
	mod = check(registryDeployment(t, 2, name, image, map[string]any{"aaa": other,
		"local": map[string]any{"username": user, "password": wrong, "address": addr}}),
		500, "pulling image "+image, "registry "+addr, "as "+user)
	if mod["runtimeStatus"] != agent.RuntimeFailed {
		t.Errorf("module with a wrong password: %v", mod)
	}
	noContainer("with a wrong password")

	// The right ones: pulled, created and started.
	right := registryDeployment(t, 3, name, image, map[string]any{"aaa": other,
		"local": map[string]any{"username": user, "password": password, "address": addr}})
	check(right, 200)
	waitFor(t, e, name, "run", func(s moby.ModuleState) bool { return s.State == "running" && s.Image == image })
	if mod := check(right, 200); mod["runtimeStatus"] != agent.RuntimeRunning {
		t.Errorf("module with the registry's credentials: %v", mod)
	}
	waitLogs(t, e, name, "pulled\n")

	// A new version whose pull fails keeps the container it has (the
	// engine's copy of the image is no update) and reports the failure;
	// the next Apply that can pull recreates it.
	first := waitFor(t, e, name, "run", func(s moby.ModuleState) bool { return s.State == "running" })
	bumped := registryDeployment(t, 4, name, image, map[string]any{"local": map[string]any{"username": user, "password": wrong, "address": addr}})
	bumped.Modules[name].Version = "2.0"
	check(bumped, 500, "pulling image "+image, "version 2.0")
	if s := waitFor(t, e, name, "run", func(s moby.ModuleState) bool { return s.State == "running" }); s.ContainerID != first.ContainerID || s.Version != "1.0" {
		t.Errorf("a new version whose image cannot be pulled: the container is %s of version %q, want the old %s of 1.0", s.ContainerID, s.Version, first.ContainerID)
	}
	fixed := registryDeployment(t, 5, name, image, map[string]any{"local": map[string]any{"username": user, "password": password, "address": addr}})
	fixed.Modules[name].Version = "2.0"
	check(fixed, 200)
	if s := waitFor(t, e, name, "run", func(s moby.ModuleState) bool { return s.State == "running" }); s.ContainerID == first.ContainerID || s.Version != "2.0" {
		t.Errorf("a new version once its image can be pulled: the container is %s of version %q, want a new one of 2.0", s.ContainerID, s.Version)
	}
}
