package server

import (
	"bufio"
	"context"
	"crypto/tls"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/coder/websocket"

	"github.com/hatchery/hatchery/internal/mqtt"
	"github.com/hatchery/hatchery/internal/testutil"
)

// MQTT over WebSocket on the HTTPS port is the device endpoint of 8883: an
// X.509 device is authenticated by the certificate it gave the HTTPS
// connection; another subprotocol is refused.
func TestMQTTOverWebSocket(t *testing.T) {
	e := newEnv(t)
	cert := testutil.NewCert(t, "ws-1", false, nil)
	e.putX509Device(t, "ws-1", cert, false)
	devices := &mqtt.Server{Handler: NewDeviceEndpoint(e.hub)}
	defer devices.Close()
	ts := httptest.NewUnstartedServer(New(e.dps, e.hub, devices))
	ts.TLS = &tls.Config{ClientAuth: tls.RequestClientCert}
	ts.StartTLS()
	defer ts.Close()
	url := "wss" + strings.TrimPrefix(ts.URL, "https") + "/$iothub/websocket?iothub-no-client-cert=false"
	dial := func(protocols ...string) (*websocket.Conn, error) {
		conf := ts.Client().Transport.(*http.Transport).TLSClientConfig.Clone()
		conf.Certificates = []tls.Certificate{cert}
		ws, _, err := websocket.Dial(context.Background(), url, &websocket.DialOptions{Subprotocols: protocols,
			HTTPClient: &http.Client{Transport: &http.Transport{TLSClientConfig: conf}}})
		return ws, err
	}

	ws, err := dial("mqtt")
	if err != nil {
		t.Fatal(err)
	}
	conn := websocket.NetConn(context.Background(), ws, websocket.MessageBinary)
	defer conn.Close()
	c := &rawClient{t: t, conn: conn, rd: bufio.NewReader(conn)}
	c.write(&mqtt.Connect{ProtocolLevel: 4, CleanSession: true, KeepAlive: 60, ClientID: "ws-1",
		HasUsername: true, Username: host + "/ws-1/?api-version=2021-04-12"})
	if ack, ok := c.read().(*mqtt.Connack); !ok || ack.ReturnCode != mqtt.Accepted {
		t.Fatalf("CONNACK %+v", ack)
	}
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
