package certtext

import (
	"crypto/tls"
	"encoding/base64"
	"encoding/pem"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/testutil"
)

func testCertDER(t testing.TB) []byte { return testutil.NewCert(t, "dev-1", false, nil).Leaf.Raw }

// The three spellings clients send all read as the same certificate.
func TestParseForms(t *testing.T) {
	der := testCertDER(t)
	pemText := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	for name, in := range map[string]string{
		"PEM":                  pemText,
		"base64 of PEM":        base64.StdEncoding.EncodeToString([]byte(pemText)),
		"base64 of DER":        base64.StdEncoding.EncodeToString(der),
		"PEM after other text": "Bag Attributes\n    friendlyName: dev-1\n" + pemText,
	} {
		c, err := Parse(in)
		if err != nil || c.Subject.CommonName != "dev-1" {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := Parse(base64.StdEncoding.EncodeToString(der[:len(der)/2])); err == nil || !strings.Contains(err.Error(), "DER certificate does not parse") {
		t.Errorf("truncated DER: %v", err)
	}
	for _, bad := range []string{"", "not base64!", base64.StdEncoding.EncodeToString([]byte("hello")),
		"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

// A bundle reads whole with ParseAll, in order; Parse takes its first.
func TestParseAll(t *testing.T) {
	root := testutil.NewCert(t, "root", true, nil)
	inter := testutil.NewCert(t, "intermediate", true, &root)
	bundle := ""
	for _, c := range []tls.Certificate{root, inter} {
		bundle += string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Leaf.Raw}))
	}
	for name, in := range map[string]string{"PEM": bundle, "base64 of PEM": base64.StdEncoding.EncodeToString([]byte(bundle))} {
		cs, err := ParseAll(in)
		if err != nil || len(cs) != 2 || cs[0].Subject.CommonName != "root" || cs[1].Subject.CommonName != "intermediate" {
			t.Errorf("%s: %d certificates, %v", name, len(cs), err)
		}
		if c, err := Parse(in); err != nil || c.Subject.CommonName != "root" {
			t.Errorf("%s: Parse: %v", name, err)
		}
	}
	if cs, err := ParseAll(base64.StdEncoding.EncodeToString(root.Leaf.Raw)); err != nil || len(cs) != 1 {
		t.Errorf("base64 of DER: %d certificates, %v", len(cs), err)
	}
	withKey := bundle + "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
	if _, err := ParseAll(withKey); err == nil || !strings.Contains(err.Error(), "PEM block 3 is a PRIVATE KEY") {
		t.Errorf("bundle with a key: %v", err)
	}
	broken := bundle + "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
	if _, err := ParseAll(broken); err == nil || !strings.Contains(err.Error(), "certificate 3 of the PEM does not parse") {
		t.Errorf("bundle with a broken certificate: %v", err)
	}
}

func FuzzParse(f *testing.F) {
	der := testCertDER(f)
	f.Add(string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))
	f.Add(base64.StdEncoding.EncodeToString(der))
	f.Add("-----BEGIN CERTIFICATE-----\n")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := Parse(s)
		if (c == nil) == (err == nil) {
			t.Fatalf("certificate %v with error %v", c != nil, err)
		}
		if cs, err := ParseAll(s); err == nil && (len(cs) == 0 || c == nil || !cs[0].Equal(c)) {
			t.Fatalf("ParseAll read %d certificates where Parse read %v", len(cs), c)
		}
	})
}

func TestThumbprints(t *testing.T) {
	c := testutil.NewCert(t, "dev-1", false, nil).Leaf
	s1, s256 := Thumbprints(c)
	if len(s1) != 40 || len(s256) != 64 || s1 != strings.ToUpper(s1) {
		t.Fatalf("thumbprints %q %q", s1, s256)
	}
}
