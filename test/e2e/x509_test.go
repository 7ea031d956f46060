package e2e

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"net/http"
	"path/filepath"
	"testing"

	"github.com/hatchery/hatchery/internal/edge/moby/mobytest"
	"github.com/hatchery/hatchery/internal/testutil"
)

// pkiFiles writes a CA and a device certificate signed by it, as an
// operator's PKI would issue them: PEM files for the enrollment and for
// identity_cert/identity_pk.
func pkiFiles(t *testing.T, dir, deviceCN string) (caPath, certPath, keyPath string, dev *x509.Certificate) {
	t.Helper()
	ca := testutil.NewCert(t, "Edge Fleet CA", true, nil)
	cert := testutil.NewCert(t, deviceCN, false, &ca)
	caPath, certPath, keyPath = filepath.Join(dir, "ca.pem"), filepath.Join(dir, "device.pem"), filepath.Join(dir, "device.key")
	testutil.WritePEM(t, ca, caPath, "")
	testutil.WritePEM(t, cert, certPath, keyPath)
	return caPath, certPath, keyPath, cert.Leaf
}

// An X.509 device of an enrollment group provisions with its certificate
// (the registration ID is its CN), connects its agent with it, runs the
// deployment's module, and the module's workload tokens are accepted;
// manual provisioning with a certificate works too.
func TestX509Provisioning(t *testing.T) {
	requireTools(t)
	image := mobytest.New(t).Image("")
	s := startSite(t)
	caPath, certPath, keyPath, cert := pkiFiles(t, t.TempDir(), "x509-edge-1")
	s.hatchery("enrollment-group", "create", "--group-id", "x509-fleet", "--attestation-type", "x509",
		"--certificate-path", caPath, "--edge-enabled", "--initial-twin-tags", `{"environment":"prod"}`)

	d := newDevice(t, s)
	d.startServices()
	d.writeConfig(d.dpsConfig(`method = "x509"
identity_cert = "file://` + certPath + `"
identity_pk = "file://` + keyPath + `"`))
	d.mustIotedge("config", "apply")
	d.waitStatus("x509-edge-1 on hub localhost, provisioned by dps/x509")
	d.waitStatus("Hub:          connected")

	deploy(t, s, "x509-base", "10", map[string]any{"reader": module(image, "always", "-env", "IOTEDGE_DEVICEID")})
	d.waitModule("reader", "running")
	st, token := d.workloadToken("reader", "reader", "localhost/devices/x509-edge-1/modules/reader")
	if st != http.StatusOK {
		t.Fatalf("workload sign for the module of an X.509 device: HTTP %d", st)
	}
	s.sendAsModule("x509-edge-1", "reader", token)

	// Manual provisioning: the device registered in the hub by thumbprint.
	sum := sha256.Sum256(cert.Raw)
	s.hatchery("device", "create", "--device-id", "x509-manual", "--edge-enabled", "--auth-method", "x509_thumbprint",
		"--primary-thumbprint", hex.EncodeToString(sum[:]))
	d.writeConfig(`trust_bundle_cert = "file://` + s.CA + `"

[provisioning]
source = "manual"
iothub_hostname = "localhost"
device_id = "x509-manual"

[provisioning.authentication]
method = "x509"
identity_cert = "file://` + certPath + `"
identity_pk = "file://` + keyPath + `"
`)
	d.mustIotedge("config", "apply")
	d.waitStatus("x509-manual on hub localhost, provisioned by manual/x509")
	d.waitStatus("Hub:          connected")
}
