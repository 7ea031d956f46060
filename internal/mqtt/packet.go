// Package mqtt is an MQTT 3.1.1 packet codec and a small server built on it,
// sized for many mostly idle device connections (see
// docs/decisions/0001-mqtt-server.md). It implements what Azure IoT Hub's
// device endpoint needs: QoS 0 and 1, no retained messages, no persistent
// sessions. The IoT hub plugs its semantics in through Handler.
package mqtt

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"unsafe"
)

// PacketType is the MQTT control packet type (the high nibble of the first byte).
type PacketType byte

// Control packet types of MQTT 3.1.1.
const (
	TypeConnect     PacketType = 1
	TypeConnack     PacketType = 2
	TypePublish     PacketType = 3
	TypePuback      PacketType = 4
	TypePubrec      PacketType = 5
	TypePubrel      PacketType = 6
	TypePubcomp     PacketType = 7
	TypeSubscribe   PacketType = 8
	TypeSuback      PacketType = 9
	TypeUnsubscribe PacketType = 10
	TypeUnsuback    PacketType = 11
	TypePingreq     PacketType = 12
	TypePingresp    PacketType = 13
	TypeDisconnect  PacketType = 14
)

var typeNames = [...]string{
	TypeConnect:     "CONNECT",
	TypeConnack:     "CONNACK",
	TypePublish:     "PUBLISH",
	TypePuback:      "PUBACK",
	TypePubrec:      "PUBREC",
	TypePubrel:      "PUBREL",
	TypePubcomp:     "PUBCOMP",
	TypeSubscribe:   "SUBSCRIBE",
	TypeSuback:      "SUBACK",
	TypeUnsubscribe: "UNSUBSCRIBE",
	TypeUnsuback:    "UNSUBACK",
	TypePingreq:     "PINGREQ",
	TypePingresp:    "PINGRESP",
	TypeDisconnect:  "DISCONNECT",
}

func (t PacketType) String() string {
	if int(t) < len(typeNames) && typeNames[t] != "" {
		return typeNames[t]
	}
	return "packet type " + strconv.Itoa(int(t))
}

// CONNACK return codes of MQTT 3.1.1 (section 3.2.2.3), and the SUBACK
// failure code.
const (
	Accepted                   byte = 0
	RefusedProtocolVersion     byte = 1
	RefusedIdentifierRejected  byte = 2
	RefusedServerUnavailable   byte = 3
	RefusedBadUsernamePassword byte = 4
	RefusedNotAuthorized       byte = 5
	SubscribeFailure           byte = 0x80
)

// DefaultMaxPacketSize is the default limit on a packet's size: Azure IoT
// Hub's 256 KiB device-to-cloud message plus 8 KiB for the topic (with its
// property bag) and headers.
const DefaultMaxPacketSize = 256<<10 + 8<<10

const (
	maxRemainingLength = 268435455
	maxStringLength    = 65535
	bodyChunk          = 16 << 10 // see readBody
	protocolNameMQTT   = "MQTT"
	protocolNameMQIsdp = "MQIsdp"
	protocolLevel311   = 4
	protocolLevel31    = 3
)

// Errors that PacketError wraps; test for them with errors.Is.
var (
	// ErrMalformed marks a packet that breaks the MQTT 3.1.1 rules.
	ErrMalformed = errors.New("mqtt: malformed packet")
	// ErrPacketTooLarge marks a packet over the reader's size limit; it is
	// detected from the fixed header, before the body is read.
	ErrPacketTooLarge = errors.New("mqtt: packet too large")
	// ErrUnacceptableProtocolVersion marks a CONNECT with a protocol level the
	// codec does not speak; a server answers it with CONNACK code 1.
	ErrUnacceptableProtocolVersion = errors.New("mqtt: unacceptable protocol version")
)

// PacketError describes what is wrong with a packet read from or encoded for
// the wire. Its message names the packet and the field, for example
// `SUBSCRIBE: topic filter "a/#/b": '#' must be last`.
type PacketError struct {
	Type   PacketType
	Reason string
	Err    error // ErrMalformed, ErrPacketTooLarge, ErrUnacceptableProtocolVersion or io.ErrUnexpectedEOF
}

func (e *PacketError) Error() string { return e.Type.String() + ": " + e.Reason }
func (e *PacketError) Unwrap() error { return e.Err }

func malformed(t PacketType, format string, args ...any) error {
	return &PacketError{Type: t, Reason: fmt.Sprintf(format, args...), Err: ErrMalformed}
}

