// Package certtext reads certificates as operators and SDKs write them into
// JSON and files — PEM (after any other text, as openssl may put there),
// base64 of PEM, base64 of DER — and names them by thumbprint, as Azure does.
package certtext

import (
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
)

// Parse reads one certificate in any of the spellings above: of a PEM
// bundle, the first.
func Parse(s string) (*x509.Certificate, error) {
	cs, err := parse(s, 1)
	if err != nil {
		return nil, err
	}
	return cs[0], nil
}

// ParseAll reads every certificate of a PEM bundle, in order (or the one
// that base64 of DER holds). Any other PEM block in it is an error.
func ParseAll(s string) ([]*x509.Certificate, error) { return parse(s, -1) }

// parse reads at most max certificates (all if max < 0), at least one.
func parse(s string, max int) ([]*x509.Certificate, error) {
	s = strings.TrimSpace(s)
	if !strings.HasPrefix(s, "-----") && !strings.Contains(s, "-----BEGIN") {
		raw, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			return nil, errors.New("not a PEM certificate nor base64: give the PEM file's contents")
		}
		if len(raw) > 0 && raw[0] == 0x30 { // an ASN.1 SEQUENCE: DER
			c, err := x509.ParseCertificate(raw)
			if err != nil {
				return nil, fmt.Errorf("the base64 DER certificate does not parse: %v", err)
			}
			return []*x509.Certificate{c}, nil
		}
		s = string(raw) // base64 of PEM
	}
	var out []*x509.Certificate
	for rest := []byte(s); len(out) != max; {
		b, r := pem.Decode(rest)
		switch {
		case b == nil && len(out) == 0, len(out) == 0 && b.Type != "CERTIFICATE":
			return nil, errors.New("no PEM CERTIFICATE block: give the certificate file's contents (-----BEGIN CERTIFICATE-----)")
		case b == nil:
			return out, nil
		case b.Type != "CERTIFICATE":
			return nil, fmt.Errorf("PEM block %d is a %s, not a CERTIFICATE: give certificates only", len(out)+1, b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d of the PEM does not parse: %v", len(out)+1, err)
		}
		out, rest = append(out, c), r
	}
	return out, nil
}

// Thumbprints are c's SHA-1 and SHA-256 thumbprints, upper-case hex.
func Thumbprints(c *x509.Certificate) (sha1Hex, sha256Hex string) {
	s1, s256 := sha1.Sum(c.Raw), sha256.Sum256(c.Raw)
	return strings.ToUpper(hex.EncodeToString(s1[:])), strings.ToUpper(hex.EncodeToString(s256[:]))
}
