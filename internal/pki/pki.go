// Package pki keeps the local certificate authority of a self-hosted install:
// a CA created on first start, and a server certificate it signs for the
// names devices and SDKs use.
package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/hatchery/hatchery/internal/atomicfile"
)

// Files are the PEM files of a data directory's TLS material.
type Files struct {
	CACert, CAKey, ServerCert, ServerKey string
}

// NoCA reports whether neither of the local CA's files exists: a new
// installation, or one whose tls/ was lost.
func (f Files) NoCA() bool {
	cert, key := f.missingCA()
	return cert && key
}

// missingCA says which of the local CA's files do not exist.
func (f Files) missingCA() (cert, key bool) {
	_, certErr := os.Stat(f.CACert)
	_, keyErr := os.Stat(f.CAKey)
	return errors.Is(certErr, os.ErrNotExist), errors.Is(keyErr, os.ErrNotExist)
}

// FilesIn names the files under dir/tls.
func FilesIn(dir string) Files {
	d := filepath.Join(dir, "tls")
	return Files{
		CACert:     filepath.Join(d, "ca.pem"),
		CAKey:      filepath.Join(d, "ca-key.pem"),
		ServerCert: filepath.Join(d, "server.pem"),
		ServerKey:  filepath.Join(d, "server-key.pem"),
	}
}

// RenewBefore is how long before it expires the server certificate the
// local CA issued is issued again.
const RenewBefore = 30 * 24 * time.Hour

// Ensure creates the CA if absent, and a server certificate if absent, if
// it is not the CA's, if it does not cover every name in hosts, or if it
// expires within RenewBefore. Half a CA (a restore that missed a file) is
// an error: a new one would leave every device trusting the old.
func Ensure(f Files, hosts []string) error {
	if err := os.MkdirAll(filepath.Dir(f.CACert), 0o700); err != nil {
		return err
	}
	var ca *x509.Certificate
	var caKey *ecdsa.PrivateKey
	var err error
	switch certMissing, keyMissing := f.missingCA(); {
	case certMissing && keyMissing:
		ca, caKey, err = newCA(f)
	case certMissing != keyMissing:
		present, missing := f.CAKey, f.CACert
		if keyMissing {
			present, missing = f.CACert, f.CAKey
		}
		return fmt.Errorf("local CA: %s is missing but %s is there: restore it from a backup (devices trust this CA); only deleting both (and, for a database that serves devices, serving with --new-ca) starts a new CA, which every device must then be given", missing, present)
	default:
		ca, caKey, err = loadPair(f.CACert, f.CAKey)
		if fi, statErr := os.Stat(f.CAKey); statErr == nil && fi.Mode().Perm()&0o077 != 0 {
			slog.Warn("the local CA's key may be read by others, who could then impersonate this server: chmod 600 it",
				"file", f.CAKey, "mode", fi.Mode().Perm().String())
		}
	}
	if err != nil {
		return fmt.Errorf("local CA in %s: %w", filepath.Dir(f.CACert), err)
	}
	if cert, _, err := loadPair(f.ServerCert, f.ServerKey); err == nil && cert.CheckSignatureFrom(ca) == nil &&
		covers(cert, hosts) && time.Until(cert.NotAfter) > RenewBefore {
		return nil
	}
	return newServerCert(f, ca, caKey, hosts)
}

func covers(cert *x509.Certificate, hosts []string) bool {
	for _, h := range hosts {
		if cert.VerifyHostname(h) != nil {
			return false
		}
	}
	return true
}

func newCA(f Files) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "Hatchery local CA", Organization: []string{"Hatchery"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(20, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	if err := writePair(f.CACert, f.CAKey, der, key); err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	return cert, key, err
}

func newServerCert(f Files, ca *x509.Certificate, caKey *ecdsa.PrivateKey, hosts []string) error {
	return newServerCertValid(f, ca, caKey, hosts, 365*24*time.Hour)
}

func newServerCertValid(f Files, ca *x509.Certificate, caKey *ecdsa.PrivateKey, hosts []string, valid time.Duration) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: hosts[0], Organization: []string{"Hatchery"}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(valid),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			if !slices.ContainsFunc(tmpl.IPAddresses, ip.Equal) {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			}
		} else if !slices.Contains(tmpl.DNSNames, h) {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	return writePair(f.ServerCert, f.ServerKey, der, key)
}

// Roots is the system's CA certificates and those of each PEM file named
// ("" names none): what a client of a server with a private CA trusts.
func Roots(files ...string) (*x509.CertPool, error) {
	roots, err := x509.SystemCertPool()
	if err != nil {
		roots = x509.NewCertPool()
	}
	for _, f := range files {
		if f == "" {
			continue
		}
		pemBytes, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("reading CA certificates: %w", err)
		}
		if !roots.AppendCertsFromPEM(pemBytes) {
			return nil, fmt.Errorf("%s holds no PEM certificate", f)
		}
	}
	return roots, nil
}

// Pool reads a PEM bundle into a certificate pool.
func Pool(file string) (*x509.CertPool, error) {
	pemBytes, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemBytes) {
		return nil, fmt.Errorf("%s holds no PEM certificate", file)
	}
	return pool, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

// writePair writes a key and its certificate, each whole or not at all. A
// failure (a full disk) leaves neither new file: a key without its
// certificate would read, at the next start, as half of a CA lost, to be
// restored from a backup.
func writePair(certFile, keyFile string, der []byte, key *ecdsa.PrivateKey) error {
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := atomicfile.Write(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	if err := atomicfile.Write(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		os.Remove(keyFile)
		return err
	}
	return nil
}

func loadPair(certFile, keyFile string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		if _, statErr := os.Stat(certFile); errors.Is(statErr, os.ErrNotExist) {
			return nil, nil, statErr
		}
		return nil, nil, err
	}
	key, ok := pair.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return nil, nil, fmt.Errorf("%s is not an ECDSA key", keyFile)
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	return cert, key, err
}
