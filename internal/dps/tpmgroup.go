package dps

import (
	"bytes"
	"context"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/certtext"
	"github.com/hatchery/hatchery/internal/store"
)

// A TPM group trusts TPM manufacturers' CA certificates: a device whose
// endorsement key comes with a certificate chaining to one of them is
// provisioned without an enrollment of its own, under the registration ID
// its EK determines. (The hosted service has no such groups.)

// checkTPMGroup validates a TPM group's CA certificates.
func checkTPMGroup(a *TPMAttestation, now time.Time) error {
	if a == nil || a.EKCertificateAuthorities == nil {
		return azerr.BadRequest("a TPM enrollment group needs attestation.tpm.ekCertificateAuthorities.primary.certificate: " +
			"the TPM manufacturer's CA certificate (PEM) that signs its devices' EK certificates; " +
			"for one device, create an individual enrollment with its endorsement key")
	}
	if a.EndorsementKey != "" {
		return azerr.BadRequest("a TPM enrollment group takes no endorsementKey: its devices present EK certificates")
	}
	return fillCertificates("attestation.tpm.ekCertificateAuthorities", a.EKCertificateAuthorities, caBundle, now)
}

// ekCertExtensions are extensions EK certificates mark critical that Go's
// verifier does not know and that add no constraint on the chain: subject
// alternative names of directoryName form hold the TPM's manufacturer,
// model and version (TCG EK Credential Profile).
var ekCertExtensions = []asn1.ObjectIdentifier{{2, 5, 29, 17}, {2, 5, 29, 9}}

// tpmGroup finds the TPM group whose CA certificate signed the device's EK
// certificate (returned parsed), after checking that the certificate is for
// this EK and that the registration ID is the one the EK determines. It is
// asked only for IDs with no individual enrollment, so every refusal is
// denied's: one told apart would say the ID is not enrolled.
func (s *Service) tpmGroup(ctx context.Context, regID string, ek []byte, certB64 string) (*EnrollmentGroup, *x509.Certificate, error) {
	cert, err := ekCertificate(regID, certB64)
	if err != nil {
		return nil, nil, err
	}
	pub, _ := attest.ParsePublic(ek) // checked by the caller
	certKey, err := ekCertKey(cert)
	if err != nil {
		return nil, nil, denied(regID, err.Error())
	}
	if !certKey.Equal(pub.Key()) {
		return nil, nil, denied(regID, "the EK certificate is for another key than the endorsement key sent "+
			"(an EK persisted from another template than the TCG default, as the Azure C and Node SDKs create it, is not the key the maker certified: "+
			"evict it with `tpm2_evictcontrol -C o -c 0x81010001` and let the runtime create it again)")
	}
	if regID != attest.RegistrationID(ek) && regID != attest.LegacyRegistrationID(ek) {
		return nil, nil, denied(regID, fmt.Sprintf("no individual enrollment, and a TPM group's device registers as the ID its EK determines, %s", attest.RegistrationID(ek)))
	}
	m, err := s.closestGroup(ctx, func(g *EnrollmentGroup) (*x509.Certificate, int) {
		return s.tpmGroupTrusts(g, cert)
	})
	if err != nil {
		return nil, nil, err
	}
	if m.group == nil {
		return nil, nil, notChaining(regID, cert)
	}
	return m.group, cert, nil
}

// stillTrusts checks, when a TPM group's device answers its challenge, that
// the challenge's group still trusts its EK certificate: a CA removed from
// the group (or a group re-created with other CAs) stops devices that were
// challenged before, as it stops new ones.
func (s *Service) stillTrusts(regID string, g *EnrollmentGroup, c *challenge) error {
	if c.EndorsementKeyCertificate == "" {
		return denied(regID, "the TPM challenge predates EK certificates kept with challenges: register again for a new challenge")
	}
	cert, err := ekCertificate(regID, c.EndorsementKeyCertificate)
	if err != nil {
		return err
	}
	if ca, _ := s.tpmGroupTrusts(g, cert); ca == nil {
		return notChaining(regID, cert)
	}
	return nil
}

