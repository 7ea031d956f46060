package softtpm

import (
	"bytes"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/provisioning"
)

var _ provisioning.TPM = (*TPM)(nil)

func TestActivation(t *testing.T) {
	keys, err := NewKeys()
	if err != nil {
		t.Fatal(err)
	}
	dev := New(keys)
	ek, _ := dev.EndorsementKey()
	srk, _ := dev.StorageRootKey()
	// The service's parser takes both public areas as a TPM's.
	for _, pub := range [][]byte{ek, srk} {
		if _, err := attest.ParsePublic(pub); err != nil {
			t.Fatal(err)
		}
	}
	const handle = 0x81000100
	if _, err := dev.HMAC(handle, []byte("x")); !errors.Is(err, tpm2.TPMRCHandle) {
		t.Fatalf("HMAC before import: %v", err)
	}
	key := []byte("0123456789abcdef0123456789abcdef")
	blob, err := attest.ActivationBlob(ek, srk, key, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if err := dev.ImportActivationBlob(blob, handle); err != nil {
		t.Fatal(err)
	}
	got, _ := dev.HMAC(handle, []byte("data"))
	want := hmac.New(sha256.New, key)
	want.Write([]byte("data"))
	if !bytes.Equal(got, want.Sum(nil)) {
		t.Fatal("HMAC with the imported key differs")
	}

	// A blob for another device, or altered anywhere, is refused.
	other, _ := NewKeys()
	otherEK, _ := New(other).EndorsementKey()
	otherSRK, _ := New(other).StorageRootKey()
	foreign, _ := attest.ActivationBlob(otherEK, otherSRK, key, rand.Reader)
	if err := dev.ImportActivationBlob(foreign, handle); err == nil {
		t.Fatal("a blob for another TPM was imported")
	}
	for _, at := range []int{10, 300, 700, len(blob) - 20} {
		bad := bytes.Clone(blob)
		bad[at] ^= 1
		if err := dev.ImportActivationBlob(bad, handle); err == nil {
			t.Errorf("a blob altered at byte %d was imported", at)
		}
	}
	if err := dev.ImportActivationBlob(blob[:100], handle); err == nil {
		t.Error("a truncated blob was imported")
	}
}

// wrapObject builds an activation blob for keys of any public and sensitive
// area, with go-tpm's MakeCredential and the inner and outer wraps by hand,
// so that the test can send what attest never would.
func wrapObject(t *testing.T, keys *Keys, public tpm2.TPMTPublic, sensitive tpm2.TPMTSensitive) []byte {
	t.Helper()
	kem := func(pub []byte) tpm2.LabeledEncapsulationKey {
		p, err := tpm2.Unmarshal[tpm2.TPMTPublic](pub[2:])
		if err != nil {
			t.Fatal(err)
		}
		k, err := tpm2.ImportEncapsulationKey(p)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	innerKey := make([]byte, 16)
	rand.Read(innerKey)
	credBlob, secretE, err := tpm2.CreateCredential(rand.Reader, kem(keys.ekPub), attest.Name(keys.srkPub[2:]), innerKey)
	if err != nil {
		t.Fatal(err)
	}
	pub := tpm2.Marshal(public)
	name := attest.Name(pub)
	sens2B := tpm2.Marshal(tpm2.TPM2BData{Buffer: tpm2.Marshal(sensitive)})
	digest := sha256.Sum256(append(bytes.Clone(sens2B), name...))
	dup := append(tpm2.Marshal(tpm2.TPM2BDigest{Buffer: digest[:]}), sens2B...)
	cfbEncrypt(t, innerKey, dup)
	seedS, secretS, err := kem(keys.srkPub).Encapsulate(rand.Reader, "DUPLICATE")
	if err != nil {
		t.Fatal(err)
	}
	cfbEncrypt(t, tpm2.KDFa(crypto.SHA256, seedS, "STORAGE", name, nil, 128), dup)
	mac := hmac.New(sha256.New, tpm2.KDFa(crypto.SHA256, seedS, "INTEGRITY", nil, nil, 256))
	mac.Write(dup)
	mac.Write(name)
	dup = append(tpm2.Marshal(tpm2.TPM2BDigest{Buffer: mac.Sum(nil)}), dup...)

	var blob []byte
	for _, part := range [][]byte{credBlob, secretE, dup, secretS, pub, nil} {
		blob = append(blob, tpm2.Marshal(tpm2.TPM2BData{Buffer: part})...)
	}
	return blob
}

func cfbEncrypt(t *testing.T, key, b []byte) {
	c, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	//lint:ignore SA1019 the TPM's wrapping format is AES-CFB.
	cipher.NewCFBEncrypter(c, make([]byte, aes.BlockSize)).XORKeyStream(b, b)
}

// object is the HMAC key of PROTOCOL.md §2 with seed and key.
func object(seed, key []byte) (tpm2.TPMTPublic, tpm2.TPMTSensitive) {
	unique := sha256.Sum256(append(bytes.Clone(seed), key...))
	return tpm2.TPMTPublic{
			Type:             tpm2.TPMAlgKeyedHash,
			NameAlg:          tpm2.TPMAlgSHA256,
			ObjectAttributes: tpm2.TPMAObject{SignEncrypt: true, UserWithAuth: true, NoDA: true},
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{Scheme: tpm2.TPMTKeyedHashScheme{
				Scheme: tpm2.TPMAlgHMAC, Details: tpm2.NewTPMUSchemeKeyedHash(tpm2.TPMAlgHMAC, &tpm2.TPMSSchemeHMAC{HashAlg: tpm2.TPMAlgSHA256})}}),
			Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: unique[:]}),
		}, tpm2.TPMTSensitive{
			SensitiveType: tpm2.TPMAlgKeyedHash,
			SeedValue:     tpm2.TPM2BDigest{Buffer: seed},
			Sensitive:     tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BSensitiveData{Buffer: key}),
		}
}

