// Package softtpm is a TPM in software for simulated devices: the device
// half of PROTOCOL.md §1–2 — endorsement and storage root keys, credential
// activation, import of the duplicated HMAC key, HMAC — with the keys in
// memory. It checks every integrity value a real TPM checks, so a blob it
// accepts is one a TPM would accept too.
package softtpm

import (
	"bytes"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/hatchery/hatchery/internal/attest"
)

// Keys are a device's endorsement and storage root keys. Generating an
// RSA-2048 pair takes tens of milliseconds, so a simulator may share a
// pool of them among devices; the service's work per device is the same.
type Keys struct {
	ek, srk       *rsa.PrivateKey
	ekPub, srkPub []byte // TPM2B_PUBLIC
	ekCert        []byte // DER, if the "manufacturer" issued one
}

// Certify issues the EK a certificate from a manufacturer CA, as TPM
// makers do at production (TCG EK Credential Profile): for key
// encipherment and EK certificates only, with an empty subject and the TPM
// named in a critical subject alternative name.
func (k *Keys) Certify(ca *x509.Certificate, caKey crypto.Signer) error {
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().AddDate(10, 0, 0), KeyUsage: x509.KeyUsageKeyEncipherment, BasicConstraintsValid: true,
		UnknownExtKeyUsage: []asn1.ObjectIdentifier{{2, 23, 133, 8, 1}}, // tcg-kp-EKCertificate
		ExtraExtensions:    []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Critical: true, Value: tpmSAN}}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &k.ek.PublicKey, caKey)
	if err != nil {
		return err
	}
	k.ekCert = der
	return nil
}

// tpmSAN is a subject alternative name of one directoryName holding the
// TPM's manufacturer, model and firmware version (tcg-at-tpmManufacturer,
// -tpmModel, -tpmVersion).
var tpmSAN = func() []byte {
	name, _ := asn1.Marshal(pkix.RDNSequence{{
		{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 1}, Value: "id:53575450"}, // "SWTP"
		{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 2}, Value: "softtpm"},
		{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 3}, Value: "id:00010000"},
	}})
	san, _ := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: name}})
	return san
}()

// Object attributes of the EK (the TCG default template) and the SRK.
const (
	ekAttributes  = 0x000300b2 // fixedTPM|fixedParent|sensitiveDataOrigin|adminWithPolicy|restricted|decrypt
	srkAttributes = 0x00030472 // fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|noDA|restricted|decrypt
)

// ekPolicy is the TCG default EK's authPolicy (PolicySecret of the endorsement hierarchy).
var ekPolicy = []byte{
	0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
	0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
}

// NewKeys generates an EK and an SRK.
func NewKeys() (*Keys, error) {
	ek, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	srk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	return &Keys{ek: ek, srk: srk, ekPub: public(ek, ekAttributes, ekPolicy), srkPub: public(srk, srkAttributes, nil)}, nil
}

// public encodes a TPM2B_PUBLIC of an RSA-2048 restricted decryption key
// with AES-128-CFB symmetric parameters, as TPMs create EKs and SRKs.
func public(k *rsa.PrivateKey, attrs uint32, policy []byte) []byte {
	b := []byte{0, 0}         // size, filled in below
	b = append(b, 0x00, 0x01) // TPM_ALG_RSA
	b = append(b, 0x00, 0x0b) // nameAlg SHA-256
	b = binary.BigEndian.AppendUint32(b, attrs)
	b = binary.BigEndian.AppendUint16(b, uint16(len(policy)))
	b = append(b, policy...)
	b = append(b, 0x00, 0x06, 0x00, 0x80, 0x00, 0x43) // AES, 128 bits, CFB
	b = append(b, 0x00, 0x10)                         // scheme NULL
	b = append(b, 0x08, 0x00)                         // 2048 bits
	b = append(b, 0, 0, 0, 0)                         // default exponent
	mod := k.N.FillBytes(make([]byte, 256))
	b = binary.BigEndian.AppendUint16(b, uint16(len(mod)))
	b = append(b, mod...)
	binary.BigEndian.PutUint16(b, uint16(len(b)-2))
	return b
}

// TPM is one device's TPM.
type TPM struct {
	keys *Keys
	mu   sync.Mutex
	hmac map[uint32][]byte // imported keys by persistent handle
}

