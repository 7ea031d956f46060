package mqtt

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/testutil"
)

// ---------------------------------------------------------------------------
// Test handler and server

type closedEvent struct {
	c   *Conn
	err error
}

// testHandler accepts password "secret", grants what is asked except filters
// under "forbidden/", and records what happens.
type testHandler struct {
	published func(c *Conn, p *Publish) error             // optional
	subscribe func(c *Conn, filter string, qos byte) byte // optional; else forbidden/ is refused
	resume    []Subscription                              // optional: the session kept for CleanSession 0

	accepted chan *Conn
	closed   chan closedEvent

	mu           sync.Mutex
	pubs         []*Publish
	unsubscribed []string
}

func newTestHandler() *testHandler {
	return &testHandler{accepted: make(chan *Conn, 100), closed: make(chan closedEvent, 100)}
}

func (h *testHandler) Authenticate(c *Conn, p *Connect) byte {
	if string(p.Password) != "secret" {
		return RefusedNotAuthorized
	}
	c.SetValue("device:" + p.ClientID)
	if h.resume != nil && !p.CleanSession {
		c.ResumeSession(h.resume)
	}
	h.accepted <- c
	return Accepted
}

func (h *testHandler) Published(c *Conn, p *Publish) error {
	h.mu.Lock()
	h.pubs = append(h.pubs, p)
	h.mu.Unlock()
	if h.published != nil {
		return h.published(c, p)
	}
	return nil
}

func (h *testHandler) Subscribe(c *Conn, filter string, qos byte) byte {
	if h.subscribe != nil {
		return h.subscribe(c, filter, qos)
	}
	if strings.HasPrefix(filter, "forbidden/") {
		return SubscribeFailure
	}
	return qos
}

func (h *testHandler) Unsubscribe(c *Conn, filter string) {
	h.mu.Lock()
	h.unsubscribed = append(h.unsubscribed, filter)
	h.mu.Unlock()
}

func (h *testHandler) Closed(c *Conn, err error) { h.closed <- closedEvent{c, err} }

func (h *testHandler) publishedSoFar() []*Publish {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]*Publish(nil), h.pubs...)
}

func (h *testHandler) waitAccepted(t testing.TB) *Conn {
	t.Helper()
	select {
	case c := <-h.accepted:
		return c
	case <-time.After(5 * time.Second):
		t.Fatal("no connection accepted")
		return nil
	}
}

func (h *testHandler) waitClosed(t testing.TB) closedEvent {
	t.Helper()
	select {
	case e := <-h.closed:
		return e
	case <-time.After(5 * time.Second):
		t.Fatal("Handler.Closed not called")
		return closedEvent{}
	}
}

type testServer struct {
	*Server
	addr    string
	tlsConf *tls.Config // for clients; nil for plain TCP
}

// startServer serves h on a loopback port, over TLS when useTLS.
func startServer(t testing.TB, h Handler, useTLS bool, configure ...func(*Server)) *testServer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{Server: &Server{Handler: h, Logger: testLogger(t)}, addr: l.Addr().String()}
	if useTLS {
		serverConf, clientConf := testTLSConfigs(t)
		l = tls.NewListener(l, serverConf)
		ts.tlsConf = clientConf
	}
	for _, f := range configure {
		f(ts.Server)
	}
	done := make(chan error, 1)
	go func() { done <- ts.Serve(l) }()
	t.Cleanup(func() {
		ts.Close()
		if err := <-done; err != ErrServerClosed {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return ts
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}

var (
	tlsOnce              sync.Once
	tlsServer, tlsClient *tls.Config
	clientCert           tls.Certificate
)

// testTLSConfigs makes a self-signed server certificate for 127.0.0.1 and a
// client certificate for device "x509-device", once per test binary.
func testTLSConfigs(t testing.TB) (server, client *tls.Config) {
	tlsOnce.Do(func() {
		serverCert, serverX509 := selfSigned(t, "hatchery-test-hub", true)
		clientCert, _ = selfSigned(t, "x509-device", false)
		roots := x509.NewCertPool()
		roots.AddCert(serverX509)
		tlsServer = &tls.Config{Certificates: []tls.Certificate{serverCert}, ClientAuth: tls.RequestClientCert}
		tlsClient = &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"}
	})
	return tlsServer.Clone(), tlsClient.Clone()
}

func selfSigned(t testing.TB, cn string, server bool) (tls.Certificate, *x509.Certificate) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.KeyUsage |= x509.KeyUsageCertSign
		tmpl.IsCA, tmpl.BasicConstraintsValid = true, true
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: cert}, cert
}

