package server

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/hubdevice"
	"github.com/hatchery/hatchery/internal/mqtt"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/store"
	"github.com/hatchery/hatchery/internal/testutil"
)

// startMQTT serves the hub's device endpoint on loopback.
func (e *env) startMQTT() string { return e.serveMQTT(NewDeviceEndpoint(e.hub)) }

// serveMQTT serves h over TLS on loopback until the test ends.
func (e *env) serveMQTT(h mqtt.Handler) string {
	e.t.Helper()
	conf := e.ts.TLS.Clone()
	conf.ClientAuth = tls.RequestClientCert
	ln, err := tls.Listen("tcp", "127.0.0.1:0", conf)
	if err != nil {
		e.t.Fatal(err)
	}
	srv := &mqtt.Server{Handler: h}
	go func() { _ = srv.Serve(ln) }()
	e.t.Cleanup(func() { _ = srv.Close() })
	return ln.Addr().String()
}

func (e *env) dial(addr, device, module, keyB64 string) (*hubdevice.Client, error) {
	key, _ := base64.StdEncoding.DecodeString(keyB64)
	tlsConf := e.tls.Clone()
	tlsConf.ServerName = "example.com" // the test server's certificate
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return hubdevice.Dial(ctx, hubdevice.Options{Host: host, Addr: addr, DeviceID: device, ModuleID: module, TLS: tlsConf,
		Sign: func(aud string, exp time.Time) (string, error) { return sas.Build(key, aud, "", exp), nil }})
}

func (e *env) newDevice(id string, edge bool) *hub.Device {
	e.t.Helper()
	var d hub.Device
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/"+id, "", map[string]any{"capabilities": map[string]any{"iotEdge": edge}}, &d); err != nil {
		e.t.Fatal(err)
	}
	return &d
}

// mqttDevice starts the MQTT endpoint and connects a new device to it; the
// connection closes with the test.
func (e *env) mqttDevice(id string) (addr string, d *hub.Device, c *hubdevice.Client) {
	e.t.Helper()
	addr = e.startMQTT()
	d = e.newDevice(id, false)
	c, err := e.dial(addr, id, "", d.Authentication.SymmetricKey.PrimaryKey)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(c.Close)
	return addr, d, c
}

func TestMQTTDeviceEndpoint(t *testing.T) {
	e := newEnv(t)
	_, _, c := e.mqttDevice("d1")
	if got, _ := e.hub.GetIdentity(ctx, hub.Ref{Device: "d1"}); got.ConnectionState != "Connected" {
		t.Fatalf("connection state %q", got.ConnectionState)
	}

	// Telemetry lands in the event stream with its properties.
	if err := c.SendEvent(ctx, []byte(`{"temp":21}`), url.Values{"alert": {"no"}, "$.ct": {"application/json"}}); err != nil {
		t.Fatal(err)
	}
	evs, _ := e.st.Events(ctx, "d1", 0, 10)
	if len(evs) != 1 || evs[0].Properties["alert"] != "no" || string(evs[0].Body) != `{"temp":21}` {
		t.Fatalf("events %+v", evs)
	}
	// A property bag may end in "/" (the Node SDK's output events).
	if err := c.Publish("devices/d1/messages/events/%24.on=output1&Mode=Fast/", []byte("{}")); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); len(evs) < 2 && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		evs, _ = e.st.Events(ctx, "d1", 0, 10)
	}
	if len(evs) != 2 || evs[1].Properties["$.on"] != "output1" || evs[1].Properties["Mode"] != "Fast" {
		t.Fatalf("event with a trailing slash: %+v", evs)
	}

	// Reported properties, and the twin as the device reads it.
	if v, err := c.PatchReported(ctx, map[string]any{"firmware": "1.2"}); err != nil || v != 2 {
		t.Fatalf("patch reported: %v %v", v, err)
	}
	// A patch that is no JSON object is refused saying so.
	if _, err := c.PatchReported(ctx, []int{1, 2}); err == nil || !strings.Contains(err.Error(), "must be a JSON object") {
		t.Fatalf("a reported patch that is an array: %v", err)
	}
	// A patch the hub refuses is answered 400, which SDKs do not retry.
	if _, err := c.PatchReported(ctx, map[string]any{"a.b": 1}); err == nil || !strings.Contains(err.Error(), "status 400") {
		t.Fatalf("reported property name with a dot: %v", err)
	}
	tw, err := c.GetTwin(ctx)
	if err != nil || !strings.Contains(string(tw.Reported), `"firmware":"1.2"`) {
		t.Fatalf("twin %s %v", tw.Reported, err)
	}

	// A desired change reaches the connected device.
	desired := make(chan []byte, 1)
	if err := c.OnDesired(ctx, func(p []byte) { desired <- p }); err != nil {
		t.Fatal(err)
	}
	if err := e.hubAPI.Do(ctx, "PATCH", "/twins/d1", "", map[string]any{"properties": map[string]any{"desired": map[string]any{"interval": 10}}}, nil); err != nil {
		t.Fatal(err)
	}
	if p := testutil.Within(t, desired, "desired patch"); string(p) != `{"$version":2,"interval":10}` {
		t.Fatalf("desired patch %s", p)
	}

	// A direct method round trip.
	if err := c.OnMethod(ctx, func(name string, payload []byte) (int, []byte) {
		switch name {
		case "garble":
			return 200, []byte("not json {{")
		case "flood": // a JSON string one byte over 128 KiB
			return 200, []byte(`"` + strings.Repeat("x", 128<<10-1) + `"`)
		}
		return 200, []byte(`{"echo":` + string(payload) + `,"method":"` + name + `"}`)
	}); err != nil {
		t.Fatal(err)
	}
	var res hub.MethodResult
	if err := e.hubAPI.Do(ctx, "POST", "/twins/d1/methods", "", map[string]any{"methodName": "ping", "payload": map[string]any{"n": 1}, "responseTimeoutInSeconds": 10}, &res); err != nil {
		t.Fatal(err)
	}
	if res.Status != 200 || string(res.Payload) != `{"echo":{"n":1},"method":"ping"}` {
		t.Fatalf("method result %+v %s", res, res.Payload)
	}
	// The name reaches the device as it is, in the topic; one a topic
	// cannot carry is refused.
	if err := e.hubAPI.Do(ctx, "POST", "/twins/d1/methods", "", map[string]any{"methodName": "spa ce", "responseTimeoutInSeconds": 10}, &res); err != nil ||
		string(res.Payload) != `{"echo":null,"method":"spa ce"}` {
		t.Fatalf("method name with a space: %v %s", err, res.Payload)
	}
	if err := e.hubAPI.Do(ctx, "POST", "/twins/d1/methods", "", map[string]any{"methodName": "a/b"}, nil); azerr.As(err).Status() != 400 {
		t.Fatalf("method name with a slash: %v", err)
	}
	// The service statistics (of the .NET, Python and Java service SDKs)
	// count the connected device.
	var stats hub.ServiceStatistics
	if err := e.hubAPI.Do(ctx, "GET", "/statistics/service", "", nil, &stats); err != nil || stats.ConnectedDeviceCount != 1 {
		t.Fatalf("service statistics: %v %+v", err, stats)
	}
	// An answer that is not JSON is the device's fault, said so at once.
	err = e.hubAPI.Do(ctx, "POST", "/twins/d1/methods", "", map[string]any{"methodName": "garble", "responseTimeoutInSeconds": 10}, &res)
	if azerr.As(err).Status() != 502 || !strings.Contains(err.Error(), "not JSON") {
		t.Fatalf("an answer that is not JSON: %v", err)
	}
	// So is one over the hosted hub's 128 KiB, a request's limit too.
	err = e.hubAPI.Do(ctx, "POST", "/twins/d1/methods", "", map[string]any{"methodName": "flood", "responseTimeoutInSeconds": 10}, &res)
	if azerr.As(err).Status() != 502 || !strings.Contains(err.Error(), "at most 131072") {
		t.Fatalf("an answer over 128 KiB: %v", err)
	}

	// Cloud-to-device: queued, delivered, acknowledged, removed.
	if _, err := e.hub.SendC2D(ctx, "d1", map[string]string{"k": "v"}, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if _, err := e.hub.SendC2D(ctx, "d1", nil, make([]byte, 64<<10+1)); azerr.As(err).Status() != 413 {
		t.Fatalf("a message over 64 KiB: %v, want 413", err)
	}
	if pending, _ := e.hub.PendingC2D(ctx, "d1"); len(pending) != 1 {
		t.Fatalf("%d messages pending, want the one of 5 bytes", len(pending))
	}
	c2d := make(chan url.Values, 1)
	if err := c.OnC2D(ctx, func(props url.Values, body []byte) {
		if string(body) == "hello" {
			c2d <- props
		}
	}); err != nil {
		t.Fatal(err)
	}
	if props := testutil.Within(t, c2d, "cloud-to-device message"); props.Get("k") != "v" || props.Get("$.mid") == "" {
		t.Fatalf("c2d props %v", props)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if pending, _ := e.hub.PendingC2D(ctx, "d1"); len(pending) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("acknowledged message still queued")
		}
	}
}