// New returns a TPM with keys.
func New(keys *Keys) *TPM { return &TPM{keys: keys, hmac: map[uint32][]byte{}} }

// EndorsementKey returns the EK's TPM2B_PUBLIC.
func (t *TPM) EndorsementKey() ([]byte, error) { return t.keys.ekPub, nil }

// EndorsementCertificate returns the EK certificate (DER), nil if none.
func (t *TPM) EndorsementCertificate() ([]byte, error) { return t.keys.ekCert, nil }

// StorageRootKey returns the SRK's TPM2B_PUBLIC.
func (t *TPM) StorageRootKey() ([]byte, error) { return t.keys.srkPub, nil }

// HMAC signs data with the key imported at handle.
func (t *TPM) HMAC(handle uint32, data []byte) ([]byte, error) {
	t.mu.Lock()
	key, ok := t.hmac[handle]
	t.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("no key at handle 0x%08x: %w", handle, tpm2.TPMRCHandle)
	}
	m := hmac.New(sha256.New, key)
	m.Write(data)
	return m.Sum(nil), nil
}

// ImportActivationBlob activates the credential (parts A, B) with the EK,
// bound to the SRK's Name, and imports the duplicated key (C, D, E) under
// the SRK with the credential as its inner wrapping key, at handle.
func (t *TPM) ImportActivationBlob(blob []byte, handle uint32) error {
	parts, err := attest.SplitBlob(blob)
	if err != nil {
		return err
	}
	credBlob, secretE, dup, secretS, pub := parts[0], parts[1], parts[2], parts[3], parts[4]

	cred, err := unseal(t.keys.ek, "IDENTITY\x00", secretE, credBlob, attest.Name(t.keys.srkPub[2:]))
	if err != nil {
		return fmt.Errorf("activating the credential: %w", err)
	}
	if len(cred) != 2+16 || binary.BigEndian.Uint16(cred) != 16 {
		return errors.New("activating the credential: not an AES-128 key")
	}
	innerKey := cred[2:]

	idName := attest.Name(pub)
	inner, err := unseal(t.keys.srk, "DUPLICATE\x00", secretS, dup, idName)
	if err != nil {
		return fmt.Errorf("importing the key: %w", err)
	}
	cfbDecrypt(innerKey, inner)
	// inner = TPM2B_DIGEST(SHA-256(sensitive2B ‖ Name)) ‖ sensitive2B
	if len(inner) < 2+sha256.Size || binary.BigEndian.Uint16(inner) != sha256.Size {
		return fmt.Errorf("importing the key: inner wrap: %w", tpm2.TPMRCIntegrity)
	}
	sensitive := inner[2+sha256.Size:]
	h := sha256.New()
	h.Write(sensitive)
	h.Write(idName)
	if subtle.ConstantTimeCompare(h.Sum(nil), inner[2:2+sha256.Size]) != 1 {
		return fmt.Errorf("importing the key: inner integrity: %w", tpm2.TPMRCIntegrity)
	}
	key, err := importable(pub, sensitive)
	if err != nil {
		return fmt.Errorf("importing the key: %w", err)
	}
	t.mu.Lock()
	t.hmac[handle] = key
	t.mu.Unlock()
	return nil
}

// unseal undoes attest's seal: the seed from secret with k, then the HMAC
// over the encrypted part and name, then the AES-CFB decryption.
func unseal(k *rsa.PrivateKey, label string, secret, sealed, objName []byte) ([]byte, error) {
	seed, err := rsa.DecryptOAEP(sha256.New(), nil, k, secret, []byte(label))
	if err != nil {
		return nil, fmt.Errorf("decrypting the seed: %w", tpm2.TPMRCValue)
	}
	if len(sealed) < 2+sha256.Size || binary.BigEndian.Uint16(sealed) != sha256.Size {
		return nil, fmt.Errorf("no integrity HMAC: %w", tpm2.TPMRCSize)
	}
	mac, enc := sealed[2:2+sha256.Size], append([]byte(nil), sealed[2+sha256.Size:]...)
	h := hmac.New(sha256.New, tpm2.KDFa(crypto.SHA256, seed, "INTEGRITY", nil, nil, 256))
	h.Write(enc)
	h.Write(objName)
	if !hmac.Equal(h.Sum(nil), mac) {
		return nil, tpm2.TPMRCIntegrity
	}
	cfbDecrypt(tpm2.KDFa(crypto.SHA256, seed, "STORAGE", objName, nil, 128), enc)
	return enc, nil
}

