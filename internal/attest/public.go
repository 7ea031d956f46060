package attest

import (
	"crypto/rsa"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"
)

// Public is an RSA TPMT_PUBLIC, decoded by hand: go-tpm's reflection-based
// Unmarshal cost more than the rest of a registration together, and this
// runs several times for each one. FuzzParsePublic checks it against go-tpm.
type Public struct {
	NameAlg    uint16
	Attributes uint32
	AuthPolicy []byte
	SymAlg     uint16
	SymKeyBits uint16 // for block ciphers; the hash for XOR
	SymMode    uint16
	Scheme     uint16
	SchemeHash uint16
	KeyBits    uint16
	Exponent   uint32
	Modulus    []byte
}

// TPM constants used when decoding.
const (
	algRSA      = 0x0001
	algXOR      = 0x000a
	algNull     = 0x0010
	algRSAES    = 0x0015
	algAES      = 0x0006
	algCFB      = 0x0043
	algSHA256   = 0x000b
	attrRestr   = 1 << 16
	attrDecrypt = 1 << 17
	attrSign    = 1 << 18
)

// Symmetric algorithms and RSA schemes go-tpm's unions know; anything else
// is refused, as the TPM would.
var (
	symAlgs    = map[uint16]bool{algNull: true, algXOR: true, algAES: true}
	rsaSchemes = map[uint16]bool{algNull: true, algRSAES: true, 0x0014: true /* RSASSA */, 0x0016: true /* RSAPSS */, 0x0017: true /* OAEP */}
)

// reader decodes big-endian fields and remembers the first shortfall.
type reader struct {
	b   []byte
	off int
	err error
}

func (r *reader) take(n int, field string) []byte {
	if r.err != nil {
		return nil
	}
	if len(r.b)-r.off < n {
		r.err = fmt.Errorf("TPMT_PUBLIC: truncated in %s at byte %d", field, r.off)
		return nil
	}
	out := r.b[r.off : r.off+n]
	r.off += n
	return out
}

func (r *reader) u16(field string) uint16 {
	if b := r.take(2, field); b != nil {
		return binary.BigEndian.Uint16(b)
	}
	return 0
}

func (r *reader) u32(field string) uint32 {
	if b := r.take(4, field); b != nil {
		return binary.BigEndian.Uint32(b)
	}
	return 0
}

func (r *reader) sized(field string) []byte { return r.take(int(r.u16(field)), field) }

// parseRSA decodes a TPM2B_PUBLIC that must be exactly one RSA TPMT_PUBLIC.
func parseRSA(b []byte) (*Public, error) {
	if len(b) < 2 {
		return nil, fmt.Errorf("TPM2B_PUBLIC of %d bytes is too short", len(b))
	}
	if size := int(binary.BigEndian.Uint16(b)); size != len(b)-2 {
		return nil, fmt.Errorf("TPM2B_PUBLIC size %d but %d bytes follow", size, len(b)-2)
	}
	if len(b) < 4 {
		return nil, errors.New("TPMT_PUBLIC is empty")
	}
	if typ := binary.BigEndian.Uint16(b[2:]); typ != algRSA {
		return nil, fmt.Errorf("key type 0x%04x, want RSA (0x0001)", typ)
	}
	r := &reader{b: b[4:]}
	p := &Public{NameAlg: r.u16("nameAlg"), Attributes: r.u32("objectAttributes"), AuthPolicy: r.sized("authPolicy")}
	p.SymAlg = r.u16("symmetric")
	switch {
	case r.err != nil:
	case !symAlgs[p.SymAlg]:
		return nil, fmt.Errorf("TPMT_PUBLIC: unknown symmetric algorithm 0x%04x", p.SymAlg)
	case p.SymAlg == algXOR:
		p.SymKeyBits = r.u16("symmetric hash")
	case p.SymAlg != algNull:
		p.SymKeyBits, p.SymMode = r.u16("symmetric keyBits"), r.u16("symmetric mode")
	}
	p.Scheme = r.u16("scheme")
	switch {
	case r.err != nil:
	case !rsaSchemes[p.Scheme]:
		return nil, fmt.Errorf("TPMT_PUBLIC: unknown RSA scheme 0x%04x", p.Scheme)
	case p.Scheme != algNull && p.Scheme != algRSAES:
		p.SchemeHash = r.u16("scheme hash")
	}
	p.KeyBits, p.Exponent, p.Modulus = r.u16("keyBits"), r.u32("exponent"), r.sized("unique")
	if r.err != nil {
		return nil, r.err
	}
	if r.off != len(r.b) {
		return nil, fmt.Errorf("TPMT_PUBLIC is %d bytes but the TPM2B_PUBLIC holds %d", r.off+2, len(b)-2)
	}
	return p, nil
}

// Key is the RSA public key.
func (p *Public) Key() *rsa.PublicKey {
	e := int(p.Exponent)
	if e == 0 {
		e = 65537 // the TPM's encoding of the default exponent
	}
	return &rsa.PublicKey{N: new(big.Int).SetBytes(p.Modulus), E: e}
}