// ekCertificate parses a device's EK certificate for chain verification,
// and checks that it is one.
func ekCertificate(regID, certB64 string) (*x509.Certificate, error) {
	cert, err := parseEKCertificate(certB64)
	if err != nil {
		return nil, denied(regID, "tpm.endorsementKeyCertificate: "+err.Error())
	}
	cert.UnhandledCriticalExtensions = slices.DeleteFunc(slices.Clone(cert.UnhandledCriticalExtensions), func(oid asn1.ObjectIdentifier) bool {
		return slices.ContainsFunc(ekCertExtensions, oid.Equal)
	})
	if err := ekCertificateUse(cert); err != nil {
		return nil, denied(regID, err.Error())
	}
	return cert, nil
}

// parseEKCertificate reads PEM, or base64 of an EK certificate NV index's
// contents, which may hold the maker's padding or TCG header around the
// DER (as devices that do not strip them send it).
func parseEKCertificate(s string) (*x509.Certificate, error) {
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil || bytes.Contains(raw, []byte("-----BEGIN")) {
		return certtext.Parse(s)
	}
	const fix = ": send the certificate the TPM's maker stored in NV index 0x01c00002 (tpm2_nvread 0x01c00002)"
	der, err := attest.EKCertificateDER(raw)
	if err != nil {
		return nil, errors.New(err.Error() + fix)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("the EK certificate is no X.509 certificate (%v)"+fix, err)
	}
	return cert, nil
}

// Object identifiers of EK certificates (TCG EK Credential Profile).
var (
	oidEKCertificate = asn1.ObjectIdentifier{2, 23, 133, 8, 1} // tcg-kp-EKCertificate
	oidKeyUsage      = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidExtKeyUsage   = asn1.ObjectIdentifier{2, 5, 29, 37}
	// id-RSAES-OAEP: Infineon's EK certificates name their key's algorithm
	// so, for which Go parses no key.
	oidRSAESOAEP = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 7}
)

// ekCertificateUse refuses a certificate of the group's CA that is not an
// EK certificate: a TLS certificate's key, say, lives in software, and its
// holder could answer challenges as a TPM. Makers may omit the extended key
// usage, so only one present must name EK certificates.
func ekCertificateUse(cert *x509.Certificate) error {
	has := func(oid asn1.ObjectIdentifier) bool {
		return slices.ContainsFunc(cert.Extensions, func(e pkix.Extension) bool { return e.Id.Equal(oid) })
	}
	const why = ", so it is no EK certificate (TCG EK Credential Profile): send the certificate the TPM's maker stored in NV index 0x01c00002"
	switch {
	case cert.IsCA:
		return errors.New("the EK certificate is a CA certificate" + why)
	case has(oidKeyUsage) && cert.KeyUsage&x509.KeyUsageKeyEncipherment == 0:
		return errors.New("the EK certificate's key usage lacks keyEncipherment" + why)
	case has(oidExtKeyUsage) && !slices.ContainsFunc(cert.UnknownExtKeyUsage, oidEKCertificate.Equal):
		return errors.New("the EK certificate's extended key usage lacks tcg-kp-EKCertificate (2.23.133.8.1)" + why)
	}
	return nil
}

// ekCertKey is the RSA key of an EK certificate.
func ekCertKey(cert *x509.Certificate) (*rsa.PublicKey, error) {
	if k, ok := cert.PublicKey.(*rsa.PublicKey); ok {
		return k, nil
	}
	var spki struct {
		Algorithm pkix.AlgorithmIdentifier
		Key       asn1.BitString
	}
	if _, err := asn1.Unmarshal(cert.RawSubjectPublicKeyInfo, &spki); err != nil {
		return nil, fmt.Errorf("the EK certificate's subject public key info does not parse (%v)", err)
	}
	if !spki.Algorithm.Algorithm.Equal(oidRSAESOAEP) {
		return nil, fmt.Errorf("the EK certificate's key is of algorithm %v, not RSA as the endorsement key sent", spki.Algorithm.Algorithm)
	}
	k, err := x509.ParsePKCS1PublicKey(spki.Key.RightAlign())
	if err != nil {
		return nil, fmt.Errorf("the EK certificate's RSAES-OAEP key does not parse as an RSA public key (%v)", err)
	}
	return k, nil
}

