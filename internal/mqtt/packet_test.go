package mqtt

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"reflect"
	"runtime"
	"strings"
	"testing"
)

// samplePackets has every packet type, with optional fields set and unset.
func samplePackets() []Packet {
	return []Packet{
		&Connect{ProtocolName: "MQTT", ProtocolLevel: 4, CleanSession: true, KeepAlive: 1177,
			ClientID: "dev-1", HasUsername: true,
			Username:    "hub.example.net/dev-1/?api-version=2021-04-12",
			HasPassword: true,
			Password:    []byte("SharedAccessSignature sr=hub.example.net%2Fdevices%2Fdev-1&sig=abc&se=1")},
		&Connect{ProtocolName: "MQTT", ProtocolLevel: 4, ClientID: "dev-2/module-a",
			Will: &Will{Topic: "devices/dev-2/messages/events/", Payload: []byte("gone"), QoS: 1, Retain: true}},
		&Connect{ProtocolName: "MQIsdp", ProtocolLevel: 3, CleanSession: true, ClientID: "old-client"},
		&Connect{ProtocolName: "MQTT", ProtocolLevel: 4, ClientID: "", HasUsername: true, Username: "ü/日本"},
		&Connack{ReturnCode: Accepted},
		&Connack{SessionPresent: true},
		&Connack{ReturnCode: RefusedNotAuthorized},
		&Publish{Topic: "devices/dev-1/messages/events/%24.ct=application%2Fjson", Payload: []byte(`{"t":21.5}`)},
		&Publish{QoS: 1, PacketID: 65535, Dup: true, Topic: "$iothub/twin/GET/?$rid=1"},
		&Publish{QoS: 2, PacketID: 7, Retain: true, Topic: "a", Payload: bytes.Repeat([]byte{0xff}, 300)},
		&Puback{PacketID: 1},
		&Subscribe{PacketID: 2, Subscriptions: []Subscription{
			{Filter: "$iothub/twin/res/#", QoS: 0},
			{Filter: "$iothub/methods/POST/#", QoS: 1},
			{Filter: "devices/dev-1/messages/devicebound/#", QoS: 2},
			{Filter: "+/+/#", QoS: 1},
			{Filter: "#", QoS: 0},
		}},
		&Suback{PacketID: 2, ReturnCodes: []byte{0, 1, 2, 0x80}},
		&Unsubscribe{PacketID: 3, Filters: []string{"$iothub/twin/res/#", "a/+/b"}},
		&Unsuback{PacketID: 3},
		&Pingreq{},
		&Pingresp{},
		&Disconnect{},
	}
}

// normalize makes empty slices nil so decoded packets compare equal to the
// samples.
func normalize(p Packet) Packet {
	switch p := p.(type) {
	case *Publish:
		if len(p.Payload) == 0 {
			p.Payload = nil
		}
	case *Connect:
		if len(p.Password) == 0 {
			p.Password = nil
		}
		if p.Will != nil && len(p.Will.Payload) == 0 {
			p.Will.Payload = nil
		}
	}
	return p
}

func TestRoundTrip(t *testing.T) {
	for _, want := range samplePackets() {
		t.Run(want.Type().String(), func(t *testing.T) {
			enc, err := want.Encode(nil)
			if err != nil {
				t.Fatalf("Encode: %v", err)
			}
			var buf bytes.Buffer
			n, err := want.WriteTo(&buf)
			if err != nil || n != int64(len(enc)) || !bytes.Equal(buf.Bytes(), enc) {
				t.Fatalf("WriteTo wrote %d bytes (%v), %x; Encode gave %x", n, err, buf.Bytes(), enc)
			}
			r := bufio.NewReader(bytes.NewReader(enc))
			got, err := ReadPacket(r, len(enc))
			if err != nil {
				t.Fatalf("ReadPacket(%x): %v", enc, err)
			}
			if !reflect.DeepEqual(normalize(got), want) {
				t.Errorf("ReadPacket = %#v, want %#v", got, want)
			}
			if _, err := ReadPacket(r, 0); err != io.EOF {
				t.Errorf("after the packet ReadPacket = %v, want io.EOF", err)
			}
			// One byte less than the packet's size is over the limit.
			if _, err := ReadPacket(bufio.NewReader(bytes.NewReader(enc)), len(enc)-1); !errors.Is(err, ErrPacketTooLarge) {
				t.Errorf("with limit %d: err = %v, want ErrPacketTooLarge", len(enc)-1, err)
			}
		})
	}
}

