package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/hubdevice"
	"github.com/hatchery/hatchery/internal/pki"
	"github.com/hatchery/hatchery/internal/provisioning"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/softtpm"
	"github.com/hatchery/hatchery/internal/testutil"
	"github.com/hatchery/hatchery/internal/tpm"
)

// Two `hatchery serve` replicas on one PostgreSQL database serve one
// device whose requests alternate between them: the TPM challenge from one,
// the signed registration to the other, the poll to the first. Concurrent
// retries of one device leave one registration and one hub identity.
func TestReplicasOnOneDatabase(t *testing.T) {
	dsn := testutil.StartPostgres(t).NewDatabase(t)
	a := startServeOn(t, "--database", dsn)
	// The replicas share the PKI: the CA clients trust and the certificate.
	// One with a CA of its own (as a package's first start makes) is
	// refused.
	own := t.TempDir()
	if err := pki.Ensure(pki.FilesIn(own), []string{"localhost"}); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(a.bin, "serve", "--data-dir", own, "--database", dsn, "--hostname", "localhost",
		"--https-port", "0", "--mqtt-port", "0").CombinedOutput(); err == nil || !strings.Contains(string(out), "trust another local CA") {
		t.Fatalf("a replica with a CA of its own: %v\n%s", err, out)
	}
	tlsDir := filepath.Join(a.dataDir, "tls")
	b := &cli{t: t, bin: a.bin, dataDir: t.TempDir()}
	if out, err := exec.Command("cp", "-a", tlsDir, b.dataDir).CombinedOutput(); err != nil {
		t.Fatalf("copying the PKI: %v %s", err, out)
	}
	portB := b.serve("--database", dsn)
	// The CLI needs the database too, and says so.
	if out, err := a.run("info"); err == nil || !strings.Contains(out, "pass the same --database") {
		t.Fatalf("info without --database: %v %s", err, out)
	}
	t.Setenv("HATCHERY_DATABASE", dsn)
	var info siteInfo
	if err := json.Unmarshal([]byte(a.ok("info", "-o", "json")), &info); err != nil {
		t.Fatal(err)
	}
	if out := b.ok("info", "-o", "json"); !strings.Contains(out, info.IDScope) {
		t.Fatalf("the replicas have different ID scopes: %s vs %s", info.IDScope, out)
	}
	caPEM, _ := os.ReadFile(filepath.Join(tlsDir, "ca.pem"))
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	tlsConf := &tls.Config{RootCAs: roots, ServerName: "localhost"}

	// Each request on a new connection, to replica A, B, A, …
	var turn atomic.Int64
	replicas := []string{"127.0.0.1:" + strconv.Itoa(a.httpsPort), "127.0.0.1:" + strconv.Itoa(portB)}
	var mu sync.Mutex
	var hits []string
	alternating := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsConf, DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			addr := replicas[turn.Add(1)%2]
			mu.Lock()
			hits = append(hits, addr)
			mu.Unlock()
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		}}}
	device := func(id string) *provisioning.Client {
		return &provisioning.Client{Endpoint: "https://localhost", IDScope: info.IDScope, RegistrationID: id, HTTP: alternating, MaxPolls: 5}
	}

	keys, err := softtpm.NewKeys()
	if err != nil {
		t.Fatal(err)
	}
	dev := softtpm.New(keys)
	ek, _ := dev.EndorsementKey()
	a.ok("enrollment", "create", "--attestation-type", "tpm", "--registration-id", "rep-tpm", "--endorsement-key", base64.StdEncoding.EncodeToString(ek))
	handle := tpm.IdentityHandle(tpm.DefaultAuthKeyIndex)
	res, err := device("rep-tpm").RegisterTPM(context.Background(), dev, handle)
	if err != nil {
		t.Fatalf("TPM registration across replicas: %v", err)
	}
	if len(hits) < 3 || hits[0] == hits[1] || hits[1] == hits[2] {
		t.Fatalf("the requests did not alternate between the replicas: %v", hits)
	}
	// The hub key the device received works on the other replica's hub endpoint.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	hc, err := hubdevice.Dial(ctx, hubdevice.Options{Host: "localhost", Port: b.mqttPort, DeviceID: res.DeviceID, TLS: tlsConf,
		Sign: func(aud string, exp time.Time) (string, error) {
			return sas.BuildSigned(func(d []byte) ([]byte, error) { return dev.HMAC(handle, d) }, aud, "", exp)
		}})
	if err != nil {
		t.Fatalf("the provisioned TPM device on replica B's hub endpoint: %v", err)
	}
	hc.Close()

	// Concurrent retries of one symmetric-key device, through both replicas.
	key := a.symmetricKeyEnrollment("rep-sym")
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := device("rep-sym").RegisterSymmetricKey(context.Background(), key)
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("a concurrent registration failed: %v", err)
		}
	}
	var regs []map[string]any
	if err := json.Unmarshal([]byte(b.ok("registration", "list", "-o", "json")), &regs); err != nil {
		t.Fatal(err)
	}
	if len(regs) != 2 {
		t.Fatalf("%d registration records for two devices: %v", len(regs), regs)
	}
	var devices []map[string]any
	if err := json.Unmarshal([]byte(b.ok("device", "list", "-o", "json")), &devices); err != nil {
		t.Fatal(err)
	}
	if len(devices) != 2 {
		t.Fatalf("%d hub identities for two devices: %v", len(devices), devices)
	}
}

