package main

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/testutil"
)

func TestDefaultDataDir(t *testing.T) {
	t.Setenv("HATCHERY_DATA_DIR", "")
	dir := t.TempDir()
	own, packaged := filepath.Join(dir, "own"), filepath.Join(dir, "packaged")
	if got := preferPackaged(own, packaged); got != own {
		t.Errorf("neither exists: %s, want the user's own, to be created", got)
	}
	if err := os.Mkdir(packaged, 0o700); err != nil {
		t.Fatal(err)
	}
	if got := preferPackaged(own, packaged); got != packaged {
		t.Errorf("only the package's exists: %s, want it", got)
	}
	// A server that never served the user's own (it failed to listen:
	// the service has the ports) leaves it without endpoint.json.
	if err := os.Mkdir(own, 0o700); err != nil {
		t.Fatal(err)
	}
	if got := preferPackaged(own, packaged); got != packaged {
		t.Errorf("the user's own never served: %s, want the package's", got)
	}
	if err := os.WriteFile(filepath.Join(own, endpointFile), []byte("{}"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := preferPackaged(own, packaged); got != own {
		t.Errorf("both served: %s, want the user's own", got)
	}
	// HATCHERY_DATA_DIR names the directory, served or not.
	named := filepath.Join(dir, "named")
	t.Setenv("HATCHERY_DATA_DIR", named)
	if got := defaultDataDir(); got != named {
		t.Errorf("HATCHERY_DATA_DIR=%s: %s", named, got)
	}
}

// Root serving another user's data directory would leave it files that
// user's server cannot open: serve refuses, and touches nothing there.
func TestRootServingAnotherUsersDataDir(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Missing(t, "giving a data directory to another user needs root: run the tests as root")
	}
	c := &cli{t: t, bin: filepath.Join(t.TempDir(), "hatchery"), dataDir: filepath.Join(t.TempDir(), "data")}
	c.build()
	if err := os.Mkdir(c.dataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(c.dataDir, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	out, err := c.run("serve", "--hostname", "localhost", "--https-port", strconv.Itoa(testutil.FreePort(t)),
		"--mqtt-port", strconv.Itoa(testutil.FreePort(t)))
	if err == nil || !strings.Contains(out, "is not root's") || !strings.Contains(out, "run serve as that user") {
		t.Errorf("serve as root on a directory of uid 65534: %v\n%s", err, out)
	}
	if left, _ := os.ReadDir(c.dataDir); len(left) > 0 {
		t.Errorf("serve left %d files in the directory it refused, %s first", len(left), left[0].Name())
	}
}

// Under systemd (Type=notify), serve says when its ports are open and when
// it stops, over the socket $NOTIFY_SOCKET names.
func TestServeNotifiesSystemd(t *testing.T) {
	c := &cli{t: t, bin: filepath.Join(t.TempDir(), "hatchery"), dataDir: filepath.Join(t.TempDir(), "data")}
	c.build()
	sock := filepath.Join(t.TempDir(), "notify")
	notes, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer notes.Close()
	port := testutil.FreePort(t)
	srv := exec.Command(c.bin, "serve", "--data-dir", c.dataDir, "--hostname", "localhost",
		"--https-port", strconv.Itoa(port), "--mqtt-port", strconv.Itoa(testutil.FreePort(t)))
	srv.Env = append(os.Environ(), "NOTIFY_SOCKET="+sock)
	log := &testutil.SyncBuffer{}
	srv.Stdout, srv.Stderr = log, log
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = srv.Process.Kill()
		_ = srv.Wait()
		if t.Failed() {
			t.Logf("server log:\n%s", log.String())
		}
	}()
	receive := func() string {
		_ = notes.SetReadDeadline(time.Now().Add(30 * time.Second))
		b := make([]byte, 256)
		n, err := notes.Read(b)
		if err != nil {
			t.Fatalf("waiting for serve's notification: %v", err)
		}
		return string(b[:n])
	}
	if got := receive(); got != "READY=1" {
		t.Fatalf("first notification %q, want READY=1", got)
	}
	// Ready means ready: the port answers and the CLI finds the server.
	conn, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		t.Fatalf("READY=1, but the HTTPS port refuses: %v", err)
	}
	conn.Close()
	if _, err := os.Stat(filepath.Join(c.dataDir, endpointFile)); err != nil {
		t.Fatalf("READY=1 before %s was written: %v", endpointFile, err)
	}
	if err := srv.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if got := receive(); got != "STOPPING=1" {
		t.Errorf("after SIGTERM %q, want STOPPING=1", got)
	}
}

// A backup of the package's service's directory is restored in place, as
// its user's; any other by serving it.
func TestRestoreHint(t *testing.T) {
	if got := restoreHint("/srv/h", "/backups/h1"); got != "restore by serving with --data-dir /backups/h1" {
		t.Errorf("another directory: %q", got)
	}
	got := restoreHint(packagedDataDir, "/backups/h1")
	for _, want := range []string{"systemctl stop hatchery", "cp -a /backups/h1 /var/lib/hatchery", "chown -R hatchery:hatchery /var/lib/hatchery", "systemctl start hatchery"} {
		if !strings.Contains(got, want) {
			t.Errorf("the service's directory: %q lacks %q", got, want)
		}
	}
	// A path is one word of the command, whatever it holds.
	for path, want := range map[string]string{"/b/h 1": `'/b/h 1'`, "/b/it's": `'/b/it'\''s'`, "/b/h-1.x": "/b/h-1.x"} {
		if got := shellQuote(path); got != want {
			t.Errorf("shellQuote(%q) = %s, want %s", path, got, want)
		}
	}
}

// The CLI reaches the server on this machine at the address it listens
// on: the host name devices use need not resolve here.
func TestCLIWithUnresolvableHostName(t *testing.T) {
	c := &cli{t: t, bin: filepath.Join(t.TempDir(), "hatchery"), dataDir: filepath.Join(t.TempDir(), "data")}
	c.build()
	c.serve("--hostname", "hatchery.invalid", "--listen", "127.0.0.1")
	c.ok("enrollment", "list")
	c.ok("query", "-q", "SELECT * FROM devices")
	if out := c.ok("info"); !strings.Contains(out, "hatchery.invalid") || strings.Contains(out, "does not answer") {
		t.Errorf("info does not show the certificate the server presents:\n%s", out)
	}
	// The CA certificate, to copy to devices.
	want, err := os.ReadFile(filepath.Join(c.dataDir, "tls", "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if out := c.ok("info", "--ca-pem"); out != string(want) {
		t.Errorf("info --ca-pem printed %q, want tls/ca.pem", out)
	}
}

// The CLI reads the service's database URL from its defaults file, as
// systemd does, since sudo does not pass on an operator's environment.
func TestEnvFileValue(t *testing.T) {
	f := filepath.Join(t.TempDir(), "hatchery")
	if err := os.WriteFile(f, []byte(`# Options of the hatchery service
HATCHERY_SERVE_OPTS="--hostname h.example"
#HATCHERY_DATABASE=postgres://commented@db/x
HATCHERY_DATABASE=postgres://first@db/x
 HATCHERY_DATABASE = "postgres://hatchery:p=w@db/hatchery"
QUOTED="a \"quoted\" \\ value"
SINGLE='no \escapes'
`), 0o640); err != nil {
		t.Fatal(err)
	}
	for key, want := range map[string]string{
		"HATCHERY_DATABASE":   "postgres://hatchery:p=w@db/hatchery", // the last, unquoted, '=' in the value kept
		"HATCHERY_SERVE_OPTS": "--hostname h.example",
		"QUOTED":              `a "quoted" \ value`,
		"SINGLE":              `no \escapes`,
		"HATCHERY_NONE":       "",
	} {
		if got := envFileValue(f, key); got != want {
			t.Errorf("%s = %q, want %q", key, got, want)
		}
	}
	if got := envFileValue(filepath.Join(t.TempDir(), "missing"), "HATCHERY_DATABASE"); got != "" {
		t.Errorf("a missing file: %q", got)
	}
}

// A command given a database but no replica's data directory says where
// to run it: the database alone does not say where the service is.
func TestCLIDatabaseWithoutReplicaDir(t *testing.T) {
	c := &cli{t: t, bin: filepath.Join(t.TempDir(), "hatchery"), dataDir: filepath.Join(t.TempDir(), "admin")}
	c.build()
	out, err := c.run("enrollment", "list", "--database", "postgres://hatchery@db.invalid/hatchery")
	if err == nil || !strings.Contains(out, "with --database, run the command beside a replica, with its --data-dir") {
		t.Fatalf("a command with --database and no data directory: %v\n%s", err, out)
	}
}
