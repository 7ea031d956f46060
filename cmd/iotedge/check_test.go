package main

import (
	"archive/zip"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/config"
)

func TestCheckIdentityCert(t *testing.T) {
	dir := t.TempDir()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	notAfter := time.Date(2030, 1, 31, 0, 0, 0, 0, time.UTC)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "dev"},
		NotBefore: notAfter.Add(-365 * 24 * time.Hour), NotAfter: notAfter}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	cert, pk := filepath.Join(dir, "dev.pem"), filepath.Join(dir, "dev.key")
	_ = os.WriteFile(cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	_ = os.WriteFile(pk, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600)

	for _, tc := range []struct {
		what       string
		cert, key  string
		now        time.Time
		result, in string
	}{
		{"valid", "file://" + cert, "file://" + pk, notAfter.Add(-30 * 24 * time.Hour), "ok", ""},
		{"expiring within a week", cert, pk, notAfter.Add(-48 * time.Hour), "warning", "expires on 2030-01-31"},
		{"expired", cert, pk, notAfter.Add(time.Hour), "error", "expired on 2030-01-31"},
		{"not yet valid", cert, pk, notAfter.Add(-400 * 24 * time.Hour), "error", "check the clock"},
		{"missing key", cert, pk + ".missing", notAfter.Add(-30 * 24 * time.Hour), "error", "identity_pk"},
		{"key of another certificate", cert, cert, notAfter.Add(-30 * 24 * time.Hour), "error", "identity_cert"},
	} {
		got := checkIdentityCert(tc.cert, tc.key, tc.now)
		if got.result != tc.result || !strings.Contains(got.details, tc.in) {
			t.Errorf("%s: %+v, want %s with %q", tc.what, got, tc.result, tc.in)
		}
	}
}

// TestRedactedConfig: no way of writing a secret reaches a support bundle.
func TestRedactedConfig(t *testing.T) {
	in := `[provisioning]
source = "manual"
connection_string = "HostName=h;DeviceId=d;SharedAccessKey=SECRET1"

[provisioning.authentication]
method = "sas"
device_id_pk = { value = "SECRET2" }

[provisioning.attestation]
symmetric_key.value = """SECRET3"""

[agent.config]
auth = { serveraddress = "r.example", username = "edge", password = 'SECRET4' }

[old]
symmetric_key = "SECRET6"
device_connection_string = "HostName=h;DeviceId=d;SharedAccessKey=SECRET7"
notes = ["HostName=h;DeviceId=d;sharedaccesskey=SECRET8"]
comment = "HostName=h;DeviceId=d;SharedAccessKey=SECRET9"
`
	out, err := redactedConfig([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), "SECRET") || !strings.Contains(string(out), "r.example") || !strings.Contains(string(out), "<redacted>") {
		t.Fatalf("redacted config:\n%s", out)
	}
	if out, err := redactedConfig([]byte("connection_string = \"SECRET5\n")); err == nil || strings.Contains(err.Error()+string(out), "SECRET") {
		t.Fatalf("a config that does not parse: %v %s", err, out)
	}
}

// The support bundle holds what it can collect, each file dated now (zip
// entries without a date show as 1980), and says what it could not.
func TestSupportBundle(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("IOTEDGE_CONFIG", filepath.Join(dir, "config.toml"))
	t.Setenv("IOTEDGE_HOST", "unix://"+filepath.Join(dir, "mgmt.sock"))
	t.Setenv("IOTEDGE_TPM_SOCKET", filepath.Join(dir, "tpmd.sock"))
	out := filepath.Join(dir, "bundle.zip")
	if msg, err := iotedge(t, "support-bundle", "--output", out); err != nil {
		t.Fatalf("%v\n%s", err, msg)
	}
	z, err := zip.OpenReader(out)
	if err != nil {
		t.Fatal(err)
	}
	defer z.Close()
	var names []string
	for _, f := range z.File {
		names = append(names, f.Name)
		if d := time.Since(f.Modified); d < -time.Minute || d > time.Minute {
			t.Errorf("%s dated %s", f.Name, f.Modified)
		}
	}
	if !slices.Equal(names, []string{"config.toml", "check.json", "status.json", "logs/iotedged.log"}) {
		t.Errorf("bundle holds %v", names)
	}
	f, _ := z.Open("status.json")
	b, _ := io.ReadAll(f)
	if !strings.Contains(string(b), "error:") {
		t.Errorf("status.json of a daemon that does not run: %s", b)
	}
}

// A config.toml that does not parse leaves the checks that read it
// skipped, rather than run against defaults the runtime does not use, and
// says why; a missing one leaves the engine checked at its default socket.
func TestChecksWithoutUsableConfig(t *testing.T) {
	for _, content := range []string{"[provisioning]\nsource = dps\n", ""} {
		dir := t.TempDir()
		path := filepath.Join(dir, "config.toml")
		t.Setenv("IOTEDGE_CONFIG", path)
		t.Setenv("IOTEDGE_HOST", "unix://"+filepath.Join(dir, "mgmt.sock"))
		if content != "" {
			if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		_, _, loadErr := config.Load(path)
		if loadErr == nil {
			t.Fatalf("%q loads", content)
		}
		for _, r := range runChecks(t.Context()) {
			switch {
			case r.ID == "config-toml-well-formed":
				if r.Result != "error" {
					t.Errorf("%q: %s: %s, want error", content, r.ID, r.Result)
				}
			case r.ID == "daemon": // it does not need the configuration
			case r.ID == "container-engine" && content == "":
				if r.Result == "skipped" {
					t.Errorf("without config.toml, %s: skipped (%s), want the default socket checked", r.ID, r.Details)
				}
			case r.Result != "skipped" || !strings.Contains(r.Details, loadErr.Error()):
				t.Errorf("%q: %s: %s (%s), want skipped saying %q", content, r.ID, r.Result, r.Details, loadErr)
			}
		}
	}
}