// Packet is one MQTT control packet.
type Packet interface {
	Type() PacketType
	// Encode appends the packet's wire form to dst. It checks the packet
	// against the same rules ReadPacket enforces.
	Encode(dst []byte) ([]byte, error)
	// WriteTo writes the packet with a single Write call.
	WriteTo(w io.Writer) (int64, error)
}

// Connect is the first packet of a client.
type Connect struct {
	ProtocolName  string // "MQTT" (level 4) or "MQIsdp" (level 3); empty encodes as "MQTT"
	ProtocolLevel byte   // 4, or 3 for MQTT 3.1; 0 encodes as 4
	CleanSession  bool
	KeepAlive     uint16 // seconds; 0 disables the keepalive
	ClientID      string
	Will          *Will // nil when the client set no will
	HasUsername   bool
	Username      string
	HasPassword   bool
	Password      []byte // for Azure IoT Hub, a SAS token; aliases the read buffer
}

// Will is the last-will message of a CONNECT.
type Will struct {
	Topic   string
	Payload []byte
	QoS     byte
	Retain  bool
}

// Connack answers CONNECT.
type Connack struct {
	SessionPresent bool
	ReturnCode     byte
}

// Publish carries an application message in either direction.
type Publish struct {
	Dup      bool
	QoS      byte
	Retain   bool
	Topic    string
	PacketID uint16 // non-zero when QoS > 0
	Payload  []byte // aliases the packet's buffer, which ReadPacket does not reuse
}

// Puback acknowledges a QoS 1 PUBLISH.
type Puback struct{ PacketID uint16 }

// Subscribe asks for messages on topic filters.
type Subscribe struct {
	PacketID      uint16
	Subscriptions []Subscription
}

// Subscription is one topic filter of a SUBSCRIBE with its requested QoS.
type Subscription struct {
	Filter string
	QoS    byte
}

// Suback answers SUBSCRIBE with one return code per filter: the granted QoS
// or SubscribeFailure.
type Suback struct {
	PacketID    uint16
	ReturnCodes []byte
}

// Unsubscribe removes subscriptions.
type Unsubscribe struct {
	PacketID uint16
	Filters  []string
}

// Unsuback answers UNSUBSCRIBE.
type Unsuback struct{ PacketID uint16 }

// Pingreq is the client's keepalive probe.
type Pingreq struct{}

// Pingresp answers PINGREQ.
type Pingresp struct{}

// Disconnect is the client's clean goodbye.
type Disconnect struct{}

func (*Connect) Type() PacketType     { return TypeConnect }
func (*Connack) Type() PacketType     { return TypeConnack }
func (*Publish) Type() PacketType     { return TypePublish }
func (*Puback) Type() PacketType      { return TypePuback }
func (*Subscribe) Type() PacketType   { return TypeSubscribe }
func (*Suback) Type() PacketType      { return TypeSuback }
func (*Unsubscribe) Type() PacketType { return TypeUnsubscribe }
func (*Unsuback) Type() PacketType    { return TypeUnsuback }
func (*Pingreq) Type() PacketType     { return TypePingreq }
func (*Pingresp) Type() PacketType    { return TypePingresp }
func (*Disconnect) Type() PacketType  { return TypeDisconnect }

// ---------------------------------------------------------------------------
// Reading

// ReadPacket reads one control packet. maxSize limits the whole packet (fixed
// header included); 0 or less means the protocol's own limit. The limit is
// checked from the fixed header before anything is allocated, and bodies over
// 16 KiB are allocated as their bytes arrive, so a peer that announces a large
// packet and then stalls holds at most twice what it actually sent.
//
// Errors: io.EOF when r ends cleanly before a packet; otherwise a *PacketError
// (wrapping ErrMalformed, ErrPacketTooLarge, ErrUnacceptableProtocolVersion or
// io.ErrUnexpectedEOF) or the reader's error. Publish.Payload, Connect.Password
// and Suback.ReturnCodes alias a buffer owned by the returned packet.
func ReadPacket(r *bufio.Reader, maxSize int) (Packet, error) {
	b0, err := r.ReadByte()
	if err != nil {
		return nil, err
	}
	return readPacket(b0, r, maxSize)
}