func TestRemainingLengthEncoding(t *testing.T) {
	for _, n := range []int{0, 127, 128, 16383, 16384, 2097151, 2097152, 300000} {
		p := &Publish{Topic: "t", Payload: make([]byte, n)}
		enc, err := p.Encode(nil)
		if err != nil {
			t.Fatal(err)
		}
		got, err := ReadPacket(bufio.NewReader(bytes.NewReader(enc)), 0)
		if err != nil {
			t.Fatalf("payload %d: %v", n, err)
		}
		if len(got.(*Publish).Payload) != n {
			t.Fatalf("payload %d: read %d bytes", n, len(got.(*Publish).Payload))
		}
	}
}

// raw builds a packet from its first byte and body, with a correct remaining length.
func raw(b0 byte, body ...[]byte) []byte {
	b := bytes.Join(body, nil)
	out, err := appendFixedHeader(nil, 0, b0, len(b))
	if err != nil {
		panic(err)
	}
	return append(out, b...)
}

// str is a length-prefixed string field.
func str(s string) []byte { return appendString(nil, s) }

func bs(b ...byte) []byte { return b }

// connectHeader is a valid CONNECT body up to (and without) the payload.
func connectHeader(name string, level, flags byte) []byte {
	return bytes.Join([][]byte{str(name), bs(level, flags, 0, 60)}, nil)
}

