package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/hatchery/hatchery/internal/pki"
)

// serverTLS is the TLS configuration of both ports, and the CA certificate
// that devices and the CLI trust for it ("" for the system's CAs): the
// local CA's, whose server certificate is issued again before it expires,
// or the operator's --tls-cert (read again when its files change) with
// --tls-ca.
func serverTLS(o serveOptions) (*tls.Config, string, error) {
	var served *pki.Served
	var caFile string
	var err error
	if o.certFile == "" {
		files := pki.FilesIn(o.dir)
		hosts := append([]string{o.host, "localhost", "127.0.0.1", "::1"}, o.tlsNames...)
		if err := pki.Ensure(files, hosts); err != nil {
			return nil, "", err
		}
		// Renewing issues the server certificate again; it never makes a
		// new CA under a running server, whose devices trust this one.
		renew := func() error {
			if files.NoCA() {
				return fmt.Errorf("the local CA is gone from %s: restore tls/ from a backup (devices trust that CA)", filepath.Dir(files.CACert))
			}
			return pki.Ensure(files, hosts)
		}
		if served, err = pki.NewServed(files.ServerCert, files.ServerKey, renew); err != nil {
			return nil, "", err
		}
		caFile = files.CACert
	} else {
		if served, err = pki.NewServed(o.certFile, o.keyFile, nil); err != nil {
			return nil, "", err
		}
		var roots *x509.CertPool
		if o.caFile != "" {
			if caFile, err = filepath.Abs(o.caFile); err != nil {
				return nil, "", err
			}
			if roots, err = pki.Pool(caFile); err != nil {
				return nil, "", fmt.Errorf("--tls-ca: %w", err)
			}
		}
		served.Vet(func(c *tls.Certificate) { checkOperatorCert(c, o.host, roots) })
	}
	conf := served.Config()
	// Devices with X.509 identities present client certificates on both
	// ports; the services, not the TLS layer, decide whether to trust them.
	conf.ClientAuth = tls.RequestClientCert
	return conf, caFile, nil
}

// checkOperatorCert warns of what would fail handshakes with --tls-cert:
// it is served as given, and replaced files are read within a minute (and
// checked again then, and daily).
func checkOperatorCert(cert *tls.Certificate, host string, roots *x509.CertPool) {
	leaf := cert.Leaf
	switch left := time.Until(leaf.NotAfter); {
	case left <= 0:
		slog.Warn("--tls-cert has expired: devices will refuse it; replace its files (they are read again within a minute)", "expired", leaf.NotAfter)
	case left < pki.RenewBefore:
		slog.Warn("--tls-cert expires soon: replace its files before (they are read again within a minute)", "expires", leaf.NotAfter)
	}
	if err := leaf.VerifyHostname(host); err != nil {
		slog.Warn("--tls-cert does not cover --hostname: devices will refuse it", "hostname", host, "error", err)
	}
	intermediates := x509.NewCertPool()
	for _, der := range cert.Certificate[1:] {
		if c, err := x509.ParseCertificate(der); err == nil {
			intermediates.AddCert(c)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: intermediates, CurrentTime: leaf.NotBefore.Add(time.Second)}); err != nil {
		slog.Warn("--tls-cert does not chain to --tls-ca (or, without it, to the system's CAs): give --tls-ca the CA that issued it, as devices and the CLI will need it", "error", err)
	}
}