// ---------------------------------------------------------------------------
// Minimal client over the codec

type client struct {
	t   testing.TB
	nc  net.Conn
	br  *bufio.Reader
	wmu sync.Mutex
}

func (ts *testServer) dial(t testing.TB) *client {
	t.Helper()
	var nc net.Conn
	var err error
	if ts.tlsConf != nil {
		nc, err = tls.Dial("tcp", ts.addr, ts.tlsConf)
	} else {
		nc, err = net.Dial("tcp", ts.addr)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return &client{t: t, nc: nc, br: bufio.NewReader(nc)}
}

func (c *client) write(p Packet) {
	c.t.Helper()
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if _, err := p.WriteTo(c.nc); err != nil {
		c.t.Fatalf("writing %s: %v", p.Type(), err)
	}
}

func (c *client) writeRaw(b []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("writing: %v", err)
	}
}

func (c *client) read() Packet {
	c.t.Helper()
	c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	p, err := ReadPacket(c.br, 0)
	if err != nil {
		c.t.Fatalf("reading: %v", err)
	}
	return p
}

func readAs[T Packet](c *client) T {
	c.t.Helper()
	p := c.read()
	v, ok := p.(T)
	if !ok {
		c.t.Fatalf("read %#v, want %T", p, *new(T))
	}
	return v
}

// expectClosed reads until the server closes the connection.
func (c *client) expectClosed() {
	c.t.Helper()
	c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		p, err := ReadPacket(c.br, 0)
		if err == nil {
			c.t.Logf("read %s while waiting for the close", p.Type())
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			c.t.Fatal("server did not close the connection")
		}
		return
	}
}

func (c *client) connect(id, password string, keepAlive uint16) *Connack {
	c.t.Helper()
	c.write(&Connect{ClientID: id, KeepAlive: keepAlive, CleanSession: false,
		HasUsername: true, Username: "hub.example.net/" + id + "/?api-version=2021-04-12",
		HasPassword: true, Password: []byte(password)})
	return readAs[*Connack](c)
}

// connected dials, connects and waits for the server side of the connection.
func (ts *testServer) connected(t testing.TB, h *testHandler, id string) (*client, *Conn) {
	t.Helper()
	c := ts.dial(t)
	if ack := c.connect(id, "secret", 60); ack.ReturnCode != Accepted {
		t.Fatalf("CONNACK %d", ack.ReturnCode)
	}
	return c, h.waitAccepted(t)
}

func (c *client) subscribe(id uint16, subs ...Subscription) []byte {
	c.t.Helper()
	c.write(&Subscribe{PacketID: id, Subscriptions: subs})
	ack := readAs[*Suback](c)
	if ack.PacketID != id {
		c.t.Fatalf("SUBACK for %d, want %d", ack.PacketID, id)
	}
	return ack.ReturnCodes
}

// ---------------------------------------------------------------------------
// Tests

func forBoth(t *testing.T, f func(t *testing.T, useTLS bool)) {
	for _, useTLS := range []bool{false, true} {
		name := "tcp"
		if useTLS {
			name = "tls"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			f(t, useTLS)
		})
	}
}

func TestConnect(t *testing.T) {
	forBoth(t, func(t *testing.T, useTLS bool) {
		h := newTestHandler()
		ts := startServer(t, h, useTLS)

		c := ts.dial(t)
		ack := c.connect("dev-1", "secret", 60)
		if ack.ReturnCode != Accepted || ack.SessionPresent {
			t.Fatalf("CONNACK %+v, want accepted without session (CleanSession=false is treated as true)", ack)
		}
		sc := h.waitAccepted(t)
		if sc.ClientID() != "dev-1" || sc.Value() != "device:dev-1" {
			t.Errorf("ClientID %q, Value %v", sc.ClientID(), sc.Value())
		}
		if sc.RemoteAddr().String() != c.nc.LocalAddr().String() {
			t.Errorf("RemoteAddr %v, want %v", sc.RemoteAddr(), c.nc.LocalAddr())
		}
		if (sc.TLS() != nil) != useTLS {
			t.Errorf("TLS() = %v with TLS %v", sc.TLS(), useTLS)
		}
		c.write(&Pingreq{})
		readAs[*Pingresp](c)
		c.write(&Disconnect{})
		c.expectClosed()
		if e := h.waitClosed(t); e.c != sc || e.err != nil {
			t.Errorf("Closed(%v, %v), want the connection and nil", e.c, e.err)
		}

		// Refused: CONNACK 5, then the server closes; Closed is not called.
		c = ts.dial(t)
		if ack := c.connect("dev-2", "wrong", 60); ack.ReturnCode != RefusedNotAuthorized || ack.SessionPresent {
			t.Fatalf("CONNACK %+v, want return code 5", ack)
		}
		c.expectClosed()
		select {
		case e := <-h.closed:
			t.Errorf("Closed called for a refused connection: %v", e.err)
		case <-time.After(50 * time.Millisecond):
		}
	})
}