func TestReadPacketMalformed(t *testing.T) {
	tests := []struct {
		name  string
		in    []byte
		max   int
		want  string // the whole error message
		isErr error
	}{
		{"reserved type 0", bs(0x00, 0), 0, "packet type 0: reserved packet type", ErrMalformed},
		{"reserved type 15", bs(0xf0, 0), 0, "packet type 15: reserved packet type", ErrMalformed},
		{"CONNECT flags", bs(0x11, 0), 0, "CONNECT: reserved flag bits are 0001, must be 0000", ErrMalformed},
		{"SUBSCRIBE flags", raw(0x80, bs(0, 1), str("a"), bs(0)), 0, "SUBSCRIBE: reserved flag bits are 0000, must be 0010", ErrMalformed},
		{"UNSUBSCRIBE flags", raw(0xa3, bs(0, 1), str("a")), 0, "UNSUBSCRIBE: reserved flag bits are 0011, must be 0010", ErrMalformed},
		{"PINGREQ flags", bs(0xc1, 0), 0, "PINGREQ: reserved flag bits are 0001, must be 0000", ErrMalformed},
		{"PUBLISH QoS 3", raw(0x36, str("a"), bs(0, 1)), 0, "PUBLISH: QoS 3 is reserved", ErrMalformed},
		{"PUBLISH DUP at QoS 0", raw(0x38, str("a")), 0, "PUBLISH: DUP flag set on a QoS 0 message", ErrMalformed},
		{"PUBREL", raw(0x62, bs(0, 1)), 0, "PUBREL: QoS 2 flows are not supported", ErrMalformed},
		{"remaining length 5 bytes", bs(0x30, 0xff, 0xff, 0xff, 0xff, 0x01), 0, "PUBLISH: remaining length is longer than 4 bytes", ErrMalformed},
		{"too large", bs(0x30, 0xff, 0xff, 0xff, 0x7f), 1 << 20, "PUBLISH: packet of 268435460 bytes exceeds the 1048576-byte limit", ErrPacketTooLarge},
		{"too large by one", raw(0x30, str("a"), bs(1, 2, 3)), 7, "PUBLISH: packet of 8 bytes exceeds the 7-byte limit", ErrPacketTooLarge},
		{"truncated length", bs(0x30, 0x80), 0, "PUBLISH: connection ended inside the packet", io.ErrUnexpectedEOF},
		{"truncated body", bs(0x30, 10, 0, 1, 'a'), 0, "PUBLISH: connection ended inside the packet", io.ErrUnexpectedEOF},
		{"PUBACK length 3", bs(0x40, 3, 0, 1, 0), 0, "PUBACK: remaining length is 3, must be 2", ErrMalformed},
		{"PUBACK id 0", bs(0x40, 2, 0, 0), 0, "PUBACK: packet identifier is 0", ErrMalformed},
		{"UNSUBACK id 0", bs(0xb0, 2, 0, 0), 0, "UNSUBACK: packet identifier is 0", ErrMalformed},
		{"PINGREQ length 1", bs(0xc0, 1, 0), 0, "PINGREQ: remaining length is 1, must be 0", ErrMalformed},
		{"DISCONNECT length 2", bs(0xe0, 2, 0, 0), 0, "DISCONNECT: remaining length is 2, must be 0", ErrMalformed},
		{"CONNACK flags", bs(0x20, 2, 2, 0), 0, "CONNACK: reserved acknowledge flag bits are set (00000010)", ErrMalformed},
		{"CONNACK code 6", bs(0x20, 2, 0, 6), 0, "CONNACK: return code 6 is reserved", ErrMalformed},
		{"CONNACK session present on refusal", bs(0x20, 2, 1, 5), 0, "CONNACK: session present is set with refusal code 5", ErrMalformed},

		{"filter # not last", raw(0x82, bs(0, 1), str("a/#/b"), bs(1)), 0, `SUBSCRIBE: topic filter "a/#/b": '#' must be last`, ErrMalformed},
		{"filter # not a level", raw(0x82, bs(0, 1), str("a/b#"), bs(1)), 0, `SUBSCRIBE: topic filter "a/b#": '#' must be a whole level`, ErrMalformed},
		{"filter + not a level", raw(0x82, bs(0, 1), str("a/b+/c"), bs(1)), 0, `SUBSCRIBE: topic filter "a/b+/c": '+' must be a whole level`, ErrMalformed},
		{"filter +x", raw(0x82, bs(0, 1), str("+x"), bs(1)), 0, `SUBSCRIBE: topic filter "+x": '+' must be a whole level`, ErrMalformed},
		{"filter empty", raw(0x82, bs(0, 1), str(""), bs(1)), 0, `SUBSCRIBE: topic filter "": must not be empty`, ErrMalformed},
		{"filter NUL", raw(0x82, bs(0, 1), str("a\x00b"), bs(1)), 0, `SUBSCRIBE: topic filter "a\x00b": contains U+0000`, ErrMalformed},
		{"filter bad UTF-8", raw(0x82, bs(0, 1), str("a\xffb"), bs(1)), 0, `SUBSCRIBE: topic filter "a\xffb": invalid UTF-8`, ErrMalformed},
		{"filter surrogate", raw(0x82, bs(0, 1), str("a\xed\xa0\x80"), bs(1)), 0, `SUBSCRIBE: topic filter "a\xed\xa0\x80": invalid UTF-8`, ErrMalformed},
		{"SUBSCRIBE QoS 3", raw(0x82, bs(0, 1), str("a"), bs(3)), 0, `SUBSCRIBE: topic filter "a": requested QoS 3 is reserved`, ErrMalformed},
		{"SUBSCRIBE QoS reserved bits", raw(0x82, bs(0, 1), str("a"), bs(0x41)), 0, `SUBSCRIBE: topic filter "a": reserved bits set in requested QoS byte 0x41`, ErrMalformed},
		{"SUBSCRIBE QoS missing", raw(0x82, bs(0, 1), str("a")), 0, `SUBSCRIBE: topic filter "a": requested QoS missing`, ErrMalformed},
		{"SUBSCRIBE no filters", raw(0x82, bs(0, 1)), 0, "SUBSCRIBE: no topic filters", ErrMalformed},
		{"SUBSCRIBE id 0", raw(0x82, bs(0, 0), str("a"), bs(0)), 0, "SUBSCRIBE: packet identifier is 0", ErrMalformed},
		{"SUBSCRIBE filter overruns", raw(0x82, bs(0, 1, 0, 9, 'a')), 0, "SUBSCRIBE: topic filter: length 9 exceeds the 1 bytes left in the packet", ErrMalformed},
		{"SUBSCRIBE short id", raw(0x82, bs(0)), 0, "SUBSCRIBE: packet identifier: truncated", ErrMalformed},
		{"UNSUBSCRIBE no filters", raw(0xa2, bs(0, 1)), 0, "UNSUBSCRIBE: no topic filters", ErrMalformed},
		{"UNSUBSCRIBE bad filter", raw(0xa2, bs(0, 1), str("#/a")), 0, `UNSUBSCRIBE: topic filter "#/a": '#' must be last`, ErrMalformed},
		{"SUBACK code 3", raw(0x90, bs(0, 1, 0, 3)), 0, "SUBACK: return code 1 is 0x03, must be 0, 1, 2 or 0x80", ErrMalformed},
		{"SUBACK empty", raw(0x90, bs(0, 1)), 0, "SUBACK: no return codes", ErrMalformed},

		{"topic wildcard +", raw(0x30, str("a/+")), 0, `PUBLISH: topic name "a/+": wildcard '+' is not allowed in a topic name`, ErrMalformed},
		{"topic wildcard #", raw(0x30, str("#")), 0, `PUBLISH: topic name "#": wildcard '#' is not allowed in a topic name`, ErrMalformed},
		{"topic empty", raw(0x30, str("")), 0, `PUBLISH: topic name "": must not be empty`, ErrMalformed},
		{"topic bad UTF-8", raw(0x30, str("\xc3")), 0, "PUBLISH: topic name: invalid UTF-8", ErrMalformed},
		{"topic NUL", raw(0x30, str("a\x00")), 0, "PUBLISH: topic name: contains U+0000", ErrMalformed},
		{"topic overruns", raw(0x30, bs(0, 5, 'a')), 0, "PUBLISH: topic name: length 5 exceeds the 1 bytes left in the packet", ErrMalformed},
		{"PUBLISH QoS 1 id 0", raw(0x32, str("a"), bs(0, 0)), 0, "PUBLISH: packet identifier is 0", ErrMalformed},
		{"PUBLISH QoS 1 no id", raw(0x32, str("a"), bs(0)), 0, "PUBLISH: packet identifier: truncated", ErrMalformed},

		{"CONNECT protocol name", raw(0x10, connectHeader("MQTX", 4, 2), str("c")), 0, `CONNECT: protocol name "MQTX" is not MQTT`, ErrMalformed},
		{"CONNECT level 5", raw(0x10, connectHeader("MQTT", 5, 2), bs(0), str("c")), 0, "CONNECT: protocol level 5 is not supported (MQTT 3.1.1 is level 4)", ErrUnacceptableProtocolVersion},
		{"CONNECT level 3 as MQTT", raw(0x10, connectHeader("MQTT", 3, 2), str("c")), 0, "CONNECT: protocol level 3 is not supported (MQTT 3.1.1 is level 4)", ErrUnacceptableProtocolVersion},
		{"CONNECT MQIsdp level 4", raw(0x10, connectHeader("MQIsdp", 4, 2), str("c")), 0, "CONNECT: protocol level 4 is not supported with protocol name MQIsdp (MQTT 3.1 is level 3)", ErrUnacceptableProtocolVersion},
		{"CONNECT reserved flag", raw(0x10, connectHeader("MQTT", 4, 3), str("c")), 0, "CONNECT: reserved connect flag bit 0 is set", ErrMalformed},
		{"CONNECT will QoS without will", raw(0x10, connectHeader("MQTT", 4, 0x0a), str("c")), 0, "CONNECT: will QoS or will retain set without the will flag", ErrMalformed},
		{"CONNECT will retain without will", raw(0x10, connectHeader("MQTT", 4, 0x22), str("c")), 0, "CONNECT: will QoS or will retain set without the will flag", ErrMalformed},
		{"CONNECT will QoS 3", raw(0x10, connectHeader("MQTT", 4, 0x1e), str("c"), str("t"), str("m")), 0, "CONNECT: will QoS 3 is reserved", ErrMalformed},
		{"CONNECT will topic wildcard", raw(0x10, connectHeader("MQTT", 4, 0x06), str("c"), str("t/#"), str("m")), 0, `CONNECT: will topic "t/#": wildcard '#' is not allowed in a topic name`, ErrMalformed},
		{"CONNECT password without user name", raw(0x10, connectHeader("MQTT", 4, 0x42), str("c"), str("p")), 0, "CONNECT: password flag set without the user name flag", ErrMalformed},
		{"CONNECT trailing bytes", raw(0x10, connectHeader("MQTT", 4, 2), str("c"), bs(1, 2)), 0, "CONNECT: 2 unexpected bytes after the payload", ErrMalformed},
		{"CONNECT client id overruns", raw(0x10, connectHeader("MQTT", 4, 2), bs(0, 40, 'c')), 0, "CONNECT: client identifier: length 40 exceeds the 1 bytes left in the packet", ErrMalformed},
		{"CONNECT client id NUL", raw(0x10, connectHeader("MQTT", 4, 2), str("c\x00")), 0, "CONNECT: client identifier: contains U+0000", ErrMalformed},
		{"CONNECT user name bad UTF-8", raw(0x10, connectHeader("MQTT", 4, 0x82), str("c"), str("\xff")), 0, "CONNECT: user name: invalid UTF-8", ErrMalformed},
		{"CONNECT missing password", raw(0x10, connectHeader("MQTT", 4, 0xc2), str("c"), str("u")), 0, "CONNECT: password: truncated", ErrMalformed},
		{"CONNECT no keepalive", raw(0x10, str("MQTT"), bs(4, 2, 0)), 0, "CONNECT: keep alive: truncated", ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := ReadPacket(bufio.NewReader(bytes.NewReader(tt.in)), tt.max)
			if err == nil {
				t.Fatalf("ReadPacket(%x) = %#v, want error %q", tt.in, p, tt.want)
			}
			if err.Error() != tt.want {
				t.Errorf("ReadPacket(%x) error\n got: %s\nwant: %s", tt.in, err, tt.want)
			}
			if !errors.Is(err, tt.isErr) {
				t.Errorf("error %v is not %v", err, tt.isErr)
			}
		})
	}
}

