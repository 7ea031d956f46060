package moby_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/moby"
	"github.com/hatchery/hatchery/internal/edge/moby/mobytest"
)

// TestPullFromRegistry pulls a module's image from a real private registry
// with htpasswd auth: refused without credentials and with a wrong
// password, with errors that name the registry and the user but never a
// password; pulled and run with the right ones.
func TestPullFromRegistry(t *testing.T) {
	e := mobytest.New(t)
	addr, user, password := mobytest.StartRegistry(t)
	ref := e.PushImage(addr, user, password)
	ctx := ctxFor(t)
	name := "pulled-" + mobytest.ID()
	opts, _ := json.Marshal(map[string]any{"Cmd": []string{"-print", "pulled from " + addr}})
	spec := moby.ModuleSpec{Name: name, Image: ref, CreateOptions: opts, PullPolicy: "on-create", ConfigHash: "h"}

	noContainer := func(when string) {
		t.Helper()
		states, err := e.List(ctx)
		if err != nil || len(states) != 0 {
			t.Errorf("%s: containers %+v, %v", when, states, err)
		}
	}

	err := e.Create(ctx, spec)
	t.Logf("without credentials: %v", err)
	if err == nil {
		t.Fatal("pulled from a registry with auth without credentials")
	}
	for _, want := range []string{"module " + name, "pulling image " + ref, "registry " + addr, "without credentials"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error without credentials lacks %q: %v", want, err)
		}
	}
	noContainer("after the pull without credentials failed")

	wrong := "wrong-" + mobytest.ID()
	spec.Auth = &moby.RegistryAuth{Username: user, Password: wrong, Address: addr}
	err = e.Create(ctx, spec)
	t.Logf("with a wrong password: %v", err)
	if err == nil {
		t.Fatal("pulled with a wrong password")
	}
	for _, want := range []string{"pulling image " + ref, "registry " + addr, "as " + user} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error with a wrong password lacks %q: %v", want, err)
		}
	}
	if strings.Contains(err.Error(), wrong) || strings.Contains(err.Error(), password) {
		t.Errorf("error shows a password: %v", err)
	}
	noContainer("after the pull with a wrong password failed")

	spec.Auth.Password = password
	if err := e.Create(ctx, spec); err != nil {
		t.Fatalf("with the right password: %v", err)
	}
	if err := e.Start(ctx, name); err != nil {
		t.Fatal(err)
	}
	if s := waitState(t, e, name, "running"); s.Image != ref {
		t.Errorf("running: %+v", s)
	}
	want := "pulled from " + addr + "\n"
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if got := logs(t, e, name, moby.LogOptions{}); got == want {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("logs: %q, want %q", got, want)
		}
	}
}

// With imagePullPolicy on-create, each new container's image is pulled,
// so a tag that moved in the registry is run at its new image; when the
// pull fails, the image the engine has is used.
func TestOnCreatePullsEachTime(t *testing.T) {
	e := mobytest.New(t)
	addr, user, password := mobytest.StartRegistry(t)
	ref := e.PushImage(addr, user, password)
	ctx := ctxFor(t)
	spec := moby.ModuleSpec{Name: "pulled-" + mobytest.ID(), Image: ref, PullPolicy: "on-create",
		Auth: &moby.RegistryAuth{Username: user, Password: password, Address: addr}}
	if err := e.EnsureImage(ctx, spec, false); err != nil {
		t.Fatal(err)
	}
	pushed, err := e.ImageID(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	// Removing ref leaves this image behind if ref ends up elsewhere.
	t.Cleanup(func() { _ = e.RemoveImage(context.Background(), pushed) })
	// The engine's copy goes stale: ref now names another image here.
	if err := e.Tag(ctx, e.Image(""), ref); err != nil {
		t.Fatal(err)
	}
	if err := e.EnsureImage(ctx, spec, false); err != nil {
		t.Fatal(err)
	}
	if id, _ := e.ImageID(ctx, ref); id != pushed {
		t.Errorf("after EnsureImage the engine has %s as %s, want the registry's %s: it did not pull", id, ref, pushed)
	}

	spec.Auth.Password = "wrong-" + mobytest.ID()
	if err := e.EnsureImage(ctx, spec, false); err != nil {
		t.Errorf("a failed pull with the image on the engine: %v, want the engine's copy used", err)
	}
	// An update must pull: the engine's copy is what the module runs now.
	if err := e.EnsureImage(ctx, spec, true); err == nil || !strings.Contains(err.Error(), "left as it is") {
		t.Errorf("a failed pull for an update: %v, want its error", err)
	}
	spec.Image = addr + "/hatchery-test/nosuch:1"
	if err := e.EnsureImage(ctx, spec, false); err == nil {
		t.Error("a failed pull of an image the engine lacks succeeded")
	}
}