// TestImportChecksTheObject feeds blobs whose wraps are all sound but whose
// key a real TPM refuses at TPM2_Import, or could not sign with.
func TestImportChecksTheObject(t *testing.T) {
	keys, err := NewKeys()
	if err != nil {
		t.Fatal(err)
	}
	dev := New(keys)
	key, seed := []byte("0123456789abcdef0123456789abcdef"), make([]byte, 32)
	rand.Read(seed)
	// The object of PROTOCOL.md §2, wrapped by wrapObject, is imported.
	pub, sens := object(seed, key)
	if err := dev.ImportActivationBlob(wrapObject(t, keys, pub, sens), 0x81000100); err != nil {
		t.Fatalf("the object attest builds: %v", err)
	}

	for _, tc := range []struct {
		name string
		want tpm2.TPMRC
		edit func(*tpm2.TPMTPublic, *tpm2.TPMTSensitive)
	}{
		{"unique of another key", tpm2.TPMRCBinding, func(p *tpm2.TPMTPublic, _ *tpm2.TPMTSensitive) {
			other, _ := object(seed, []byte("another key"))
			p.Unique = other.Unique
		}},
		{"16-byte seedValue", tpm2.TPMRCKeySize, func(p *tpm2.TPMTPublic, s *tpm2.TPMTSensitive) { *p, *s = object(seed[:16], key) }},
		{"authValue", tpm2.TPMRCAuthFail, func(_ *tpm2.TPMTPublic, s *tpm2.TPMTSensitive) {
			s.AuthValue = tpm2.TPM2BAuth{Buffer: []byte("secret")}
		}},
		{"fixedTPM", tpm2.TPMRCAttributes, func(p *tpm2.TPMTPublic, _ *tpm2.TPMTSensitive) { p.ObjectAttributes.FixedTPM = true }},
		{"not userWithAuth", tpm2.TPMRCAttributes, func(p *tpm2.TPMTPublic, _ *tpm2.TPMTSensitive) { p.ObjectAttributes.UserWithAuth = false }},
		{"NULL scheme", tpm2.TPMRCScheme, func(p *tpm2.TPMTPublic, _ *tpm2.TPMTSensitive) {
			p.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull}})
		}},
		{"symmetric cipher", tpm2.TPMRCType, func(p *tpm2.TPMTPublic, s *tpm2.TPMTSensitive) {
			p.Type, s.SensitiveType = tpm2.TPMAlgSymCipher, tpm2.TPMAlgSymCipher
			p.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgSymCipher, &tpm2.TPMSSymCipherParms{Sym: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgAES,
				KeyBits: tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(128)), Mode: tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB)}})
			p.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgSymCipher, &tpm2.TPM2BDigest{Buffer: make([]byte, 32)})
			s.Sensitive = tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgSymCipher, &tpm2.TPM2BSymKey{Buffer: key[:16]})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pub, sens := object(seed, key)
			tc.edit(&pub, &sens)
			err := New(keys).ImportActivationBlob(wrapObject(t, keys, pub, sens), 0x81000100)
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
}

func FuzzImportable(f *testing.F) {
	pub, sens := object(make([]byte, 32), []byte("0123456789abcdef0123456789abcdef"))
	sens2B := tpm2.Marshal(tpm2.TPM2BData{Buffer: tpm2.Marshal(sens)})
	f.Add(tpm2.Marshal(pub), sens2B)
	f.Add(tpm2.Marshal(pub), sens2B[:len(sens2B)-1])
	f.Add(tpm2.Marshal(pub)[:20], []byte{0, 4, 0, 8, 0, 0})
	f.Add([]byte{0, 8, 0, 0x0b, 0, 4, 4, 0x40, 0, 0, 0, 5, 0, 0x0b, 0, 0x20}, []byte{0, 2, 0, 8})
	f.Fuzz(func(t *testing.T, pub, sensitive []byte) {
		// Whatever it accepts go-tpm decodes to the same key, and re-encodes
		// to the same bytes: one TPMT_SENSITIVE, no more.
		key, err := importable(pub, sensitive)
		if err != nil {
			return
		}
		ref, err := tpm2.Unmarshal[tpm2.TPMTSensitive](sensitive[2:])
		if err != nil {
			t.Fatalf("accepted %x, which go-tpm refuses: %v", sensitive, err)
		}
		if !bytes.Equal(tpm2.Marshal(ref), sensitive[2:]) {
			t.Errorf("accepted %x, which re-encodes as %x", sensitive, tpm2.Marshal(ref))
		}
		if bits, _ := ref.Sensitive.Bits(); !bytes.Equal(bits.Buffer, key) {
			t.Errorf("key %x, go-tpm's %x", key, bits.Buffer)
		}
	})
}