func TestEncodeRejects(t *testing.T) {
	tests := []struct {
		p    Packet
		want string
	}{
		{&Publish{Topic: "a/+"}, `PUBLISH: topic name "a/+": wildcard '+' is not allowed in a topic name`},
		{&Publish{Topic: "a", QoS: 1}, "PUBLISH: packet identifier is 0"},
		{&Publish{Topic: "a", QoS: 3, PacketID: 1}, "PUBLISH: QoS 3 is invalid"},
		{&Publish{Topic: "a", Dup: true}, "PUBLISH: DUP flag set on a QoS 0 message"},
		{&Publish{Topic: strings.Repeat("a", 65536)}, "PUBLISH: topic name is 65536 bytes, longer than 65535"},
		{&Subscribe{PacketID: 1, Subscriptions: []Subscription{{Filter: "a/#/b"}}}, `SUBSCRIBE: topic filter "a/#/b": '#' must be last`},
		{&Subscribe{PacketID: 1}, "SUBSCRIBE: no topic filters"},
		{&Suback{PacketID: 1, ReturnCodes: []byte{3}}, "SUBACK: return code 0 is 0x03, must be 0, 1, 2 or 0x80"},
		{&Unsubscribe{Filters: []string{"a"}}, "UNSUBSCRIBE: packet identifier is 0"},
		{&Puback{}, "PUBACK: packet identifier is 0"},
		{&Connack{ReturnCode: 6}, "CONNACK: return code 6 is reserved"},
		{&Connect{ClientID: "c", HasPassword: true, Password: []byte("p")}, "CONNECT: password flag set without the user name flag"},
		{&Connect{ProtocolLevel: 5}, `CONNECT: protocol "MQTT" level 5 is not supported`},
	}
	for _, tt := range tests {
		_, err := tt.p.Encode(nil)
		if err == nil || err.Error() != tt.want {
			t.Errorf("%T.Encode error = %v, want %s", tt.p, err, tt.want)
		}
		if _, err := tt.p.WriteTo(io.Discard); err == nil {
			t.Errorf("%T.WriteTo succeeded, want error", tt.p)
		}
	}
}

