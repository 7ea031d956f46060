package dps

import (
	"context"
	"crypto/subtle"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/certtext"
)

// X509Attestation is an enrollment's certificates: an individual
// enrollment names the device's own certificate, a group the CA
// certificates its devices' certificates chain to (given inline or as
// references to CA certificates registered with `hatchery certificate`).
type X509Attestation struct {
	ClientCertificates  *X509Certificates `json:"clientCertificates,omitempty"`
	SigningCertificates *X509Certificates `json:"signingCertificates,omitempty"`
	CAReferences        *X509CAReferences `json:"caReferences,omitempty"`
}

// X509Certificates is a primary and an optional secondary certificate, so
// that one can be rolled while the other still works.
type X509Certificates struct {
	Primary   *X509CertificateWithInfo `json:"primary,omitempty"`
	Secondary *X509CertificateWithInfo `json:"secondary,omitempty"`

	// The certificates parsed, once: a cached group's CAs serve every
	// registration of its devices. bundled holds the certificates after
	// the first of each PEM.
	parseOnce sync.Once
	parsed    []*x509.Certificate
	bundled   *x509.CertPool
}

// X509CertificateWithInfo is a certificate (PEM, or base64 of PEM or DER, as
// the service SDKs and the CLI send it) and what the service read from it.
type X509CertificateWithInfo struct {
	Certificate string               `json:"certificate,omitempty"`
	Info        *X509CertificateInfo `json:"info,omitempty"`
}

// X509CAReferences name registered CA certificates.
type X509CAReferences struct {
	Primary   string `json:"primary,omitempty"`
	Secondary string `json:"secondary,omitempty"`
}

// CAStore resolves caReferences to CA certificates that have been
// verified (proof of possession, or vouched for by the operator).
type CAStore interface {
	VerifiedCA(ctx context.Context, name string) (*x509.Certificate, error)
}

// CertificateInfo describes c.
func CertificateInfo(c *x509.Certificate) *X509CertificateInfo {
	s1, s256 := certtext.Thumbprints(c)
	return &X509CertificateInfo{
		SubjectName: c.Subject.String(), IssuerName: c.Issuer.String(),
		SHA1Thumbprint: s1, SHA256Thumbprint: s256,
		NotBeforeUtc: c.NotBefore.UTC(), NotAfterUtc: c.NotAfter.UTC(),
		SerialNumber: strings.ToUpper(c.SerialNumber.Text(16)), Version: c.Version,
	}
}

// checkX509 validates an enrollment's certificates and fills in their info.
// Individual enrollments hold device certificates, groups CA certificates.
func (s *Service) checkX509(ctx context.Context, a *X509Attestation, group bool) error {
	if a == nil {
		a = &X509Attestation{}
	}
	if !group {
		if a.ClientCertificates == nil || a.SigningCertificates != nil || a.CAReferences != nil {
			return azerr.BadRequest("attestation.x509 of an individual enrollment takes clientCertificates (the device's certificate), " +
				"not signingCertificates or caReferences: those belong to enrollment groups")
		}
		return fillCertificates("attestation.x509.clientCertificates", a.ClientCertificates, deviceCert, s.Now())
	}
	switch {
	case a.ClientCertificates != nil:
		return azerr.BadRequest("attestation.x509 of an enrollment group takes signingCertificates (CA certificates) or caReferences, " +
			"not clientCertificates: enroll a single device's certificate with an individual enrollment")
	case a.SigningCertificates != nil && a.CAReferences != nil:
		return azerr.BadRequest("attestation.x509 takes signingCertificates or caReferences, not both")
	case a.SigningCertificates != nil:
		return fillCertificates("attestation.x509.signingCertificates", a.SigningCertificates, caCert, s.Now())
	case a.CAReferences != nil && a.CAReferences.Primary != "":
		for _, name := range []string{a.CAReferences.Primary, a.CAReferences.Secondary} {
			if name == "" {
				continue
			}
			if s.CAs == nil {
				return azerr.BadRequest("attestation.x509.caReferences: this service has no CA certificate store: give signingCertificates instead")
			}
			if _, err := s.CAs.VerifiedCA(ctx, name); err != nil {
				return azerr.BadRequest("attestation.x509.caReferences: %v", err)
			}
		}
		return nil
	}
	return azerr.BadRequest("attestation.x509 of an enrollment group needs signingCertificates.primary.certificate " +
		"(the PEM of the root or intermediate CA that signs the devices' certificates) or caReferences.primary")
}

