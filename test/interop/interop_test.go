//go:build unix

// Package interop runs the official Azure IoT Node.js SDKs, unmodified, against a real
// `hatchery serve`. The SDKs hard-code port 443, so the server listens there (run as root
// or with CAP_NET_BIND_SERVICE). The JavaScript tests are *.test.js in this directory
// (node:test); this harness builds and starts the server and runs them:
//
//	go test ./test/interop/ -v -count=1
//
// It needs Node.js ≥ 20 and npm; the SDKs are installed from package-lock.json with
// `npm ci --ignore-scripts` when node_modules is missing or out of date. tpm.test.js also
// needs swtpm, which the harness starts (without it, those tests alone skip).
// With CI=true a missing dependency fails the test instead of skipping it.
package interop

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
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

const (
	httpsPort       = 443 // hard-coded by the Azure SDKs
	npmTimeout      = 5 * time.Minute
	buildTimeout    = 3 * time.Minute
	readyTimeout    = 30 * time.Second
	infoTimeout     = 30 * time.Second
	nodeTimeout     = 90 * time.Second
	stopTimeout     = 10 * time.Second
	minNodeMajor    = 20
	installHint     = "install Node.js ≥ 20 and npm (Debian: apt-get install nodejs npm)"
	serverHostname  = "localhost"
	nodeTestPattern = "*.test.js"
)

// hatcheryInfo is the output of `hatchery info --output json`.
type hatcheryInfo struct {
	IDScope                             string `json:"idScope"`
	ProvisioningHost                    string `json:"provisioningHost"`
	ProvisioningServiceConnectionString string `json:"provisioningServiceConnectionString"`
	HubHostName                         string `json:"hubHostName"`
	HubConnectionString                 string `json:"hubConnectionString"`
	CACertificate                       string `json:"caCertificate"`
	ServiceEndpoint                     string `json:"serviceEndpoint"`
}

func TestAzureSDKInterop(t *testing.T) {
	interopDir, err := os.Getwd() // go test runs in the package directory
	if err != nil {
		t.Fatal(err)
	}
	repoRoot := filepath.Join(interopDir, "..", "..")
	if _, err := os.Stat(filepath.Join(repoRoot, "go.mod")); err != nil {
		t.Fatalf("repository root not found from %s: %v", interopDir, err)
	}

	node := requireTool(t, "node")
	npm := requireTool(t, "npm")
	requireNodeVersion(t, node)
	requirePort(t, httpsPort) // fail fast, before installing and building

	ensureNodeModules(t, npm, interopDir)
	bin := buildHatchery(t, repoRoot)

	requirePort(t, httpsPort) // again: another test package may have taken it meanwhile
	dataDir := filepath.Join(t.TempDir(), "data")
	startServer(t, bin, dataDir)
	info, infoJSON := serverInfo(t, bin, dataDir)
	t.Logf("hatchery: idScope=%s provisioningHost=%s hub=%s", info.IDScope, info.ProvisioningHost, info.HubHostName)

	files, err := filepath.Glob(filepath.Join(interopDir, nodeTestPattern))
	if err != nil || len(files) == 0 {
		t.Fatalf("no %s files in %s (%v)", nodeTestPattern, interopDir, err)
	}
	for i, f := range files {
		files[i] = filepath.Base(f)
	}

	args := append([]string{"--test", "--test-reporter=spec"}, files...)
	cmd := command(t, nodeTimeout, node, args...)
	cmd.Dir = interopDir
	cmd.Env = append(os.Environ(),
		"HATCHERY_INFO="+infoJSON,
		"NODE_EXTRA_CA_CERTS="+info.CACertificate,
		"NO_COLOR=1",
	)
	if addr := startSWTPM(t); addr != "" {
		cmd.Env = append(cmd.Env, "HATCHERY_SWTPM="+addr)
	}
	if err := runLogged(t, "node", cmd); err != nil {
		t.Fatalf("node %s: %v (output above)", strings.Join(args, " "), err)
	}
}

