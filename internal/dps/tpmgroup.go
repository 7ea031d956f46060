package dps

import (
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/certtext"
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
// certificate, after checking that the certificate is for this EK and that
// the registration ID is the one the EK determines. It is asked only for
// IDs with no individual enrollment, so every refusal is denied's: one told
// apart would say the ID is not enrolled.
func (s *Service) tpmGroup(ctx context.Context, regID string, ek []byte, certB64 string) (*EnrollmentGroup, error) {
	cert, err := certtext.Parse(certB64)
	if err != nil {
		return nil, denied(regID, "tpm.endorsementKeyCertificate: "+err.Error())
	}
	pub, _ := attest.ParsePublic(ek) // checked by the caller
	certKey, ok := cert.PublicKey.(*rsa.PublicKey)
	if !ok || !certKey.Equal(pub.Key()) {
		return nil, denied(regID, "the EK certificate is for another key than the endorsement key sent")
	}
	if regID != attest.RegistrationID(ek) && regID != attest.LegacyRegistrationID(ek) {
		return nil, denied(regID, fmt.Sprintf("no individual enrollment, and a TPM group's device registers as the ID its EK determines, %s", attest.RegistrationID(ek)))
	}
	cert.UnhandledCriticalExtensions = slices.DeleteFunc(slices.Clone(cert.UnhandledCriticalExtensions), func(oid asn1.ObjectIdentifier) bool {
		return slices.ContainsFunc(ekCertExtensions, oid.Equal)
	})
	m, err := s.closestGroup(ctx, func(g *EnrollmentGroup) (*x509.Certificate, int) {
		if g.Attestation.Type != AttestationTPM || g.Attestation.TPM == nil {
			return nil, 0
		}
		cas := g.Attestation.TPM.EKCertificateAuthorities
		return chainsTo(cert, cas.intermediates(), cas.certificates(), s.Now(), x509.ExtKeyUsageAny)
	})
	if err != nil {
		return nil, err
	}
	if m.group == nil {
		return nil, denied(regID, "no individual enrollment, and the EK certificate (issuer "+strings.TrimSpace(cert.Issuer.String())+
			") does not chain to the CA of any TPM enrollment group (when its issuer is an intermediate CA, put it in the group's PEM after the root)")
	}
	return m.group, nil
}