// readPacket reads the packet whose first byte, b0, the caller already read.
func readPacket(b0 byte, r *bufio.Reader, maxSize int) (Packet, error) {
	t := PacketType(b0 >> 4)
	flags := b0 & 0x0f
	if err := checkFlags(t, flags); err != nil {
		return nil, err
	}
	n, hdrLen, err := readRemainingLength(r, t)
	if err != nil {
		return nil, err
	}
	if maxSize > 0 && 1+hdrLen+n > maxSize {
		return nil, &PacketError{Type: t, Err: ErrPacketTooLarge,
			Reason: fmt.Sprintf("packet of %d bytes exceeds the %d-byte limit", 1+hdrLen+n, maxSize)}
	}
	switch t {
	case TypeConnack, TypePuback, TypeUnsuback:
		if n != 2 {
			return nil, malformed(t, "remaining length is %d, must be 2", n)
		}
		hi, err := r.ReadByte()
		if err != nil {
			return nil, truncated(t, err)
		}
		lo, err := r.ReadByte()
		if err != nil {
			return nil, truncated(t, err)
		}
		if t == TypeConnack {
			return decodeConnack(hi, lo)
		}
		id, err := packetID(t, uint16(hi)<<8|uint16(lo))
		if err != nil {
			return nil, err
		}
		if t == TypePuback {
			return &Puback{PacketID: id}, nil
		}
		return &Unsuback{PacketID: id}, nil
	case TypePingreq, TypePingresp, TypeDisconnect:
		if n != 0 {
			return nil, malformed(t, "remaining length is %d, must be 0", n)
		}
		switch t {
		case TypePingreq:
			return &Pingreq{}, nil
		case TypePingresp:
			return &Pingresp{}, nil
		}
		return &Disconnect{}, nil
	}
	body, err := readBody(r, n)
	if err != nil {
		return nil, truncated(t, err)
	}
	d := decoder{b: body, t: t}
	switch t {
	case TypeConnect:
		return d.connect()
	case TypePublish:
		return d.publish(flags)
	case TypeSubscribe:
		return d.subscribe()
	case TypeSuback:
		return d.suback()
	case TypeUnsubscribe:
		return d.unsubscribe()
	}
	return nil, &PacketError{Type: t, Reason: "reserved packet type", Err: ErrMalformed} // checkFlags rejected it already
}

func truncated(t PacketType, err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return &PacketError{Type: t, Reason: "connection ended inside the packet", Err: io.ErrUnexpectedEOF}
	}
	return err
}

// checkFlags checks the type and the fixed header's flag bits (section 2.2.2).
func checkFlags(t PacketType, flags byte) error {
	want := byte(0)
	switch t {
	case TypePublish:
		qos := flags >> 1 & 3
		if qos == 3 {
			return malformed(t, "QoS 3 is reserved")
		}
		if qos == 0 && flags&0x08 != 0 {
			return malformed(t, "DUP flag set on a QoS 0 message")
		}
		return nil
	case TypeSubscribe, TypeUnsubscribe:
		want = 0x02
	case TypeConnect, TypeConnack, TypePuback, TypeSuback, TypeUnsuback,
		TypePingreq, TypePingresp, TypeDisconnect:
	case TypePubrec, TypePubrel, TypePubcomp:
		return malformed(t, "QoS 2 flows are not supported")
	default:
		return &PacketError{Type: t, Reason: "reserved packet type", Err: ErrMalformed}
	}
	if flags != want {
		return malformed(t, "reserved flag bits are %04b, must be %04b", flags, want)
	}
	return nil
}

// readRemainingLength reads the variable-length "remaining length"; hdrLen is
// the number of bytes it took (1 to 4).
func readRemainingLength(r *bufio.Reader, t PacketType) (n, hdrLen int, _ error) {
	shift := 0
	for hdrLen < 4 {
		b, err := r.ReadByte()
		if err != nil {
			return 0, 0, truncated(t, err)
		}
		hdrLen++
		n |= int(b&0x7f) << shift
		if b&0x80 == 0 {
			return n, hdrLen, nil
		}
		shift += 7
	}
	return 0, 0, malformed(t, "remaining length is longer than 4 bytes")
}

