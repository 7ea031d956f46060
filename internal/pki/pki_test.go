package pki

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestEnsureCoversHostsAndKeepsCA(t *testing.T) {
	f := FilesIn(t.TempDir())
	if err := Ensure(f, []string{"edge.example", "localhost", "127.0.0.1", "127.0.0.1"}); err != nil {
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
	if len(leaf.IPAddresses) != 1 {
		t.Errorf("an address given twice is in the certificate as %v", leaf.IPAddresses)
	}
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

// Half a CA is refused and left as it is; a server certificate that is not
// the CA's is issued again.
func TestEnsureGuardsTheCA(t *testing.T) {
	hosts := []string{"localhost"}
	f := FilesIn(t.TempDir())
	if err := Ensure(f, hosts); err != nil {
		t.Fatal(err)
	}
	key, _ := os.ReadFile(f.CAKey)
	cert, _ := os.ReadFile(f.CACert)
	os.Remove(f.CACert)
	if err := Ensure(f, hosts); err == nil || !strings.Contains(err.Error(), "restore it") {
		t.Fatalf("ca.pem missing: %v", err)
	}
	if now, _ := os.ReadFile(f.CAKey); string(now) != string(key) {
		t.Fatal("the CA key was replaced")
	}
	os.WriteFile(f.CACert, cert, 0o644)
	os.Remove(f.CAKey)
	if err := Ensure(f, hosts); err == nil || !strings.Contains(err.Error(), "restore it") {
		t.Fatalf("ca-key.pem missing: %v", err)
	}
	os.WriteFile(f.CAKey, key, 0o600)

	// A server certificate of another CA, as a partial restore leaves it.
	other := FilesIn(t.TempDir())
	if err := Ensure(other, hosts); err != nil {
		t.Fatal(err)
	}
	for _, p := range [][2]string{{other.ServerCert, f.ServerCert}, {other.ServerKey, f.ServerKey}} {
		b, _ := os.ReadFile(p[0])
		os.WriteFile(p[1], b, 0o600)
	}
	if err := Ensure(f, hosts); err != nil {
		t.Fatal(err)
	}
	pool, _ := Pool(f.CACert)
	pair, _ := tls.LoadX509KeyPair(f.ServerCert, f.ServerKey)
	if _, err := pair.Leaf.Verify(x509.VerifyOptions{DNSName: "localhost", Roots: pool}); err != nil {
		t.Fatalf("the server certificate is not the CA's: %v", err)
	}
}

// A first start on a full disk leaves no TLS file behind, whichever write
// fails: once there is space, the next start makes the CA, rather than
// taking a key without its certificate for half of a CA lost. The process's
// file size limit fails the writes as a full disk does (Go ignores
// SIGXFSZ: the write returns EFBIG).
func TestEnsureOnAFullDiskLeavesNothing(t *testing.T) {
	var saved syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &saved); err != nil {
		t.Fatal(err)
	}
	// 0 fails the CA key's first byte, 100 its end; 400 lets the key
	// (about 230 bytes) through and fails its certificate.
	for _, limit := range []uint64{0, 100, 400} {
		f := FilesIn(t.TempDir())
		err := func() error {
			if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &syscall.Rlimit{Cur: limit, Max: saved.Max}); err != nil {
				t.Fatal(err)
			}
			defer syscall.Setrlimit(syscall.RLIMIT_FSIZE, &saved)
			return Ensure(f, []string{"localhost"})
		}()
		if err == nil {
			t.Fatalf("limit %d: Ensure succeeded", limit)
		}
		if left, _ := os.ReadDir(filepath.Dir(f.CACert)); len(left) != 0 {
			t.Errorf("limit %d: a failed Ensure (%v) left %v", limit, err, left)
		}
		if err := Ensure(f, []string{"localhost"}); err != nil {
			t.Errorf("limit %d: once there is space: %v", limit, err)
		}
	}
}

// The served certificate is issued again before it expires, and files an
// operator replaces are served, without a restart.
func TestServedRenewsAndReloads(t *testing.T) {
	hosts := []string{"localhost"}
	f := FilesIn(t.TempDir())
	if err := Ensure(f, hosts); err != nil {
		t.Fatal(err)
	}
	// Make the server certificate one that expires in ten days.
	ca, caKey, err := loadPair(f.CACert, f.CAKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := newServerCertValid(f, ca, caKey, hosts, 10*24*time.Hour); err != nil {
		t.Fatal(err)
	}
	s, err := NewServed(f.ServerCert, f.ServerKey, func() error { return Ensure(f, hosts) })
	if err != nil {
		t.Fatal(err)
	}
	first := s.Current().Leaf.NotAfter
	if time.Until(first) > RenewBefore {
		t.Fatal("the test certificate does not expire soon")
	}
	next := func() *x509.Certificate {
		t.Helper()
		s.mu.Lock()
		s.checked = time.Time{} // a minute has passed
		s.mu.Unlock()
		c, err := s.Config().GetCertificate(&tls.ClientHelloInfo{})
		if err != nil {
			t.Fatal(err)
		}
		return c.Leaf
	}
	if leaf := next(); time.Until(leaf.NotAfter) < RenewBefore {
		t.Fatalf("served a certificate expiring %v, after renewal", leaf.NotAfter)
	}

	// An operator's files, replaced while serving.
	op := FilesIn(t.TempDir())
	if err := Ensure(op, []string{"a.example"}); err != nil {
		t.Fatal(err)
	}
	s, err = NewServed(op.ServerCert, op.ServerKey, nil)
	if err != nil {
		t.Fatal(err)
	}
	var checked []string // the certificates Vet's check was shown
	s.Vet(func(c *tls.Certificate) { checked = append(checked, c.Leaf.DNSNames[0]) })
	if err := os.Remove(op.ServerCert); err != nil {
		t.Fatal(err)
	}
	if err := Ensure(op, []string{"b.example"}); err != nil {
		t.Fatal(err)
	}
	if leaf := next(); leaf.VerifyHostname("b.example") != nil {
		t.Fatalf("still serving %v after the files were replaced", leaf.DNSNames)
	}
	next()
	s.vetted = s.vetted.Add(-25 * time.Hour) // a day has passed
	next()
	if strings.Join(checked, " ") != "a.example b.example b.example" {
		t.Errorf("the check was shown %v, want the first at once, the replacement when loaded and a day later", checked)
	}
	os.WriteFile(op.ServerCert, []byte("garbage"), 0o644)
	if leaf := next(); leaf.VerifyHostname("b.example") != nil {
		t.Fatal("a broken replacement replaced the certificate served")
	}
}

// Roots adds each named bundle to the system's, and says which one it
// could not use.
func TestRoots(t *testing.T) {
	f := FilesIn(t.TempDir())
	if err := Ensure(f, []string{"localhost"}); err != nil {
		t.Fatal(err)
	}
	roots, err := Roots(f.CACert, "")
	if err != nil {
		t.Fatal(err)
	}
	pair, _ := tls.LoadX509KeyPair(f.ServerCert, f.ServerKey)
	if _, err := pair.Leaf.Verify(x509.VerifyOptions{DNSName: "localhost", Roots: roots}); err != nil {
		t.Fatalf("the bundle's CA is not trusted: %v", err)
	}
	if _, err := Roots(f.CACert + ".missing"); err == nil || !strings.Contains(err.Error(), ".missing") {
		t.Errorf("a missing bundle: %v", err)
	}
	if _, err := Roots(f.ServerKey); err == nil || !strings.Contains(err.Error(), "no PEM certificate") {
		t.Errorf("a bundle without certificates: %v", err)
	}
}