func TestConnectMQTT31(t *testing.T) {
	h := newTestHandler()
	ts := startServer(t, h, false)
	c := ts.dial(t)
	c.write(&Connect{ProtocolName: "MQIsdp", ProtocolLevel: 3, ClientID: "old",
		HasUsername: true, Username: "u", HasPassword: true, Password: []byte("secret")})
	if ack := readAs[*Connack](c); ack.ReturnCode != Accepted {
		t.Fatalf("CONNACK %d", ack.ReturnCode)
	}
}

func TestUnacceptableProtocolLevel(t *testing.T) {
	h := newTestHandler()
	ts := startServer(t, h, false)
	c := ts.dial(t)
	c.writeRaw(raw(0x10, connectHeader("MQTT", 5, 2), bs(0), str("mqtt5-client")))
	if ack := readAs[*Connack](c); ack.ReturnCode != RefusedProtocolVersion {
		t.Fatalf("CONNACK %d, want 1", ack.ReturnCode)
	}
	c.expectClosed()
}

func TestProtocolViolationsClose(t *testing.T) {
	tests := []struct {
		name    string
		connect bool // send a valid CONNECT first
		send    []byte
		want    error
	}{
		{"packet before CONNECT", false, bs(0xc0, 0), ErrProtocolViolation},
		{"second CONNECT", true, mustEncode(&Connect{ClientID: "x"}), ErrProtocolViolation},
		{"reserved flags", true, bs(0xc1, 0), ErrMalformed},
		{"QoS 2 PUBLISH", true, mustEncode(&Publish{QoS: 2, PacketID: 1, Topic: "devices/d/messages/events/"}), ErrProtocolViolation},
		{"PUBREL", true, bs(0x62, 2, 0, 1), ErrMalformed},
		{"CONNACK from client", true, bs(0x20, 2, 0, 0), ErrProtocolViolation},
		{"bad topic filter", true, raw(0x82, bs(0, 1), str("a/#/b"), bs(1)), ErrMalformed},
		{"oversized PUBLISH", true, mustEncode(&Publish{Topic: "devices/d/messages/events/", Payload: make([]byte, 2000)}), ErrPacketTooLarge},
		{"SUBSCRIBE with too many filters", true, mustEncode(&Subscribe{PacketID: 1, Subscriptions: filters("f/", DefaultMaxSubscribeFilters+1)}), ErrProtocolViolation},
		{"UNSUBSCRIBE with too many filters", true, mustEncode(&Unsubscribe{PacketID: 1, Filters: filterNames(filters("f/", DefaultMaxSubscribeFilters+1))}), ErrProtocolViolation},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h := newTestHandler()
			ts := startServer(t, h, false, func(s *Server) { s.MaxPacketSize = 1024 })
			c := ts.dial(t)
			if tt.connect {
				if ack := c.connect("d", "secret", 60); ack.ReturnCode != Accepted {
					t.Fatalf("CONNACK %d", ack.ReturnCode)
				}
			}
			c.writeRaw(tt.send)
			c.expectClosed()
			if tt.connect {
				if e := h.waitClosed(t); !errors.Is(e.err, tt.want) {
					t.Errorf("Closed with %v, want %v", e.err, tt.want)
				} else {
					t.Logf("Closed: %v", e.err)
				}
			}
			if n := len(h.publishedSoFar()); n != 0 {
				t.Errorf("Published called %d times", n)
			}
		})
	}
}

