// Package attest is the service side of TPM attestation: it checks the keys
// a device sends and builds the activation blob that hands the device a
// secret HMAC key only its TPM can import (shared/PROTOCOL.md §2).
package attest

import (
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base32"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/google/go-tpm/tpm2"
)

// ParsePublic parses a TPM2B_PUBLIC (size prefix included) that must hold an
// RSA-2048 restricted decryption key with SHA-256 nameAlg and AES-128-CFB
// symmetric parameters: an EK or SRK in the form PROTOCOL.md §1 describes.
func ParsePublic(tpm2bPublic []byte) (*Public, error) {
	pub, err := parseRSA(tpm2bPublic)
	if err != nil {
		return nil, err
	}
	a := pub.Attributes
	if a&attrRestr == 0 || a&attrDecrypt == 0 || a&attrSign != 0 {
		return nil, errors.New("not a restricted decryption key (want attributes restricted|decrypt, not sign)")
	}
	if pub.NameAlg != algSHA256 {
		return nil, fmt.Errorf("nameAlg 0x%04x, want SHA-256 (0x000b)", pub.NameAlg)
	}
	if pub.KeyBits != 2048 {
		return nil, fmt.Errorf("RSA key size %d bits, want 2048", pub.KeyBits)
	}
	if len(pub.Modulus) != 256 {
		return nil, fmt.Errorf("RSA modulus of %d bytes, want 256", len(pub.Modulus))
	}
	// A real RSA-2048 modulus is the product of two odd 1024-bit primes: its
	// top bit is set and it is odd. Anything else (zeros, a tiny number in 256
	// bytes) could be enrolled but never wrapped to, failing only at the
	// device's first registration.
	if pub.Modulus[0]&0x80 == 0 || pub.Modulus[len(pub.Modulus)-1]&1 == 0 {
		return nil, errors.New("RSA modulus is not a 2048-bit RSA key (want its top bit set and an odd number): the key was not read from a TPM")
	}
	// 0 stands for 65537; any other must be odd and at least 3, or no key
	// can be wrapped to it.
	if e := pub.Exponent; e != 0 && (e < 3 || e%2 == 0 || e > 1<<31-1) {
		return nil, fmt.Errorf("RSA exponent %d, want 0 (65537) or an odd number from 3 to 2^31-1", e)
	}
	if pub.Scheme != algNull {
		return nil, fmt.Errorf("RSA scheme 0x%04x, want NULL as for any storage key", pub.Scheme)
	}
	if pub.SymAlg != algAES || pub.SymKeyBits != 128 || pub.SymMode != algCFB {
		return nil, errors.New("symmetric parameters are not AES-128-CFB")
	}
	return pub, nil
}

// SameKey reports whether two TPM2B_PUBLIC encodings carry the same RSA
// public key, whatever their other fields (attributes, policy, ...).
func SameKey(a, b []byte) (bool, error) {
	pa, err := parseRSA(a)
	if err != nil {
		return false, fmt.Errorf("first key: %w", err)
	}
	pb, err := parseRSA(b)
	if err != nil {
		return false, fmt.Errorf("second key: %w", err)
	}
	ka, kb := pa.Key(), pb.Key()
	return ka.E == kb.E && ka.N.Cmp(kb.N) == 0, nil
}

// Part sizes of the activation blob, from PROTOCOL.md §2.
const (
	innerKeySize  = 16  // AES-128, the only size clients accept
	seedValueSize = 32  // TPMT_SENSITIVE.seedValue; other sizes fail with TPM_RC_KEY_SIZE
	secretSize    = 256 // RSA-2048 OAEP ciphertext
	maxKeySize    = 64  // an HMAC-SHA-256 key no longer than the hash block
)

// idKeyPublicPrefix is the new key's TPMT_PUBLIC up to its unique field:
// type KEYEDHASH, nameAlg SHA-256, attributes sign|userWithAuth|noDA, empty
// authPolicy, scheme HMAC(SHA-256), then unique's size. Spelled out because
// every byte is fixed and each variant fails inside the TPM (PROTOCOL.md §2).
var idKeyPublicPrefix = []byte{
	0x00, 0x08, // TPM_ALG_KEYEDHASH
	0x00, 0x0b, // nameAlg SHA-256
	0x00, 0x04, 0x04, 0x40, // sign | noDA | userWithAuth
	0x00, 0x00, // authPolicy: empty
	0x00, 0x05, 0x00, 0x0b, // scheme HMAC, SHA-256
	0x00, 0x20, // unique: SHA-256(seedValue ‖ key)
}