// importable checks the imported key's public and sensitive areas as
// TPM2_Import and the device's later TPM2_HMAC do (PROTOCOL.md §2), and
// returns the HMAC key.
func importable(pub, sensitive []byte) ([]byte, error) {
	p, err := tpm2.Unmarshal[tpm2.TPMTPublic](pub)
	if err != nil || len(tpm2.Marshal(p)) != len(pub) {
		return nil, fmt.Errorf("public area does not decode as one TPMT_PUBLIC: %w", tpm2.TPMRCSize)
	}
	if p.Type != tpm2.TPMAlgKeyedHash || p.NameAlg != tpm2.TPMAlgSHA256 {
		return nil, fmt.Errorf("public area of type 0x%04x, nameAlg 0x%04x: want KEYEDHASH with SHA-256: %w", p.Type, p.NameAlg, tpm2.TPMRCType)
	}
	// A duplicated object may not be fixed to a TPM or parent; signing with
	// the empty password needs sign and userWithAuth.
	if a := p.ObjectAttributes; a.FixedTPM || a.FixedParent || !a.SignEncrypt || !a.UserWithAuth {
		return nil, fmt.Errorf("attributes 0x%08x: want sign and userWithAuth, neither fixedTPM nor fixedParent: %w", tpm2.Marshal(a), tpm2.TPMRCAttributes)
	}
	// The device reads the HMAC hash from the scheme.
	parms, _ := p.Parameters.KeyedHashDetail()
	if hm, err := parms.Scheme.Details.HMAC(); parms.Scheme.Scheme != tpm2.TPMAlgHMAC || err != nil || hm.HashAlg != tpm2.TPMAlgSHA256 {
		return nil, fmt.Errorf("scheme is not HMAC with SHA-256: %w", tpm2.TPMRCScheme)
	}
	typ, fields, err := sensitiveArea(sensitive)
	if err != nil {
		return nil, err
	}
	authValue, seedValue, key := fields[0], fields[1], fields[2]
	switch {
	case typ != uint16(tpm2.TPMAlgKeyedHash):
		return nil, fmt.Errorf("sensitive area of type 0x%04x, public area KEYEDHASH: %w", typ, tpm2.TPMRCType)
	case len(authValue) != 0:
		return nil, fmt.Errorf("the key has an authValue, but the device signs with the empty password: %w", tpm2.TPMRCAuthFail)
	case len(seedValue) != sha256.Size:
		return nil, fmt.Errorf("seedValue of %d bytes, want %d: %w", len(seedValue), sha256.Size, tpm2.TPMRCKeySize)
	}
	// The public area must be bound to the secret: unique = H(seedValue ‖ key).
	unique, _ := p.Unique.KeyedHash()
	h := sha256.New()
	h.Write(seedValue)
	h.Write(key)
	if !bytes.Equal(h.Sum(nil), unique.Buffer) {
		return nil, fmt.Errorf("unique is not SHA-256(seedValue ‖ key): %w", tpm2.TPMRCBinding)
	}
	return key, nil
}

// sensitiveArea splits a TPM2B(TPMT_SENSITIVE) of a symmetric object into
// its type and its authValue, seedValue and key.
func sensitiveArea(b []byte) (typ uint16, fields [3][]byte, err error) {
	malformed := fmt.Errorf("sensitive area malformed: %w", tpm2.TPMRCSize)
	if len(b) < 4 || int(binary.BigEndian.Uint16(b)) != len(b)-2 {
		return 0, fields, malformed
	}
	typ, b = binary.BigEndian.Uint16(b[2:]), b[4:]
	for i := range fields {
		if len(b) < 2 || int(binary.BigEndian.Uint16(b)) > len(b)-2 {
			return 0, fields, malformed
		}
		n := 2 + int(binary.BigEndian.Uint16(b))
		fields[i], b = b[2:n], b[n:]
	}
	if len(b) != 0 {
		return 0, fields, malformed
	}
	return typ, fields, nil
}

func cfbDecrypt(key, b []byte) {
	c, _ := aes.NewCipher(key)
	//lint:ignore SA1019 the TPM's wrapping format is AES-CFB; integrity comes from its HMAC.
	cipher.NewCFBDecrypter(c, make([]byte, aes.BlockSize)).XORKeyStream(b, b)
}