// tpmGroupTrusts is the CA of TPM group g that cert chains to, and how far
// (closestGroup); nil if g is no TPM group or cert chains to none of its CAs.
func (s *Service) tpmGroupTrusts(g *EnrollmentGroup, cert *x509.Certificate) (*x509.Certificate, int) {
	if g.Attestation.Type != AttestationTPM || g.Attestation.TPM == nil {
		return nil, 0
	}
	cas := g.Attestation.TPM.EKCertificateAuthorities
	return chainsTo(cert, cas.intermediates(), cas.certificates(), s.Now(), x509.ExtKeyUsageAny)
}

// notChaining refuses an EK certificate that no TPM group trusts.
func notChaining(regID string, cert *x509.Certificate) error {
	return denied(regID, "no individual enrollment, and the EK certificate (issuer "+strings.TrimSpace(cert.Issuer.String())+
		") does not chain to the CA of any TPM enrollment group (when its issuer is an intermediate CA, put it in the group's PEM after the root)"+sha1Note(cert))
}

// sha1Note says why an EK certificate signed with SHA-1 chains to no group
// (Go verifies no SHA-1 signatures, which can be forged).
func sha1Note(cert *x509.Certificate) string {
	switch cert.SignatureAlgorithm {
	case x509.SHA1WithRSA, x509.ECDSAWithSHA1, x509.DSAWithSHA1:
		return "; it is signed with SHA-1, which this service does not verify as SHA-1 signatures can be forged: create an individual enrollment with the device's endorsement key instead"
	}
	return ""
}

// A TPM activates credentials for its EK whatever else the public area it
// reports says (attributes, authPolicy, the exponent as 0 or 65537), and the
// registration ID hashes all of it, in two spellings: one TPM could register
// as many IDs. So a TPM group's device claims its ID by its key, at its first
// authenticated registration (a challenge is for anyone who knows the public
// EK), and registers as no other while the registration record lives.

// ekClaim is the registration ID a TPM group's device registered as.
type ekClaim struct {
	RegistrationID string `json:"registrationId"`
}

// ekOf names, under a registration ID, the EK key ID it hashes, so that a
// DELETE finds the ID's claim without its record. An ID determines its EK
// for good, so the index is written before each claim and never changes,
// nor is deleted (freeing it could race a claim made again): one outliving
// its claim points at a claim of another ID or at none.
type ekOf struct {
	KeyID string `json:"keyId"`
}

// ekKeyID names an EK by its key: the hash of its modulus.
func ekKeyID(ek []byte) (string, error) {
	pub, err := attest.ParsePublic(ek)
	if err != nil {
		return "", fmt.Errorf("the challenge's endorsement key: %w", err)
	}
	sum := sha256.Sum256(pub.Modulus)
	return hex.EncodeToString(sum[:]), nil
}

// tpmIdentity has a TPM group's device claim regID for its EK, or finds
// that it did, and returns the EK's key ID; "" for other devices. The claim
// is read every time rather than trusted from the registration record: a
// registration that raced a DELETE of its record writes the record back
// with the key ID of a claim that DELETE freed, and this claims it again.
func (s *Service) tpmIdentity(ctx context.Context, regID string, att *attestation) (string, error) {
	if att.group == nil || att.challenge == nil {
		return "", nil
	}
	ek, _ := base64.StdEncoding.DecodeString(att.challenge.EndorsementKey)
	keyID, err := ekKeyID(ek)
	if err != nil {
		return "", err
	}
	return keyID, s.claimID(ctx, regID, keyID)
}

