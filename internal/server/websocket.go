package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync/atomic"
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
		nc := &wsStream{Conn: websocket.NetConn(context.Background(), ws, websocket.MessageBinary), ws: ws}
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
//
// It also reports a passed deadline as a TCP or TLS connection does, with
// os.ErrDeadlineExceeded, which the MQTT server looks for to tell a client
// silent past its keep-alive or not reading from a broken connection: the
// WebSocket's stream says context.DeadlineExceeded, or context.Canceled
// when the deadline cut a read or write short.
type wsStream struct {
	net.Conn
	ws              *websocket.Conn
	readBy, writeBy atomic.Int64 // deadlines in Unix nanoseconds; 0 for none
}

func (s *wsStream) CloseNow() error { return s.ws.CloseNow() }

func (s *wsStream) Read(p []byte) (int, error) {
	n, err := s.Conn.Read(p)
	return n, timedOut(err, &s.readBy)
}

func (s *wsStream) Write(p []byte) (int, error) {
	n, err := s.Conn.Write(p)
	return n, timedOut(err, &s.writeBy)
}

func (s *wsStream) SetDeadline(t time.Time) error {
	s.readBy.Store(unixNano(t))
	s.writeBy.Store(unixNano(t))
	return s.Conn.SetDeadline(t)
}

func (s *wsStream) SetReadDeadline(t time.Time) error {
	s.readBy.Store(unixNano(t))
	return s.Conn.SetReadDeadline(t)
}

func (s *wsStream) SetWriteDeadline(t time.Time) error {
	s.writeBy.Store(unixNano(t))
	return s.Conn.SetWriteDeadline(t)
}

func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

// timedOut is err as os.ErrDeadlineExceeded if it is the stream's context
// ending and the deadline by has passed.
func timedOut(err error, by *atomic.Int64) error {
	if err == nil || !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	if d := by.Load(); d == 0 || time.Now().UnixNano() < d {
		return err // closed, not timed out
	}
	return fmt.Errorf("%w (%w)", os.ErrDeadlineExceeded, err)
}