// certRole is what the PEMs of a certificate field hold.
type certRole int

const (
	deviceCert certRole = iota // one device certificate
	caCert                     // one CA certificate
	caBundle                   // a CA certificate, then intermediate CAs that chain to it
)

func fillCertificates(field string, cs *X509Certificates, role certRole, now time.Time) error {
	if cs.Primary == nil || cs.Primary.Certificate == "" {
		return azerr.BadRequest("%s.primary.certificate is required: the certificate's PEM", field)
	}
	for _, nc := range []struct {
		name string
		c    *X509CertificateWithInfo
	}{{"primary", cs.Primary}, {"secondary", cs.Secondary}} {
		name, c := nc.name, nc.c
		if c == nil {
			continue
		}
		if c.Certificate == "" {
			return azerr.BadRequest("%s.%s.certificate is empty: give the certificate's PEM or leave %s out", field, name, name)
		}
		certs, err := readCertificates(c.Certificate, role)
		if err != nil {
			return azerr.BadRequest("%s.%s.certificate: %v", field, name, err)
		}
		for _, cert := range certs {
			if role != deviceCert && !cert.IsCA {
				return azerr.BadRequest("%s.%s.certificate: %q is not a CA certificate (basicConstraints CA:TRUE): "+
					"a group trusts the CA that signs its devices' certificates", field, name, cert.Subject.String())
			}
		}
		if err := checkBundle(certs, now); err != nil {
			return azerr.BadRequest("%s.%s.certificate: %v", field, name, err)
		}
		c.Info = CertificateInfo(certs[0])
		// Kept as read: a private key pasted after the certificate, as
		// PEM files carry them, is never stored or given back.
		c.Certificate = encodePEM(certs)
	}
	return nil
}

// encodePEM is the PEM of certs.
func encodePEM(certs []*x509.Certificate) string {
	var out []byte
	for _, cert := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})...)
	}
	return string(out)
}

// storedCertificates reads a stored certificate field: every certificate
// of its PEM, or, where earlier versions stored the text as sent, the
// first, whatever follows it (a private key pasted after it).
func storedCertificates(text string) ([]*x509.Certificate, error) {
	if certs, err := certtext.ParseAll(text); err == nil {
		return certs, nil
	}
	cert, err := certtext.Parse(text)
	if err != nil {
		return nil, err
	}
	return []*x509.Certificate{cert}, nil
}

// certificatesOnly re-encodes the certificate fields of a stored
// attestation as their certificates alone, for reads: earlier versions
// stored the text as sent, and a private key pasted after a certificate
// is never given back. (The next write of the enrollment stores it so.)
// A field that does not parse, which no version stored, is left empty.
func (a *Attestation) certificatesOnly() {
	var fields []*X509Certificates
	if a.X509 != nil {
		fields = append(fields, a.X509.ClientCertificates, a.X509.SigningCertificates)
	}
	if a.TPM != nil {
		fields = append(fields, a.TPM.EKCertificateAuthorities)
	}
	for _, cs := range fields {
		if cs == nil {
			continue
		}
		for _, c := range []*X509CertificateWithInfo{cs.Primary, cs.Secondary} {
			if c == nil {
				continue
			}
			certs, err := storedCertificates(c.Certificate)
			if err != nil {
				c.Certificate = ""
				continue
			}
			c.Certificate = encodePEM(certs)
		}
	}
}

// readCertificates reads a certificate field's PEM: all of a TPM group's
// bundle, whose intermediates serve; of any other, the first certificate
// alone, whatever follows it (its chain, its key, as PEM files carry them).
func readCertificates(pemText string, role certRole) ([]*x509.Certificate, error) {
	if role == caBundle {
		return certtext.ParseAll(pemText)
	}
	c, err := certtext.Parse(pemText)
	if err != nil {
		return nil, err
	}
	return []*x509.Certificate{c}, nil
}

// checkBundle checks that the certificates after the first chain to it
// now, through each other: only then can they serve as intermediates.
func checkBundle(certs []*x509.Certificate, now time.Time) error {
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	for _, c := range certs[1:] {
		if ca, _ := chainsTo(c, inter, certs[:1], now, x509.ExtKeyUsageAny); ca == nil {
			return fmt.Errorf("%q does not chain to the first certificate, %q, or is not valid now: "+
				"put the CA the group trusts first and after it only intermediate CAs it issued", c.Subject.String(), certs[0].Subject.String())
		}
	}
	return nil
}