// allocated returns the bytes f allocates on the heap (and whatever other
// goroutines allocate meanwhile).
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// leastAllocated is the least a repeatable f allocates in a few runs: other
// goroutines of the test binary allocate now and then, rarely in every run.
func leastAllocated(f func()) uint64 {
	least := allocated(f)
	for range 4 {
		least = min(least, allocated(f))
	}
	return least
}

func TestReadPacketLimitCheckedBeforeAllocating(t *testing.T) {
	// Declares the protocol's largest packet; the limit is 1 MiB.
	in := bs(0x30, 0xff, 0xff, 0xff, 0x7f, 0, 1, 'a')
	var err error
	n := leastAllocated(func() {
		_, err = ReadPacket(bufio.NewReaderSize(bytes.NewReader(in), 16), 1<<20)
	})
	if !errors.Is(err, ErrPacketTooLarge) {
		t.Fatalf("err = %v, want ErrPacketTooLarge", err)
	}
	if n > 1024 {
		t.Errorf("rejecting the packet allocated %d bytes", n)
	}
}

func TestReadPacketAllocationFollowsData(t *testing.T) {
	// Declares 4 MiB (within the 8 MiB limit) but sends 100 bytes.
	in := append(bs(0x30, 0x80, 0x80, 0x80, 0x02, 0, 1, 'a'), make([]byte, 100)...)
	var err error
	n := leastAllocated(func() {
		_, err = ReadPacket(bufio.NewReaderSize(bytes.NewReader(in), 16), 8<<20)
	})
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("err = %v, want io.ErrUnexpectedEOF", err)
	}
	if n > 2*bodyChunk+1024 {
		t.Errorf("a 4 MiB packet of which 100 bytes arrived allocated %d bytes", n)
	}
	// A packet that does arrive whole is read whole.
	p := &Publish{Topic: "t", Payload: bytes.Repeat([]byte("x"), 1<<20+7)}
	enc, _ := p.Encode(nil)
	got, err := ReadPacket(bufio.NewReaderSize(bytes.NewReader(enc), 16), 8<<20)
	if err != nil || !bytes.Equal(got.(*Publish).Payload, p.Payload) {
		t.Fatalf("large PUBLISH: err %v", err)
	}
}

