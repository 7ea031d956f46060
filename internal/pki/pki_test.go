package pki

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"testing"
)

func TestEnsureCoversHostsAndKeepsCA(t *testing.T) {
	f := FilesIn(t.TempDir())
	if err := Ensure(f, []string{"edge.example", "localhost", "127.0.0.1"}); err != nil {
		t.Fatal(err)
	}
	ca1, _ := os.ReadFile(f.CACert)
	pool, err := Pool(f.CACert)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.LoadX509KeyPair(f.ServerCert, f.ServerKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(pair.Certificate[0])
	for _, h := range []string{"edge.example", "localhost", "127.0.0.1"} {
		if _, err := leaf.Verify(x509.VerifyOptions{DNSName: h, Roots: pool}); err != nil {
			t.Errorf("%s: %v", h, err)
		}
	}
	if st, _ := os.Stat(f.CAKey); st.Mode().Perm() != 0o600 {
		t.Errorf("CA key mode %v", st.Mode())
	}
	// A new name reissues the server certificate under the same CA.
	if err := Ensure(f, []string{"other.example"}); err != nil {
		t.Fatal(err)
	}
	ca2, _ := os.ReadFile(f.CACert)
	if string(ca1) != string(ca2) {
		t.Fatal("CA changed")
	}
	pair, _ = tls.LoadX509KeyPair(f.ServerCert, f.ServerKey)
	leaf, _ = x509.ParseCertificate(pair.Certificate[0])
	if leaf.VerifyHostname("other.example") != nil {
		t.Fatal("server certificate not reissued for new host")
	}
}
