package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/hatchery/hatchery/internal/connlimit"
	"github.com/hatchery/hatchery/internal/mqtt"
	"github.com/hatchery/hatchery/internal/sas"
)

// loopback is where and how this machine reaches c's server.
func (c *cli) loopback() *loopback {
	c.t.Helper()
	_, lb := c.site()
	return lb
}

// site is what `hatchery info` says of c's installation, and where and how
// this machine reaches its server.
func (c *cli) site() (siteInfo, *loopback) {
	c.t.Helper()
	var info siteInfo
	if err := json.Unmarshal([]byte(c.ok("info", "-o", "json")), &info); err != nil {
		c.t.Fatal(err)
	}
	lb, err := info.loopback()
	if err != nil {
		c.t.Fatal(err)
	}
	return info, lb
}

// Idle keep-alive connections filling --max-https-connections do not keep a
// new client from being answered: the one idle longest is closed for it.
func TestIdleHTTPSConnectionsMakeRoom(t *testing.T) {
	c := startServeOn(t, "--max-https-connections", "4")
	lb := c.loopback()
	addr := strings.TrimPrefix(lb.url, "https://")
	for range 4 {
		conn, err := tls.Dial("tcp", addr, lb.tls)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	// Idle connections last 2 minutes: a client left waiting for one to
	// close would not be answered within this.
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: lb.tls}}
	defer client.CloseIdleConnections()
	resp, err := client.Get(lb.url + "/healthz")
	if err != nil {
		t.Fatalf("a new client while idle connections fill the bound: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /healthz: HTTP %d", resp.StatusCode)
	}
}

