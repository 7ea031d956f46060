package certtext

import (
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
	})
}

func TestThumbprints(t *testing.T) {
	c := testutil.NewCert(t, "dev-1", false, nil).Leaf
	s1, s256 := Thumbprints(c)
	if len(s1) != 40 || len(s256) != 64 || s1 != strings.ToUpper(s1) {
		t.Fatalf("thumbprints %q %q", s1, s256)
	}
}
