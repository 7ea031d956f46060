package server

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/hatchery/hatchery/internal/mqtt"
	"github.com/hatchery/hatchery/internal/testutil"
)

// startWebSocket serves the HTTPS port with MQTT over WebSocket, and
// returns how to dial it with cert.
func (e *env) startWebSocket(t *testing.T, cert tls.Certificate) func(protocols ...string) (*websocket.Conn, error) {
	t.Helper()
	devices := &mqtt.Server{Handler: NewDeviceEndpoint(e.hub)}
	t.Cleanup(func() { devices.Close() })
	ts := httptest.NewUnstartedServer(New(e.dps, e.hub, devices))
	ts.TLS = &tls.Config{ClientAuth: tls.RequestClientCert}
	ts.StartTLS()
	t.Cleanup(ts.Close)
	url := "wss" + strings.TrimPrefix(ts.URL, "https") + "/$iothub/websocket?iothub-no-client-cert=false"
	return func(protocols ...string) (*websocket.Conn, error) {
		conf := ts.Client().Transport.(*http.Transport).TLSClientConfig.Clone()
		conf.Certificates = []tls.Certificate{cert}
		ws, _, err := websocket.Dial(context.Background(), url, &websocket.DialOptions{Subprotocols: protocols,
			HTTPClient: &http.Client{Transport: &http.Transport{TLSClientConfig: conf}}})
		return ws, err
	}
}

// wsDevice connects the X.509 device ws-1 over MQTT over WebSocket, with
// keepAlive, and returns it, connected, and the dial for more.
func wsDevice(t *testing.T, keepAlive uint16) (*rawClient, func(protocols ...string) (*websocket.Conn, error)) {
	t.Helper()
	e := newEnv(t)
	cert := testutil.NewCert(t, "ws-1", false, nil)
	e.putX509Device(t, "ws-1", cert, false)
	dial := e.startWebSocket(t, cert)
	ws, err := dial("mqtt")
	if err != nil {
		t.Fatal(err)
	}
	conn := websocket.NetConn(context.Background(), ws, websocket.MessageBinary)
	t.Cleanup(func() { conn.Close() })
	c := &rawClient{t: t, conn: conn, rd: bufio.NewReader(conn)}
	c.write(&mqtt.Connect{ProtocolLevel: 4, CleanSession: true, KeepAlive: keepAlive, ClientID: "ws-1",
		HasUsername: true, Username: host + "/ws-1/?api-version=2021-04-12"})
	if ack, ok := c.read().(*mqtt.Connack); !ok || ack.ReturnCode != mqtt.Accepted {
		t.Fatalf("CONNACK %+v", ack)
	}
	return c, dial
}

// MQTT over WebSocket on the HTTPS port is the device endpoint of 8883: an
// X.509 device is authenticated by the certificate it gave the HTTPS
// connection; another subprotocol is refused.
func TestMQTTOverWebSocket(t *testing.T) {
	c, dial := wsDevice(t, 60)
	if code := c.subscribe("$iothub/twin/res/#"); code == mqtt.SubscribeFailure {
		t.Fatal("twin responses refused over WebSocket")
	}
	c.publish("$iothub/twin/GET/?$rid=7", nil)
	for {
		if p, ok := c.read().(*mqtt.Publish); ok && strings.HasPrefix(p.Topic, "$iothub/twin/res/200/?$rid=7") {
			break
		}
	}

	if ws, err := dial("chat"); err == nil {
		if _, _, err := ws.Read(context.Background()); websocket.CloseStatus(err) != websocket.StatusPolicyViolation {
			t.Fatalf("another subprotocol: %v", err)
		}
	}
}

// A client silent past its keep-alive over WebSocket is closed as one over
// TCP is, for the keep-alive (logged at Info), not a network error.
func TestMQTTOverWebSocketKeepAlive(t *testing.T) {
	log := captureLog(t)
	c, _ := wsDevice(t, 1)
	if _, err := c.tryRead(); err == nil {
		t.Fatal("a packet, not the connection closed for the keep-alive")
	}
	want := mqtt.ErrKeepAliveTimeout.Error()
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(log.String(), want); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no %q logged:\n%s", want, log)
		}
	}
}

// A write past its deadline fails with os.ErrDeadlineExceeded, as on TCP,
// for the MQTT server to tell a client that stopped reading.
func TestWebSocketWriteDeadline(t *testing.T) {
	e := newEnv(t)
	cert := testutil.NewCert(t, "ws-1", false, nil)
	ws, err := e.startWebSocket(t, cert)("mqtt")
	if err != nil {
		t.Fatal(err)
	}
	s := &wsStream{Conn: websocket.NetConn(context.Background(), ws, websocket.MessageBinary), ws: ws}
	defer s.CloseNow()
	_ = s.SetWriteDeadline(time.Now())
	time.Sleep(20 * time.Millisecond) // for the stream's timer to fire
	if _, err := s.Write([]byte{0xc0, 0}); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write past the deadline: %v, want os.ErrDeadlineExceeded", err)
	}
}