// Connections not authenticated — yet to send CONNECT, or registration
// sessions without credentials — give way to devices: at --max-mqtt-unauthenticated, or at
// --max-mqtt-connections, the oldest of them is closed for a new
// connection; authenticated devices are kept, MQTT over WebSocket counts
// with the MQTT port, and past the bound of kept ones new connections are
// closed at once.
func TestMQTTConnectionLimits(t *testing.T) {
	c := startServeOn(t, "--max-mqtt-connections", "3", "--max-mqtt-unauthenticated", "2")
	var info siteInfo
	if err := json.Unmarshal([]byte(c.ok("info", "-o", "json")), &info); err != nil {
		t.Fatal(err)
	}
	lb := c.loopback()
	mqttAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(c.mqttPort))
	overTLS := func() (net.Conn, error) { return tls.Dial("tcp", mqttAddr, lb.tls) }
	overWebSocket := func() (net.Conn, error) {
		ws, _, err := websocket.Dial(context.Background(), "wss"+strings.TrimPrefix(lb.url, "https")+"/$iothub/websocket",
			&websocket.DialOptions{Subprotocols: []string{"mqtt"}, HTTPClient: &http.Client{Transport: &http.Transport{TLSClientConfig: lb.tls}}})
		if err != nil {
			return nil, err
		}
		return websocket.NetConn(context.Background(), ws, websocket.MessageBinary), nil
	}
	// connect sends CONNECT and returns the connection once CONNACK 0 is back.
	connect := func(dial func() (net.Conn, error), p *mqtt.Connect) (net.Conn, error) {
		conn, err := dial()
		if err != nil {
			return nil, err
		}
		conn.SetDeadline(time.Now().Add(20 * time.Second))
		b, _ := p.Encode(nil)
		if _, err := conn.Write(b); err != nil {
			conn.Close()
			return nil, err
		}
		ack, err := mqtt.ReadPacket(bufio.NewReader(conn), mqtt.DefaultMaxPacketSize)
		if err == nil {
			if a, ok := ack.(*mqtt.Connack); !ok || a.ReturnCode != mqtt.Accepted {
				err = fmt.Errorf("answered %+v", ack)
			}
		}
		if err != nil {
			conn.Close()
			return nil, err
		}
		conn.SetDeadline(time.Time{})
		t.Cleanup(func() { conn.Close() })
		return conn, nil
	}
	registration := func(dial func() (net.Conn, error), regID string) (net.Conn, error) {
		return connect(dial, &mqtt.Connect{ProtocolLevel: 4, CleanSession: true, KeepAlive: 60, ClientID: regID,
			HasUsername: true, Username: info.IDScope + "/registrations/" + regID + "/api-version=2019-03-31"})
	}
	device := func(dial func() (net.Conn, error), id string) (net.Conn, error) {
		c.ok("device", "create", "--device-id", id)
		var d struct {
			Authentication struct{ SymmetricKey struct{ PrimaryKey string } }
		}
		if err := json.Unmarshal([]byte(c.ok("device", "show", "--device-id", id, "-o", "json")), &d); err != nil {
			t.Fatal(err)
		}
		key, _ := base64.StdEncoding.DecodeString(d.Authentication.SymmetricKey.PrimaryKey)
		token := sas.Build(key, "localhost/devices/"+id, "", time.Now().Add(time.Hour))
		return connect(dial, &mqtt.Connect{ProtocolLevel: 4, CleanSession: true, KeepAlive: 60, ClientID: id,
			HasUsername: true, Username: "localhost/" + id + "/?api-version=2021-04-12", HasPassword: true, Password: []byte(token)})
	}
	closed := func(conn net.Conn) bool {
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := conn.Read(make([]byte, 1))
		return err != nil && !errors.Is(err, os.ErrDeadlineExceeded)
	}
	alive := func(conn net.Conn) bool {
		conn.SetDeadline(time.Now().Add(20 * time.Second))
		defer conn.SetDeadline(time.Time{})
		b, _ := (&mqtt.Pingreq{}).Encode(nil)
		if _, err := conn.Write(b); err != nil {
			return false
		}
		p, err := mqtt.ReadPacket(bufio.NewReader(conn), mqtt.DefaultMaxPacketSize)
		_, ok := p.(*mqtt.Pingresp)
		return err == nil && ok
	}
	must := func(conn net.Conn, err error) net.Conn {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return conn
	}

	silent := must(overTLS()) // yet to send CONNECT
	defer silent.Close()
	r1 := must(registration(overTLS, "r1"))
	// Connections still within their grace (a burst of devices part-way
	// through TLS and CONNECT) are not closed for a newcomer, who is
	// refused instead.
	if _, err := device(overTLS, "d0"); err == nil {
		t.Error("a device was let in at --max-mqtt-unauthenticated by closing a connection still in its grace")
	}
	silent.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if _, err := silent.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("a connection within its grace was closed for a newcomer: %v", err)
	}
	time.Sleep(connlimit.Grace + 500*time.Millisecond)
	d1 := must(device(overTLS, "d1"))
	if !closed(silent) {
		t.Error("the oldest connection yet to send CONNECT is open although a device came at --max-mqtt-unauthenticated")
	}
	d2 := must(device(overWebSocket, "d2"))
	must(device(overTLS, "d3"))
	if !closed(r1) {
		t.Error("a session without credentials is open although a device came at --max-mqtt-connections")
	}
	if _, err := device(overTLS, "d4"); err == nil {
		t.Error("a connection on the MQTT port accepted past --max-mqtt-connections of devices, one of them over WebSocket")
	}
	if _, err := registration(overWebSocket, "r3"); err == nil {
		t.Error("a connection over WebSocket accepted past --max-mqtt-connections")
	}
	if !alive(d1) || !alive(d2) {
		t.Error("an authenticated device was closed to make room")
	}
	if n := strings.Count(c.serverLog.String(), "mqtt: at the connection limit: new connections refused"); n != 1 {
		t.Errorf("refusals logged %d times, want once a minute", n)
	}
	d2.Close()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if _, err := registration(overTLS, "r4"); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("no room once a device left: %v", err)
		}
	}
}
