package server

import (
	"context"
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/coder/websocket"

	"github.com/hatchery/hatchery/internal/mqtt"
)

// mqttOverWebSocket serves the hub's MQTT device endpoint inside a
// WebSocket on the HTTPS port (GET /$iothub/websocket, subprotocol mqtt),
// as the SDKs' MqttWs transports connect from networks that let only 443
// out. The MQTT server authenticates and bounds the connection as on 8883;
// a device's client certificate comes from the HTTPS connection.
func mqttOverWebSocket(devices *mqtt.Server) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		// The HTTP server's read and write deadlines would end the
		// connection after its first 30 s: MQTT keep-alives take over.
		rc := http.NewResponseController(w)
		_ = rc.SetReadDeadline(time.Time{})
		_ = rc.SetWriteDeadline(time.Time{})
		ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{"mqtt"}})
		if err != nil {
			return // Accept answered the client
		}
		if ws.Subprotocol() != "mqtt" {
			ws.Close(websocket.StatusPolicyViolation, "this endpoint speaks the mqtt subprotocol")
			return
		}
		nc := wsStream{websocket.NetConn(context.Background(), ws, websocket.MessageBinary), ws}
		// After NetConn, which lifts the limit: a message holds a packet, or a few.
		ws.SetReadLimit(2 * int64(max(devices.MaxPacketSize, mqtt.DefaultMaxPacketSize)))
		switch err := devices.ServeConn(nc, r.TLS); {
		case errors.Is(err, mqtt.ErrTooManyConnections):
			ws.CloseNow() // at once, as the MQTT port closes what is past its bound
		case err != nil:
			ws.Close(websocket.StatusGoingAway, "the server is stopping")
		}
	}
}

// wsStream is the MQTT stream of a WebSocket, which the MQTT server closes
// at once when it ends the connection itself (to make room for another,
// say): a client that does not answer the close handshake would keep the
// connection open for seconds.
type wsStream struct {
	net.Conn
	ws *websocket.Conn
}

func (s wsStream) CloseNow() error { return s.ws.CloseNow() }
