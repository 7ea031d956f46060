package mobytest

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/moby"
	"github.com/hatchery/hatchery/internal/testutil"
)

// StartRegistry runs a private image registry (Debian's docker-registry,
// the Distribution registry 2.x) on a free port of 127.0.0.1, with a
// temporary storage directory and htpasswd (bcrypt) basic auth for one
// user with a random password, and stops it when the test ends. It returns
// the registry's host:port, the user and the password.
//
// The registry speaks plain HTTP: neither it (htpasswd only warns without
// TLS) nor the engine needs TLS here, since the engine treats 127.0.0.0/8
// as an insecure registry range by default and so sends credentials to it
// over HTTP. The engine must share this host's loopback (no rootless or
// in-VM engine).
//
// Without docker-registry or htpasswd (Debian apache2-utils) the test fails
// under CI=true and is skipped otherwise.
func StartRegistry(t testing.TB) (addr, user, password string) {
	t.Helper()
	testutil.Require(t, "docker-registry", "docker-registry")
	testutil.Require(t, "htpasswd", "apache2-utils")
	user, password = "hatchery", "pw-"+ID()+ID()
	dir := t.TempDir()
	htpasswd := filepath.Join(dir, "htpasswd")
	cmd := exec.Command("htpasswd", "-B", "-i", "-n", user) // -i: the password on stdin, not argv
	cmd.Stdin = strings.NewReader(password)
	if err := os.WriteFile(htpasswd, testutil.Run(t, cmd), 0o600); err != nil {
		t.Fatal(err)
	}

	// Another process may take the port between the probe and the
	// registry's bind; then the registry exits and other ports are tried.
	var lastErr error
	for range 5 {
		addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(testutil.FreePort(t)))
		config := filepath.Join(dir, "config.yml")
		if err := os.WriteFile(config, []byte(registryConfig(addr, filepath.Join(dir, "storage"), htpasswd)), 0o600); err != nil {
			t.Fatal(err)
		}
		out := &testutil.SyncBuffer{}
		cmd := exec.Command("docker-registry", "serve", config)
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatalf("starting docker-registry: %v", err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		if lastErr = waitRegistry(addr, exited); lastErr == nil {
			t.Cleanup(func() {
				testutil.StopProcess(t, cmd, exited)
				if t.Failed() {
					t.Logf("docker-registry on %s logged:\n%s", addr, tail(out.String(), 8000))
				}
			})
			return addr, user, password
		}
		cmd.Process.Kill()
		<-exited
		lastErr = fmt.Errorf("%v; docker-registry logged:\n%s", lastErr, tail(out.String(), 4000))
	}
	t.Fatalf("docker-registry did not start: %v", lastErr)
	return "", "", ""
}

// PushImage imports the modbin image (see Image) as
// <registry>/hatchery-test/modbin:<random>, pushes it to the registry with
// the docker CLI, logged in as user with a temporary DOCKER_CONFIG (the
// host's docker config is left alone), and removes it from the engine, so
// that the reference it returns exists only in the registry. A copy the
// test pulls is removed when the test ends.
func (v *Env) PushImage(registry, user, password string) string {
	v.t.Helper()
	testutil.Require(v.t, "docker", "docker.io")
	ref := registry + "/hatchery-test/modbin:" + ID()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := v.Import(ctx, ref, bytes.NewReader(rootfs(v.t)), `ENTRYPOINT ["/modbin"]`); err != nil {
		v.t.Fatal(err)
	}
	v.images = append(v.images, ref) // also if what follows fails

	config := v.t.TempDir()
	cli := func(stdin string, args ...string) {
		v.t.Helper()
		cmd := exec.CommandContext(ctx, "docker", args...)
		cmd.Env = append(os.Environ(), "DOCKER_CONFIG="+config, "DOCKER_HOST="+engineURI())
		cmd.Stdin = strings.NewReader(stdin)
		testutil.Run(v.t, cmd)
	}
	cli(password, "login", "--username", user, "--password-stdin", registry)
	cli("", "push", ref)
	if err := v.RemoveImage(ctx, ref); err != nil {
		v.t.Fatal(err)
	}
	return ref
}

// engineURI is the engine New connects to.
func engineURI() string {
	if uri := os.Getenv("HATCHERY_MOBY_URI"); uri != "" {
		return uri
	}
	return moby.DefaultURI
}

func registryConfig(addr, storage, htpasswd string) string {
	return fmt.Sprintf(`version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
  secret: %s
auth:
  htpasswd:
    realm: hatchery-test
    path: %s
`, strconv.Quote(storage), addr, ID()+ID(), strconv.Quote(htpasswd))
}

// waitRegistry waits until the registry answers its API root; without
// credentials that is a 401 with a Basic challenge.
func waitRegistry(addr string, exited <-chan error) error {
	hc := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(15 * time.Second)
	for {
		select {
		case err := <-exited:
			return fmt.Errorf("docker-registry exited: %v", err)
		default:
		}
		rsp, err := hc.Get("http://" + addr + "/v2/")
		if err == nil {
			rsp.Body.Close()
			if rsp.StatusCode == http.StatusUnauthorized && strings.HasPrefix(rsp.Header.Get("Www-Authenticate"), "Basic") {
				return nil
			}
			err = fmt.Errorf("GET /v2/ answered %s, want 401 with a Basic challenge", rsp.Status)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no answer on %s within 15s: %v", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}
