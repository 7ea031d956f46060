package pki

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// Served is the server's certificate, kept current while the server runs:
// its files are read again when they change (an operator's renewal), and,
// with Renew, issued again RenewBefore it expires. Both are looked at, at
// most once a minute, as handshakes ask for the certificate.
type Served struct {
	certFile, keyFile string
	renew             func() error // nil: the operator's files
	check             func(*tls.Certificate)

	mu      sync.Mutex
	cert    *tls.Certificate
	stamp   string // the files' modification times, as last read
	checked time.Time
	vetted  time.Time // when Check last ran
}

// NewServed loads certFile and keyFile; renew, if not nil, rewrites them
// with a certificate issued anew.
func NewServed(certFile, keyFile string, renew func() error) (*Served, error) {
	s := &Served{certFile: certFile, keyFile: keyFile, renew: renew, checked: time.Now()}
	if err := s.load(); err != nil {
		return nil, err
	}
	return s, nil
}

// Vet has check warn of what is wrong with the certificate served: now,
// for each one loaded from then on, and once a day (it comes nearer its
// expiry).
func (s *Served) Vet(check func(*tls.Certificate)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.check = check
	s.vet(true)
}

// vet runs check on the certificate served, if it is due.
func (s *Served) vet(loaded bool) {
	if s.check != nil && (loaded || time.Since(s.vetted) >= 24*time.Hour) {
		s.vetted = time.Now()
		s.check(s.cert)
	}
}

// Config is a server TLS configuration that serves the certificate.
func (s *Served) Config() *tls.Config {
	return &tls.Config{GetCertificate: s.get, MinVersion: tls.VersionTLS12}
}

// Current is the certificate served now.
func (s *Served) Current() *tls.Certificate {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cert
}

func (s *Served) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if now := time.Now(); now.Sub(s.checked) >= time.Minute {
		s.checked = now
		s.refresh()
	}
	return s.cert, nil
}

// refresh renews and reloads as due; a failure keeps the certificate
// being served, and is logged.
func (s *Served) refresh() {
	if s.renew != nil && time.Until(s.cert.Leaf.NotAfter) < RenewBefore {
		if err := s.renew(); err != nil {
			slog.Error("issuing the server certificate again", "expires", s.cert.Leaf.NotAfter, "error", err)
		}
	}
	if stamp(s.certFile, s.keyFile) == s.stamp {
		s.vet(false)
		return
	}
	if err := s.load(); err != nil {
		s.stamp = stamp(s.certFile, s.keyFile) // said once per change
		slog.Error("the server certificate's files changed but do not load: still serving the one before", "error", err)
		return
	}
	slog.Info("server certificate loaded", "file", s.certFile, "expires", s.cert.Leaf.NotAfter)
	s.vet(true)
}

func (s *Served) load() error {
	st := stamp(s.certFile, s.keyFile)
	pair, err := tls.LoadX509KeyPair(s.certFile, s.keyFile)
	if err != nil {
		return fmt.Errorf("loading TLS certificate %s: %w", s.certFile, err)
	}
	s.cert, s.stamp = &pair, st
	return nil
}

// stamp identifies the files' versions by their modification times.
func stamp(files ...string) string {
	out := ""
	for _, f := range files {
		if fi, err := os.Stat(f); err == nil {
			out += fi.ModTime().String() + "|"
		}
	}
	return out
}
