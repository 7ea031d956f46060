// Package testutil holds helpers for tests that run real tools: they fail
// under CI=true when a tool is missing, and skip on a developer's machine.
package testutil

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Require checks that command is on PATH. When it is missing the test
// fails under CI=true and is skipped otherwise; hint names the Debian
// package that provides it.
func Require(t testing.TB, command, hint string) {
	t.Helper()
	if _, err := exec.LookPath(command); err == nil {
		return
	}
	Missing(t, "%s is not on PATH: install the Debian package %s (apt-get install %s)", command, hint, hint)
}

// Missing fails the test under CI=true, where every dependency must be
// installed and the tests run as root, and skips it elsewhere, saying so.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf(format, args...)
	}
	t.Skipf(format+" (under CI=true this fails)", args...)
}

// SeedsDir returns the directory of the seed documents: $HATCHERY_SEEDS, or
// shared/seeds beside the repository. When it is missing the test fails
// under CI=true and is skipped otherwise.
func SeedsDir(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("HATCHERY_SEEDS")
	if dir == "" {
		root, err := os.Getwd()
		for err == nil {
			if _, serr := os.Stat(filepath.Join(root, "go.mod")); serr == nil {
				break
			}
			if parent := filepath.Dir(root); parent != root {
				root = parent
			} else {
				err = errors.New("no go.mod above the test's directory")
			}
		}
		if err != nil {
			t.Fatalf("finding the repository root: %v", err)
		}
		dir = filepath.Join(root, "..", "shared", "seeds")
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		Missing(t, "seed documents not found at %s: set HATCHERY_SEEDS to their directory", dir)
	}
	return dir
}

// Run runs cmd and returns its standard output; when it fails, the test
// fails with the command line and everything the command printed.
func Run(t testing.TB, cmd *exec.Cmd) []byte {
	t.Helper()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v\n%s%s", strings.Join(cmd.Args, " "), err, out, stderr.Bytes())
	}
	return out
}

// StartSWTPM starts a fresh swtpm (TPM 2.0, already started up) on free
// loopback ports N and N+1, stops it when the test ends, and returns the
// TCTI string "swtpm:host=127.0.0.1,port=N" that tpm2-tools and tpm.Open
// both accept.
func StartSWTPM(t testing.TB) string {
	t.Helper()
	Require(t, "swtpm", "swtpm")
	state := t.TempDir()
	// Another process may take the ports between our probe and swtpm's
	// bind; then swtpm exits and we try other ports.
	var lastErr error
	for range 5 {
		port := freePortPair(t)
		var stderr bytes.Buffer
		cmd := exec.Command("swtpm", "socket", "--tpm2",
			"--server", "type=tcp,port="+strconv.Itoa(port),
			"--ctrl", "type=tcp,port="+strconv.Itoa(port+1),
			"--flags", "not-need-init,startup-clear",
			"--tpmstate", "dir="+state)
		cmd.Stdout, cmd.Stderr = &stderr, &stderr
		if err := cmd.Start(); err != nil {
			t.Fatalf("starting swtpm: %v", err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		if lastErr = waitAnswer(port, exited); lastErr == nil {
			t.Cleanup(func() { StopProcess(t, cmd, exited) })
			return fmt.Sprintf("swtpm:host=127.0.0.1,port=%d", port)
		}
		cmd.Process.Kill()
		<-exited
		lastErr = fmt.Errorf("%v; swtpm said: %s", lastErr, stderr.Bytes())
	}
	t.Fatalf("swtpm did not start: %v", lastErr)
	return ""
}

// ListenPair listens on two adjacent free TCP ports N and N+1 of 127.0.0.1,
// the layout of simulators whose control port follows the command port.
// The listeners are closed when the test ends.
func ListenPair(t testing.TB) (n, n1 net.Listener) {
	t.Helper()
	l, l1 := listenLow(t, 2)
	t.Cleanup(func() { l.Close(); l1.Close() })
	return l, l1
}

// FreePort returns a port of 127.0.0.1 that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, _ := listenLow(t, 1)
	l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// listenLow listens on one free port of 127.0.0.1 (n 1), or on two adjacent
// ones (n 2; the second listener is nil otherwise). The ports are below
// Linux's ephemeral range (32768 up), so that outgoing connections, of
// which a load test may leave thousands, never hold them.
func listenLow(t testing.TB, n int) (l, l1 net.Listener) {
	t.Helper()
	for range 200 {
		port := 10000 + rand.IntN(22000)
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue
		}
		if n == 1 {
			return l, nil
		}
		if l1, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port+1))); err == nil {
			return l, l1
		}
		l.Close()
	}
	t.Fatalf("found no %d adjacent free ports on 127.0.0.1", n)
	return nil, nil
}

// freePortPair returns a port N such that N and N+1 were both free a moment ago.
func freePortPair(t testing.TB) int {
	t.Helper()
	l, l1 := ListenPair(t)
	l.Close()
	l1.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// waitAnswer waits until swtpm answers a TPM2_GetRandom on its data port.
func waitAnswer(port int, exited <-chan error) error {
	getRandom := []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case err := <-exited:
			return fmt.Errorf("swtpm exited: %v", err)
		default:
		}
		if conn, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			conn.SetDeadline(time.Now().Add(5 * time.Second))
			rsp := make([]byte, 10)
			_, err = conn.Write(getRandom)
			if err == nil {
				_, err = conn.Read(rsp)
			}
			conn.Close()
			if err == nil && rsp[0] == 0x80 {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no answer on %s within 10s", addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// StopProcess ends a started command with SIGTERM, and kills it if it
// lingers; exited receives what cmd.Wait returned.
func StopProcess(t testing.TB, cmd *exec.Cmd, exited <-chan error) {
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		t.Logf("%s (pid %d) ignored SIGTERM; killing it", filepath.Base(cmd.Path), cmd.Process.Pid)
		cmd.Process.Kill()
		<-exited
	}
}

// SyncBuffer collects a process's (or logger's) output while the test reads it.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *SyncBuffer) Reset() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf.Reset()
}

// Within is the first value from ch, failing the test when none comes
// within 20 s.
func Within[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(20 * time.Second):
		t.Fatalf("no %s within 20 s", what)
	}
	var zero T
	return zero
}
