package hub

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/certtext"
	"github.com/hatchery/hatchery/internal/hubid"
	"github.com/hatchery/hatchery/internal/store"
)

const kindCertificate = "hub.certificate"

// Certificate is a CA certificate devices' certificates may chain to, in
// the shape of IoT Hub's certificate descriptions.
type Certificate struct {
	Name       string                `json:"name"`
	ETag       string                `json:"etag"`
	Properties CertificateProperties `json:"properties"`
}

// CertificateProperties describe the certificate; only verified ones
// (proof of possession done, or vouched for by the operator) authenticate devices.
type CertificateProperties struct {
	Subject     string    `json:"subject"`
	Expiry      time.Time `json:"expiry"`
	Thumbprint  string    `json:"thumbprint"`
	IsVerified  bool      `json:"isVerified"`
	Created     time.Time `json:"created"`
	Updated     time.Time `json:"updated"`
	Certificate string    `json:"certificate"` // PEM
}

// PutCertificate stores a CA certificate.
func (s *Service) PutCertificate(ctx context.Context, name string, c *Certificate) (*Certificate, error) {
	if !hubid.Valid(name) {
		return nil, azerr.BadRequest("certificate name %q is not valid: use %s", name, hubid.Rule)
	}
	cert, err := certtext.Parse(c.Properties.Certificate)
	if err != nil {
		return nil, azerr.BadRequest("properties.certificate: %v", err)
	}
	if !cert.IsCA {
		return nil, azerr.BadRequest("properties.certificate is not a CA certificate (basicConstraints CA:TRUE): devices' certificates must chain to a CA")
	}
	now := s.Now().UTC()
	thumbprint, _ := certtext.Thumbprints(cert)
	out := &Certificate{Name: name, ETag: newETag(), Properties: CertificateProperties{
		Subject: cert.Subject.String(), Expiry: cert.NotAfter, Thumbprint: thumbprint,
		IsVerified: c.Properties.IsVerified, Created: now, Updated: now,
		Certificate: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})),
	}}
	body, _ := json.Marshal(out)
	if _, err := s.store.Put(ctx, store.Doc{Kind: kindCertificate, ID: name, Body: body}, ""); err != nil {
		return nil, err
	}
	return out, nil
}

// GetCertificate returns a stored CA certificate.
func (s *Service) GetCertificate(ctx context.Context, name string) (*Certificate, error) {
	d, err := s.store.Get(ctx, kindCertificate, name)
	if errors.Is(err, store.ErrNotFound) {
		return nil, azerr.NotFound("CertificateNotFound", "no certificate %q", name)
	}
	if err != nil {
		return nil, err
	}
	c := &Certificate{}
	return c, json.Unmarshal(d.Body, c)
}

// DeleteCertificate removes a CA certificate.
func (s *Service) DeleteCertificate(ctx context.Context, name string) error {
	if err := s.store.Delete(ctx, kindCertificate, name, ""); errors.Is(err, store.ErrNotFound) {
		return azerr.NotFound("CertificateNotFound", "no certificate %q", name)
	} else {
		return err
	}
}

// VerifiedCA returns the named CA certificate if it is verified.
func (s *Service) VerifiedCA(ctx context.Context, name string) (*x509.Certificate, error) {
	c, err := s.GetCertificate(ctx, name)
	if err != nil {
		return nil, err
	}
	if !c.Properties.IsVerified {
		return nil, azerr.BadRequest("CA certificate %q is not verified: upload it again with `hatchery certificate create --name %s --path CA.pem --verified`", name, name)
	}
	return certtext.Parse(c.Properties.Certificate)
}

// ListCertificates returns the stored CA certificates, by name. One that
// cannot be read is left out, and logged, rather than failing every X.509
// device's authentication.
func (s *Service) ListCertificates(ctx context.Context) ([]*Certificate, error) {
	docs, err := s.store.List(ctx, kindCertificate, "", 1000)
	if err != nil {
		return nil, err
	}
	out := make([]*Certificate, 0, len(docs))
	for _, d := range docs {
		c := &Certificate{}
		if err := json.Unmarshal(d.Body, c); err != nil {
			slog.Error("a stored CA certificate is corrupt: left out (upload it again)", "name", d.ID, "error", err)
			continue
		}
		out = append(out, c)
	}
	return out, nil
}

// verifiedCAs is the pool of verified CA certificates.
func (s *Service) verifiedCAs(ctx context.Context) (*x509.CertPool, error) {
	cs, err := s.ListCertificates(ctx)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, c := range cs {
		if c.Properties.IsVerified {
			pool.AppendCertsFromPEM([]byte(c.Properties.Certificate))
		}
	}
	return pool, nil
}

// deviceByCertificate checks a device's TLS client certificate chain: a
// selfSigned device by its registered thumbprints, a certificateAuthority
// device by a chain to a verified CA with the device ID as subject CN; it
// returns the device's record and the identity's (the same for a device).
// chain holds one certificate at least.
func (s *Service) deviceByCertificate(ctx context.Context, r Ref, chain []*x509.Certificate) (dev, id *record, err error) {
	leaf := chain[0]
	now := s.Now()
	if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		return nil, nil, azerr.Unauthorized("%s: the client certificate is not valid now (%s to %s)", r, leaf.NotBefore, leaf.NotAfter)
	}
	if dev, id, err = s.connecting(ctx, r); err != nil {
		return nil, nil, err
	}
	// A module without a certificate of its own is authenticated by its
	// device's, as device keys authenticate modules (edge runtimes of
	// X.509 devices connect their agent this way).
	auth := id.Device.Authentication
	if auth.Type != "selfSigned" && auth.Type != "certificateAuthority" {
		auth = dev.Device.Authentication
	}
	switch auth.Type {
	case "selfSigned":
		ok := false
		for _, want := range []*string{auth.X509Thumbprint.PrimaryThumbprint, auth.X509Thumbprint.SecondaryThumbprint} {
			s1, s256 := certtext.Thumbprints(leaf)
			for _, got := range []string{s1, s256} {
				ok = ok || (want != nil && strings.EqualFold(strings.ReplaceAll(*want, ":", ""), got))
			}
		}
		if !ok {
			return nil, nil, denied(r, "the client certificate's thumbprint is not the registered one")
		}
	case "certificateAuthority":
		roots, err := s.verifiedCAs(ctx)
		if err != nil {
			return nil, nil, err
		}
		inter := x509.NewCertPool()
		for _, c := range chain[1:] {
			inter.AddCert(c)
		}
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
			return nil, nil, denied(r, "the client certificate does not chain to a verified CA of this hub: "+err.Error())
		}
		if leaf.Subject.CommonName != r.String() && leaf.Subject.CommonName != r.Device {
			return nil, nil, denied(r, fmt.Sprintf("the client certificate's subject CN is %q", leaf.Subject.CommonName))
		}
	default:
		return nil, nil, denied(r, fmt.Sprintf("it authenticates with %q, not a certificate", auth.Type))
	}
	return dev, id, enabled(dev)
}