// requireTool finds a program on PATH; missing, it fails under CI=true and skips otherwise.
func requireTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		testutil.Missing(t, "%s not found on PATH: %s", name, installHint)
	}
	return p
}

// startSWTPM starts a software TPM for tpm.test.js and returns the host:port of its
// command channel. Without swtpm, CI=true fails; elsewhere only tpm.test.js skips its
// tests (it sees no HATCHERY_SWTPM), so the other SDK tests still run.
func startSWTPM(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("swtpm"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("swtpm is not on PATH: install the Debian package swtpm (apt-get install swtpm)")
		}
		t.Logf("swtpm is not on PATH: the TPM attestation tests skip; install the Debian package swtpm (apt-get install swtpm)")
		return ""
	}
	tcti := testutil.StartSWTPM(t)
	var port int
	if _, err := fmt.Sscanf(tcti, "swtpm:host=127.0.0.1,port=%d", &port); err != nil {
		t.Fatalf("unexpected TCTI %q from testutil.StartSWTPM: %v", tcti, err)
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
}

func requireNodeVersion(t *testing.T, node string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, node, "--version").Output()
	if err != nil {
		t.Fatalf("%s --version: %v", node, err)
	}
	v := strings.TrimSpace(string(out))
	m := regexp.MustCompile(`^v(\d+)\.`).FindStringSubmatch(v)
	if m == nil {
		t.Fatalf("%s --version printed %q", node, v)
	}
	if major, _ := strconv.Atoi(m[1]); major < minNodeMajor {
		testutil.Missing(t, "node %s is too old: %s", v, installHint)
	}
	t.Logf("node %s", v)
}

// requirePort checks that the server will be able to listen on the port.
func requirePort(t *testing.T, port int) {
	t.Helper()
	l, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
	if err == nil {
		l.Close()
		return
	}
	if errors.Is(err, syscall.EACCES) {
		testutil.Missing(t, "cannot listen on port %d: %v: the Azure SDKs hard-code it; run as root or give the test binary CAP_NET_BIND_SERVICE", port, err)
	}
	t.Fatalf("port %d is not free (%v): the Azure SDKs hard-code it, so stop whatever listens there (ss -ltnp 'sport = :%d')", port, err, port)
}

// ensureNodeModules runs `npm ci --ignore-scripts` unless node_modules already holds
// exactly the versions package.json asks for.
func ensureNodeModules(t *testing.T, npm, dir string) {
	t.Helper()
	reason := nodeModulesStale(dir)
	if reason == "" {
		return
	}
	t.Logf("installing the Azure SDKs (%s): npm ci --ignore-scripts", reason)
	cmd := command(t, npmTimeout, npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund")
	cmd.Dir = dir
	if err := runLogged(t, "npm", cmd); err != nil {
		t.Fatalf("npm ci --ignore-scripts in %s: %v (is the npm registry reachable?)", dir, err)
	}
	if reason := nodeModulesStale(dir); reason != "" {
		t.Fatalf("after npm ci: %s", reason)
	}
}

func nodeModulesStale(dir string) string {
	var pkg struct {
		Dependencies map[string]string `json:"dependencies"`
	}
	b, err := os.ReadFile(filepath.Join(dir, "package.json"))
	if err != nil {
		return err.Error()
	}
	if err := json.Unmarshal(b, &pkg); err != nil {
		return "package.json: " + err.Error()
	}
	for name, want := range pkg.Dependencies {
		var installed struct {
			Version string `json:"version"`
		}
		b, err := os.ReadFile(filepath.Join(dir, "node_modules", name, "package.json"))
		if err != nil {
			return name + " is not installed"
		}
		if err := json.Unmarshal(b, &installed); err != nil || installed.Version != want {
			return fmt.Sprintf("%s %s is installed, package.json wants %s", name, installed.Version, want)
		}
	}
	return ""
}

func buildHatchery(t *testing.T, repoRoot string) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("go is not on PATH: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "hatchery")
	cmd := command(t, buildTimeout, goTool, "build", "-o", bin, "./cmd/hatchery")
	cmd.Dir = repoRoot
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/hatchery: %v\n%s", err, out)
	}
	return bin
}