func TestReadPublishAllocations(t *testing.T) {
	p := &Publish{QoS: 1, PacketID: 9, Topic: "devices/dev-1/messages/events/", Payload: make([]byte, 256)}
	enc, _ := p.Encode(nil)
	rd := bytes.NewReader(enc)
	br := bufio.NewReader(rd)
	allocs := testing.AllocsPerRun(100, func() {
		rd.Reset(enc)
		br.Reset(rd)
		if _, err := ReadPacket(br, 0); err != nil {
			t.Fatal(err)
		}
	})
	// The body, the topic string and the *Publish.
	if allocs > 3 {
		t.Errorf("ReadPacket(PUBLISH) makes %v allocations, want at most 3", allocs)
	}
}

func TestTopicValidation(t *testing.T) {
	for _, f := range []string{"#", "+", "a/#", "+/+", "/", "//", "a//b", "$iothub/twin/res/#", "+/tennis/#", "sport/+/player1", "日本/+"} {
		if err := validateTopicFilter(f); err != nil {
			t.Errorf("validateTopicFilter(%q) = %v, want nil", f, err)
		}
	}
	for f, want := range map[string]string{
		"":      "must not be empty",
		"a/#/b": "'#' must be last",
		"a#":    "'#' must be a whole level",
		"a/+b":  "'+' must be a whole level",
		"++":    "'+' must be a whole level",
		"a\x00": "contains U+0000",
		"\xff":  "invalid UTF-8",
	} {
		if err := validateTopicFilter(f); err == nil || err.Error() != want {
			t.Errorf("validateTopicFilter(%q) = %v, want %s", f, err, want)
		}
	}
	for _, n := range []string{"a", "/", "$iothub/twin/GET/?$rid=1", "devices/d/messages/events/a=b&c=d"} {
		if err := ValidateTopicName(n); err != nil {
			t.Errorf("ValidateTopicName(%q) = %v", n, err)
		}
	}
	for _, n := range []string{"", "a/+", "#", "a\x00"} {
		if err := ValidateTopicName(n); err == nil {
			t.Errorf("ValidateTopicName(%q) = nil, want error", n)
		}
	}
}