// A retained PUBLISH is accepted, as Azure IoT Hub does, with its flag
// passed to the Handler; nothing is retained.
func TestRetainedPublishAccepted(t *testing.T) {
	t.Parallel()
	h := newTestHandler()
	ts := startServer(t, h, false)
	c, _ := ts.connected(t, h, "d")
	c.write(&Publish{QoS: 1, PacketID: 7, Retain: true, Topic: "devices/d/messages/events/", Payload: []byte("x")})
	if ack := readAs[*Puback](c); ack.PacketID != 7 {
		t.Fatalf("PUBACK for %d", ack.PacketID)
	}
	if pubs := h.publishedSoFar(); len(pubs) != 1 || !pubs[0].Retain {
		t.Fatalf("published %+v", pubs)
	}
}

// filters is n subscriptions at QoS 1 to prefix followed by a number.
func filters(prefix string, n int) []Subscription {
	subs := make([]Subscription, n)
	for i := range subs {
		subs[i] = Subscription{Filter: prefix + strconv.Itoa(i), QoS: 1}
	}
	return subs
}

// Filters a Handler refuses are logged once a SUBSCRIBE, however many
// there are, with a count and an example.
func TestRefusedSubscriptionsLoggedOnce(t *testing.T) {
	t.Parallel()
	h := newTestHandler()
	var log testutil.SyncBuffer
	ts := startServer(t, h, false, func(s *Server) { s.Logger = slog.New(slog.NewTextHandler(&log, nil)) })
	c, _ := ts.connected(t, h, "d")
	codes := c.subscribe(1, append(filters("forbidden/", DefaultMaxSubscribeFilters-1), Subscription{Filter: "allowed", QoS: 1})...)
	if codes[0] != SubscribeFailure || codes[len(codes)-1] != 1 {
		t.Fatalf("SUBACK %v", codes)
	}
	if n := strings.Count(log.String(), "subscriptions refused"); n != 1 {
		t.Fatalf("%d log lines for one SUBSCRIBE:\n%s", n, log.String())
	}
	if want := `refused=63 of=64 filter="\"forbidden/0\""`; !strings.Contains(log.String(), want) {
		t.Errorf("log %q lacks %s", log.String(), want)
	}
	// A client that keeps trying is heard once at Info.
	for i := range 5 {
		c.subscribe(uint16(2+i), Subscription{Filter: "forbidden/again", QoS: 1})
	}
	if n := strings.Count(log.String(), "subscriptions refused"); n != 1 {
		t.Fatalf("%d log lines at Info for six refused SUBSCRIBEs:\n%s", n, log.String())
	}
}

func filterNames(subs []Subscription) []string {
	names := make([]string, len(subs))
	for i, s := range subs {
		names[i] = s.Filter
	}
	return names
}

func mustEncode(p Packet) []byte {
	b, err := p.Encode(nil)
	if err != nil {
		panic(err)
	}
	return b
}

