package dps

import "testing"

// A group with no certificates of a kind (a TPM group stored without
// ekCertificateAuthorities) trusts no CA and has no intermediates.
func TestNoCertificatesTrustNothing(t *testing.T) {
	var cs *X509Certificates
	if c, p := cs.certificates(), cs.intermediates(); c != nil || p != nil {
		t.Fatalf("no certificates read as %v and %v", c, p)
	}
}
