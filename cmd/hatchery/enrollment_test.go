package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/provisioning"
	"github.com/hatchery/hatchery/internal/testutil"
)

// register provisions regID with key against c's server.
func (c *cli) register(regID string, key []byte) {
	c.t.Helper()
	if err := c.tryRegister(regID, key); err != nil {
		c.t.Fatalf("registering %s: %v", regID, err)
	}
}

func (c *cli) tryRegister(regID string, key []byte) error {
	c.t.Helper()
	info, lb := c.site()
	httpClient := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: lb.tls,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, strings.TrimPrefix(lb.url, "https://"))
		}}}
	device := &provisioning.Client{Endpoint: "https://localhost", IDScope: info.IDScope, RegistrationID: regID, HTTP: httpClient, MaxPolls: 5}
	_, err := device.RegisterSymmetricKey(context.Background(), key)
	return err
}

// Write commands show what a read shows: the device's registration, every
// setting their flags set, and the key a rotation made.
func TestEnrollmentWriteOutputs(t *testing.T) {
	c := startServe(t)
	c.register("wr-1", c.symmetricKeyEnrollment("wr-1"))
	for _, args := range [][]string{
		{"enrollment", "update", "--registration-id", "wr-1", "--initial-twin-tags", `{"a":1}`},
		{"enrollment", "rotate-keys", "--registration-id", "wr-1", "--key", "secondary"},
	} {
		out := c.ok(args...)
		if len(grepLines(out, "Registration status:", "assigned")) != 1 || len(grepLines(out, "Registration status:", "unassigned")) != 0 ||
			len(grepLines(out, "Assigned hub:", "localhost")) != 1 || len(grepLines(out, "Assigned device ID:", "wr-1")) != 1 {
			t.Errorf("hatchery %s shows the device unassigned:\n%s", strings.Join(args, " "), out)
		}
	}
	// The rotated key is shown, for enrollments and groups alike.
	c.ok("enrollment-group", "create", "--group-id", "wr-g")
	for _, id := range [][]string{{"enrollment", "--registration-id", "wr-1"}, {"enrollment-group", "--group-id", "wr-g"}} {
		out := c.ok(id[0], "rotate-keys", id[1], id[2], "--key", "secondary")
		var e struct {
			Attestation struct {
				SymmetricKey struct{ SecondaryKey string } `json:"symmetricKey"`
			} `json:"attestation"`
		}
		if err := json.Unmarshal([]byte(c.ok(id[0], "show", id[1], id[2], "--show-keys", "-o", "json")), &e); err != nil {
			t.Fatal(err)
		}
		if key := e.Attestation.SymmetricKey.SecondaryKey; key == "" || len(grepLines(out, "Secondary key:", key)) != 1 {
			t.Errorf("%s rotate-keys --key secondary does not show the new key %s:\n%s", id[0], key, out)
		}
	}

	// show has a row for each setting the flags set.
	for _, kind := range []string{"enrollment", "enrollment-group"} {
		args := []string{kind, "create", "--registration-id", "set-1"}
		if kind == "enrollment-group" {
			args = []string{kind, "create", "--group-id", "set-g"}
		}
		c.ok(append(args, "--attestation-type", "symmetrickey", "--reprovision-policy", "reprovisionandresetdata",
			"--allocation-policy", "custom", "--webhook-url", "https://alloc.example/pick", "--initial-twin-properties", `{ "interval": 30 }`)...)
		args[1] = "show"
		out := c.ok(args...)
		for _, row := range [][]string{{"Reprovision policy:", "reprovisionandresetdata"}, {"Webhook URL:", "https://alloc.example/pick"},
			{"Initial desired properties:", `{"interval":30}`}} {
			if len(grepLines(out, row...)) != 1 {
				t.Errorf("%s show lacks %q:\n%s", kind, row, out)
			}
		}
	}
}

