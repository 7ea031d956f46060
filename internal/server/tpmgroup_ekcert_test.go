package server

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	mbig "math/big"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/softtpm"
	"github.com/hatchery/hatchery/internal/testutil"
	"github.com/hatchery/hatchery/internal/tpm"
)

// reportsCert is a TPM that reports cert as its EK certificate.
type reportsCert struct {
	*softtpm.TPM
	cert []byte
}

func (r reportsCert) EndorsementCertificate() ([]byte, error) { return r.cert, nil }

// issueFor has ca issue tmpl for dev's EK.
func issueFor(t *testing.T, ca tls.Certificate, dev *softtpm.TPM, tmpl *x509.Certificate) []byte {
	t.Helper()
	ek, _ := dev.EndorsementKey()
	pub, _ := attest.ParsePublic(ek)
	tmpl.SerialNumber, tmpl.NotBefore, tmpl.NotAfter = mbig.NewInt(time.Now().UnixNano()), time.Now().Add(-time.Hour), time.Now().Add(time.Hour)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Leaf, pub.Key(), ca.PrivateKey.(crypto.Signer))
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// withOAEPKey is der, re-signed by ca, with its key's algorithm
// id-RSAES-OAEP, as Infineon's EK certificates name it.
func withOAEPKey(t *testing.T, ca tls.Certificate, der []byte) []byte {
	t.Helper()
	var c struct {
		TBS, Alg asn1.RawValue
		Sig      asn1.BitString
	}
	if _, err := asn1.Unmarshal(der, &c); err != nil {
		t.Fatal(err)
	}
	rsaEncryption := []byte{0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01}
	oaep := []byte{0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x07}
	c.TBS.FullBytes = bytes.Replace(c.TBS.FullBytes, rsaEncryption, oaep, 1)
	h := sha256.Sum256(c.TBS.FullBytes)
	sig, err := ca.PrivateKey.(crypto.Signer).Sign(rand.Reader, h[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	c.Sig = asn1.BitString{Bytes: sig, BitLength: 8 * len(sig)}
	out, err := asn1.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// EK certificates register as TPMs hold them: with the NV index's padding,
// behind the TCG NV header, with an RSAES-OAEP key.
func TestTPMGroupEKCertificateForms(t *testing.T) {
	e := newEnv(t)
	ca := testutil.NewCert(t, "Acme TPM CA", true, nil)
	if err := e.putTPMGroup("acme-tpms", certPEM(ca)); err != nil {
		t.Fatal(err)
	}
	for what, form := range map[string]func(der []byte) []byte{
		"padded with 00": func(der []byte) []byte { return append(der, make([]byte, 300)...) },
		"padded with FF": func(der []byte) []byte { return append(der, bytes.Repeat([]byte{0xff}, 300)...) },
		"behind the TCG NV header": func(der []byte) []byte {
			return append([]byte{0x10, 0x01, 0x00, byte(len(der) >> 8), byte(len(der))}, der...)
		},
		"with an RSAES-OAEP key": func(der []byte) []byte { return withOAEPKey(t, ca, der) },
	} {
		dev := certifiedTPM(t, &ca)
		der, _ := dev.EndorsementCertificate()
		ek, _ := dev.EndorsementKey()
		res, err := e.device(attest.RegistrationID(ek)).RegisterTPM(ctx, reportsCert{dev, form(bytes.Clone(der))}, tpm.IdentityHandle(tpm.DefaultAuthKeyIndex))
		if err != nil || res.EnrollmentGroupID != "acme-tpms" {
			t.Errorf("%s: %+v, %v", what, res, err)
		}
	}
}

// A certificate of the group's CA for the EK's key that is no EK
// certificate is refused: its private key may live in software, whose
// holder could act as the TPM. So are contents of the EK certificate's NV
// index that are no certificate, and EK certificates signed with SHA-1.
func TestTPMGroupRefusesOtherCertificates(t *testing.T) {
	e := newEnv(t)
	ca := testutil.NewCert(t, "Acme TPM CA", true, nil)
	if err := e.putTPMGroup("acme-tpms", certPEM(ca)); err != nil {
		t.Fatal(err)
	}
	ekUsage := []asn1.ObjectIdentifier{{2, 23, 133, 8, 1}}
	log := captureLog(t)
	for what, tc := range map[string]struct {
		cert func(dev *softtpm.TPM) []byte
		want string
	}{
		"a TLS server certificate": {func(dev *softtpm.TPM) []byte {
			return issueFor(t, ca, dev, &x509.Certificate{DNSNames: []string{"www.example.com"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
				KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment})
		}, "extended key usage lacks tcg-kp-EKCertificate (2.23.133.8.1), so it is no EK certificate"},
		"a signing certificate": {func(dev *softtpm.TPM) []byte {
			return issueFor(t, ca, dev, &x509.Certificate{KeyUsage: x509.KeyUsageDigitalSignature})
		}, "key usage lacks keyEncipherment, so it is no EK certificate"},
		"a CA certificate": {func(dev *softtpm.TPM) []byte {
			return issueFor(t, ca, dev, &x509.Certificate{IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageKeyEncipherment})
		}, "is a CA certificate, so it is no EK certificate"},
		"an EK certificate signed with SHA-1": {func(dev *softtpm.TPM) []byte {
			return issueFor(t, ca, dev, &x509.Certificate{SignatureAlgorithm: x509.ECDSAWithSHA1, KeyUsage: x509.KeyUsageKeyEncipherment, UnknownExtKeyUsage: ekUsage})
		}, "it is signed with SHA-1, which this service does not verify"},
		"an erased NV index": {func(*softtpm.TPM) []byte { return bytes.Repeat([]byte{0xff}, 1024) },
			"is not DER (an ASN.1 SEQUENCE, 30 …, complete) nor DER behind the TCG NV header"},
		"DER that is no certificate": {func(*softtpm.TPM) []byte { return []byte{0x30, 0x03, 0x02, 0x01, 0x00, 0xff} },
			"the EK certificate is no X.509 certificate"},
	} {
		dev := certifiedTPM(t, nil)
		ek, _ := dev.EndorsementKey()
		_, err := e.device(attest.RegistrationID(ek)).RegisterTPM(ctx, reportsCert{dev, tc.cert(dev)}, tpm.IdentityHandle(tpm.DefaultAuthKeyIndex))
		if err == nil || !strings.Contains(log.String(), tc.want) {
			t.Errorf("%s: %v; log lacks %q", what, err, tc.want)
		}
	}
}
