package attest

import (
	"encoding/binary"
	"fmt"
)

// EKCertificateDER returns the DER certificate an EK certificate NV index
// holds. TPM makers size the index larger than the certificate (padding it
// with 00 or FF) or put the certificate behind the TCG header 10 01 00
// <u16 length> (PC Client Platform TPM Profile); x509 parsers take neither.
// It lives here, in a package both the device and the service link, so
// both read NV contents the same way.
func EKCertificateDER(nv []byte) ([]byte, error) {
	b := nv
	if len(b) >= 5 && b[0] == 0x10 && b[1] == 0x01 && b[2] == 0x00 {
		n := int(binary.BigEndian.Uint16(b[3:]))
		if n > len(b)-5 {
			return nil, fmt.Errorf("the EK certificate's TCG NV header (10 01 00) gives %d bytes, but %d follow it", n, len(b)-5)
		}
		b = b[5 : 5+n]
	}
	n := derLength(b)
	if n == 0 {
		return nil, fmt.Errorf("the EK certificate (%d bytes, starting % x) is not DER (an ASN.1 SEQUENCE, 30 …, complete) nor DER behind the TCG NV header 10 01 00 <length>",
			len(nv), nv[:min(len(nv), 8)])
	}
	return b[:n], nil
}

// derLength is the length of the DER SEQUENCE b starts with, header
// included; 0 if b does not start with a whole one.
func derLength(b []byte) int {
	if len(b) < 2 || b[0] != 0x30 {
		return 0
	}
	n, hdr := int(b[1]), 2
	if n >= 0x80 {
		k := n & 0x7f
		if k == 0 || k > 3 || len(b) < 2+k { // indefinite (BER) or over 16 MiB: no certificate
			return 0
		}
		n, hdr = 0, 2+k
		for _, c := range b[2:hdr] {
			n = n<<8 | int(c)
		}
	}
	if hdr+n > len(b) {
		return 0
	}
	return hdr + n
}
