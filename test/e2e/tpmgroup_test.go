package e2e

import (
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/testutil"
	"github.com/hatchery/hatchery/internal/tpm"
)

// A TPM whose maker stored an EK certificate in NV (done here with
// tpm2-tools, as at the factory) provisions through a TPM enrollment group
// that trusts the maker's CA: no per-device enrollment, the seed flow on
// the device unchanged.
func TestTPMGroupProvisioning(t *testing.T) {
	requireTools(t)
	s := startSite(t)
	d := newDevice(t, s)
	regID, ekB64 := provisionInfo(t, d.tcti)

	// The maker's CA and the EK certificate, in NV at the TCG index.
	dir := t.TempDir()
	ca := testutil.NewCert(t, "Example TPM Manufacturer CA", true, nil)
	ek, _ := base64.StdEncoding.DecodeString(ekB64)
	pub, err := attest.ParsePublic(ek)
	if err != nil {
		t.Fatal(err)
	}
	ekCert, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(2), NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().AddDate(1, 0, 0), KeyUsage: x509.KeyUsageKeyEncipherment}, ca.Leaf, pub.Key(), ca.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	certFile, caFile := filepath.Join(dir, "ek.der"), filepath.Join(dir, "ca.pem")
	_ = os.WriteFile(certFile, ekCert, 0o600)
	testutil.WritePEM(t, ca, caFile, "")
	index := "0x" + strconv.FormatUint(tpm.EKCertIndex, 16)
	for _, args := range [][]string{
		{"tpm2_nvdefine", "-C", "o", "-s", strconv.Itoa(len(ekCert)), "-a", "ownerread|ownerwrite|authread|authwrite|no_da", index},
		{"tpm2_nvwrite", "-C", "o", "-i", certFile, index},
	} {
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI="+d.tcti)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}

	s.hatchery("enrollment-group", "create", "--group-id", "example-tpms", "--attestation-type", "tpm", "--certificate-path", caFile,
		"--edge-enabled", "--initial-twin-tags", `{"environment":"prod"}`)
	d.startServices()
	d.writeConfig(d.configFromTemplate(regID))
	d.mustIotedge("config", "apply")
	d.waitStatus(regID + " on hub localhost, provisioned by dps/tpm")
	d.waitStatus("Hub:          connected")
	if out := s.hatchery("registration", "list", "--group-id", "example-tpms"); len(grep(out, regID, "assigned")) != 1 {
		t.Fatalf("the group's registrations:\n%s", out)
	}
}