func TestMQTTRefusals(t *testing.T) {
	e := newEnv(t)
	addr := e.startMQTT()
	d := e.newDevice("d1", false)
	e.newDevice("d2", false)
	other := base64.StdEncoding.EncodeToString([]byte("0123456789abcdef0123456789abcdef"))
	if _, err := e.dial(addr, "d1", "", other); !errors.Is(err, hubdevice.ErrNotAuthorized) {
		t.Fatalf("wrong key: %v", err)
	}
	if _, err := e.dial(addr, "ghost", "", other); !errors.Is(err, hubdevice.ErrNotAuthorized) {
		t.Fatalf("unknown device: %v", err)
	}
	// Publishing to another device's topic ends the connection.
	c, err := e.dial(addr, "d1", "", d.Authentication.SymmetricKey.PrimaryKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Publish("devices/d2/messages/events/", []byte("{}")); err != nil {
		t.Fatal(err)
	}
	testutil.Within(t, c.Done(), "disconnect after foreign topic")
	if evs, _ := e.st.Events(ctx, "d2", 0, 10); len(evs) != 0 {
		t.Fatal("event stored for another device")
	}
	// A disabled device is refused: the signal to reprovision.
	d.Status = "disabled"
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/d1", "*", d, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := e.dial(addr, "d1", "", d.Authentication.SymmetricKey.PrimaryKey); !errors.Is(err, hubdevice.ErrNotAuthorized) {
		t.Fatalf("disabled device: %v", err)
	}
}

// Modules connect with their own identity and see their module twin.
func TestMQTTModuleTwin(t *testing.T) {
	e := newEnv(t)
	addr := e.startMQTT()
	e.newDevice("edge1", true)
	agent, err := e.hub.GetIdentity(ctx, hub.Ref{Device: "edge1", Module: "$edgeAgent"})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.hubAPI.Do(ctx, "PATCH", "/twins/edge1/modules/$edgeAgent", "", map[string]any{"properties": map[string]any{"desired": map[string]any{"schemaVersion": "1.1"}}}, nil); err != nil {
		t.Fatal(err)
	}
	c, err := e.dial(addr, "edge1", "$edgeAgent", agent.Authentication.SymmetricKey.PrimaryKey)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tw, err := c.GetTwin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var desired map[string]any
	_ = json.Unmarshal(tw.Desired, &desired)
	if desired["schemaVersion"] != "1.1" {
		t.Fatalf("module twin %s", tw.Desired)
	}
	if _, err := c.PatchReported(ctx, map[string]any{"lastDesiredStatus": map[string]any{"code": 200}}); err != nil {
		t.Fatal(err)
	}
	if mt := mustTwin(t, e, "edge1", "$edgeAgent"); !strings.Contains(string(mt.Properties.Reported), `"code":200`) {
		t.Fatalf("module reported %s", mt.Properties.Reported)
	}
}

// Connections end with the access they were opened with: a module's when
// its keys change or it is deleted, the device's (and its modules') when
// it is disabled.
func TestMQTTRevocationDisconnects(t *testing.T) {
	e := newEnv(t)
	addr, d, c := e.mqttDevice("d1")
	module := func() *hub.Device {
		var m hub.Device
		if err := e.hubAPI.Do(ctx, "PUT", "/devices/d1/modules/m1", "", &hub.Device{}, &m); err != nil {
			t.Fatal(err)
		}
		return &m
	}
	dialModule := func(m *hub.Device) *hubdevice.Client {
		mc, err := e.dial(addr, "d1", "m1", m.Authentication.SymmetricKey.PrimaryKey)
		if err != nil {
			t.Fatal(err)
		}
		return mc
	}
	m := module()
	mc := dialModule(m)
	m.Authentication.SymmetricKey.PrimaryKey = base64.StdEncoding.EncodeToString(make([]byte, 32))
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/d1/modules/m1", "*", m, nil); err != nil {
		t.Fatal(err)
	}
	testutil.Within(t, mc.Done(), "disconnect of the module whose keys changed")
	mc = dialModule(m)
	if err := e.hubAPI.Do(ctx, "DELETE", "/devices/d1/modules/m1", "*", nil, nil); err != nil {
		t.Fatal(err)
	}
	testutil.Within(t, mc.Done(), "disconnect of the deleted module")
	if _, err := c.PatchReported(ctx, map[string]any{"alive": true}); err != nil {
		t.Fatalf("the device lost its connection with its module: %v", err)
	}

	mc = dialModule(module())
	d.Status = "disabled"
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/d1", "*", d, nil); err != nil {
		t.Fatal(err)
	}
	testutil.Within(t, c.Done(), "disconnect of the disabled device")
	testutil.Within(t, mc.Done(), "disconnect of the disabled device's module")
}

