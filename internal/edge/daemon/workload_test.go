package daemon

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/agent"
	"github.com/hatchery/hatchery/internal/edge/moby"
)

// A module's socket signs only its own tokens, named exactly (module IDs
// may differ by case alone and the device's key signs for all of them),
// and only ones that expire within a day; the directory above the sockets
// keeps the host's other users out.
func TestWorkloadSignsOnlyTheModulesOwnTokens(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "workload")
	w := newWorkload(dir)
	defer w.close()
	w.configure(func(string, []byte) ([]byte, error) { return []byte("digest"), nil },
		func(m string) string { return "hub.test/devices/gw/modules/" + m }, nil)
	moduleDir, err := w.socket("sensor")
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("the workload directory: %v %v, want 0700", fi.Mode(), err)
	}
	if fi, err := os.Stat(filepath.Join(moduleDir, "workload.sock")); err != nil || fi.Mode().Perm() != 0o666 {
		t.Errorf("the module's socket: %v %v, want 0666", fi.Mode(), err)
	}
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", filepath.Join(moduleDir, "workload.sock"))
	}}}
	sign := func(data string) int {
		body, _ := json.Marshal(map[string]string{"keyId": "primary", "algo": "HMACSHA256", "data": base64.StdEncoding.EncodeToString([]byte(data))})
		resp, err := client.Post("http://workload/modules/sensor/genid/1/sign", "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	hour := strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10)
	week := strconv.FormatInt(time.Now().Add(7*24*time.Hour).Unix(), 10)
	for _, c := range []struct {
		data string
		want int
	}{
		{url.QueryEscape("hub.test/devices/gw/modules/sensor") + "\n" + hour, http.StatusOK},
		{url.QueryEscape("HUB.test/devices/gw/modules/sensor") + "\n" + hour, http.StatusOK},
		{url.QueryEscape("hub.test/devices/gw/modules/Sensor") + "\n" + hour, http.StatusForbidden},
		{url.QueryEscape("hub.test/devices/gw") + "\n" + hour, http.StatusForbidden},
		{url.QueryEscape("hub.test/devices/gw/modules/sensor") + "\n" + week, http.StatusForbidden},
		{url.QueryEscape("hub.test/devices/gw/modules/sensor") + "\nsoon", http.StatusForbidden},
		{url.QueryEscape("hub.test/devices/gw/modules/sensor"), http.StatusForbidden},
	} {
		if got := sign(c.data); got != c.want {
			t.Errorf("signing %q: HTTP %d, want %d", c.data, got, c.want)
		}
	}
}

// engineStub is an engine that already has containers, as after a restart
// of the daemon or a reboot; Start records whether the module's socket was
// there for Docker to bind-mount.
type engineStub struct {
	agent.Engine
	containers []string
	socketAt   func(module string) string
	started    map[string]bool // module → its socket existed at Start

	mu      sync.Mutex
	stopped []string
	// states overrides a container's state, running by default.
	states  map[string]moby.ModuleState
	created []moby.ModuleSpec
}

func (e *engineStub) stoppedNames() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return strings.Join(e.stopped, ",")
}

func (e *engineStub) List(context.Context) ([]moby.ModuleState, error) {
	var out []moby.ModuleState
	for _, n := range e.containers {
		st, ok := e.states[n]
		if !ok {
			st = moby.ModuleState{Name: n, State: "running"}
		}
		out = append(out, st)
	}
	return out, nil
}

func (e *engineStub) Start(_ context.Context, name string) error {
	if e.socketAt != nil {
		_, err := os.Stat(e.socketAt(name))
		e.started[name] = err == nil
	} else {
		e.started[name] = true
	}
	if st, ok := e.states[name]; ok {
		st.State = "running"
		e.states[name] = st
	}
	return nil
}

// Containers the daemon did not create in this run (it restarted; the
// device rebooted) get their sockets back: those listed, and those it
// starts, before Docker would make the bind mount's source itself.
func TestWorkloadServesExistingContainers(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "workload")
	w := newWorkload(dir)
	defer w.close()
	sock := func(m string) string { return filepath.Join(dir, m, "workload.sock") }
	stub := &engineStub{containers: []string{"sensor"}, socketAt: sock, started: map[string]bool{}}
	e := decorated{Engine: stub, w: w}
	if _, err := e.List(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sock("sensor")); err != nil {
		t.Errorf("a listed container's socket: %v", err)
	}
	if err := e.Start(context.Background(), "filter"); err != nil {
		t.Fatal(err)
	}
	if !stub.started["filter"] {
		t.Error("the socket of a module was not there when it started")
	}
}

func (e *engineStub) Remove(_ context.Context, name string) error {
	e.containers = slices.DeleteFunc(e.containers, func(n string) bool { return n == name })
	return nil
}

// A module removed from the deployment loses its socket: the device's key
// must not go on signing tokens for an identity it no longer runs. So does
// one whose container went without Remove (a Remove that failed, then
// `docker rm`), at the next listing.
func TestWorkloadReleasesRemovedModules(t *testing.T) {
	for _, how := range []string{"removed", "gone"} {
		dir := filepath.Join(t.TempDir(), "workload")
		w := newWorkload(dir)
		defer w.close()
		stub := &engineStub{containers: []string{"sensor", "filter"}, started: map[string]bool{}}
		e := decorated{Engine: stub, w: w}
		if _, err := e.List(context.Background()); err != nil {
			t.Fatal(err)
		}
		if how == "removed" {
			if err := e.Remove(context.Background(), "sensor"); err != nil {
				t.Fatal(err)
			}
		} else {
			stub.containers = []string{"filter"}
			if _, err := e.List(context.Background()); err != nil {
				t.Fatal(err)
			}
		}
		if c, err := net.Dial("unix", filepath.Join(dir, "sensor", "workload.sock")); err == nil {
			c.Close()
			t.Errorf("the socket of a module whose container is %s still answers", how)
		}
		if c, err := net.Dial("unix", filepath.Join(dir, "filter", "workload.sock")); err != nil {
			t.Errorf("the remaining module's socket: %v", err)
		} else {
			c.Close()
		}
	}
}

func (e *engineStub) Create(_ context.Context, s moby.ModuleSpec) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.created = append(e.created, s)
	return nil
}

// A mistyped HostConfig or Binds is refused, not replaced by the workload
// socket's bind (which would start the module without its volumes).
func TestWorkloadRefusesMistypedBinds(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "workload")
	w := newWorkload(dir)
	defer w.close()
	stub := &engineStub{started: map[string]bool{}}
	e := decorated{Engine: stub, w: w, env: func(string) map[string]string { return nil }}
	for opts, want := range map[string]string{
		`{"HostConfig":{"Binds":"/data:/data"}}`: "createOptions.HostConfig.Binds must be a list",
		`{"HostConfig":["/data:/data"]}`:         "createOptions.HostConfig must be an object",
	} {
		err := e.Create(context.Background(), moby.ModuleSpec{Name: "sensor", Image: "img", CreateOptions: []byte(opts)})
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("createOptions %s: %v, want %q", opts, err, want)
		}
	}
	if len(stub.created) != 0 {
		t.Errorf("created despite bad createOptions: %+v", stub.created)
	}
	err := e.Create(context.Background(), moby.ModuleSpec{Name: "sensor", Image: "img", CreateOptions: []byte(`{"HostConfig":{"Binds":["/data:/data"]}}`)})
	if err != nil || len(stub.created) != 1 || !strings.Contains(string(stub.created[0].CreateOptions), `"Binds":["/data:/data","`) {
		t.Errorf("good Binds: %v, %+v", err, stub.created)
	}
}
