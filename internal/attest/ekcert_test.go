package attest

import (
	"bytes"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/testutil"
)

func TestEKCertificateDER(t *testing.T) {
	der := testutil.NewCert(t, "EK", false, nil).Leaf.Raw // long-form length (82)
	short := []byte{0x30, 0x03, 0x02, 0x01, 0x00}
	header := func(n int, b []byte) []byte { return append([]byte{0x10, 0x01, 0x00, byte(n >> 8), byte(n)}, b...) }
	pad := func(b []byte, c byte) []byte { return append(bytes.Clone(b), bytes.Repeat([]byte{c}, 100)...) }
	for what, tc := range map[string]struct {
		nv, want []byte
		err      string
	}{
		"DER":                         {der, der, ""},
		"padded with 00":              {pad(der, 0), der, ""},
		"padded with FF":              {pad(der, 0xff), der, ""},
		"short-form length, padded":   {pad(short, 0xff), short, ""},
		"behind the TCG header":       {header(len(der), der), der, ""},
		"behind the header, padded":   {pad(header(len(der), der), 0xff), der, ""},
		"header longer than contents": {header(len(der)+1, der), nil, "bytes, but"},
		"truncated DER":               {der[:len(der)-1], nil, "is not DER"},
		"erased":                      {pad(nil, 0xff), nil, "starting ff ff"},
		"indefinite length (BER)":     {[]byte{0x30, 0x80, 0, 0}, nil, "is not DER"},
		"empty":                       {nil, nil, "is not DER"},
	} {
		got, err := EKCertificateDER(tc.nv)
		if !bytes.Equal(got, tc.want) || (err == nil) != (tc.err == "") || err != nil && !strings.Contains(err.Error(), tc.err) {
			t.Errorf("%s: %x, %v", what, got, err)
		}
	}
}

func FuzzEKCertificateDER(f *testing.F) {
	der := testutil.NewCert(f, "EK", false, nil).Leaf.Raw
	f.Add(der)
	f.Add(append([]byte{0x10, 0x01, 0x00, byte(len(der) >> 8), byte(len(der))}, der...))
	f.Add([]byte{0x30, 0x83, 0x01, 0x00, 0x00})
	f.Add([]byte{0x10, 0x01, 0x00, 0x00, 0x02, 0x30, 0x00, 0xff})
	f.Fuzz(func(t *testing.T, nv []byte) {
		// What it returns is one whole DER SEQUENCE from within nv.
		if got, err := EKCertificateDER(nv); err == nil && (derLength(got) != len(got) || !bytes.Contains(nv, got)) {
			t.Fatalf("%x gave %x", nv, got)
		}
	})
}
