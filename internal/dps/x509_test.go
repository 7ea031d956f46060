package dps

import (
	"encoding/base64"
	"encoding/pem"
	"testing"

	"github.com/hatchery/hatchery/internal/testutil"
)

func testCertDER(t testing.TB) []byte { return testutil.NewCert(t, "dev-1", false, nil).Leaf.Raw }

// The three spellings clients send all read as the same certificate.
func TestParseCertificateForms(t *testing.T) {
	der := testCertDER(t)
	pemText := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	for name, in := range map[string]string{
		"PEM":           pemText,
		"base64 of PEM": base64.StdEncoding.EncodeToString([]byte(pemText)),
		"base64 of DER": base64.StdEncoding.EncodeToString(der),
	} {
		c, err := ParseCertificate(in)
		if err != nil || c.Subject.CommonName != "dev-1" {
			t.Errorf("%s: %v", name, err)
		}
	}
	for _, bad := range []string{"", "not base64!", base64.StdEncoding.EncodeToString([]byte("hello")),
		"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"} {
		if _, err := ParseCertificate(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

func FuzzParseCertificate(f *testing.F) {
	der := testCertDER(f)
	f.Add(string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))
	f.Add(base64.StdEncoding.EncodeToString(der))
	f.Add("-----BEGIN CERTIFICATE-----\n")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := ParseCertificate(s)
		if (c == nil) == (err == nil) {
			t.Fatalf("certificate %v with error %v", c != nil, err)
		}
	})
}