// startServeOn builds the binary and starts one server with extra flags.
func startServeOn(t *testing.T, extra ...string) *cli {
	t.Helper()
	c := &cli{t: t, bin: filepath.Join(t.TempDir(), "hatchery"), dataDir: t.TempDir()}
	c.build()
	c.httpsPort = c.serve(extra...)
	return c
}

// While the database is out of reach, devices are told to come back later
// (503 with Retry-After; CONNACK 3, server unavailable), not that their
// credentials are wrong (CONNACK 5 makes edge devices provision again);
// once it is back, the server serves again by itself.
func TestDatabaseOutage(t *testing.T) {
	pg := testutil.StartPostgres(t)
	dsn := pg.NewDatabase(t)
	c := startServeOn(t, "--database", dsn)
	t.Setenv("HATCHERY_DATABASE", dsn)
	var info siteInfo
	if err := json.Unmarshal([]byte(c.ok("info", "-o", "json")), &info); err != nil {
		t.Fatal(err)
	}
	key := c.symmetricKeyEnrollment("dev-1")
	lb, err := info.loopback()
	if err != nil {
		t.Fatal(err)
	}
	tlsConf := lb.tls
	httpClient := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsConf,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, strings.TrimPrefix(lb.url, "https://"))
		}}}
	device := &provisioning.Client{Endpoint: "https://localhost", IDScope: info.IDScope, RegistrationID: "dev-1", HTTP: httpClient, MaxPolls: 5}
	res, err := device.RegisterSymmetricKey(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	connect := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		hc, err := hubdevice.Dial(ctx, hubdevice.Options{Host: "localhost", Port: c.mqttPort, DeviceID: res.DeviceID, TLS: tlsConf,
			Sign: func(aud string, exp time.Time) (string, error) { return sas.Build(key, aud, "", exp), nil }})
		if err == nil {
			hc.Close()
		}
		return err
	}
	if err := connect(); err != nil {
		t.Fatal(err)
	}

	pg.Stop(t)
	if err := connect(); err == nil || errors.Is(err, hubdevice.ErrNotAuthorized) || !strings.Contains(err.Error(), "code 3") {
		t.Errorf("connecting while the database is down: %v, want CONNACK 3", err)
	}
	req, _ := http.NewRequest("PUT", "https://localhost/"+info.IDScope+"/registrations/dev-1/register?api-version=2021-06-01", strings.NewReader(`{"registrationId":"dev-1"}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", sas.Build(key, info.IDScope+"/registrations/dev-1", "registration", time.Now().Add(time.Hour)))
	resp, err := httpClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Errorf("registering while the database is down: HTTP %d, Retry-After %q; want 503 with Retry-After", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	health := func() int {
		resp, err := httpClient.Get("https://localhost/healthz")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if st := health(); st != http.StatusServiceUnavailable {
		t.Errorf("/healthz while the database is down: HTTP %d", st)
	}

	pg.Start(t)
	deadline := time.Now().Add(30 * time.Second)
	for connect() != nil {
		if time.Now().After(deadline) {
			t.Fatal("the server did not serve devices again once the database was back")
		}
		time.Sleep(500 * time.Millisecond)
	}
	if _, err := device.RegisterSymmetricKey(context.Background(), key); err != nil {
		t.Errorf("registering once the database is back: %v", err)
	}
	if st := health(); st != http.StatusOK {
		t.Errorf("/healthz once the database is back: HTTP %d", st)
	}
}

// symmetricKeyEnrollment enrolls regID with a symmetric key, and returns it.
func (c *cli) symmetricKeyEnrollment(regID string) []byte {
	c.t.Helper()
	var e struct {
		Attestation struct {
			SymmetricKey struct{ PrimaryKey string } `json:"symmetricKey"`
		} `json:"attestation"`
	}
	if err := json.Unmarshal([]byte(c.ok("enrollment", "create", "--attestation-type", "symmetrickey", "--registration-id", regID, "-o", "json")), &e); err != nil {
		c.t.Fatal(err)
	}
	key, err := base64.StdEncoding.DecodeString(e.Attestation.SymmetricKey.PrimaryKey)
	if err != nil {
		c.t.Fatal(err)
	}
	return key
}
