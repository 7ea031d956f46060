package dps

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"math/big"
	"testing"
	"time"
)

func testCertDER(t testing.TB) []byte {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "dev-1"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

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