// certificates returns the parsed certificates of a primary/secondary pair
// as stored (it is not for one still being filled in).
func (cs *X509Certificates) certificates() []*x509.Certificate {
	if cs == nil {
		return nil
	}
	cs.parse()
	return cs.parsed
}

// intermediates returns the certificates after the first of each PEM: a
// TPM group's intermediate CAs, which EK certificates chain through.
func (cs *X509Certificates) intermediates() *x509.CertPool {
	if cs == nil {
		return nil
	}
	cs.parse()
	return cs.bundled
}

func (cs *X509Certificates) parse() {
	cs.parseOnce.Do(func() {
		cs.bundled = x509.NewCertPool()
		for _, c := range []*X509CertificateWithInfo{cs.Primary, cs.Secondary} {
			if c == nil {
				continue
			}
			certs, err := storedCertificates(c.Certificate)
			if err != nil {
				continue
			}
			cs.parsed = append(cs.parsed, certs[0])
			for _, inter := range certs[1:] {
				cs.bundled.AddCert(inter)
			}
		}
	})
}

// x509Identity checks what a device's certificate says about it: the
// registration ID is the one it names (registrationName), and it must be
// valid now.
func x509Identity(regID string, leaf *x509.Certificate, now time.Time) error {
	if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		return unauthorized(regID, fmt.Sprintf("the client certificate is valid from %s to %s, not now",
			leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339)))
	}
	if namesRegistration(leaf, regID) {
		return nil
	}
	if why := nameless(leaf, regID); why != "" {
		return unauthorized(regID, why)
	}
	names, _ := registrationNames(leaf)
	return unauthorized(regID, "the registration ID must be the client certificate's "+names)
}

// nameless says how to fix a device certificate that names no registration
// ID at all; "" for one that names one.
func nameless(c *x509.Certificate, regID string) string {
	if registrationName(c) != "" {
		return ""
	}
	return fmt.Sprintf("the certificate names no registration ID (it has no subject CN and no DNS name): issue the device one with CN=%s", regID)
}

// registrationNames describes the registration ID a device certificate
// names (registrationName), for refusals of others, and quotes it in lower
// case, as an enrollment takes it. A certificate naming none is nameless's.
func registrationNames(c *x509.Certificate) (described, ids string) {
	id := strings.ToLower(registrationName(c))
	if c.Subject.CommonName != "" {
		return fmt.Sprintf("subject CN %q", c.Subject.CommonName), fmt.Sprintf("%q", id)
	}
	return fmt.Sprintf("first DNS name %q (it has no subject CN)", registrationName(c)), fmt.Sprintf("%q", id)
}

// registrationName is the one registration ID a device certificate names:
// its subject CN, as the hosted service takes it; only a certificate
// without one is named by its first DNS name, as the C# SDK derives the ID
// (X509Certificate2.GetNameInfo(DnsName)), which works for certificates
// whose CN and first DNS name agree. Never both: a certificate with CN=A
// and DNS:B would be two devices, and registering as B would take B's
// registration and hub identity over. "" when it names none.
func registrationName(c *x509.Certificate) string {
	if c.Subject.CommonName != "" {
		return c.Subject.CommonName
	}
	if len(c.DNSNames) > 0 {
		return c.DNSNames[0]
	}
	return ""
}

// namesRegistration reports whether a device certificate names regID, the
// registration ID the device uses (registrationName).
func namesRegistration(c *x509.Certificate, regID string) bool {
	name := registrationName(c)
	return name != "" && strings.EqualFold(name, regID)
}

// checkRegistrationCN refuses an individual X.509 enrollment whose
// certificates name another registration ID, under which the device
// would register and find no enrollment.
func checkRegistrationCN(e *Enrollment) error {
	x := e.Attestation.X509
	if x == nil || x.ClientCertificates == nil {
		return nil
	}
	for _, c := range x.ClientCertificates.certificates() {
		if !namesRegistration(c, e.RegistrationID) {
			if why := nameless(c, e.RegistrationID); why != "" {
				return azerr.BadRequest("%s", why)
			}
			names, ids := registrationNames(c)
			return azerr.BadRequest("the certificate's device registers with its %s as registration ID, not %q: enroll it as %s",
				names, e.RegistrationID, ids)
		}
	}
	return nil
}