// readBody reads n bytes. Small bodies, and bodies already buffered, get one
// exact allocation; larger ones grow by doubling from 16 KiB as data arrives.
func readBody(r *bufio.Reader, n int) ([]byte, error) {
	if n == 0 {
		return nil, nil
	}
	if n <= bodyChunk || n <= r.Buffered() {
		b := make([]byte, n)
		_, err := io.ReadFull(r, b)
		return b, err
	}
	b := make([]byte, bodyChunk)
	got := 0
	for {
		m, err := io.ReadFull(r, b[got:])
		got += m
		if err != nil {
			if got > 0 && err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		if got == n {
			return b, nil
		}
		nb := make([]byte, min(2*len(b), n))
		copy(nb, b)
		b = nb
	}
}

func decodeConnack(flags, code byte) (Packet, error) {
	if flags&^1 != 0 {
		return nil, malformed(TypeConnack, "reserved acknowledge flag bits are set (%08b)", flags)
	}
	if code > RefusedNotAuthorized {
		return nil, malformed(TypeConnack, "return code %d is reserved", code)
	}
	if code != Accepted && flags != 0 {
		return nil, malformed(TypeConnack, "session present is set with refusal code %d", code)
	}
	return &Connack{SessionPresent: flags == 1, ReturnCode: code}, nil
}

func packetID(t PacketType, id uint16) (uint16, error) {
	if id == 0 {
		return 0, malformed(t, "packet identifier is 0")
	}
	return id, nil
}

// decoder walks a packet body; field names end up in error messages.
type decoder struct {
	b []byte
	t PacketType
}

func (d *decoder) uint16(field string) (uint16, error) {
	if len(d.b) < 2 {
		return 0, malformed(d.t, "%s: truncated", field)
	}
	v := uint16(d.b[0])<<8 | uint16(d.b[1])
	d.b = d.b[2:]
	return v, nil
}

// binary reads a length-prefixed byte field, aliasing the body.
func (d *decoder) binary(field string) ([]byte, error) {
	n, err := d.uint16(field)
	if err != nil {
		return nil, err
	}
	if int(n) > len(d.b) {
		return nil, malformed(d.t, "%s: length %d exceeds the %d bytes left in the packet", field, n, len(d.b))
	}
	v := d.b[:n:n]
	d.b = d.b[n:]
	return v, nil
}

// text reads a length-prefixed UTF-8 string, still as bytes, validated.
func (d *decoder) text(field string) ([]byte, error) {
	v, err := d.binary(field)
	if err != nil {
		return nil, err
	}
	if reason := checkUTF8(view(v)); reason != "" {
		return nil, malformed(d.t, "%s: %s", field, reason)
	}
	return v, nil
}

// view returns b as a string without copying, for checks that don't keep it.
func view(b []byte) string { return unsafe.String(unsafe.SliceData(b), len(b)) }

func (d *decoder) connect() (Packet, error) {
	name, err := d.text("protocol name")
	if err != nil {
		return nil, err
	}
	if len(d.b) < 1 {
		return nil, malformed(d.t, "protocol level: truncated")
	}
	level := d.b[0]
	d.b = d.b[1:]
	p := &Connect{ProtocolLevel: level}
	switch string(name) {
	case protocolNameMQTT:
		p.ProtocolName = protocolNameMQTT
		if level != protocolLevel311 {
			return nil, &PacketError{Type: d.t, Err: ErrUnacceptableProtocolVersion,
				Reason: fmt.Sprintf("protocol level %d is not supported (MQTT 3.1.1 is level 4)", level)}
		}
	case protocolNameMQIsdp:
		p.ProtocolName = protocolNameMQIsdp
		if level != protocolLevel31 {
			return nil, &PacketError{Type: d.t, Err: ErrUnacceptableProtocolVersion,
				Reason: fmt.Sprintf("protocol level %d is not supported with protocol name MQIsdp (MQTT 3.1 is level 3)", level)}
		}
	default:
		return nil, malformed(d.t, "protocol name %s is not MQTT", quote(name))
	}
	if len(d.b) < 1 {
		return nil, malformed(d.t, "connect flags: truncated")
	}
	flags := d.b[0]
	d.b = d.b[1:]
	if flags&0x01 != 0 {
		return nil, malformed(d.t, "reserved connect flag bit 0 is set")
	}
	p.CleanSession = flags&0x02 != 0
	willFlag := flags&0x04 != 0
	willQoS := flags >> 3 & 3
	willRetain := flags&0x20 != 0
	p.HasPassword = flags&0x40 != 0
	p.HasUsername = flags&0x80 != 0
	if !willFlag && (willQoS != 0 || willRetain) {
		return nil, malformed(d.t, "will QoS or will retain set without the will flag")
	}
	if willQoS == 3 {
		return nil, malformed(d.t, "will QoS 3 is reserved")
	}
	if p.HasPassword && !p.HasUsername {
		return nil, malformed(d.t, "password flag set without the user name flag")
	}
	if p.KeepAlive, err = d.uint16("keep alive"); err != nil {
		return nil, err
	}
	id, err := d.text("client identifier")
	if err != nil {
		return nil, err
	}
	p.ClientID = string(id)
	if willFlag {
		topic, err := d.text("will topic")
		if err != nil {
			return nil, err
		}
		if reason := topicNameReason(view(topic)); reason != "" {
			return nil, malformed(d.t, "will topic %s: %s", quote(topic), reason)
		}
		msg, err := d.binary("will message")
		if err != nil {
			return nil, err
		}
		// The will outlives CONNECT; copy it so it doesn't pin the body and its password.
		p.Will = &Will{Topic: string(topic), Payload: bytes.Clone(msg), QoS: willQoS, Retain: willRetain}
	}
	if p.HasUsername {
		u, err := d.text("user name")
		if err != nil {
			return nil, err
		}
		p.Username = string(u)
	}
	if p.HasPassword {
		if p.Password, err = d.binary("password"); err != nil {
			return nil, err
		}
	}
	if len(d.b) != 0 {
		return nil, malformed(d.t, "%d unexpected bytes after the payload", len(d.b))
	}
	return p, nil
}

func (d *decoder) publish(flags byte) (Packet, error) {
	p := &Publish{Dup: flags&0x08 != 0, QoS: flags >> 1 & 3, Retain: flags&0x01 != 0}
	topic, err := d.text("topic name")
	if err != nil {
		return nil, err
	}
	if reason := topicNameReason(view(topic)); reason != "" {
		return nil, malformed(d.t, "topic name %s: %s", quote(topic), reason)
	}
	p.Topic = string(topic)
	if p.QoS > 0 {
		id, err := d.uint16("packet identifier")
		if err != nil {
			return nil, err
		}
		if p.PacketID, err = packetID(d.t, id); err != nil {
			return nil, err
		}
	}
	p.Payload = d.b
	return p, nil
}

// bodyString returns the rest of the body as a string without copying. The
// decoder owns the body and no []byte view of it escapes for SUBSCRIBE and
// UNSUBSCRIBE, so the bytes never change.
func (d *decoder) bodyString() string {
	if len(d.b) == 0 {
		return ""
	}
	return unsafe.String(&d.b[0], len(d.b))
}

func (d *decoder) subscribe() (Packet, error) {
	id, err := d.uint16("packet identifier")
	if err != nil {
		return nil, err
	}
	p := &Subscribe{}
	if p.PacketID, err = packetID(d.t, id); err != nil {
		return nil, err
	}
	s := d.bodyString()
	// First pass validates and counts, second fills an exact slice.
	count := 0
	for off := 0; off < len(s); count++ {
		f, next, err := d.filterAt(s, off)
		if err != nil {
			return nil, err
		}
		if next >= len(s) {
			return nil, malformed(d.t, "topic filter %s: requested QoS missing", quote(f))
		}
		q := s[next]
		if q&^3 != 0 {
			return nil, malformed(d.t, "topic filter %s: reserved bits set in requested QoS byte %#02x", quote(f), q)
		}
		if q == 3 {
			return nil, malformed(d.t, "topic filter %s: requested QoS 3 is reserved", quote(f))
		}
		off = next + 1
	}
	if count == 0 {
		return nil, malformed(d.t, "no topic filters")
	}
	p.Subscriptions = make([]Subscription, 0, count)
	for off := 0; off < len(s); {
		f, next, _ := d.filterAt(s, off)
		p.Subscriptions = append(p.Subscriptions, Subscription{Filter: f, QoS: s[next]})
		off = next + 1
	}
	return p, nil
}

func (d *decoder) unsubscribe() (Packet, error) {
	id, err := d.uint16("packet identifier")
	if err != nil {
		return nil, err
	}
	p := &Unsubscribe{}
	if p.PacketID, err = packetID(d.t, id); err != nil {
		return nil, err
	}
	s := d.bodyString()
	count := 0
	for off := 0; off < len(s); count++ {
		_, next, err := d.filterAt(s, off)
		if err != nil {
			return nil, err
		}
		off = next
	}
	if count == 0 {
		return nil, malformed(d.t, "no topic filters")
	}
	p.Filters = make([]string, 0, count)
	for off := 0; off < len(s); {
		f, next, _ := d.filterAt(s, off)
		p.Filters = append(p.Filters, f)
		off = next
	}
	return p, nil
}

// filterAt reads the length-prefixed topic filter at s[off:] and returns it
// with the offset just past it.
func (d *decoder) filterAt(s string, off int) (string, int, error) {
	if len(s)-off < 2 {
		return "", 0, malformed(d.t, "topic filter: truncated")
	}
	n := int(s[off])<<8 | int(s[off+1])
	off += 2
	if n > len(s)-off {
		return "", 0, malformed(d.t, "topic filter: length %d exceeds the %d bytes left in the packet", n, len(s)-off)
	}
	f := s[off : off+n]
	if reason := checkUTF8(f); reason != "" {
		return "", 0, malformed(d.t, "topic filter %s: %s", quote(f), reason)
	}
	if reason := topicFilterReason(f); reason != "" {
		return "", 0, malformed(d.t, "topic filter %s: %s", quote(f), reason)
	}
	return f, off + n, nil
}

func (d *decoder) suback() (Packet, error) {
	id, err := d.uint16("packet identifier")
	if err != nil {
		return nil, err
	}
	p := &Suback{}
	if p.PacketID, err = packetID(d.t, id); err != nil {
		return nil, err
	}
	if len(d.b) == 0 {
		return nil, malformed(d.t, "no return codes")
	}
	for i, c := range d.b {
		if c > 2 && c != SubscribeFailure {
			return nil, malformed(d.t, "return code %d is %#02x, must be 0, 1, 2 or 0x80", i, c)
		}
	}
	p.ReturnCodes = d.b
	return p, nil
}

// quote quotes a field for an error message, shortening long ones.
func quote[T string | []byte](v T) string {
	const max = 64
	if len(v) > max {
		return strconv.Quote(string(v[:max])) + "..."
	}
	return strconv.Quote(string(v))
}

// ---------------------------------------------------------------------------
// Encoding

func appendFixedHeader(dst []byte, t PacketType, b0 byte, n int) ([]byte, error) {
	if n > maxRemainingLength {
		return dst, malformed(t, "remaining length %d exceeds %d", n, maxRemainingLength)
	}
	dst = append(dst, b0)
	for {
		b := byte(n & 0x7f)
		n >>= 7
		if n > 0 {
			b |= 0x80
		}
		dst = append(dst, b)
		if n == 0 {
			return dst, nil
		}
	}
}

func appendUint16(dst []byte, v uint16) []byte { return append(dst, byte(v>>8), byte(v)) }

func appendString[T string | []byte](dst []byte, s T) []byte {
	dst = appendUint16(dst, uint16(len(s)))
	return append(dst, s...)
}

// checkText checks a UTF-8 string field for encoding.
func checkText(t PacketType, field, s string) error {
	if len(s) > maxStringLength {
		return malformed(t, "%s is %d bytes, longer than %d", field, len(s), maxStringLength)
	}
	if reason := checkUTF8(s); reason != "" {
		return malformed(t, "%s: %s", field, reason)
	}
	return nil
}

func checkBinary(t PacketType, field string, b []byte) error {
	if len(b) > maxStringLength {
		return malformed(t, "%s is %d bytes, longer than %d", field, len(b), maxStringLength)
	}
	return nil
}

// Encode appends the CONNECT packet to dst.
func (p *Connect) Encode(dst []byte) ([]byte, error) {
	t := TypeConnect
	name, level := p.ProtocolName, p.ProtocolLevel
	if name == "" {
		name = protocolNameMQTT
	}
	if level == 0 {
		level = protocolLevel311
		if name == protocolNameMQIsdp {
			level = protocolLevel31
		}
	}
	if !(name == protocolNameMQTT && level == protocolLevel311) && !(name == protocolNameMQIsdp && level == protocolLevel31) {
		return dst, &PacketError{Type: t, Err: ErrUnacceptableProtocolVersion,
			Reason: fmt.Sprintf("protocol %q level %d is not supported", name, level)}
	}
	if err := checkText(t, "client identifier", p.ClientID); err != nil {
		return dst, err
	}
	n := 2 + len(name) + 4 + 2 + len(p.ClientID)
	flags := byte(0)
	if p.CleanSession {
		flags |= 0x02
	}
	if w := p.Will; w != nil {
		if err := checkText(t, "will topic", w.Topic); err != nil {
			return dst, err
		}
		if reason := topicNameReason(w.Topic); reason != "" {
			return dst, malformed(t, "will topic %s: %s", quote(w.Topic), reason)
		}
		if err := checkBinary(t, "will message", w.Payload); err != nil {
			return dst, err
		}
		if w.QoS > 2 {
			return dst, malformed(t, "will QoS %d is invalid", w.QoS)
		}
		flags |= 0x04 | w.QoS<<3
		if w.Retain {
			flags |= 0x20
		}
		n += 4 + len(w.Topic) + len(w.Payload)
	}
	if p.HasUsername {
		if err := checkText(t, "user name", p.Username); err != nil {
			return dst, err
		}
		flags |= 0x80
		n += 2 + len(p.Username)
	} else if p.Username != "" {
		return dst, malformed(t, "user name set without HasUsername")
	}
	if p.HasPassword {
		if !p.HasUsername {
			return dst, malformed(t, "password flag set without the user name flag")
		}
		if err := checkBinary(t, "password", p.Password); err != nil {
			return dst, err
		}
		flags |= 0x40
		n += 2 + len(p.Password)
	} else if len(p.Password) != 0 {
		return dst, malformed(t, "password set without HasPassword")
	}
	dst, err := appendFixedHeader(dst, t, byte(t)<<4, n)
	if err != nil {
		return dst, err
	}
	dst = appendString(dst, name)
	dst = append(dst, level, flags)
	dst = appendUint16(dst, p.KeepAlive)
	dst = appendString(dst, p.ClientID)
	if w := p.Will; w != nil {
		dst = appendString(dst, w.Topic)
		dst = appendString(dst, w.Payload)
	}
	if p.HasUsername {
		dst = appendString(dst, p.Username)
	}
	if p.HasPassword {
		dst = appendString(dst, p.Password)
	}
	return dst, nil
}

// Encode appends the CONNACK packet to dst.
func (p *Connack) Encode(dst []byte) ([]byte, error) {
	if p.ReturnCode > RefusedNotAuthorized {
		return dst, malformed(TypeConnack, "return code %d is reserved", p.ReturnCode)
	}
	if p.SessionPresent && p.ReturnCode != Accepted {
		return dst, malformed(TypeConnack, "session present is set with refusal code %d", p.ReturnCode)
	}
	flags := byte(0)
	if p.SessionPresent {
		flags = 1
	}
	return append(dst, byte(TypeConnack)<<4, 2, flags, p.ReturnCode), nil
}

// Encode appends the PUBLISH packet to dst.
func (p *Publish) Encode(dst []byte) ([]byte, error) {
	t := TypePublish
	if p.QoS > 2 {
		return dst, malformed(t, "QoS %d is invalid", p.QoS)
	}
	if p.Dup && p.QoS == 0 {
		return dst, malformed(t, "DUP flag set on a QoS 0 message")
	}
	if err := checkText(t, "topic name", p.Topic); err != nil {
		return dst, err
	}
	if reason := topicNameReason(p.Topic); reason != "" {
		return dst, malformed(t, "topic name %s: %s", quote(p.Topic), reason)
	}
	n := 2 + len(p.Topic) + len(p.Payload)
	if p.QoS > 0 {
		if p.PacketID == 0 {
			return dst, malformed(t, "packet identifier is 0")
		}
		n += 2
	}
	b0 := byte(t)<<4 | p.QoS<<1
	if p.Dup {
		b0 |= 0x08
	}
	if p.Retain {
		b0 |= 0x01
	}
	dst, err := appendFixedHeader(dst, t, b0, n)
	if err != nil {
		return dst, err
	}
	dst = appendString(dst, p.Topic)
	if p.QoS > 0 {
		dst = appendUint16(dst, p.PacketID)
	}
	return append(dst, p.Payload...), nil
}

func appendAck(dst []byte, t PacketType, b0 byte, id uint16) ([]byte, error) {
	if id == 0 {
		return dst, malformed(t, "packet identifier is 0")
	}
	return append(dst, b0, 2, byte(id>>8), byte(id)), nil
}

// Encode appends the PUBACK packet to dst.
func (p *Puback) Encode(dst []byte) ([]byte, error) {
	return appendAck(dst, TypePuback, byte(TypePuback)<<4, p.PacketID)
}

// Encode appends the UNSUBACK packet to dst.
func (p *Unsuback) Encode(dst []byte) ([]byte, error) {
	return appendAck(dst, TypeUnsuback, byte(TypeUnsuback)<<4, p.PacketID)
}

// Encode appends the SUBSCRIBE packet to dst.
func (p *Subscribe) Encode(dst []byte) ([]byte, error) {
	t := TypeSubscribe
	if p.PacketID == 0 {
		return dst, malformed(t, "packet identifier is 0")
	}
	if len(p.Subscriptions) == 0 {
		return dst, malformed(t, "no topic filters")
	}
	n := 2
	for _, s := range p.Subscriptions {
		if err := checkFilter(t, s.Filter); err != nil {
			return dst, err
		}
		if s.QoS > 2 {
			return dst, malformed(t, "topic filter %s: requested QoS %d is invalid", quote(s.Filter), s.QoS)
		}
		n += 3 + len(s.Filter)
	}
	dst, err := appendFixedHeader(dst, t, byte(t)<<4|0x02, n)
	if err != nil {
		return dst, err
	}
	dst = appendUint16(dst, p.PacketID)
	for _, s := range p.Subscriptions {
		dst = appendString(dst, s.Filter)
		dst = append(dst, s.QoS)
	}
	return dst, nil
}

func checkFilter(t PacketType, f string) error {
	if err := checkText(t, "topic filter", f); err != nil {
		return err
	}
	if reason := topicFilterReason(f); reason != "" {
		return malformed(t, "topic filter %s: %s", quote(f), reason)
	}
	return nil
}

// Encode appends the SUBACK packet to dst.
func (p *Suback) Encode(dst []byte) ([]byte, error) {
	t := TypeSuback
	if p.PacketID == 0 {
		return dst, malformed(t, "packet identifier is 0")
	}
	if len(p.ReturnCodes) == 0 {
		return dst, malformed(t, "no return codes")
	}
	for i, c := range p.ReturnCodes {
		if c > 2 && c != SubscribeFailure {
			return dst, malformed(t, "return code %d is %#02x, must be 0, 1, 2 or 0x80", i, c)
		}
	}
	dst, err := appendFixedHeader(dst, t, byte(t)<<4, 2+len(p.ReturnCodes))
	if err != nil {
		return dst, err
	}
	dst = appendUint16(dst, p.PacketID)
	return append(dst, p.ReturnCodes...), nil
}

// Encode appends the UNSUBSCRIBE packet to dst.
func (p *Unsubscribe) Encode(dst []byte) ([]byte, error) {
	t := TypeUnsubscribe
	if p.PacketID == 0 {
		return dst, malformed(t, "packet identifier is 0")
	}
	if len(p.Filters) == 0 {
		return dst, malformed(t, "no topic filters")
	}
	n := 2
	for _, f := range p.Filters {
		if err := checkFilter(t, f); err != nil {
			return dst, err
		}
		n += 2 + len(f)
	}
	dst, err := appendFixedHeader(dst, t, byte(t)<<4|0x02, n)
	if err != nil {
		return dst, err
	}
	dst = appendUint16(dst, p.PacketID)
	for _, f := range p.Filters {
		dst = appendString(dst, f)
	}
	return dst, nil
}

// Encode appends the PINGREQ packet to dst.
func (*Pingreq) Encode(dst []byte) ([]byte, error) { return append(dst, byte(TypePingreq)<<4, 0), nil }

// Encode appends the PINGRESP packet to dst.
func (*Pingresp) Encode(dst []byte) ([]byte, error) {
	return append(dst, byte(TypePingresp)<<4, 0), nil
}

// Encode appends the DISCONNECT packet to dst.
func (*Disconnect) Encode(dst []byte) ([]byte, error) {
	return append(dst, byte(TypeDisconnect)<<4, 0), nil
}

// Write buffers are pooled so that idle connections hold none.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

const maxPooledBuf = 64 << 10

func getBuf() *[]byte { return bufPool.Get().(*[]byte) }

func putBuf(bp *[]byte, b []byte) {
	if cap(b) > maxPooledBuf {
		return
	}
	*bp = b[:0]
	bufPool.Put(bp)
}

func writeTo(w io.Writer, p Packet) (int64, error) {
	bp := getBuf()
	b, err := p.Encode((*bp)[:0])
	if err != nil {
		putBuf(bp, b)
		return 0, err
	}
	n, err := w.Write(b)
	putBuf(bp, b)
	return int64(n), err
}

// WriteTo writes the packet to w in one Write call.
func (p *Connect) WriteTo(w io.Writer) (int64, error) { return writeTo(w, p) }

// WriteTo writes the packet to w in one Write call.
func (p *Connack) WriteTo(w io.Writer) (int64, error) { return writeTo(w, p) }

// WriteTo writes the packet to w in one Write call.
func (p *Publish) WriteTo(w io.Writer) (int64, error) { return writeTo(w, p) }

// WriteTo writes the packet to w in one Write call.
func (p *Puback) WriteTo(w io.Writer) (int64, error) { return writeTo(w, p) }

// WriteTo writes the packet to w in one Write call.
func (p *Subscribe) WriteTo(w io.Writer) (int64, error) { return writeTo(w, p) }

// WriteTo writes the packet to w in one Write call.
func (p *Suback) WriteTo(w io.Writer) (int64, error) { return writeTo(w, p) }

// WriteTo writes the packet to w in one Write call.
func (p *Unsubscribe) WriteTo(w io.Writer) (int64, error) { return writeTo(w, p) }

// WriteTo writes the packet to w in one Write call.
func (p *Unsuback) WriteTo(w io.Writer) (int64, error) { return writeTo(w, p) }

// WriteTo writes the packet to w in one Write call.
func (p *Pingreq) WriteTo(w io.Writer) (int64, error) { return writeTo(w, p) }

// WriteTo writes the packet to w in one Write call.
func (p *Pingresp) WriteTo(w io.Writer) (int64, error) { return writeTo(w, p) }

// WriteTo writes the packet to w in one Write call.
func (p *Disconnect) WriteTo(w io.Writer) (int64, error) { return writeTo(w, p) }