// ActivationBlob builds A‖B‖C‖D‖E‖F of PROTOCOL.md §2: the HMAC key `key`,
// duplicated to the device's SRK under an inner AES-128 wrap whose key is
// sent as a credential that only the device's EK can activate. ekPub and
// srkPub are the TPM2B_PUBLIC bytes as the device sent them. rnd supplies
// the inner key, the seeds and the OAEP padding.
func ActivationBlob(ekPub, srkPub, key []byte, rnd io.Reader) ([]byte, error) {
	if len(key) == 0 || len(key) > maxKeySize {
		return nil, fmt.Errorf("HMAC key of %d bytes, want 1 to %d", len(key), maxKeySize)
	}
	ek, err := ParsePublic(ekPub)
	if err != nil {
		return nil, fmt.Errorf("endorsement key: %w", err)
	}
	srk, err := ParsePublic(srkPub)
	if err != nil {
		return nil, fmt.Errorf("storage root key: %w", err)
	}

	var random [innerKeySize + seedValueSize + 2*sha256.Size]byte
	if _, err := io.ReadFull(rnd, random[:]); err != nil {
		return nil, fmt.Errorf("reading random bytes: %w", err)
	}
	innerKey := random[:innerKeySize]
	seedValue := random[innerKeySize : innerKeySize+seedValueSize]
	seedE := random[innerKeySize+seedValueSize : len(random)-sha256.Size]
	seedS := random[len(random)-sha256.Size:]

	// The Names are hashed from the bytes as sent, never re-encoded: a Name
	// that differs by one bit fails with TPM_RC_INTEGRITY.
	srkName := Name(srkPub[2:])
	pubE := sha256.New()
	pubE.Write(seedValue)
	pubE.Write(key)
	public := append(append(make([]byte, 0, len(idKeyPublicPrefix)+sha256.Size), idKeyPublicPrefix...), pubE.Sum(nil)...)
	idName := Name(public)

	// innerData = TPM2B_DIGEST(SHA-256(sensitive2B ‖ Name)) ‖ sensitive2B,
	// sensitive2B = TPM2B(TPMT_SENSITIVE{KEYEDHASH, authValue, seedValue, key}).
	sensSize := 2 + 2 + (2 + seedValueSize) + (2 + len(key))
	inner := make([]byte, 2+sha256.Size, 2+sha256.Size+2+sensSize)
	inner[1] = sha256.Size
	inner = binary.BigEndian.AppendUint16(inner, uint16(sensSize))
	inner = append(inner, 0x00, 0x08) // sensitiveType KEYEDHASH
	inner = append(inner, 0x00, 0x00) // authValue: empty, or signing fails
	inner = append(inner, 0x00, seedValueSize)
	inner = append(inner, seedValue...)
	inner = binary.BigEndian.AppendUint16(inner, uint16(len(key)))
	inner = append(inner, key...)
	integrity := sha256.New()
	integrity.Write(inner[2+sha256.Size:])
	integrity.Write(idName)
	copy(inner[2:], integrity.Sum(nil))
	cfb(innerKey, inner)

	blob := make([]byte, 0, 2+2+sha256.Size+2+innerKeySize+ // A
		2+secretSize+ // B
		2+2+sha256.Size+len(inner)+ // C
		2+secretSize+ // D
		2+len(public)+ // E
		2) // F
	// A, B: MakeCredential of the inner key to the EK, bound to Name(SRK).
	credential := [2 + innerKeySize]byte{0, innerKeySize}
	copy(credential[2:], innerKey)
	blob, err = seal(blob, rnd, ek.Key(), "IDENTITY\x00", seedE, srkName, credential[:])
	if err != nil {
		return nil, fmt.Errorf("endorsement key: %w", err)
	}
	// C, D: outer duplication wrap of the inner-wrapped sensitive to the SRK.
	if blob, err = seal(blob, rnd, srk.Key(), "DUPLICATE\x00", seedS, idName, inner); err != nil {
		return nil, fmt.Errorf("storage root key: %w", err)
	}
	// E, F.
	blob = binary.BigEndian.AppendUint16(blob, uint16(len(public)))
	blob = append(blob, public...)
	return append(blob, 0, 0), nil
}

