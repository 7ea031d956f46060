package attest

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/hatchery/hatchery/internal/testutil"
)

// testdata/ek.pub comes from `tpm2_createek -G rsa -u ek.pub` and
// testdata/srk.pub from `tpm2_createprimary -C o` with the SRK attributes
// of PROTOCOL.md §1, both on swtpm 0.7.1.
func fixture(t testing.TB, name string) []byte {
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// edit returns a copy of b with f applied.
func edit(b []byte, f func([]byte) []byte) []byte { return f(bytes.Clone(b)) }

// resize fixes the TPM2B size prefix after an edit.
func resize(b []byte) []byte {
	binary.BigEndian.PutUint16(b, uint16(len(b)-2))
	return b
}

func TestParsePublic(t *testing.T) {
	ek := fixture(t, "ek.pub")
	for _, name := range []string{"ek.pub", "srk.pub"} {
		pub, err := ParsePublic(fixture(t, name))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if pub.KeyBits != 2048 || len(pub.Modulus) != 256 {
			t.Errorf("%s: %+v", name, pub)
		}
	}

	// Offsets in the EK's TPM2B_PUBLIC: type 2, nameAlg 4, attributes 6,
	// authPolicy 10 (34 bytes), symmetric 44, scheme 50, keyBits 52,
	// exponent 54, modulus 58 (258 bytes).
	for _, tc := range []struct {
		name, want string
		in         []byte
	}{
		{"empty", "too short", nil},
		{"one byte", "too short", []byte{1}},
		{"truncated", "size 314 but 200 bytes follow", ek[:202]},
		{"size too small", "size 300 but 314 bytes follow", edit(ek, func(b []byte) []byte { b[0], b[1] = 0x01, 0x2c; return b })},
		{"trailing bytes", "TPMT_PUBLIC is 314 bytes but the TPM2B_PUBLIC holds 315", edit(ek, func(b []byte) []byte { return resize(append(b, 0)) })},
		{"ECC type", "key type 0x0023, want RSA", edit(ek, func(b []byte) []byte { b[3] = 0x23; return b })},
		{"keyed hash type", "key type 0x0008", edit(ek, func(b []byte) []byte { b[3] = 0x08; return b })},
		{"empty TPMT_PUBLIC", "TPMT_PUBLIC is empty", []byte{0, 0}},
		{"odd byte", "TPMT_PUBLIC is empty", []byte{0, 1, 0}},
		{"truncated parameters", "TPMT_PUBLIC: ", resize(bytes.Clone(ek[:50]))},
		{"unknown type", "key type 0x0099", edit(ek, func(b []byte) []byte { b[3] = 0x99; return b })},
		{"SHA-1 name", "nameAlg 0x0004", edit(ek, func(b []byte) []byte { b[5] = 0x04; return b })},
		{"not restricted", "not a restricted decryption key", edit(ek, func(b []byte) []byte { b[7] &^= 0x01; return b })},
		{"signing", "not a restricted decryption key", edit(ek, func(b []byte) []byte { b[7] |= 0x04; return b })},
		{"AES-256", "not AES-128-CFB", edit(ek, func(b []byte) []byte { b[47] = 0x00; return b })},
		{"1024 bits", "1024 bits", edit(ek, func(b []byte) []byte { b[52], b[53] = 0x04, 0x00; return b })},
		{"exponent 1", "RSA exponent 1", edit(ek, func(b []byte) []byte { b[57] = 1; return b })},
		{"even exponent", "RSA exponent 65536", edit(ek, func(b []byte) []byte { b[55], b[56], b[57] = 1, 0, 0; return b })},
		{"exponent past 2^31", "RSA exponent 4294967295", edit(ek, func(b []byte) []byte { b[54], b[55], b[56], b[57] = 0xff, 0xff, 0xff, 0xff; return b })},
		{"zero modulus", "RSA modulus is not a 2048-bit RSA key", edit(ek, func(b []byte) []byte { clear(b[60:]); return b })},
		{"small modulus", "RSA modulus is not a 2048-bit RSA key", edit(ek, func(b []byte) []byte { b[60] &^= 0x80; return b })},
		{"even modulus", "RSA modulus is not a 2048-bit RSA key", edit(ek, func(b []byte) []byte { b[len(b)-1] &^= 1; return b })},
		{"short modulus", "modulus of 255 bytes", edit(ek, func(b []byte) []byte {
			b[58], b[59] = 0x00, 0xff
			return resize(b[:len(b)-1])
		})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParsePublic(tc.in)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestSameKey(t *testing.T) {
	ek, srk := fixture(t, "ek.pub"), fixture(t, "srk.pub")
	// Same modulus and exponent, other attributes: still the same key.
	other := edit(ek, func(b []byte) []byte { b[7] |= 0x04; return b })
	for _, tc := range []struct {
		name string
		a, b []byte
		want bool
	}{
		{"identical", ek, ek, true},
		{"other attributes", ek, other, true},
		{"explicit exponent", ek, edit(ek, func(b []byte) []byte { b[55], b[57] = 0x01, 0x01; return b }), true},
		{"other exponent", ek, edit(ek, func(b []byte) []byte { b[57] = 0x03; return b }), false},
		{"other key", ek, srk, false},
	} {
		got, err := SameKey(tc.a, tc.b)
		if err != nil || got != tc.want {
			t.Errorf("%s: SameKey = %v, %v; want %v", tc.name, got, err, tc.want)
		}
	}
	if _, err := SameKey(ek, ek[:100]); err == nil || !strings.Contains(err.Error(), "second key") {
		t.Errorf("truncated second key: got %v", err)
	}
}

func parts(t testing.TB, blob []byte) [][]byte { return testutil.BlobParts(t, blob) }

func TestActivationBlobLayout(t *testing.T) {
	blob, err := ActivationBlob(fixture(t, "ek.pub"), fixture(t, "srk.pub"), make([]byte, 32), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p := parts(t, blob)
	want := []int{54, 258, 144, 258, 50, 2}
	if len(p) != len(want) || len(blob) != 766 {
		t.Fatalf("blob of %d bytes in %d parts, want 766 in 6", len(blob), len(p))
	}
	for i, part := range p {
		if len(part) != want[i] {
			t.Errorf("part %c: %d bytes, want %d", 'A'+i, len(part), want[i])
		}
	}

	// E must be exactly what go-tpm would encode for the key PROTOCOL.md
	// §2 describes; the hand-written prefix is checked against it here.
	unique := p[4][len(p[4])-32:]
	e := tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgKeyedHash,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{SignEncrypt: true, UserWithAuth: true, NoDA: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{
			Scheme: tpm2.TPMTKeyedHashScheme{
				Scheme:  tpm2.TPMAlgHMAC,
				Details: tpm2.NewTPMUSchemeKeyedHash(tpm2.TPMAlgHMAC, &tpm2.TPMSSchemeHMAC{HashAlg: tpm2.TPMAlgSHA256}),
			},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: unique}),
	}
	if got, want := p[4][2:], tpm2.Marshal(e); !bytes.Equal(got, want) {
		t.Errorf("public area\n got %x\nwant %x", got, want)
	}
}

func TestActivationBlobErrors(t *testing.T) {
	ek, srk := fixture(t, "ek.pub"), fixture(t, "srk.pub")
	for _, tc := range []struct {
		name, want string
		ek, srk    []byte
		key        []byte
	}{
		{"bad EK", "endorsement key: TPM2B_PUBLIC size 314 but 280 bytes follow", ek[:282], srk, make([]byte, 32)},
		{"bad SRK", "storage root key: TPM2B_PUBLIC", ek, srk[:10], make([]byte, 32)},
		{"empty key", "HMAC key of 0 bytes", ek, srk, nil},
		{"long key", "HMAC key of 65 bytes", ek, srk, make([]byte, 65)},
	} {
		if _, err := ActivationBlob(tc.ek, tc.srk, tc.key, rand.Reader); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
	if _, err := ActivationBlob(ek, srk, make([]byte, 32), bytes.NewReader(make([]byte, 10))); err == nil {
		t.Error("short random source: no error")
	}
}

// TestActivationBlobTPM2Tools has tpm2-tools, an independent client, do
// what devices do with the blob (PROTOCOL.md §1) against swtpm, with keys
// that tpm2-tools made.
func TestActivationBlobTPM2Tools(t *testing.T) {
	tools := testutil.NewTPM2Tools(t, testutil.StartSWTPM(t))
	ek, srk := tools.CreateKeys()
	for i, key := range [][]byte{bytes.Repeat([]byte{0x5a}, 32), []byte("a key of 64 bytes, the HMAC-SHA-256 block size, the longest one.")} {
		blob, err := ActivationBlob(ek, srk, key, rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		data := bytes.Repeat([]byte("registration\n"), 10*(i+1))
		got := tools.HMAC(tools.Activate(blob), data)
		mac := hmac.New(sha256.New, key)
		mac.Write(data)
		if want := mac.Sum(nil); !bytes.Equal(got, want) {
			t.Errorf("key %d: TPM HMAC %x, want %x", i, got, want)
		}
	}
}

func BenchmarkActivationBlob(b *testing.B) {
	ek, srk, key := fixture(b, "ek.pub"), fixture(b, "srk.pub"), make([]byte, 32)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ActivationBlob(ek, srk, key, rand.Reader); err != nil {
			b.Fatal(err)
		}
	}
}

func FuzzParsePublic(f *testing.F) {
	ek := fixture(f, "ek.pub")
	f.Add(ek)
	f.Add(fixture(f, "srk.pub"))
	f.Add(ek[:60])
	f.Add([]byte{0, 0})
	f.Add([]byte{0, 4, 0, 0x23, 0, 0x0b})
	// Variants of the fields whose size depends on their value.
	splice := func(at, end int, b ...byte) []byte {
		return resize(append(append(bytes.Clone(ek[:at]), b...), ek[end:]...))
	}
	f.Add(splice(44, 50, 0x00, 0x10))             // symmetric NULL
	f.Add(splice(44, 50, 0x00, 0x0a, 0x00, 0x0b)) // symmetric XOR
	f.Add(splice(50, 52, 0x00, 0x15))             // scheme RSAES
	f.Add(splice(50, 52, 0x00, 0x17, 0x00, 0x0b)) // scheme OAEP(SHA-256)
	// The exponent spelled out rather than 0 (the default), as some TPMs report it.
	f.Add(edit(ek, func(b []byte) []byte { binary.BigEndian.PutUint32(b[54:], 65537); return b }))
	f.Fuzz(func(t *testing.T, b []byte) {
		// Whatever the hand decoder accepts, go-tpm decodes to the same key
		// and re-encodes to exactly the same bytes: one TPMT_PUBLIC, no more.
		if pub, err := parseRSA(b); err == nil {
			ref, err := tpm2.Unmarshal[tpm2.TPMTPublic](b[2:])
			if err != nil {
				t.Fatalf("accepted %x, which go-tpm refuses: %v", b, err)
			}
			if !bytes.Equal(tpm2.Marshal(ref), b[2:]) {
				t.Errorf("accepted %x, which re-encodes as %x", b, tpm2.Marshal(ref))
			}
			n, _ := ref.Unique.RSA()
			parms, _ := ref.Parameters.RSADetail()
			if !bytes.Equal(n.Buffer, pub.Modulus) || parms.Exponent != pub.Exponent || uint16(parms.KeyBits) != pub.KeyBits {
				t.Errorf("decoded %+v, go-tpm %+v", pub, ref)
			}
		}
		ParsePublic(b)
		SameKey(b, ek)
	})
}

func TestRegistrationID(t *testing.T) {
	ek := []byte("abc")
	// SHA-256("abc"), in hex and in base32 (from Python's base64.b32encode).
	if got, want := RegistrationID(ek), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"; got != want {
		t.Errorf("RegistrationID = %s, want %s", got, want)
	}
	if got, want := LegacyRegistrationID(ek), "xj4bnp4pahh6uqkbidpf3lrceoyagyndsylxvhfucd7wd4qacwwq"; got != want {
		t.Errorf("LegacyRegistrationID = %s, want %s", got, want)
	}
}

// SplitBlob takes any bytes without panicking, and the parts it returns,
// re-encoded, are the blob up to the optional part F.
func FuzzSplitBlob(f *testing.F) {
	ek, srk := fixture(f, "ek.pub"), fixture(f, "srk.pub")
	blob, err := ActivationBlob(ek, srk, []byte("0123456789abcdef"), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(blob)
	f.Add(blob[:len(blob)-2])
	f.Add([]byte{0, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		parts, err := SplitBlob(b)
		if err != nil {
			return
		}
		var re []byte
		for _, p := range parts {
			re = append(re, byte(len(p)>>8), byte(len(p)))
			re = append(re, p...)
		}
		if !bytes.HasPrefix(b, re) {
			t.Fatalf("the parts are not the blob's")
		}
	})
}