func TestSubscribePublish(t *testing.T) {
	forBoth(t, func(t *testing.T, useTLS bool) {
		h := newTestHandler()
		h.published = func(c *Conn, p *Publish) error {
			switch {
			case p.Topic == "$iothub/twin/GET/?$rid=1":
				return c.Send("$iothub/twin/res/200/?$rid=1", []byte(`{"desired":{}}`), 0, nil)
			case strings.HasSuffix(p.Topic, "/fail"):
				return errors.New("store unavailable")
			}
			return nil
		}
		ts := startServer(t, h, useTLS)
		c, sc := ts.connected(t, h, "dev-1")

		codes := c.subscribe(1,
			Subscription{"devices/dev-1/messages/devicebound/#", 1},
			Subscription{"$iothub/twin/res/#", 2}, // QoS 2 is granted as 1
			Subscription{"forbidden/#", 1},
			Subscription{"$iothub/methods/POST/#", 0},
		)
		if !bytes.Equal(codes, []byte{1, 1, 0x80, 0}) {
			t.Fatalf("SUBACK codes %v, want [1 1 128 0]", codes)
		}
		if !sc.Subscribed("$iothub/methods/POST/reboot/?$rid=2") || sc.Subscribed("forbidden/x") || sc.Subscribed("$iothub/twin/PATCH/properties/desired/?$version=2") {
			t.Error("Subscribed reports wrong subscriptions")
		}

		// QoS 1 telemetry gets its PUBACK after Published.
		c.write(&Publish{QoS: 1, PacketID: 42, Topic: "devices/dev-1/messages/events/a=b", Payload: []byte("hello")})
		if ack := readAs[*Puback](c); ack.PacketID != 42 {
			t.Fatalf("PUBACK %d, want 42", ack.PacketID)
		}
		// QoS 0 gets none: the next packet is the twin response.
		c.write(&Publish{Topic: "devices/dev-1/messages/events/", Payload: []byte("q0")})
		c.write(&Publish{Topic: "$iothub/twin/GET/?$rid=1"})
		res := readAs[*Publish](c)
		if res.Topic != "$iothub/twin/res/200/?$rid=1" || res.QoS != 0 || string(res.Payload) != `{"desired":{}}` {
			t.Fatalf("twin response %+v", res)
		}
		pubs := h.publishedSoFar()
		if len(pubs) != 3 || string(pubs[0].Payload) != "hello" || pubs[0].QoS != 1 || string(pubs[1].Payload) != "q0" {
			t.Fatalf("Published got %+v", pubs)
		}

		// Unsubscribe.
		c.write(&Unsubscribe{PacketID: 7, Filters: []string{"$iothub/twin/res/#"}})
		if ack := readAs[*Unsuback](c); ack.PacketID != 7 {
			t.Fatalf("UNSUBACK %d", ack.PacketID)
		}
		if sc.Subscribed("$iothub/twin/res/200/?$rid=1") {
			t.Error("still subscribed after UNSUBSCRIBE")
		}
		if err := sc.Send("$iothub/twin/res/200/?$rid=2", nil, 0, nil); err != ErrNotSubscribed {
			t.Errorf("Send after UNSUBSCRIBE = %v, want ErrNotSubscribed", err)
		}

		// A handler error closes the connection without PUBACK.
		c.write(&Publish{QoS: 1, PacketID: 43, Topic: "devices/dev-1/messages/events/fail"})
		c.expectClosed()
		if e := h.waitClosed(t); e.err == nil || !strings.Contains(e.err.Error(), "store unavailable") {
			t.Errorf("Closed with %v, want the handler's error", e.err)
		}
	})
}