// seal appends the two halves of TPM "secret sharing" to a storage key
// (Part 1, 24: MakeCredential and the outer duplication wrap are the same
// construction): u16 size ‖ TPM2B(HMAC) ‖ AES-128-CFB(KDFa(seed, "STORAGE",
// name)) of plaintext, then TPM2B(RSA-OAEP(seed, label)).
func seal(blob []byte, rnd io.Reader, to *rsa.PublicKey, label string, seed, name, plaintext []byte) ([]byte, error) {
	blob = binary.BigEndian.AppendUint16(blob, uint16(2+sha256.Size+len(plaintext)))
	blob = append(blob, 0, sha256.Size)
	mac := len(blob)
	blob = append(blob, make([]byte, sha256.Size)...)
	blob = append(blob, plaintext...)
	enc := blob[len(blob)-len(plaintext):]
	cfb(tpm2.KDFa(crypto.SHA256, seed, "STORAGE", name, nil, 128), enc)
	h := hmac.New(sha256.New, tpm2.KDFa(crypto.SHA256, seed, "INTEGRITY", nil, nil, 256))
	h.Write(enc)
	h.Write(name)
	copy(blob[mac:], h.Sum(nil))

	secret, err := rsa.EncryptOAEP(sha256.New(), rnd, to, seed, []byte(label))
	if err != nil {
		return nil, err
	}
	blob = binary.BigEndian.AppendUint16(blob, uint16(len(secret)))
	return append(blob, secret...), nil
}

// Name is the TPM Name of an object: nameAlg SHA-256 ‖ SHA-256(TPMT_PUBLIC).
func Name(tpmtPublic []byte) []byte {
	sum := sha256.Sum256(tpmtPublic)
	return append([]byte{0x00, 0x0b}, sum[:]...)
}

// cfb encrypts b in place with AES-CFB and the zero IV that TPM wraps use.
func cfb(key, b []byte) {
	c, _ := aes.NewCipher(key) // key is always 16 bytes
	//lint:ignore SA1019 the TPM's wrapping format is AES-CFB; integrity comes from its HMAC.
	cipher.NewCFBEncrypter(c, make([]byte, aes.BlockSize)).XORKeyStream(b, b)
}

// RegistrationID is the registration ID of the seed script: lowercase hex of
// SHA-256 over the EK's TPM2B_PUBLIC, size prefix included.
func RegistrationID(ekPub []byte) string {
	sum := sha256.Sum256(ekPub)
	return hex.EncodeToString(sum[:])
}

// LegacyRegistrationID is the registration ID of the C SDK's
// tpm_device_provision and of the Node SDK: the same digest in RFC 4648
// base32, lowercased, without padding.
func LegacyRegistrationID(ekPub []byte) string {
	sum := sha256.Sum256(ekPub)
	return strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(sum[:]))
}

// SplitBlob splits an activation blob into its parts A to E (credential
// blob, credential secret, duplicate, symmetric seed, public area), without
// their size prefixes. The trailing part F is optional: devices accept what
// any service sends.
func SplitBlob(blob []byte) ([5][]byte, error) {
	names := [...]string{"credential blob", "credential secret", "duplicate", "symmetric seed", "public area", "URI data"}
	var parts [len(names)][]byte
	rest := blob
	for i, name := range names {
		if i == len(names)-1 && len(rest) == 0 {
			break
		}
		if len(rest) < 2 || int(binary.BigEndian.Uint16(rest)) > len(rest)-2 {
			return [5][]byte{}, fmt.Errorf("activation blob: %s (part %c) truncated at byte %d of %d", name, 'A'+i, len(blob)-len(rest), len(blob))
		}
		n := 2 + int(binary.BigEndian.Uint16(rest))
		parts[i], rest = rest[2:n], rest[n:]
	}
	if len(rest) != 0 {
		return [5][]byte{}, fmt.Errorf("activation blob: %d unexpected bytes after the URI data", len(rest))
	}
	return [5][]byte(parts[:5]), nil
}