func TestMatchTopic(t *testing.T) {
	tests := []struct {
		filter, topic string
		want          bool
	}{
		{"sport/tennis/player1/#", "sport/tennis/player1", true},
		{"sport/tennis/player1/#", "sport/tennis/player1/ranking", true},
		{"sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", true},
		{"sport/tennis/player1/#", "sport/tennis/player2", false},
		{"sport/#", "sport", true},
		{"sport/tennis/+", "sport/tennis/player1", true},
		{"sport/tennis/+", "sport/tennis/player1/ranking", false},
		{"sport/tennis/+", "sport/tennis", false},
		{"sport/+", "sport", false},
		{"sport/+", "sport/", true},
		{"+/+", "/finance", true},
		{"/+", "/finance", true},
		{"+", "/finance", false},
		{"+", "a", true},
		{"#", "a/b/c", true},
		{"#", "$SYS/x", false},
		{"+/monitor/Clients", "$SYS/monitor/Clients", false},
		{"$SYS/#", "$SYS/monitor/Clients", true},
		{"$SYS/monitor/+", "$SYS/monitor/Clients", true},
		{"$iothub/twin/res/#", "$iothub/twin/res/200/?$rid=1", true},
		{"$iothub/methods/POST/#", "$iothub/methods/POST/reboot/?$rid=7", true},
		{"$iothub/methods/POST/#", "$iothub/twin/res/200/?$rid=1", false},
		{"devices/d1/messages/devicebound/#", "devices/d1/messages/devicebound/%24.to=%2Fdevices%2Fd1", true},
		{"devices/d1/messages/devicebound/#", "devices/d2/messages/devicebound/x", false},
		{"a/b", "a/b", true},
		{"a/b", "a/b/c", false},
		{"a/b/c", "a/b", false},
		{"a/+/c", "a//c", true},
		{"a", "A", false},
	}
	for _, tt := range tests {
		if got := matchTopic(tt.filter, tt.topic); got != tt.want {
			t.Errorf("matchTopic(%q, %q) = %v, want %v", tt.filter, tt.topic, got, tt.want)
		}
	}
}