func TestSend(t *testing.T) {
	forBoth(t, func(t *testing.T, useTLS bool) {
		h := newTestHandler()
		ts := startServer(t, h, useTLS)
		c, sc := ts.connected(t, h, "dev-1")
		c.subscribe(1,
			Subscription{"devices/dev-1/messages/devicebound/#", 1},
			Subscription{"$iothub/methods/POST/#", 0})

		if err := sc.Send("devices/dev-2/messages/devicebound/x", nil, 1, nil); err != ErrNotSubscribed {
			t.Errorf("Send to an unsubscribed topic = %v, want ErrNotSubscribed", err)
		}
		if err := sc.Send("devices/+", nil, 1, nil); err == nil {
			t.Error("Send to a wildcard topic succeeded")
		}

		// QoS 1 with onAck.
		acked := make(chan error, 1)
		if err := sc.Send("devices/dev-1/messages/devicebound/%24.mid=1", []byte("c2d"), 1, func(err error) { acked <- err }); err != nil {
			t.Fatal(err)
		}
		p := readAs[*Publish](c)
		if p.QoS != 1 || p.PacketID == 0 || string(p.Payload) != "c2d" {
			t.Fatalf("received %+v", p)
		}
		select {
		case err := <-acked:
			t.Fatalf("onAck(%v) before PUBACK", err)
		case <-time.After(20 * time.Millisecond):
		}
		c.write(&Puback{PacketID: p.PacketID})
		select {
		case err := <-acked:
			if err != nil {
				t.Fatalf("onAck(%v)", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("onAck not called after PUBACK")
		}

		// QoS 1 asked, QoS 0 granted: delivered at QoS 0, onAck(nil) at once.
		called := false
		if err := sc.Send("$iothub/methods/POST/reboot/?$rid=1", []byte("{}"), 1, func(err error) { called = err == nil }); err != nil || !called {
			t.Fatalf("Send = %v, onAck called %v", err, called)
		}
		if p := readAs[*Publish](c); p.QoS != 0 || p.PacketID != 0 {
			t.Fatalf("received %+v, want QoS 0", p)
		}

		// Unacknowledged when the connection ends: onAck gets ErrConnClosed.
		if err := sc.Send("devices/dev-1/messages/devicebound/x", []byte("lost"), 1, func(err error) { acked <- err }); err != nil {
			t.Fatal(err)
		}
		readAs[*Publish](c)
		c.nc.Close()
		select {
		case err := <-acked:
			if !errors.Is(err, ErrConnClosed) {
				t.Fatalf("onAck(%v), want ErrConnClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("onAck not called when the connection closed")
		}
		h.waitClosed(t)
		if err := sc.Send("devices/dev-1/messages/devicebound/x", nil, 1, nil); err != ErrConnClosed {
			t.Errorf("Send after close = %v, want ErrConnClosed", err)
		}
	})
}

func TestKeepAliveTimeout(t *testing.T) {
	t.Parallel()
	h := newTestHandler()
	ts := startServer(t, h, false)
	c := ts.dial(t)
	start := time.Now()
	if ack := c.connect("sleepy", "secret", 1); ack.ReturnCode != Accepted {
		t.Fatal(ack.ReturnCode)
	}
	// A PINGREQ at 1 s keeps the connection for another 1.5 s.
	time.Sleep(time.Second)
	c.write(&Pingreq{})
	readAs[*Pingresp](c)
	c.expectClosed()
	elapsed := time.Since(start)
	if elapsed < 2400*time.Millisecond || elapsed > 6*time.Second {
		t.Errorf("closed after %v, want about 2.5 s", elapsed)
	}
	if e := h.waitClosed(t); !errors.Is(e.err, ErrKeepAliveTimeout) {
		t.Errorf("Closed with %v, want ErrKeepAliveTimeout", e.err)
	}
}

// A client whose packets span its writes keeps the server's read buffer
// from running empty; each packet it starts still renews its keep-alive.
func TestKeepAliveWhilePacketsSpanWrites(t *testing.T) {
	t.Parallel()
	h := newTestHandler()
	ts := startServer(t, h, false)
	c := ts.dial(t)
	if ack := c.connect("split", "secret", 1); ack.ReturnCode != Accepted {
		t.Fatal(ack.ReturnCode)
	}
	// PINGREQs (C0 00), every write the end of one and the start of the
	// next, for twice the 1.5 s keep-alive.
	c.writeRaw([]byte{0xC0})
	for range 8 {
		time.Sleep(400 * time.Millisecond)
		c.writeRaw([]byte{0x00, 0xC0})
		readAs[*Pingresp](c)
	}
	c.writeRaw([]byte{0x00})
	readAs[*Pingresp](c)
}

func TestConnectTimeout(t *testing.T) {
	t.Parallel()
	h := newTestHandler()
	ts := startServer(t, h, true, func(s *Server) { s.ConnectTimeout = 300 * time.Millisecond })
	// Plain TCP to the TLS port, never handshaking.
	nc, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	start := time.Now()
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(nc); err != nil {
		t.Fatalf("waiting for the close: %v", err)
	}
	if d := time.Since(start); d < 250*time.Millisecond || d > 3*time.Second {
		t.Errorf("closed after %v, want about 300ms", d)
	}

	// TLS but no CONNECT.
	c := ts.dial(t)
	start = time.Now()
	c.expectClosed()
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("closed after %v, want about 300ms", d)
	}
}

func TestX509ClientCertificate(t *testing.T) {
	h := newTestHandler()
	ts := startServer(t, h, true)
	ts.tlsConf.Certificates = []tls.Certificate{clientCert}
	c := ts.dial(t)
	c.write(&Connect{ClientID: "x509-device", HasUsername: true, Username: "hub/x509-device/?api-version=2021-04-12", HasPassword: true, Password: []byte("secret")})
	readAs[*Connack](c)
	sc := h.waitAccepted(t)
	st := sc.TLS()
	if st == nil || len(st.PeerCertificates) != 1 || st.PeerCertificates[0].Subject.CommonName != "x509-device" {
		t.Fatalf("TLS state %+v, want the client certificate", st)
	}
}

func TestConcurrentSends(t *testing.T) {
	forBoth(t, func(t *testing.T, useTLS bool) {
		h := newTestHandler()
		ts := startServer(t, h, useTLS)
		c, sc := ts.connected(t, h, "dev-1")
		c.subscribe(1, Subscription{"devices/dev-1/messages/devicebound/#", 1})

		const senders, each = 32, 100
		// The client acknowledges every message and counts payloads.
		got := make(map[string]bool)
		clientDone := make(chan error, 1)
		go func() {
			for len(got) < senders*each {
				c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
				p, err := ReadPacket(c.br, 0)
				if err != nil {
					clientDone <- err
					return
				}
				pub, ok := p.(*Publish)
				if !ok || pub.QoS != 1 {
					clientDone <- fmt.Errorf("unexpected %#v", p)
					return
				}
				if got[string(pub.Payload)] {
					clientDone <- fmt.Errorf("duplicate %s", pub.Payload)
					return
				}
				got[string(pub.Payload)] = true
				var ack [4]byte
				b, _ := (&Puback{PacketID: pub.PacketID}).Encode(ack[:0])
				c.wmu.Lock()
				_, err = c.nc.Write(b)
				c.wmu.Unlock()
				if err != nil {
					clientDone <- err
					return
				}
			}
			clientDone <- nil
		}()

		var wg, acks sync.WaitGroup
		acks.Add(senders * each)
		var ackErrs sync.Map
		for i := range senders {
			wg.Go(func() {
				for j := range each {
					msg := fmt.Sprintf("m-%d-%d", i, j)
					err := sc.Send("devices/dev-1/messages/devicebound/x", []byte(msg), 1, func(err error) {
						if err != nil {
							ackErrs.Store(msg, err)
						}
						acks.Done()
					})
					if err != nil {
						t.Errorf("Send: %v", err)
						acks.Done()
					}
				}
			})
		}
		wg.Wait()
		if err := <-clientDone; err != nil {
			t.Fatalf("client: %v", err)
		}
		acks.Wait()
		ackErrs.Range(func(k, v any) bool { t.Errorf("onAck(%v) for %v", v, k); return true })
		sc.mu.Lock()
		left := len(sc.inflight)
		sc.mu.Unlock()
		if left != 0 {
			t.Errorf("%d messages still in flight", left)
		}
	})
}

func TestSlowClientIsClosed(t *testing.T) {
	t.Parallel()
	h := newTestHandler()
	ts := startServer(t, h, true, func(s *Server) { s.WriteTimeout = 200 * time.Millisecond })
	c, sc := ts.connected(t, h, "slow")
	c.subscribe(1, Subscription{"devices/slow/messages/devicebound/#", 0})
	// The client stops reading; Send must not block for long.
	payload := make([]byte, 64<<10)
	start := time.Now()
	var err error
	for i := 0; i < 10000 && err == nil; i++ {
		err = sc.Send("devices/slow/messages/devicebound/x", payload, 0, nil)
	}
	if err == nil {
		t.Fatal("640 MB sent to a client that does not read")
	}
	t.Logf("Send failed after %v: %v", time.Since(start), err)
	if e := h.waitClosed(t); e.err == nil || !strings.Contains(e.err.Error(), "did not read") {
		t.Errorf("Closed with %v", e.err)
	}
}

func TestServerClose(t *testing.T) {
	h := newTestHandler()
	ts := startServer(t, h, true)
	var clients []*client
	for i := range 5 {
		c, _ := ts.connected(t, h, fmt.Sprintf("dev-%d", i))
		clients = append(clients, c)
	}
	if err := ts.Close(); err != nil {
		t.Fatal(err)
	}
	for range clients {
		if e := h.waitClosed(t); !errors.Is(e.err, ErrServerClosed) {
			t.Errorf("Closed with %v, want ErrServerClosed", e.err)
		}
	}
	for _, c := range clients {
		c.expectClosed()
	}
	if _, err := net.Dial("tcp", ts.addr); err == nil {
		t.Error("listener still accepts")
	}
}

func TestConnClose(t *testing.T) {
	h := newTestHandler()
	ts := startServer(t, h, false)
	c, sc := ts.connected(t, h, "dev-1")
	sc.Close()
	c.expectClosed()
	if e := h.waitClosed(t); e.err != ErrConnClosed {
		t.Errorf("Closed with %v, want ErrConnClosed", e.err)
	}
}

func TestHandlerPanicClosesOnlyThatConnection(t *testing.T) {
	h := newTestHandler()
	h.published = func(c *Conn, p *Publish) error {
		if p.Topic == "boom" {
			panic("handler bug")
		}
		return nil
	}
	ts := startServer(t, h, false)
	c1, _ := ts.connected(t, h, "dev-1")
	c2, _ := ts.connected(t, h, "dev-2")
	c1.write(&Publish{Topic: "boom"})
	c1.expectClosed()
	if e := h.waitClosed(t); e.err == nil || !strings.Contains(e.err.Error(), "handler bug") {
		t.Errorf("Closed with %v", e.err)
	}
	c2.write(&Publish{QoS: 1, PacketID: 1, Topic: "fine"})
	readAs[*Puback](c2)
}

// What the handler sends on a filter while subscribing it reaches the
// client (before the SUBACK, as MQTT permits); a filter refused on a second
// SUBSCRIBE keeps what the first granted.
func TestSendWhileSubscribing(t *testing.T) {
	h := newTestHandler()
	var sendErr error
	refuse := false
	h.subscribe = func(c *Conn, filter string, qos byte) byte {
		switch {
		case filter == "welcome/#":
			sendErr = c.Send("welcome/1", []byte("hi"), 1, nil)
		case refuse:
			return SubscribeFailure
		}
		return qos
	}
	ts := startServer(t, h, false)
	c, sc := ts.connected(t, h, "dev-1")
	c.write(&Subscribe{PacketID: 1, Subscriptions: []Subscription{{"welcome/#", 1}}})
	if p := readAs[*Publish](c); p.Topic != "welcome/1" || string(p.Payload) != "hi" || p.QoS != 1 {
		t.Fatalf("sent while subscribing: %+v", p)
	}
	if ack := readAs[*Suback](c); ack.PacketID != 1 || !bytes.Equal(ack.ReturnCodes, []byte{1}) {
		t.Fatalf("SUBACK %+v", ack)
	}
	if sendErr != nil {
		t.Fatalf("Send while subscribing: %v", sendErr)
	}

	if codes := c.subscribe(2, Subscription{"flip/#", 1}); !bytes.Equal(codes, []byte{1}) {
		t.Fatalf("first SUBSCRIBE: %v", codes)
	}
	refuse = true
	if codes := c.subscribe(3, Subscription{"flip/#", 0}, Subscription{"new/#", 1}); !bytes.Equal(codes, []byte{0x80, 0x80}) {
		t.Fatalf("refused SUBSCRIBE: %v", codes)
	}
	if !sc.Subscribed("flip/x") || sc.Subscribed("new/x") {
		t.Fatal("a refused SUBSCRIBE changed the subscriptions")
	}
	if err := sc.Send("flip/x", []byte("q"), 1, nil); err != nil {
		t.Fatal(err)
	}
	if p := readAs[*Publish](c); p.QoS != 1 {
		t.Fatalf("a refused SUBSCRIBE changed the granted QoS: %+v", p)
	}
}

// A session the Handler kept is resumed: CONNACK says so, and the client
// is subscribed again to what the Handler still grants, without a SUBACK.
func TestResumeSession(t *testing.T) {
	h := newTestHandler()
	h.resume = []Subscription{{"$iothub/methods/POST/#", 0}, {"forbidden/x", 1}}
	ts := startServer(t, h, false)
	c := ts.dial(t)
	if ack := c.connect("dev-1", "secret", 60); ack.ReturnCode != Accepted || !ack.SessionPresent {
		t.Fatalf("CONNACK %+v, want accepted with a session present", ack)
	}
	sc := h.waitAccepted(t)
	// The server reads the client's next packet once the session is
	// resumed: a PINGRESP says it is.
	c.write(&Pingreq{})
	readAs[*Pingresp](c)
	if err := sc.Send("$iothub/methods/POST/reboot/?$rid=1", []byte("{}"), 0, nil); err != nil {
		t.Fatalf("Send on a resumed subscription: %v", err)
	}
	if p := readAs[*Publish](c); p.Topic != "$iothub/methods/POST/reboot/?$rid=1" {
		t.Fatalf("received %+v", p)
	}
	if err := sc.Send("forbidden/x", nil, 0, nil); err != ErrNotSubscribed {
		t.Fatalf("Send on a resumed filter the handler refused: %v", err)
	}

	h.resume = nil
	c2 := ts.dial(t)
	if ack := c2.connect("dev-2", "secret", 60); ack.SessionPresent {
		t.Fatalf("CONNACK %+v without a kept session", ack)
	}
}