// authenticateX509 finds the enrollment that trusts the device's TLS client
// certificate chain: its individual enrollment by the certificate itself,
// else the first X.509 group whose CA the chain leads to.
func (s *Service) authenticateX509(ctx context.Context, regID string, e *Enrollment, chain []*x509.Certificate) (*attestation, error) {
	leaf, now := chain[0], s.Now()
	if err := x509Identity(regID, leaf, now); err != nil {
		return nil, err
	}
	if e != nil {
		if e.Attestation.Type != AttestationX509 || e.Attestation.X509 == nil {
			return nil, denied(regID, "the device presented a certificate but its enrollment uses "+e.Attestation.Type+" attestation")
		}
		for _, c := range e.Attestation.X509.ClientCertificates.certificates() {
			if subtle.ConstantTimeCompare(c.Raw, leaf.Raw) == 1 {
				return &attestation{enrollment: e, certificate: leaf}, nil
			}
		}
		return nil, denied(regID, "the client certificate is not the one enrolled (compare sha256 thumbprints with `hatchery enrollment show`)")
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	m, err := s.closestGroup(ctx, func(g *EnrollmentGroup) (*x509.Certificate, int) {
		if g.Attestation.Type != AttestationX509 || g.Attestation.X509 == nil {
			return nil, 0
		}
		return chainsTo(leaf, inter, s.groupCAs(ctx, g.Attestation.X509), now, x509.ExtKeyUsageClientAuth)
	})
	if err != nil {
		return nil, err
	}
	if m.group == nil {
		return nil, denied(regID, "no individual enrollment has this registration ID and the client certificate "+
			"does not chain to the CA of any X.509 enrollment group (send the intermediate certificates in the TLS chain)")
	}
	return &attestation{group: m.group, certificate: leaf, signer: m.ca, matched: m.all}, nil
}

// chainsTo returns the CA of cas that cert chains to now (through the
// intermediates inter, which may be nil), allowing usage, and the length
// of the shortest such chain; nil if none.
func chainsTo(cert *x509.Certificate, inter *x509.CertPool, cas []*x509.Certificate, now time.Time, usage x509.ExtKeyUsage) (*x509.Certificate, int) {
	roots := x509.NewCertPool()
	for _, ca := range cas {
		roots.AddCert(ca)
	}
	chains, err := cert.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{usage}})
	if err != nil {
		return nil, 0
	}
	shortest := slices.MinFunc(chains, func(a, b []*x509.Certificate) int { return len(a) - len(b) })
	return shortest[len(shortest)-1], len(shortest)
}

// groupMatch is the group a device's certificate chose, the CA it chained
// to there, and the IDs of every group it chains to.
type groupMatch struct {
	group *EnrollmentGroup
	ca    *x509.Certificate
	all   []string
}

// closestGroup finds, among the groups a certificate chains to (by
// chain, which returns the group's CA and the chain's length, or nil), the
// one whose CA is nearest to it, as the hosted service does: a group for an
// intermediate CA comes before one for its root, so that disabling it
// blocks that intermediate's devices whatever the root's group says. Among
// groups as near, the first by ID.
func (s *Service) closestGroup(ctx context.Context, chain func(*EnrollmentGroup) (*x509.Certificate, int)) (groupMatch, error) {
	var m groupMatch
	nearest := 0
	err := s.eachGroup(ctx, func(g *EnrollmentGroup) bool {
		ca, n := chain(g)
		if ca == nil {
			return true
		}
		m.all = append(m.all, g.EnrollmentGroupID)
		if m.group == nil || n < nearest {
			m.group, m.ca, nearest = g, ca, n
		}
		return true
	})
	return m, err
}

// groupCAs returns the CA certificates a group trusts.
func (s *Service) groupCAs(ctx context.Context, a *X509Attestation) []*x509.Certificate {
	if a.SigningCertificates != nil {
		return a.SigningCertificates.certificates()
	}
	var out []*x509.Certificate
	if a.CAReferences != nil && s.CAs != nil {
		for _, name := range []string{a.CAReferences.Primary, a.CAReferences.Secondary} {
			if name == "" {
				continue
			}
			// A reference to a CA that has since been removed or
			// unverified no longer authenticates anyone.
			if ca, err := s.CAs.VerifiedCA(ctx, name); err == nil {
				out = append(out, ca)
			}
		}
	}
	return out
}
