package main

// The CLI's two ways of driving the runtime: systemctl and journalctl when
// the runtime is installed as systemd units on a running systemd, the
// management socket otherwise. systemctl and journalctl are fakes put first
// on PATH; the daemon is a fake management server on a Unix socket.
//
// underSystemd() looks for /run/systemd/system, which a test cannot create.
// The systemd path is tested when IOTEDGE_SYSTEMD_DIR (the directory whose
// existence means "systemd is running", see systemdMarkerEnv) is honoured,
// or when the machine runs systemd; otherwise those tests skip and say so.
// packaging/systemd_boot_test.go runs the same commands against a real
// systemd with the package installed.

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/config"
	"github.com/hatchery/hatchery/internal/edge/mgmt"
)

// systemdMarkerEnv names the directory underSystemd checks in place of
// /run/systemd/system. env.go does not read it yet: the systemd-path tests
// skip until it does.
const systemdMarkerEnv = "IOTEDGE_SYSTEMD_DIR"

// fakeSystemd puts fake systemctl and journalctl first on PATH. They log
// each call, one line of arguments, to the returned file. `systemctl cat`
// succeeds when unitInstalled, `systemctl is-active` prints "active" and
// journalctl prints "journal:" and its arguments.
func fakeSystemd(t *testing.T, unitInstalled bool) (calls string) {
	t.Helper()
	dir := t.TempDir()
	calls = filepath.Join(dir, "calls")
	catStatus := "1"
	if unitInstalled {
		catStatus = "0"
	}
	scripts := map[string]string{
		"systemctl": `#!/bin/sh
echo "systemctl $*" >>"` + calls + `"
case "$1" in
cat) exit ` + catStatus + ` ;;
is-active) echo active ;;
esac
exit 0
`,
		"journalctl": `#!/bin/sh
echo "journalctl $*" >>"` + calls + `"
echo "journal: $*"
`,
	}
	for name, body := range scripts {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	return calls
}

// readCalls returns the logged calls, without `systemctl cat`, which only
// underSystemd makes.
func readCalls(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if l != "" && !strings.HasPrefix(l, "systemctl cat ") {
			out = append(out, l)
		}
	}
	return out
}

// fakeDaemon serves the management API on a socket that IOTEDGE_HOST names
// and records the requests.
type fakeDaemon struct {
	mu       sync.Mutex
	requests []string
}

func startFakeDaemon(t *testing.T) *fakeDaemon {
	t.Helper()
	d := &fakeDaemon{}
	// Unix socket paths are short: t.TempDir() may be too long.
	dir, err := os.MkdirTemp("", "iotedge-mgmt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "mgmt.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		d.mu.Lock()
		d.requests = append(d.requests, r.Method+" "+r.URL.RequestURI())
		d.mu.Unlock()
		switch r.URL.Path {
		case "/status":
			_ = json.NewEncoder(w).Encode(mgmt.Status{State: "running", Since: time.Now(),
				Provisioning: mgmt.Provisioning{Source: "manual", DeviceID: "dev1", HubHostName: "hub"}})
		case "/logs":
			_, _ = io.WriteString(w, "daemon log line\n")
		case "/modules":
			_ = json.NewEncoder(w).Encode([]mgmt.Module{{Name: "sensor", Status: "running"}})
		default:
			w.WriteHeader(http.StatusNoContent)
		}
	}), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { srv.Close() })
	t.Setenv("IOTEDGE_HOST", "unix://"+sock)
	return d
}

func (d *fakeDaemon) got() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.requests)
}