// A connection ends when the token it connected with expires, as in the
// hosted hub; the client connects again with a new one.
func TestMQTTTokenExpiryDisconnects(t *testing.T) {
	e := newEnv(t)
	addr := e.startMQTT()
	d := e.newDevice("d1", false)
	key, _ := base64.StdEncoding.DecodeString(d.Authentication.SymmetricKey.PrimaryKey)
	tlsConf := e.tls.Clone()
	tlsConf.ServerName = "example.com"
	c, err := hubdevice.Dial(ctx, hubdevice.Options{Host: host, Addr: addr, DeviceID: "d1", TLS: tlsConf, TokenLifetime: 2 * time.Second,
		Sign: func(aud string, exp time.Time) (string, error) { return sas.Build(key, aud, "", exp), nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	testutil.Within(t, c.Done(), "disconnect when the token expired")
	again, err := e.dial(addr, "d1", "", d.Authentication.SymmetricKey.PrimaryKey)
	if err != nil {
		t.Fatalf("connecting again with a new token: %v", err)
	}
	again.Close()
}

// A device that connects with CleanSession 0 finds what it subscribed to
// in its last connection (the SDKs do not subscribe again when they
// reconnect to renew a token); a clean session ends it.
func TestMQTTPersistentSession(t *testing.T) {
	e := newEnv(t)
	addr := e.startMQTT()
	d := e.newDevice("d1", false)
	key, _ := base64.StdEncoding.DecodeString(d.Authentication.SymmetricKey.PrimaryKey)
	connect := func(clean bool) (*rawClient, *mqtt.Connack) {
		c := e.dialRaw(t, addr, nil)
		return c, c.connect(&mqtt.Connect{ProtocolLevel: 4, CleanSession: clean, KeepAlive: 60, ClientID: "d1",
			HasUsername: true, Username: host + "/d1/?api-version=2021-04-12",
			HasPassword: true, Password: []byte(sas.Build(key, host+"/devices/d1", "", time.Now().Add(time.Hour)))})
	}
	c, ack := connect(false)
	if ack.ReturnCode != mqtt.Accepted || ack.SessionPresent {
		t.Fatalf("first CONNACK %+v", ack)
	}
	if g := c.subscribe("$iothub/twin/res/#"); g != 1 {
		t.Fatalf("SUBACK %d", g)
	}
	c.conn.Close()

	c, ack = connect(false)
	if !ack.SessionPresent {
		t.Fatalf("CONNACK %+v, want the session present", ack)
	}
	c.write(&mqtt.Publish{Topic: "$iothub/twin/GET/?$rid=7"})
	if p, ok := c.read().(*mqtt.Publish); !ok || !strings.HasPrefix(p.Topic, "$iothub/twin/res/200/?$rid=7") {
		t.Fatalf("twin GET without subscribing again: %+v", p)
	}
	c.conn.Close()

	c, _ = connect(true)
	c.conn.Close()
	if _, ack = connect(false); ack.SessionPresent {
		t.Fatalf("CONNACK %+v after a clean session, want none present", ack)
	}
}

// Resuming a session, or subscribing again, leaves what is kept as it
// was, so that nothing is written; a refused filter leaves it.
func TestWithSubscription(t *testing.T) {
	kept := []hub.Subscription{{Filter: "a", QoS: 1}, {Filter: "b", QoS: 0}, {Filter: "c", QoS: 1}}
	for _, k := range kept {
		if got := withSubscription(kept, k.Filter, k.QoS); !slices.Equal(got, kept) {
			t.Errorf("subscribing to %s again: %v", k.Filter, got)
		}
	}
	if got := withSubscription(kept, "b", mqtt.SubscribeFailure); !slices.Equal(got, []hub.Subscription{{Filter: "a", QoS: 1}, {Filter: "c", QoS: 1}}) {
		t.Errorf("b refused: %v", got)
	}
	if got := withSubscription(kept, "b", 1); got[1].QoS != 1 || len(got) != 3 || kept[1].QoS != 0 {
		t.Errorf("b at QoS 1: %v (kept %v)", got, kept)
	}
	if got := withSubscription(kept, "d", 0); len(got) != 4 || got[3].Filter != "d" {
		t.Errorf("d added: %v", got)
	}
}

func (e *env) dialCert(addr, device, module string, cert tls.Certificate) (*hubdevice.Client, error) {
	conf := e.tls.Clone()
	conf.ServerName = "example.com"
	conf.Certificates = []tls.Certificate{cert}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return hubdevice.Dial(ctx, hubdevice.Options{Host: host, Addr: addr, DeviceID: device, ModuleID: module, TLS: conf})
}

// X.509 devices: by registered thumbprint, or by a chain to a verified CA.
func TestMQTTX509Devices(t *testing.T) {
	e := newEnv(t)
	addr := e.startMQTT()

	self := testutil.NewCert(t, "self-1", false, nil)
	sum := sha256.Sum256(self.Leaf.Raw)
	tp := hex.EncodeToString(sum[:])
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/self-1", "", map[string]any{"authentication": map[string]any{
		"type": "selfSigned", "x509Thumbprint": map[string]any{"primaryThumbprint": strings.ToUpper(tp)}}}, nil); err != nil {
		t.Fatal(err)
	}
	// It has no symmetric keys: null, as the hosted hub answers, not "".
	var shape struct {
		Authentication struct{ SymmetricKey map[string]any } `json:"authentication"`
	}
	if err := e.hubAPI.Do(ctx, "GET", "/devices/self-1", "", nil, &shape); err != nil {
		t.Fatal(err)
	}
	if k := shape.Authentication.SymmetricKey; len(k) != 2 || k["primaryKey"] != nil || k["secondaryKey"] != nil {
		t.Errorf("an X.509 device's symmetricKey: %v, want both keys null", k)
	}
	c, err := e.dialCert(addr, "self-1", "", self)
	if err != nil {
		t.Fatalf("self-signed device: %v", err)
	}
	c.Close()
	if _, err := e.dialCert(addr, "self-1", "", testutil.NewCert(t, "self-1", false, nil)); !errors.Is(err, hubdevice.ErrNotAuthorized) {
		t.Fatalf("another certificate with the same CN: %v", err)
	}

	ca := testutil.NewCert(t, "Fleet CA", true, nil)
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Leaf.Raw})
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/ca-1", "", map[string]any{"authentication": map[string]any{"type": "certificateAuthority"}}, nil); err != nil {
		t.Fatal(err)
	}
	devCert := testutil.NewCert(t, "ca-1", false, &ca)
	// Until the CA is uploaded and verified, the device is refused.
	if _, err := e.dialCert(addr, "ca-1", "", devCert); !errors.Is(err, hubdevice.ErrNotAuthorized) {
		t.Fatalf("CA not yet trusted: %v", err)
	}
	if err := e.hubAPI.Do(ctx, "PUT", "/certificates/fleet", "", map[string]any{"properties": map[string]any{"certificate": string(caPEM), "isVerified": true}}, nil); err != nil {
		t.Fatal(err)
	}
	c, err = e.dialCert(addr, "ca-1", "", devCert)
	if err != nil {
		t.Fatalf("CA-signed device: %v", err)
	}
	c.Close()
	// A certificate from the CA for another CN does not pass as ca-1.
	if _, err := e.dialCert(addr, "ca-1", "", testutil.NewCert(t, "someone-else", false, &ca)); !errors.Is(err, hubdevice.ErrNotAuthorized) {
		t.Fatalf("wrong CN: %v", err)
	}
	// Bad input to the registry.
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/bad-tp", "", map[string]any{"authentication": map[string]any{
		"type": "selfSigned", "x509Thumbprint": map[string]any{"primaryThumbprint": "xyz"}}}, nil); azerr.As(err).Status() != 400 {
		t.Fatalf("bad thumbprint: %v", err)
	}
	leafPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: self.Leaf.Raw})
	if err := e.hubAPI.Do(ctx, "PUT", "/certificates/leaf", "", map[string]any{"properties": map[string]any{"certificate": string(leafPEM)}}, nil); azerr.As(err).Status() != 400 {
		t.Fatalf("a leaf as CA: %v", err)
	}
}