// startServer runs `hatchery serve` on port 443 until the test ends, and waits until
// it answers HTTPS with a certificate from its own CA.
func startServer(t *testing.T, bin, dataDir string) {
	t.Helper()
	logPath := filepath.Join(filepath.Dir(dataDir), "serve.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", "--data-dir", dataDir, "--hostname", serverHostname,
		"--https-port", strconv.Itoa(httpsPort))
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("start hatchery serve: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	t.Cleanup(func() {
		defer logFile.Close()
		select {
		case err := <-exited:
			t.Errorf("hatchery serve exited before the end of the test: %v", err)
		default:
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case err := <-exited:
				t.Logf("hatchery serve stopped on SIGTERM (%v)", errOrOK(err))
			case <-time.After(stopTimeout):
				t.Errorf("hatchery serve did not stop within %s of SIGTERM; killing it", stopTimeout)
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				<-exited
			}
		}
		if log, err := os.ReadFile(logPath); err == nil {
			t.Logf("hatchery serve log:\n%s", log)
		}
	})

	caPath := filepath.Join(dataDir, "tls", "ca.pem")
	url := fmt.Sprintf("https://%s:%d/", serverHostname, httpsPort)
	deadline := time.Now().Add(readyTimeout)
	var lastErr error
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			exited <- err // for the cleanup
			log, _ := os.ReadFile(logPath)
			t.Fatalf("hatchery serve exited during start-up: %v\n%s", err, log)
		case <-time.After(200 * time.Millisecond):
		}
		if lastErr = probe(url, caPath); lastErr == nil {
			return
		}
	}
	log, _ := os.ReadFile(logPath)
	t.Fatalf("hatchery serve did not answer %s within %s: %v\n%s", url, readyTimeout, lastErr, log)
}

// probe succeeds on any HTTP answer over TLS verified against the server's CA.
func probe(url, caPath string) error {
	pem, err := os.ReadFile(caPath)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return fmt.Errorf("%s holds no PEM certificate", caPath)
	}
	client := &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	defer client.CloseIdleConnections()
	resp, err := client.Get(url)
	if err != nil {
		return err
	}
	resp.Body.Close()
	return nil
}

func serverInfo(t *testing.T, bin, dataDir string) (hatcheryInfo, string) {
	t.Helper()
	cmd := command(t, infoTimeout, bin, "info", "--data-dir", dataDir, "--output", "json")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("hatchery info: %v\n%s", err, stderr.Bytes())
	}
	var info hatcheryInfo
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("hatchery info --output json: %v\n%s", err, out)
	}
	if info.IDScope == "" || info.ProvisioningServiceConnectionString == "" || info.HubConnectionString == "" || info.CACertificate == "" {
		t.Fatalf("hatchery info --output json lacks fields the tests need:\n%s", out)
	}
	return info, string(out)
}

// command is exec.Command with a timeout that kills the whole process group
// (node --test runs each file in a child process).
func command(t *testing.T, timeout time.Duration, name string, args ...string) *exec.Cmd {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		t.Logf("%s: timed out after %s, killing it", name, timeout)
		return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// runLogged runs cmd and copies its output, line by line, into the test log as it comes.
func runLogged(t *testing.T, prefix string, cmd *exec.Cmd) error {
	w := &lineLogger{t: t, prefix: prefix + ": "}
	cmd.Stdout = w
	cmd.Stderr = w
	err := cmd.Run()
	w.flush()
	return err
}

type lineLogger struct {
	t      *testing.T
	prefix string
	mu     sync.Mutex
	buf    []byte
}

func (l *lineLogger) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf = append(l.buf, p...)
	for {
		i := bytes.IndexByte(l.buf, '\n')
		if i < 0 {
			break
		}
		l.t.Log(l.prefix + strings.TrimRight(string(l.buf[:i]), "\r"))
		l.buf = l.buf[i+1:]
	}
	return len(p), nil
}

func (l *lineLogger) flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.buf) > 0 {
		l.t.Log(l.prefix + string(l.buf))
		l.buf = nil
	}
}

func errOrOK(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}