// manualConfig writes a valid config.toml and points IOTEDGE_CONFIG at
// another path, which `config apply -c` installs.
func manualConfig(t *testing.T) (source, target string) {
	t.Helper()
	key := base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32))
	cfg, err := config.FromConnectionString("HostName=hub.example;DeviceId=dev1;SharedAccessKey=" + key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	source, target = filepath.Join(dir, "new.toml"), filepath.Join(dir, "config.toml")
	if err := os.WriteFile(source, cfg.TOML(), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("IOTEDGE_CONFIG", target)
	return source, target
}

func systemdRunning() bool {
	_, err := os.Stat("/run/systemd/system")
	return err == nil
}

func TestUnderSystemdHonoursNoSystemd(t *testing.T) {
	calls := fakeSystemd(t, true)
	t.Setenv("IOTEDGE_NO_SYSTEMD", "1")
	t.Setenv(systemdMarkerEnv, t.TempDir())
	if underSystemd() {
		t.Fatal("underSystemd() with IOTEDGE_NO_SYSTEMD=1: true, want false")
	}
	if b, _ := os.ReadFile(calls); len(b) > 0 {
		t.Errorf("IOTEDGE_NO_SYSTEMD=1 still ran: %s", b)
	}
}

func TestUnderSystemdWantsTheInstalledUnit(t *testing.T) {
	calls := fakeSystemd(t, false) // iotedged.service is not installed
	t.Setenv("IOTEDGE_NO_SYSTEMD", "")
	t.Setenv(systemdMarkerEnv, t.TempDir())
	if underSystemd() {
		t.Fatal("underSystemd() without iotedged.service: true, want false")
	}
	b, _ := os.ReadFile(calls)
	if len(b) > 0 && strings.TrimSpace(string(b)) != "systemctl cat iotedged.service" {
		t.Errorf("systemctl calls: %q, want at most `systemctl cat iotedged.service`", b)
	}
}

func TestUnderSystemdWithoutRunningSystemd(t *testing.T) {
	if systemdRunning() {
		t.Skip("this machine runs systemd (/run/systemd/system exists)")
	}
	calls := fakeSystemd(t, true)
	t.Setenv("IOTEDGE_NO_SYSTEMD", "")
	t.Setenv(systemdMarkerEnv, "")
	if underSystemd() {
		t.Fatal("underSystemd() without /run/systemd/system: true, want false")
	}
	if b, _ := os.ReadFile(calls); len(b) > 0 {
		t.Errorf("without systemd the CLI ran: %s", b)
	}
}

// Without systemd every command goes to the daemon, and nothing to
// systemctl or journalctl.
func TestCommandsUseTheDaemonWithoutSystemd(t *testing.T) {
	calls := fakeSystemd(t, false)
	t.Setenv("IOTEDGE_NO_SYSTEMD", "")
	t.Setenv("IOTEDGE_TPM_SOCKET", filepath.Join(t.TempDir(), "tpmd.sock")) // nobody listens
	d := startFakeDaemon(t)

	for _, c := range []struct {
		args []string
		want string // the daemon's request
		out  string
	}{
		{[]string{"system", "restart"}, "POST /reload", ""},
		{[]string{"system", "stop"}, "POST /stop", ""},
		{[]string{"system", "logs", "--tail", "5"}, "GET /logs?tail=5", ""},
		{[]string{"system", "status"}, "GET /status", "iotedged      Running"},
		{[]string{"system", "status"}, "GET /status", "aziot-tpmd    Down"}, // asked itself, not the daemon
	} {
		before := len(d.got())
		out, err := iotedge(t, c.args...)
		if err != nil {
			t.Fatalf("iotedge %s: %v\n%s", strings.Join(c.args, " "), err, out)
		}
		if got := d.got()[before:]; !slices.Contains(got, c.want) {
			t.Errorf("iotedge %s: daemon got %q, want %q", strings.Join(c.args, " "), got, c.want)
		}
		if !strings.Contains(out, c.out) {
			t.Errorf("iotedge %s printed:\n%s\nwant %q in it", strings.Join(c.args, " "), out, c.out)
		}
	}

	if os.Geteuid() == 0 {
		src, target := manualConfig(t)
		before := len(d.got())
		if out, err := iotedge(t, "config", "apply", "-c", src); err != nil {
			t.Fatalf("iotedge config apply: %v\n%s", err, out)
		}
		if got := d.got()[before:]; !slices.Equal(got, []string{"POST /reload"}) {
			t.Errorf("config apply: daemon got %q, want a reload", got)
		}
		if _, err := os.Stat(target); err != nil {
			t.Errorf("config apply did not install the file: %v", err)
		}
	} else {
		t.Log("config apply not run: it needs root")
	}
	if got := readCalls(t, calls); len(got) > 0 {
		t.Errorf("without systemd the CLI ran %q", got)
	}
}

// requireSystemdPath makes underSystemd() true with the fakes, or skips.
func requireSystemdPath(t *testing.T) (calls string) {
	t.Helper()
	calls = fakeSystemd(t, true)
	t.Setenv("IOTEDGE_NO_SYSTEMD", "")
	t.Setenv(systemdMarkerEnv, t.TempDir())
	if !underSystemd() {
		t.Skipf("the systemd path cannot be reached here: no /run/systemd/system, and env.go "+
			"does not read %s (underSystemd should stat cmp.Or(os.Getenv(%q), \"/run/systemd/system\"))",
			systemdMarkerEnv, systemdMarkerEnv)
	}
	return calls
}

func TestCommandsUseSystemdUnderSystemd(t *testing.T) {
	calls := requireSystemdPath(t)
	d := startFakeDaemon(t)
	units := "aziot-tpmd iotedged"

	for _, c := range []struct {
		args []string
		want []string // systemctl and journalctl calls
		out  string
	}{
		{[]string{"system", "restart"}, []string{"systemctl restart " + units}, ""},
		{[]string{"system", "stop"}, []string{"systemctl stop " + units}, ""},
		{[]string{"system", "logs", "--tail", "7"},
			[]string{"journalctl --no-pager -n 7 -u aziot-tpmd -u iotedged"}, ""},
		{[]string{"system", "status"},
			[]string{"systemctl is-active aziot-tpmd", "systemctl is-active iotedged"}, "aziot-tpmd    Running"},
	} {
		os.Remove(calls)
		out, err := iotedge(t, c.args...)
		if err != nil {
			t.Fatalf("iotedge %s: %v\n%s", strings.Join(c.args, " "), err, out)
		}
		if got := readCalls(t, calls); !slices.Equal(got, c.want) {
			t.Errorf("iotedge %s ran %q, want %q", strings.Join(c.args, " "), got, c.want)
		}
		if !strings.Contains(out, c.out) {
			t.Errorf("iotedge %s printed:\n%s\nwant %q in it", strings.Join(c.args, " "), out, c.out)
		}
	}
	if got := d.got(); slices.Contains(got, "POST /reload") || slices.Contains(got, "POST /stop") {
		t.Errorf("under systemd the daemon was asked %q: restart and stop belong to systemctl", got)
	}

	if os.Geteuid() != 0 {
		t.Log("config apply not run: it needs root")
		return
	}
	src, _ := manualConfig(t)
	os.Remove(calls)
	if out, err := iotedge(t, "config", "apply", "-c", src); err != nil {
		t.Fatalf("iotedge config apply: %v\n%s", err, out)
	}
	got := readCalls(t, calls)
	// The units are enabled (so they start at boot), then (re)started.
	if len(got) == 0 || got[len(got)-1] != "systemctl restart "+units {
		t.Errorf("config apply ran %q: want `systemctl restart %s` last", got, units)
	}
	enabled := slices.ContainsFunc(got, func(c string) bool {
		return strings.HasPrefix(c, "systemctl enable ") && strings.HasSuffix(c, " "+units)
	})
	if !enabled {
		t.Errorf("config apply ran %q: want `systemctl enable ... %s`", got, units)
	}
}

// The units the CLI drives are the ones the package ships.
func TestServicesAreThePackagedUnits(t *testing.T) {
	for _, s := range services {
		if _, err := os.Stat(filepath.Join("..", "..", "packaging", "systemd", s+".service")); err != nil {
			t.Errorf("service %s: %v", s, err)
		}
	}
}