// claimID has the EK keyID claim regID, or finds that it does.
func (s *Service) claimID(ctx context.Context, regID, keyID string) error {
	for range 3 { // a claim made or freed meanwhile is read again
		c, _, err := get[ekClaim](ctx, s.store, kindTPMKey, keyID, nil)
		switch {
		case err != nil:
			return err
		case c == nil:
			err := s.claimEK(ctx, regID, keyID)
			if errors.Is(err, store.ErrExists) {
				continue
			}
			if err != nil {
				return err
			}
		case !strings.EqualFold(c.RegistrationID, regID):
			return unauthorized(regID, fmt.Sprintf("this TPM registered as %s already, and a TPM group's device registers under one ID: "+
				"to register it as %s, delete the registration record of %s (DELETE /registrations/%s)", c.RegistrationID, regID, c.RegistrationID, c.RegistrationID))
		}
		return nil
	}
	return azerr.New(409203, "Conflict", "the claim of this TPM's registration ID changed while it was made: register again")
}

// claimEK stores the claim of the EK keyID on regID, after its index;
// ErrExists if the EK has one.
func (s *Service) claimEK(ctx context.Context, regID, keyID string) error {
	of, _ := json.Marshal(ekOf{KeyID: keyID})
	if _, err := s.store.Put(ctx, store.Doc{Kind: kindTPMKeyOf, ID: regID, Body: of}, ""); err != nil {
		return err
	}
	body, _ := json.Marshal(ekClaim{RegistrationID: regID})
	_, err := s.store.Create(ctx, store.Doc{Kind: kindTPMKey, ID: keyID, Body: body})
	return err
}

// freeEK drops the claim of the EK keyID on regID, whose registration
// record was deleted, so that its TPM may register under another ID.
//
// A registration racing the DELETE may write the record back after it was
// deleted; it re-checks its claim only after writing. If it writes after
// the record is read again here, its re-check comes after the free and
// claims the ID again; if before, the record read here is back, and this
// claims the ID for it. Either way no record lives without its claim (one
// written before the DELETE deleted made that delete, at the etag it read,
// fail and read again). At worst a claim outlives its record, which
// claimedEK finds.
func (s *Service) freeEK(ctx context.Context, regID, keyID string) error {
	c, etag, err := get[ekClaim](ctx, s.store, kindTPMKey, keyID, nil)
	if err != nil || c == nil || !strings.EqualFold(c.RegistrationID, regID) {
		return err
	}
	if err := s.store.Delete(ctx, kindTPMKey, keyID, etag); err != nil && !errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("registration %s is deleted, but freeing its TPM to register under another ID failed (%w): "+
			"the TPM can still register as %s; delete that registration again once it has", regID, err, regID)
	}
	rec, _, err := get[registrationRecord](ctx, s.store, kindRegistration, regID, nil)
	if err != nil {
		return fmt.Errorf("registration %s is deleted and its TPM freed, but reading it again, to see whether the device registered meanwhile, failed (%w): "+
			"delete registration %s again", regID, err, regID)
	}
	if rec == nil || rec.EndorsementKeyID == "" {
		return nil
	}
	// Written back meanwhile; a claim there now is this one's, re-made by
	// the registration, or the TPM's for another ID, which it keeps.
	if err := s.claimEK(ctx, regID, rec.EndorsementKeyID); err != nil && !errors.Is(err, store.ErrExists) {
		return fmt.Errorf("registration %s was registered again while it was deleted, and claiming its TPM for it again failed (%w): "+
			"delete registration %s and have the device register again", regID, err, regID)
	}
	return nil
}

// claimedEK finds the key ID of the EK that claims regID, "" if none does:
// for a DELETE of a record that names none (a registration through a TPM
// group that failed after claiming an ID leaves the claim without its
// record, or with a record an individual enrollment wrote).
func (s *Service) claimedEK(ctx context.Context, regID string) (string, error) {
	if len(regID) != len(attest.RegistrationID(nil)) && len(regID) != len(attest.LegacyRegistrationID(nil)) {
		return "", nil // only the forms an EK determines are claimed
	}
	of, _, err := get[ekOf](ctx, s.store, kindTPMKeyOf, regID, nil)
	if err != nil || of == nil {
		return "", err
	}
	c, _, err := get[ekClaim](ctx, s.store, kindTPMKey, of.KeyID, nil)
	if err != nil || c == nil || !strings.EqualFold(c.RegistrationID, regID) {
		return "", err
	}
	return of.KeyID, nil
}