// serve --webhook-timeout bounds the custom allocation webhook's answer.
func TestServeWebhookTimeout(t *testing.T) {
	c := startServeOn(t, "--webhook-timeout", "300ms")
	if out, err := exec.Command(c.bin, "serve", "--data-dir", t.TempDir(), "--webhook-timeout", "0").CombinedOutput(); err == nil ||
		!strings.Contains(string(out), "--webhook-timeout must be more than 0") {
		t.Errorf("serve --webhook-timeout 0: %v\n%s", err, out)
	}
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(3 * time.Second):
		case <-r.Context().Done():
		}
	}))
	defer slow.Close()
	var e struct {
		Attestation struct {
			SymmetricKey struct{ PrimaryKey string } `json:"symmetricKey"`
		} `json:"attestation"`
	}
	out := c.ok("enrollment", "create", "--attestation-type", "symmetrickey", "--registration-id", "slow-1",
		"--allocation-policy", "custom", "--webhook-url", slow.URL, "-o", "json")
	if err := json.Unmarshal([]byte(out), &e); err != nil {
		t.Fatal(err)
	}
	key, _ := base64.StdEncoding.DecodeString(e.Attestation.SymmetricKey.PrimaryKey)
	if err := c.tryRegister("slow-1", key); err == nil || !strings.Contains(err.Error(), "no answer within 300ms") {
		t.Errorf("registering through a webhook slower than --webhook-timeout: %v", err)
	}
}

// Unlinking a hub that enrollments still name warns, with how many.
func TestUnlinkWarnsOfEnrollmentsNamingTheHub(t *testing.T) {
	c := startServe(t)
	link := func() {
		bogus := "HostName=far.example;SharedAccessKeyName=iothubowner;SharedAccessKey=" + base64.StdEncoding.EncodeToString(make([]byte, 32))
		c.ok("hub", "link", "--hostname", "far.example", "--connection-string", bogus, "--endpoint", "https://127.0.0.1:1", "--apply-allocation-policy=false")
	}
	link()
	if out := c.ok("hub", "unlink", "--hostname", "far.example"); strings.Contains(out, "warning") {
		t.Errorf("unlinking a hub nothing names warned: %s", out)
	}
	link()
	c.ok("enrollment", "create", "--registration-id", "far-1", "--attestation-type", "symmetrickey", "--allocation-policy", "static", "--iot-hub-host-name", "far.example")
	c.ok("enrollment", "create", "--registration-id", "near-1", "--attestation-type", "symmetrickey")
	c.ok("enrollment-group", "create", "--group-id", "far-g", "--iot-hubs", "far.example,localhost")
	if out := c.ok("hub", "unlink", "--hostname", "far.example"); !strings.Contains(out, "warning: 1 enrollment and 1 enrollment group still name hub far.example") {
		t.Errorf("unlinking a hub enrollments name: %s", out)
	}
}

// Small CLI consistencies: flag names shared across commands, help that
// fits the command, names listed once.
func TestCLIDetails(t *testing.T) {
	c := &cli{t: t, bin: filepath.Join(t.TempDir(), "hatchery"), dataDir: t.TempDir()}
	c.build()
	// serve with --hostname 127.0.0.1, as c.serve does not.
	port, mqtt := testutil.FreePort(t), testutil.FreePort(t)
	srv := exec.Command(c.bin, "serve", "--data-dir", c.dataDir, "--hostname", "127.0.0.1", "--https-port", strconv.Itoa(port), "--mqtt-port", strconv.Itoa(mqtt))
	log := &testutil.SyncBuffer{}
	srv.Stdout, srv.Stderr = log, log
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Process.Signal(syscall.SIGTERM); _ = srv.Wait() })
	var info siteInfo
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		out, err := c.run("info", "-o", "json")
		if err == nil && json.Unmarshal([]byte(out), &info) == nil && info.ServerCertificate != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("server did not start: %s\n%s", out, log.String())
		}
	}
	seen := map[string]bool{}
	for _, n := range info.ServerCertificate.Names {
		if seen[n] {
			t.Errorf("info lists the server certificate's name %s twice: %v", n, info.ServerCertificate.Names)
		}
		seen[n] = true
	}

	ca := testutil.NewCert(t, "Detail CA", true, nil)
	caPath := filepath.Join(t.TempDir(), "ca.pem")
	testutil.WritePEM(t, ca, caPath, "")
	c.ok("certificate", "create", "--name", "detail-ca", "--certificate-path", caPath)
	if out, err := c.run("certificate", "create", "--name", "none"); err == nil || !strings.Contains(out, "path") {
		t.Errorf("certificate create without a file: %v %s", err, out)
	}
	for _, kind := range []string{"enrollment", "enrollment-group"} {
		if out := c.ok(kind, "update", "--help"); strings.Contains(out, "(default: generated)") {
			t.Errorf("%s update --help says keys are generated:\n%s", kind, out)
		}
	}
}
