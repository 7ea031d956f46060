package mqtt

import (
	"bufio"
	"bytes"
	"testing"
)

// FuzzReadPacket feeds arbitrary bytes to ReadPacket. It must not panic, must
// not allocate beyond a small multiple of the size limit (the body itself
// never exceeds it; per-filter bookkeeping of SUBSCRIBE is 24 bytes per
// filter of at least 4 bytes), and every packet it accepts must re-encode to
// a packet that reads back the same. Seeds: every sample packet, the
// malformed table, and testdata/fuzz/FuzzReadPacket.
func FuzzReadPacket(f *testing.F) {
	for _, p := range samplePackets() {
		enc, err := p.Encode(nil)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(enc)
	}
	f.Add(bs(0x30, 0xff, 0xff, 0xff, 0x7f))
	f.Add(raw(0x82, bs(0, 1), str("a/#/b"), bs(1)))
	f.Add(raw(0x10, connectHeader("MQTT", 5, 2), bs(0), str("c")))
	f.Add(raw(0x10, connectHeader("MQTT", 4, 0xc6), str("c"), str("t"), str("m"), str("u"), str("p")))

	const maxSize = 4096
	const allocLimit = 8*maxSize + 1024
	f.Fuzz(func(t *testing.T, data []byte) {
		br := bufio.NewReaderSize(bytes.NewReader(data), 64)
		for range 8 {
			var p Packet
			var err error
			if n := allocated(func() { p, err = ReadPacket(br, maxSize) }); n > allocLimit {
				t.Fatalf("ReadPacket allocated %d bytes with a %d-byte limit (result %T, %v)", n, maxSize, p, err)
			}
			if err != nil {
				if p != nil {
					t.Fatalf("ReadPacket returned both %T and %v", p, err)
				}
				return
			}
			enc, err := p.Encode(nil)
			if err != nil {
				t.Fatalf("ReadPacket accepted %#v but Encode refuses it: %v", p, err)
			}
			if len(enc) > maxSize {
				t.Fatalf("accepted a packet that encodes to %d bytes, over the %d limit", len(enc), maxSize)
			}
			p2, err := ReadPacket(bufio.NewReader(bytes.NewReader(enc)), 0)
			if err != nil {
				t.Fatalf("re-encoded %T %x does not read back: %v", p, enc, err)
			}
			enc2, err := p2.Encode(nil)
			if err != nil || !bytes.Equal(enc, enc2) {
				t.Fatalf("round trip changed the packet: %x, then %x (%v)", enc, enc2, err)
			}
		}
	})
}