// A device that subscribes again and again gets one watcher, not one per
// SUBSCRIBE: each desired patch arrives once, and the server keeps no pile
// of watchers for it.
func TestMQTTRepeatedSubscribe(t *testing.T) {
	e := newEnv(t)
	_, _, c := e.mqttDevice("d1")
	var got atomic.Int32
	for range 5 {
		if err := c.OnDesired(ctx, func([]byte) { got.Add(1) }); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.hub.UpdateTwin(ctx, hub.Ref{Device: "d1"}, "", &hub.TwinPatch{Properties: &hub.DesiredPatch{Desired: map[string]any{"rate": 5}}}, false); err != nil {
		t.Fatal(err)
	}
	// A round trip after the patch: by its answer, every copy sent has arrived.
	time.Sleep(200 * time.Millisecond)
	if _, err := c.GetTwin(ctx); err != nil {
		t.Fatal(err)
	}
	if n := got.Load(); n != 1 {
		t.Fatalf("the desired patch arrived %d times", n)
	}
}

// Device-to-cloud messages are kept for the retention time, then deleted in
// batches; newer ones stay.
func TestEventRetention(t *testing.T) {
	e := newEnv(t)
	e.newDevice("d1", false)
	now := time.Now()
	e.hub.Now = func() time.Time { return now.Add(-2 * time.Hour) }
	for i := range 1001 { // more than one deletion batch
		if _, err := e.hub.SendEvent(ctx, hub.Ref{Device: "d1"}, nil, []byte(strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
	}
	e.hub.Now = func() time.Time { return now }
	if _, err := e.hub.SendEvent(ctx, hub.Ref{Device: "d1"}, nil, []byte("fresh")); err != nil {
		t.Fatal(err)
	}
	if n, err := e.hub.DeleteExpiredEvents(ctx, time.Hour); err != nil || n != 1001 {
		t.Fatalf("deleted %d, %v; want the 1001 older than an hour", n, err)
	}
	left, err := e.st.Events(ctx, "d1", 0, 10)
	if err != nil || len(left) != 1 || string(left[0].Body) != "fresh" {
		t.Fatalf("left %+v, %v", left, err)
	}
}

// A device gets its share of device-to-cloud bytes: beyond it, HTTPS
// answers 429 with Retry-After, and MQTT holds the message until the rate
// allows it, or, for longer than 30 s, ends the connection; no message is
// larger than the hosted hub's 256 KiB.
func TestDeviceMessageRate(t *testing.T) {
	e := newEnv(t)
	e.hub.MessageBytes = hub.NewMessageLimit(1024) // bursts of 256 KiB, the largest message
	addr := e.startMQTT()
	d := e.newDevice("d1", false)
	key, _ := base64.StdEncoding.DecodeString(d.Authentication.SymmetricKey.PrimaryKey)
	tok := sas.Build(key, host+"/devices/d1", "", time.Now().Add(time.Minute))
	post := func(n int) (int, map[string]any) {
		return e.raw("POST", "/devices/d1/messages/events?api-version=2020-09-30", tok, strings.Repeat("x", n))
	}
	if st, body := post(256<<10 + 1); st != 413 {
		t.Fatalf("a message over 256 KiB: %d %v", st, body)
	}
	if st, body := post(200 << 10); st != 204 {
		t.Fatalf("within the burst: %d %v", st, body)
	}
	if st, body := post(100 << 10); st != 429 {
		t.Fatalf("beyond the burst: %d %v", st, body)
	}
	c, err := e.dial(addr, "d1", "", d.Authentication.SymmetricKey.PrimaryKey)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SendEvent(ctx, make([]byte, 100<<10), nil)
	testutil.Within(t, c.Done(), "disconnect of the device over its rate")
	if n, _ := e.st.Events(ctx, "d1", 0, 10); len(n) != 1 {
		t.Fatalf("%d messages stored, want the one within the limit", len(n))
	}

	// A short wait holds the message, and the connection stays: the SDKs
	// would reconnect at once, again and again.
	e.hub.MessageBytes = hub.NewMessageLimit(64 << 10) // bursts of 1 MiB
	_, _, c2 := e.mqttDevice("d2")
	for range 4 {
		if err := c2.SendEvent(ctx, make([]byte, 256<<10-1024), nil); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	if err := c2.SendEvent(ctx, make([]byte, 128<<10), nil); err != nil {
		t.Fatalf("the message beyond the burst: %v", err)
	}
	if waited := time.Since(start); waited < time.Second {
		t.Errorf("the message beyond the burst was taken after %v, not held", waited)
	}
	select {
	case <-c2.Done():
		t.Fatal("the device over its rate for a moment was disconnected")
	default:
	}
	if n, _ := e.st.Events(ctx, "d2", 0, 10); len(n) != 5 {
		t.Errorf("%d messages stored, want all 5", len(n))
	}
}

// A burst of cloud-to-device messages arrives once each: every new
// message's notification reads the whole queue, and what was sent and not
// yet acknowledged is not sent again.
func TestC2DBurstDeliveredOnce(t *testing.T) {
	e := newEnv(t)
	_, _, c := e.mqttDevice("d1")
	var mu sync.Mutex
	got := map[string]int{}
	all := make(chan struct{})
	if err := c.OnC2D(ctx, func(props url.Values, _ []byte) {
		mu.Lock()
		defer mu.Unlock()
		got[props.Get("$.mid")]++
		if len(got) == 20 && got[props.Get("$.mid")] == 1 {
			close(all)
		}
	}); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if _, err := e.hub.SendC2D(ctx, "d1", map[string]string{"messageId": "m" + strconv.Itoa(i)}, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	testutil.Within(t, all, "all 20 messages")
	time.Sleep(300 * time.Millisecond) // room for duplicates to arrive
	mu.Lock()
	defer mu.Unlock()
	for id, n := range got {
		if n != 1 {
			t.Errorf("message %s arrived %d times", id, n)
		}
	}
}

// A desired document replaced (as deployments do) reaches the device as a
// merge patch that also says what was removed.
func TestDesiredReplaceSaysWhatWent(t *testing.T) {
	e := newEnv(t)
	_, _, c := e.mqttDevice("d1")
	patches := make(chan []byte, 4)
	if err := c.OnDesired(ctx, func(p []byte) { patches <- p }); err != nil {
		t.Fatal(err)
	}
	set := func(desired map[string]any, replace bool) {
		if _, err := e.hub.UpdateTwin(ctx, hub.Ref{Device: "d1"}, "", &hub.TwinPatch{Properties: &hub.DesiredPatch{Desired: desired}}, replace); err != nil {
			t.Fatal(err)
		}
	}
	set(map[string]any{"a": 1, "b": map[string]any{"c": 1, "d": 2}}, false)
	testutil.Within(t, patches, "the first patch")
	set(map[string]any{"b": map[string]any{"c": 1}}, true)
	var got map[string]any
	_ = json.Unmarshal(testutil.Within(t, patches, "the replacing patch"), &got)
	delete(got, "$version")
	if want := `{"a":null,"b":{"c":1,"d":null}}`; mustJSON(got) != want {
		t.Fatalf("replacing patch %s, want %s", mustJSON(got), want)
	}
}

func mustJSON(v any) string { b, _ := json.Marshal(v); return string(b) }

// Concurrent desired-property writes reach the device in $version order,
// as SDKs apply patches in the order they hear them.
func TestDesiredPatchesInOrder(t *testing.T) {
	e := newEnv(t)
	_, _, c := e.mqttDevice("d1")
	versions := make(chan int64, 100)
	if err := c.OnDesired(ctx, func(p []byte) {
		var v struct {
			Version int64 `json:"$version"`
		}
		_ = json.Unmarshal(p, &v)
		versions <- v.Version
	}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Go(func() {
			if _, err := e.hub.UpdateTwin(ctx, hub.Ref{Device: "d1"}, "", &hub.TwinPatch{Properties: &hub.DesiredPatch{Desired: map[string]any{"w" + strconv.Itoa(i%8): i}}}, false); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	last := int64(0)
	for range 40 {
		v := testutil.Within(t, versions, "a desired patch")
		if v <= last {
			t.Fatalf("$version %d arrived after %d", v, last)
		}
		last = v
	}
}

// c2dReceiver connects d and subscribes it to its C2D messages, whose
// message IDs come on the channel; the connection closes with the test.
func (e *env) c2dReceiver(addr string, d *hub.Device) <-chan string {
	e.t.Helper()
	c, err := e.dial(addr, d.DeviceID, "", d.Authentication.SymmetricKey.PrimaryKey)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(c.Close)
	got := make(chan string, 10)
	if err := c.OnC2D(ctx, func(props url.Values, _ []byte) { got <- props.Get("$.mid") }); err != nil {
		e.t.Fatal(err)
	}
	return got
}

// A message a device received over HTTPS, and is working on, is not sent
// to its MQTT connection too; the next one is, and it follows when its
// lock runs out.
func TestC2DLockedOverHTTPSNotOverMQTT(t *testing.T) {
	e := newEnv(t)
	addr := e.startMQTT()
	d := e.newDevice("d1", false)
	for _, id := range []string{"m1", "m2"} {
		if _, err := e.hub.SendC2D(ctx, "d1", map[string]string{"messageId": id}, []byte(id)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond) // the queue's order is the time of sending
	}
	// m1 is received over HTTPS with a lock that runs out in 3 s (of the
	// minute's lock), and nothing is queued or settled after that.
	lockEnds := time.Now().Add(3 * time.Second)
	e.hub.Now = func() time.Time { return time.Now().Add(-time.Minute + 3*time.Second) }
	if m, _, err := e.hub.ReceiveC2D(ctx, "d1"); err != nil || m.MessageID != "m1" {
		t.Fatalf("received over HTTPS: %v %v", m, err)
	}
	e.hub.Now = time.Now
	got := e.c2dReceiver(addr, d)
	if id := testutil.Within(t, got, "the message not locked"); id != "m2" {
		t.Fatalf("MQTT got %s, which HTTPS holds", id)
	}
	if id := testutil.Within(t, got, "the message whose lock ran out"); id != "m1" || time.Now().Before(lockEnds) {
		t.Fatalf("MQTT got %s before m1's lock ran out at %s", id, lockEnds.Format(time.StampMilli))
	}
}

// A message queued while the device was not subscribed arrives when it
// subscribes again on the same connection, as the Node SDK does when its
// 'message' listener is removed and added again.
func TestC2DAfterSubscribingAgain(t *testing.T) {
	e := newEnv(t)
	_, _, c := e.mqttDevice("d1")
	got := make(chan string, 10)
	onC2D := func(props url.Values, _ []byte) { got <- props.Get("$.mid") }
	if err := c.OnC2D(ctx, onC2D); err != nil {
		t.Fatal(err)
	}
	if err := c.Unsubscribe(ctx, "devices/d1/messages/devicebound/#"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.hub.SendC2D(ctx, "d1", map[string]string{"messageId": "m1"}, []byte("x")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // the watcher tries, and finds no subscription
	if err := c.OnC2D(ctx, onC2D); err != nil {
		t.Fatal(err)
	}
	if id := testutil.Within(t, got, "the message queued while unsubscribed"); id != "m1" {
		t.Fatalf("got %s", id)
	}
}

// rawDevice connects a new device id with a SAS token on the raw codec.
func (e *env) rawDevice(t *testing.T, addr, id string) *rawClient {
	t.Helper()
	c, code := e.rawConnect(t, addr, e.newDevice(id, false), nil)
	if code != mqtt.Accepted {
		t.Fatalf("CONNACK %d", code)
	}
	return c
}

// rawConnect connects d with a SAS token and will on the raw codec, and
// returns the CONNACK code.
func (e *env) rawConnect(t *testing.T, addr string, d *hub.Device, will *mqtt.Will) (*rawClient, byte) {
	t.Helper()
	c := e.dialRaw(t, addr, nil)
	return c, c.connect(sasConnect(d, will)).ReturnCode
}

// sasConnect is d's CONNECT with a SAS token and will.
func sasConnect(d *hub.Device, will *mqtt.Will) *mqtt.Connect {
	key, _ := base64.StdEncoding.DecodeString(d.Authentication.SymmetricKey.PrimaryKey)
	return &mqtt.Connect{ProtocolLevel: 4, CleanSession: true, KeepAlive: 60, ClientID: d.DeviceID, Will: will,
		HasUsername: true, Username: host + "/" + d.DeviceID + "/?api-version=2021-04-12",
		HasPassword: true, Password: []byte(sas.Build(key, host+"/devices/"+d.DeviceID, "", time.Now().Add(time.Hour)))}
}

// closedSignal is the device endpoint, telling which connections it has
// seen the end of.
type closedSignal struct {
	*DeviceEndpoint
	closed chan *mqtt.Conn
}

func (h closedSignal) Closed(c *mqtt.Conn, err error) {
	h.DeviceEndpoint.Closed(c, err)
	h.closed <- c
}

// overlapping serves h and starts a connection of d, for the test's hooks
// to hold in Authenticate; it returns the endpoint's address and a channel
// closed when that connection's client has seen it end.
func (e *env) overlapping(t *testing.T, d *hub.Device, h closedSignal) (addr string, ended <-chan struct{}) {
	t.Helper()
	addr = e.serveMQTT(h)
	a := e.dialRaw(t, addr, nil)
	a.write(sasConnect(d, nil))
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			if _, err := a.tryRead(); err != nil {
				return
			}
		}
	}()
	return addr, done
}

// connectWhileHeld connects B, a second client of d, once the first (A,
// from overlapping) is held in its connect (held closed), lets A go on
// (closing release) once B is accepted, and returns B when A's client has
// seen its connection end.
func (e *env) connectWhileHeld(t *testing.T, addr string, d *hub.Device, held <-chan struct{}, release chan struct{}, aEnded <-chan struct{}) *rawClient {
	t.Helper()
	<-held
	b, code := e.rawConnect(t, addr, d, nil)
	if code != mqtt.Accepted {
		t.Fatalf("B: CONNACK %d", code)
	}
	close(release)
	<-aEnded
	return b
}

func (e *env) identityState(t *testing.T, id string) string {
	t.Helper()
	got, err := e.hub.GetIdentity(ctx, hub.Ref{Device: id})
	if err != nil {
		t.Fatal(err)
	}
	return got.ConnectionState
}

// waitClosed waits for the endpoint to have handled the end of c.
func waitClosed(t *testing.T, h closedSignal, c *mqtt.Conn) {
	t.Helper()
	for {
		select {
		case got := <-h.closed:
			if got == c {
				return
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the connection's end was not handled")
		}
	}
}

// Of two overlapping connections of one identity, the newer is recorded
// connected, though the older replaced the identity's connection first and
// would record itself after it; the older one's end leaves the record be.
func TestMQTTOverlappingConnectsRecordTheLatest(t *testing.T) {
	e := newEnv(t)
	d := e.newDevice("d1", false)
	h := closedSignal{NewDeviceEndpoint(e.hub), make(chan *mqtt.Conn, 4)}
	var mu sync.Mutex
	var aConn, bConn *mqtt.Conn
	aIn, bIn, bAccepted := make(chan struct{}), make(chan struct{}), make(chan struct{})
	h.hooks = &endpointHooks{
		beforeSwap: func(c *mqtt.Conn) {
			mu.Lock()
			defer mu.Unlock()
			if aConn == nil {
				aConn = c
				close(aIn)
			} else {
				bConn = c
				close(bIn)
			}
		},
		beforeAttach: func(c *mqtt.Conn) {
			mu.Lock()
			isA := c == aConn
			mu.Unlock()
			if isA { // hold A until B is through, or cannot get through
				<-bIn
				select {
				case <-bAccepted:
				case <-time.After(time.Second):
				}
			}
		},
	}
	addr, aEnded := e.overlapping(t, d, h)
	b := e.connectWhileHeld(t, addr, d, aIn, bAccepted, aEnded)
	waitClosed(t, h, aConn)
	if s := e.identityState(t, "d1"); s != "Connected" {
		t.Fatalf("with B connected and A gone: %s", s)
	}
	b.write(&mqtt.Publish{QoS: 1, PacketID: 1, Topic: "devices/d1/messages/events/", Payload: []byte("{}")})
	if _, ok := b.read().(*mqtt.Puback); !ok {
		t.Fatal("B: no PUBACK")
	}
	b.write(&mqtt.Disconnect{})
	waitClosed(t, h, bConn)
	if s := e.identityState(t, "d1"); s != "Disconnected" {
		t.Fatalf("after B disconnected: %s", s)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if n := len(h.idLocks); n != 0 {
		t.Fatalf("%d identity locks kept after the connects", n)
	}
}

// A connection closed while it authenticates (the server making room, or
// stopping) does not replace the identity's live one.
func TestMQTTClosedConnectReplacesNothing(t *testing.T) {
	e := newEnv(t)
	d := e.newDevice("d1", false)
	h := closedSignal{NewDeviceEndpoint(e.hub), make(chan *mqtt.Conn, 4)}
	var mu sync.Mutex
	var aConn *mqtt.Conn
	aIn, bAccepted := make(chan struct{}), make(chan struct{})
	h.hooks = &endpointHooks{
		beforeSwap: func(c *mqtt.Conn) {
			mu.Lock()
			first := aConn == nil
			if first {
				aConn = c
			}
			mu.Unlock()
			if first { // B connects meanwhile; then A is closed
				close(aIn)
				<-bAccepted
				c.Close()
			}
		},
		beforeAttach: func(*mqtt.Conn) {},
	}
	addr, aEnded := e.overlapping(t, d, h)
	b := e.connectWhileHeld(t, addr, d, aIn, bAccepted, aEnded)
	b.write(&mqtt.Publish{QoS: 1, PacketID: 1, Topic: "devices/d1/messages/events/", Payload: []byte("{}")})
	if _, ok := b.read().(*mqtt.Puback); !ok {
		t.Fatal("B: no PUBACK")
	}
	if s := e.identityState(t, "d1"); s != "Connected" {
		t.Fatalf("with B connected: %s", s)
	}
}

// A last will addressed to the device's telemetry is sent as telemetry,
// marked iothub-MessageType=Will, when the connection drops without
// DISCONNECT, and not after one; a will to any other topic is refused at
// CONNECT.
func TestMQTTLastWill(t *testing.T) {
	e := newEnv(t)
	addr := e.startMQTT()
	d := e.newDevice("d1", false)
	will := func(payload string) *mqtt.Will {
		return &mqtt.Will{Topic: "devices/d1/messages/events/state=lost", Payload: []byte(payload)}
	}

	// Not sent: the device said goodbye, or its new connection replaced it.
	c, code := e.rawConnect(t, addr, d, will("after DISCONNECT"))
	if code != mqtt.Accepted {
		t.Fatalf("CONNACK %d", code)
	}
	c.write(&mqtt.Disconnect{})
	c.closed()
	replaced, _ := e.rawConnect(t, addr, d, will("replaced"))
	c, _ = e.rawConnect(t, addr, d, will("gone"))
	replaced.closed()
	c.conn.Close() // dropped: sent
	var evs []store.Event
	for deadline := time.Now().Add(10 * time.Second); len(evs) == 0 && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		evs, _ = e.st.Events(ctx, "d1", 0, 10)
	}
	time.Sleep(100 * time.Millisecond) // for a will sent in error to arrive too
	evs, _ = e.st.Events(ctx, "d1", 0, 10)
	if len(evs) != 1 || string(evs[0].Body) != "gone" || evs[0].Properties["iothub-MessageType"] != "Will" || evs[0].Properties["state"] != "lost" {
		for _, ev := range evs {
			t.Logf("event %q %v", ev.Body, ev.Properties)
		}
		t.Fatalf("%d events, want the one will of the dropped connection", len(evs))
	}

	for _, topic := range []string{"devices/d2/messages/events/", "$iothub/twin/GET/", "devices/d1/messages/devicebound/"} {
		if _, code := e.rawConnect(t, addr, d, &mqtt.Will{Topic: topic}); code != mqtt.RefusedNotAuthorized {
			t.Errorf("a will to %s: CONNACK %d", topic, code)
		}
	}
}

// A retained telemetry message is accepted, not retained, and marked as
// Azure IoT Hub marks it.
func TestMQTTRetainedTelemetry(t *testing.T) {
	e := newEnv(t)
	c := e.rawDevice(t, e.startMQTT(), "d1")
	c.write(&mqtt.Publish{QoS: 1, PacketID: 1, Retain: true, Topic: "devices/d1/messages/events/a=b", Payload: []byte("{}")})
	if _, ok := c.read().(*mqtt.Puback); !ok {
		t.Fatal("no PUBACK")
	}
	if evs, _ := e.st.Events(ctx, "d1", 0, 10); len(evs) != 1 || evs[0].Properties["mqtt-retain"] != "true" || evs[0].Properties["a"] != "b" {
		t.Fatalf("events %+v", evs)
	}
}

// A property bag left unencoded, as Embedded C and hand-written firmware
// send it, is telemetry with its properties as written, not a reason to
// disconnect; escapes that are valid are decoded.
func TestMQTTUnencodedPropertyBag(t *testing.T) {
	e := newEnv(t)
	c := e.rawDevice(t, e.startMQTT(), "d1")
	for i, tc := range []struct {
		bag  string
		want map[string]string
	}{
		{"model=dtmi:com:x;1", map[string]string{"model": "dtmi:com:x;1"}},
		{"a=100%", map[string]string{"a": "100%"}},
		{"b=%2Fx&c=50%&d", map[string]string{"b": "/x", "c": "50%", "d": ""}},
	} {
		id := uint16(i + 1)
		c.write(&mqtt.Publish{QoS: 1, PacketID: id, Topic: "devices/d1/messages/events/" + tc.bag, Payload: []byte("{}")})
		if ack, ok := c.read().(*mqtt.Puback); !ok || ack.PacketID != id {
			t.Fatalf("%s: no PUBACK", tc.bag)
		}
		evs, _ := e.st.Events(ctx, "d1", 0, 10)
		if len(evs) != i+1 {
			t.Fatalf("%s: %d events, want %d", tc.bag, len(evs), i+1)
		}
		for k, v := range tc.want {
			if got, ok := evs[i].Properties[k]; !ok || got != v {
				t.Errorf("%s: property %s = %q, want %q (%v)", tc.bag, k, got, v, evs[i].Properties)
			}
		}
	}
}

// A request ID comes back as the device wrote it, escapes and all: decoded,
// "%23" would be a wildcard the reply topic may not hold.
func TestMQTTRequestIDEchoedRaw(t *testing.T) {
	e := newEnv(t)
	addr := e.startMQTT()
	c := e.rawDevice(t, addr, "d1")
	c.subscribe("$iothub/twin/res/#")
	for _, rid := range []string{"a%26b", "a%23b", "a%2Bb", "7"} {
		for _, topic := range []string{"$iothub/twin/GET/?$rid=" + rid, "$iothub/twin/PATCH/properties/reported/?$rid=" + rid} {
			c.publish(topic, []byte(`{"x":1}`))
			for {
				p, ok := c.read().(*mqtt.Publish)
				if !ok {
					continue // the PUBACK
				}
				if _, q, _ := strings.Cut(p.Topic, "?"); rawParam(q, "$rid") != rid {
					t.Errorf("%s: reply on %s", topic, p.Topic)
				}
				break
			}
		}
	}
}

// One SUBSCRIBE of many refused filters (another device's topics) is one
// log line, not one a filter.
func TestMQTTRefusedFiltersLoggedOnce(t *testing.T) {
	log := captureLog(t)
	e := newEnv(t)
	addr := e.startMQTT()
	c := e.rawDevice(t, addr, "d1")
	subs := make([]mqtt.Subscription, 50)
	for i := range subs {
		subs[i] = mqtt.Subscription{Filter: "devices/d" + strconv.Itoa(i+2) + "/messages/devicebound/#", QoS: 1}
	}
	c.write(&mqtt.Subscribe{PacketID: 1, Subscriptions: subs})
	if ack, ok := c.read().(*mqtt.Suback); !ok || len(ack.ReturnCodes) != 50 || ack.ReturnCodes[0] != mqtt.SubscribeFailure {
		t.Fatalf("SUBACK %+v", ack)
	}
	if n := strings.Count(log.String(), "filter="); n != 1 {
		t.Fatalf("%d log lines of refusals for one SUBSCRIBE:\n%s", n, log.String())
	}
}

// SUBSCRIBEs sent as fast as a device can send them start one queue
// reading at a time, with one at most waiting, not a goroutine each.
func TestC2DSubscribeFloodCoalesced(t *testing.T) {
	e := newEnv(t)
	c := e.rawDevice(t, e.startMQTT(), "d1")
	before := runtime.NumGoroutine()
	subs := make([]mqtt.Subscription, mqtt.DefaultMaxSubscribeFilters)
	for i := range subs {
		subs[i] = mqtt.Subscription{Filter: "devices/d1/messages/devicebound/#", QoS: 1}
	}
	for i := range 64 {
		c.write(&mqtt.Subscribe{PacketID: uint16(i + 1), Subscriptions: subs})
	}
	for acks := 0; acks < 64; {
		if _, ok := c.read().(*mqtt.Suback); ok {
			acks++
		}
	}
	if n := runtime.NumGoroutine() - before; n > 1000 {
		t.Fatalf("%d goroutines more after 4096 subscriptions", n)
	}
}

// A queued message that cannot become an MQTT topic is dropped, not left
// to hold up the messages behind it until it expires.
func TestC2DUndeliverableDropped(t *testing.T) {
	e := newEnv(t)
	addr := e.startMQTT()
	d := e.newDevice("d1", false)
	// Queued as SendC2D queues, before it bounded the properties.
	now := time.Now().UTC()
	bad, _ := json.Marshal(hub.C2DMessage{ID: "d1/00000000000000000001", MessageID: "huge",
		Properties: map[string]string{"k": strings.Repeat("/", 30<<10)}, Body: []byte("x"), Enqueued: now, Expiry: now.Add(time.Hour)})
	if _, err := e.st.Create(ctx, store.Doc{Kind: "hub.c2d", ID: "d1/00000000000000000001", Body: bad}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.hub.SendC2D(ctx, "d1", map[string]string{"messageId": "fine"}, []byte("x")); err != nil {
		t.Fatal(err)
	}
	got := e.c2dReceiver(addr, d)
	if id := testutil.Within(t, got, "the message behind the undeliverable one"); id != "fine" {
		t.Fatalf("got %s", id)
	}
	if msgs, _ := e.hub.PendingC2D(ctx, "d1"); len(msgs) > 1 {
		t.Fatalf("%d messages still queued", len(msgs))
	}
}

// A message the device never acknowledges is delivered again on each
// connection, and dropped after as many deliveries as over HTTPS, as the
// hosted hub dead-letters it; the messages behind it come then.
func TestC2DUnacknowledgedDropped(t *testing.T) {
	e := newEnv(t)
	addr := e.startMQTT()
	d := e.newDevice("d1", false)
	sent, err := e.hub.SendC2D(ctx, "d1", map[string]string{"messageId": "m1"}, []byte("x"))
	if err != nil {
		t.Fatal(err)
	}
	// connect subscribes, and returns the first message's ID (which may
	// come before the SUBACK); it does not acknowledge it.
	connect := func() (*rawClient, string) {
		t.Helper()
		c, code := e.rawConnect(t, addr, d, nil)
		if code != mqtt.Accepted {
			t.Fatalf("CONNACK %d", code)
		}
		c.write(&mqtt.Subscribe{PacketID: c.id(), Subscriptions: []mqtt.Subscription{{Filter: "devices/d1/messages/devicebound/#", QoS: 1}}})
		for {
			if p, ok := c.read().(*mqtt.Publish); ok {
				props, _ := url.ParseQuery(strings.TrimPrefix(p.Topic, "devices/d1/messages/devicebound/"))
				return c, props.Get("$.mid")
			}
		}
	}
	deliveries := func() int {
		t.Helper()
		doc, err := e.st.Get(ctx, "hub.c2d", sent.ID)
		if err != nil {
			t.Fatal(err)
		}
		var m hub.C2DMessage
		_ = json.Unmarshal(doc.Body, &m)
		return m.DeliveryCount
	}
	for i := 1; i <= 10; i++ {
		c, id := connect()
		if id != "m1" {
			t.Fatalf("connection %d got %s", i, id)
		}
		c.conn.Close() // a delivery no PUBACK answered counts when its connection ends
		for deadline := time.Now().Add(10 * time.Second); deliveries() != i; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%d deliveries counted after %d", deliveries(), i)
			}
		}
	}
	if _, err := e.hub.SendC2D(ctx, "d1", map[string]string{"messageId": "m2"}, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, id := connect(); id != "m2" {
		t.Fatalf("after 10 deliveries the next connection got %s", id)
	}
	if dev, _ := e.hub.GetIdentity(ctx, hub.Ref{Device: "d1"}); dev.CloudToDeviceMessageCount != 1 {
		t.Fatalf("count %d, with m1 dropped and m2 waiting", dev.CloudToDeviceMessageCount)
	}
}

// Usernames as the SDKs write them: with or without the '?', a device ID
// holding '?', a module, and a Plug and Play model ID left unencoded.
func TestParseUsername(t *testing.T) {
	for _, c := range []struct {
		username, clientID string
		device, module     string
		model              string
		ok                 bool
	}{
		{"h.example/d1/?api-version=2021-04-12", "d1", "d1", "", "", true},
		{"h.example/d1/api-version=2020-09-30&model-id=dtmi:com:example:Thermostat;1&DeviceClientType=x%2F1", "d1", "d1", "", "dtmi:com:example:Thermostat;1", true},
		{"h.example/d?1/?api-version=2021-04-12", "d?1", "d?1", "", "", true},
		{"h.example/d1/m1/?api-version=2021-04-12&model-id=dtmi%3Aa%3Bb%3B2", "d1/m1", "d1", "m1", "dtmi:a;b;2", true},
		{"h.example/d1", "d1", "d1", "", "", true},
		{"h.example/d1/m1/?api-version=2021-04-12", "d1", "", "", "", false}, // the module's username, the device's client ID
		{"h.example/d10/?api-version=2021-04-12", "d1", "", "", "", false},
		{"h.example/d1/?model-id=x", "d1", "", "", "", false},
		{"h.example/d1?api-version=2021-04-12", "d1", "d1", "", "", true},
		{"h.example/d1/m1/?x=1&api-version=1", "d1", "", "", "", false},
		{"/d1/?api-version=2021-04-12", "d1", "", "", "", false},
		{"h.example//?api-version=2021-04-12", "", "", "", "", false},
		{"h.example/d1//?api-version=2021-04-12", "d1/", "", "", "", false},
	} {
		_, r, q, ok := parseUsername(c.username, c.clientID)
		if ok != c.ok || ok && (r.Device != c.device || r.Module != c.module || announcedModel(q) != c.model) {
			t.Errorf("%q with client ID %q: %+v, model %q, ok %v", c.username, c.clientID, r, announcedModel(q), ok)
		}
	}
}

// Only a connection at fault is "not authorized", on which edge devices
// provision again; what a retry may cure is "server unavailable".
func TestConnackFor(t *testing.T) {
	for _, c := range []struct {
		err  error
		want byte
	}{
		{azerr.Unauthorized("bad key"), mqtt.RefusedNotAuthorized},
		{azerr.BadRequest("bad username"), mqtt.RefusedNotAuthorized},
		{azerr.PreconditionFailed("being changed concurrently: retry"), mqtt.RefusedServerUnavailable},
		{azerr.Throttled("too many", time.Second), mqtt.RefusedServerUnavailable},
		{errors.New("a failure of the service's own"), mqtt.RefusedServerUnavailable},
		{fmt.Errorf("reading: %w", context.DeadlineExceeded), mqtt.RefusedServerUnavailable},
	} {
		if got, _ := connackFor(c.err); got != c.want {
			t.Errorf("%v: CONNACK %d, want %d", c.err, got, c.want)
		}
	}
}

// A connect that panics while it holds its identity's lock (mqtt recovers
// it) releases the lock: the identity's next connect gets through.
func TestMQTTConnectPanicReleasesIdentity(t *testing.T) {
	e := newEnv(t)
	d := e.newDevice("d1", false)
	h := NewDeviceEndpoint(e.hub)
	var panicked atomic.Bool
	h.hooks = &endpointHooks{
		beforeSwap: func(*mqtt.Conn) {},
		beforeAttach: func(*mqtt.Conn) {
			if !panicked.Swap(true) {
				panic("a hook that fails once")
			}
		},
	}
	addr := e.serveMQTT(h)
	t.Cleanup(func() { // a lock left held would keep the server from stopping
		if t.Failed() {
			h.mu.Lock()
			for _, l := range h.idLocks {
				l.mu.TryLock()
				l.mu.Unlock()
			}
			h.mu.Unlock()
		}
	})
	a := e.dialRaw(t, addr, nil)
	a.write(sasConnect(d, nil))
	if p, err := a.tryRead(); err == nil {
		t.Fatalf("the connect that panicked was answered %#v", p)
	}
	if _, code := e.rawConnect(t, addr, d, nil); code != mqtt.Accepted {
		t.Fatalf("the next connect: CONNACK %d", code)
	}
}

// A device that disconnects with a method call pending ends the call at
// once, DeviceNotOnline, rather than leaving the caller its whole timeout
// and a 504 saying the device did not answer.
func TestMethodEndsWhenDeviceDisconnects(t *testing.T) {
	e := newEnv(t)
	_, _, c := e.mqttDevice("d1")
	done := make(chan struct{})
	defer close(done)
	if err := c.OnMethod(ctx, func(string, []byte) (int, []byte) {
		c.Close() // as a device renewing its token mid-call does
		<-done
		return 200, nil
	}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err := e.hubAPI.Do(ctx, "POST", "/twins/d1/methods", "", map[string]any{"methodName": "slow", "responseTimeoutInSeconds": 20}, nil)
	if e := azerr.As(err); e.Code != 404103 || time.Since(start) > 10*time.Second {
		t.Fatalf("a method whose device disconnected: %v after %v, want DeviceNotOnline at once", err, time.Since(start))
	}
}
