// Package e2e runs the seed documents' flow end to end with real parts:
// swtpm and tpm2-tools for the TPM, `hatchery serve` for DPS and the hub,
// aziot-tpmd and iotedged for the device, and dockerd for the modules.
package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/testutil"
)

var (
	binOnce sync.Once
	binDir  string
	binErr  error
)

// bin builds the project's commands once per test run.
func bin(t testing.TB, name string) string {
	t.Helper()
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "hatchery-e2e-bin-")
		if binErr != nil {
			return
		}
		for _, c := range []string{"hatchery", "iotedge", "iotedged", "aziot-tpmd"} {
			// Built as the package builds them (scripts/build-deb.sh), so measurements are of what ships.
			out, err := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", filepath.Join(binDir, c), "../../cmd/"+c).CombinedOutput()
			if err != nil {
				binErr = fmt.Errorf("go build %s: %v\n%s", c, err, out)
				return
			}
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return filepath.Join(binDir, name)
}

// proc is a background process whose output is kept for failure reports.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *testutil.SyncBuffer
}

// start runs a command in the background until the test ends.
func start(t testing.TB, name string, env []string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, out: &testutil.SyncBuffer{}}
	p.cmd = exec.Command(args[0], args[1:]...)
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("---- %s output ----\n%s", name, p.out.String())
		}
	})
	return p
}

func (p *proc) stop() {
	if p.cmd.ProcessState != nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-done
	}
}

// run runs a command to completion.
func run(t testing.TB, env []string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func must(t testing.TB, env []string, args ...string) string {
	t.Helper()
	out, err := run(t, env, args...)
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// eventually polls f until it returns "" (done) or the time is up; f
// returns what it is still waiting for.
func eventually(t testing.TB, timeout time.Duration, f func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		waiting := f()
		if waiting == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s still: %s", timeout, waiting)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// site is a running `hatchery serve`.
type site struct {
	t        testing.TB
	dataDir  string
	https    int
	mqtt     int
	proc     *proc
	IDScope  string `json:"idScope"`
	Endpoint string `json:"provisioningHost"`
	CA       string `json:"caCertificate"`
}

func startSite(t testing.TB) *site {
	s := &site{t: t, dataDir: t.TempDir(), https: testutil.FreePort(t), mqtt: testutil.FreePort(t)}
	s.start()
	if err := json.Unmarshal([]byte(s.hatchery("info", "--output", "json")), s); err != nil {
		t.Fatal(err)
	}
	return s
}

func (s *site) start() {
	t := s.t
	s.proc = start(t, "hatchery serve", nil, bin(t, "hatchery"), "serve", "--data-dir", s.dataDir, "--hostname", "localhost",
		"--https-port", strconv.Itoa(s.https), "--mqtt-port", strconv.Itoa(s.mqtt))
	eventually(t, 20*time.Second, func() string {
		if c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(s.mqtt)); err == nil {
			c.Close()
			return ""
		}
		return "hatchery serve is not listening"
	})
}

func (s *site) hatchery(args ...string) string {
	s.t.Helper()
	return must(s.t, nil, append([]string{bin(s.t, "hatchery")}, append(args, "--data-dir", s.dataDir)...)...)
}

// requireTools fails (CI) or skips when a real part is missing.
func requireTools(t testing.TB) {
	testutil.Require(t, "swtpm", "swtpm")
	testutil.Require(t, "tpm2_createek", "tpm2-tools")
	testutil.Require(t, "dockerd", "docker.io")
	if _, err := os.Stat("/var/run/docker.sock"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("dockerd is not running (scripts/install-test-deps.sh starts it)")
		}
		t.Skip("dockerd is not running: start it with `dockerd &`")
	}
}

// provisionInfo runs the seed documents' script through tpm2-tools and
// reads what it prints.
func provisionInfo(t testing.TB, tcti string) (regID, ek string) {
	script := filepath.Join(testutil.SeedsDir(t), "tpm-provision-info.sh")
	cmd := exec.Command("sh", script)
	cmd.Dir = t.TempDir()
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI="+tcti, "USER=root")
	out, _ := cmd.Output() // the script's last rm fails when the EK existed; its output is what counts
	m := regexp.MustCompile(`Registration Id:\n(\S+)\n\nEndorsement Key:\n(\S+)`).FindStringSubmatch(string(out))
	if m == nil {
		t.Fatalf("the seed script printed:\n%s", out)
	}
	return m[1], m[2]
}

// lines returns the lines of out that contain all of words.
func grep(out string, words ...string) []string {
	var hits []string
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		ok := true
		for _, w := range words {
			ok = ok && strings.Contains(sc.Text(), w)
		}
		if ok {
			hits = append(hits, sc.Text())
		}
	}
	return hits
}
