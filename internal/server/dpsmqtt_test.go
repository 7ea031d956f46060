package server

import (
	"bufio"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/mqtt"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/testutil"
)

// startDPSMQTT serves the device endpoint with DPS registrations on loopback.
func (e *env) startDPSMQTT() string { return e.serveMQTT(NewDeviceEndpointWithDPS(e.hub, e.dps)) }

// rawClient is a minimal client on the raw MQTT codec: a registration,
// doing what the SDKs' MQTT provisioning transports do, or a device.
type rawClient struct {
	t      *testing.T
	conn   net.Conn
	rd     *bufio.Reader
	nextID uint16
}

// dpsReply is a $dps/registrations/res/{status}/?… message.
type dpsReply struct {
	status int
	query  url.Values
	body   map[string]any
}

// dialDPS connects as a registration; code is the CONNACK return code.
func (e *env) dialDPS(t *testing.T, addr, username, clientID, password string, cert *tls.Certificate) (*rawClient, byte) {
	t.Helper()
	c := e.dialRaw(t, addr, cert)
	return c, c.connect(&mqtt.Connect{ProtocolLevel: 4, CleanSession: true, KeepAlive: 60, ClientID: clientID,
		HasUsername: true, Username: username, HasPassword: password != "", Password: []byte(password)}).ReturnCode
}

// dialRaw opens a TLS connection to the MQTT endpoint at addr.
func (e *env) dialRaw(t *testing.T, addr string, cert *tls.Certificate) *rawClient {
	t.Helper()
	conf := e.tls.Clone()
	conf.ServerName = "example.com" // the test server's certificate
	if cert != nil {
		conf.Certificates = []tls.Certificate{*cert}
	}
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, conf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &rawClient{t: t, conn: conn, rd: bufio.NewReader(conn)}
}

// connect sends p and returns the CONNACK.
func (c *rawClient) connect(p *mqtt.Connect) *mqtt.Connack {
	c.t.Helper()
	c.write(p)
	ack, ok := c.read().(*mqtt.Connack)
	if !ok {
		c.t.Fatal("no CONNACK")
	}
	return ack
}

func (c *rawClient) write(p mqtt.Packet) {
	c.t.Helper()
	b, err := p.Encode(nil)
	if err != nil {
		c.t.Fatal(err)
	}
	_ = c.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.conn.Write(b); err != nil {
		c.t.Fatal(err)
	}
}

// read returns the next packet; a closed connection fails the test.
func (c *rawClient) read() mqtt.Packet {
	c.t.Helper()
	p, err := c.tryRead()
	if err != nil {
		c.t.Fatalf("reading from the server: %v", err)
	}
	return p
}

func (c *rawClient) tryRead() (mqtt.Packet, error) {
	_ = c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	return mqtt.ReadPacket(c.rd, mqtt.DefaultMaxPacketSize)
}

func (c *rawClient) id() uint16 { c.nextID++; return c.nextID }

func (c *rawClient) subscribe(filter string) byte {
	c.t.Helper()
	id := c.id()
	c.write(&mqtt.Subscribe{PacketID: id, Subscriptions: []mqtt.Subscription{{Filter: filter, QoS: 1}}})
	for {
		if ack, ok := c.read().(*mqtt.Suback); ok && ack.PacketID == id {
			return ack.ReturnCodes[0]
		}
	}
}

func (c *rawClient) publish(topic string, body []byte) {
	c.t.Helper()
	c.write(&mqtt.Publish{QoS: 1, PacketID: c.id(), Topic: topic, Payload: body})
}

// request publishes at QoS 1 and returns the reply carrying the same $rid.
func (c *rawClient) request(topic, rid string, body []byte) dpsReply {
	c.t.Helper()
	c.publish(topic, body)
	for {
		p, ok := c.read().(*mqtt.Publish)
		if !ok {
			continue // the PUBACK
		}
		if p.QoS == 1 {
			c.write(&mqtt.Puback{PacketID: p.PacketID})
		}
		rest, found := strings.CutPrefix(p.Topic, "$dps/registrations/res/")
		statusText, rawQuery, _ := strings.Cut(rest, "/?")
		status, err := strconv.Atoi(statusText)
		if !found || err != nil {
			c.t.Fatalf("reply on topic %q", p.Topic)
		}
		q, _ := url.ParseQuery(rawQuery)
		if q.Get("$rid") != rid {
			continue
		}
		r := dpsReply{status: status, query: q}
		if err := json.Unmarshal(p.Payload, &r.body); err != nil {
			c.t.Fatalf("reply %s is not a JSON object: %v", p.Payload, err)
		}
		return r
	}
}

func (c *rawClient) register(rid string, body string) dpsReply {
	return c.request("$dps/registrations/PUT/iotdps-register/?$rid="+rid, rid, []byte(body))
}

func (c *rawClient) poll(rid, opID string) dpsReply {
	return c.request("$dps/registrations/GET/iotdps-get-operationstatus/?$rid="+rid+"&operationId="+url.QueryEscape(opID), rid, []byte(" "))
}

// closed waits for the server to end the connection.
func (c *rawClient) closed() bool {
	for {
		if _, err := c.tryRead(); err != nil {
			var ne net.Error
			return !errors.As(err, &ne) || !ne.Timeout()
		}
	}
}

func dpsUsername(scope, regID string) string {
	return scope + "/registrations/" + regID + "/api-version=2019-03-31&ClientVersion=" + url.QueryEscape("hatchery-test/1.0")
}

func dpsToken(scope, regID string, key []byte) string {
	return sas.Build(key, scope+"/registrations/"+regID, "registration", time.Now().Add(time.Hour))
}

// registerOverMQTT runs a whole registration as the SDKs do, with a key or
// a client certificate, and returns the final registration state.
func (e *env) registerOverMQTT(t *testing.T, addr, regID string, key []byte, cert *tls.Certificate, payload string) map[string]any {
	t.Helper()
	scope := e.dps.IDScope()
	password := ""
	if key != nil {
		password = dpsToken(scope, regID, key)
	}
	c, code := e.dialDPS(t, addr, dpsUsername(scope, regID), regID, password, cert)
	if code != mqtt.Accepted {
		t.Fatalf("CONNACK %d", code)
	}
	if g := c.subscribe("$dps/registrations/res/#"); g != 1 {
		t.Fatalf("SUBACK %#x", g)
	}
	r := c.register("1", `{"registrationId":"`+regID+`","payload":`+payload+`}`)
	if r.status != 202 || r.query.Get("retry-after") != "0" || r.body["status"] != "assigning" || r.body["operationId"] == "" {
		t.Fatalf("register reply %d %v %v", r.status, r.query, r.body)
	}
	opID, _ := r.body["operationId"].(string)
	for i := 2; ; i++ {
		r = c.poll(strconv.Itoa(i), opID)
		if r.status != 202 {
			break
		}
		if i > 10 {
			t.Fatal("still assigning after 10 polls")
		}
	}
	if r.status != 200 || r.body["status"] != "assigned" || r.body["operationId"] != opID {
		t.Fatalf("poll reply %d %v", r.status, r.body)
	}
	state, _ := r.body["registrationState"].(map[string]any)
	if state == nil {
		t.Fatalf("no registrationState in %v", r.body)
	}
	c.write(&mqtt.Disconnect{})
	return state
}

func TestDPSOverMQTTRegisters(t *testing.T) {
	e := newEnv(t)
	addr := e.startDPSMQTT()

	// An individual symmetric-key enrollment.
	en := e.putEnrollment(&dps.Enrollment{RegistrationID: "mqtt-01", DeviceID: "mqtt-device-01",
		Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
	key, _ := base64.StdEncoding.DecodeString(en.Attestation.SymmetricKey.PrimaryKey)
	st := e.registerOverMQTT(t, addr, "mqtt-01", key, nil, `{"model":"m1"}`)
	if st["status"] != "assigned" || st["assignedHub"] != host || st["deviceId"] != "mqtt-device-01" ||
		st["registrationId"] != "mqtt-01" {
		t.Fatalf("registration state %v", st)
	}
	if p, ok := st["payload"]; ok {
		t.Fatalf("the device's payload came back: %v", p)
	}
	// The device then connects to the hub on the same listener.
	hc, err := e.dial(addr, "mqtt-device-01", "", en.Attestation.SymmetricKey.PrimaryKey)
	if err != nil {
		t.Fatalf("hub connection of the provisioned device: %v", err)
	}
	if err := hc.SendEvent(ctx, []byte(`{"n":1}`), nil); err != nil {
		t.Fatal(err)
	}
	hc.Close()

	// A device of a symmetric-key group, with its derived key.
	var g dps.EnrollmentGroup
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/mqtt-line", "", &dps.EnrollmentGroup{
		Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}}, &g); err != nil {
		t.Fatal(err)
	}
	gk, _ := base64.StdEncoding.DecodeString(g.Attestation.SymmetricKey.PrimaryKey)
	devKey := sas.DeriveDeviceKey(gk, "sensor-9")
	st = e.registerOverMQTT(t, addr, "sensor-9", devKey, nil, `null`)
	if st["status"] != "assigned" || st["deviceId"] != "sensor-9" || st["assignedHub"] != host {
		t.Fatalf("group registration state %v", st)
	}
	hc, err = e.dial(addr, "sensor-9", "", base64.StdEncoding.EncodeToString(devKey))
	if err != nil {
		t.Fatalf("hub connection of the group device: %v", err)
	}
	hc.Close()
}

func TestDPSOverMQTTRefusals(t *testing.T) {
	e := newEnv(t)
	addr := e.startDPSMQTT()
	scope := e.dps.IDScope()
	en := e.putEnrollment(&dps.Enrollment{RegistrationID: "mqtt-02", Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
	key, _ := base64.StdEncoding.DecodeString(en.Attestation.SymmetricKey.PrimaryKey)
	other := []byte("0123456789abcdef0123456789abcdef")

	// Refused at CONNECT with 5, "not authorized".
	for _, tc := range []struct{ what, username, clientID, password string }{
		{"wrong key", dpsUsername(scope, "mqtt-02"), "mqtt-02", dpsToken(scope, "mqtt-02", other)},
		{"unknown registration", dpsUsername(scope, "ghost"), "ghost", dpsToken(scope, "ghost", other)},
		{"token for another registration", dpsUsername(scope, "mqtt-02"), "mqtt-02", dpsToken(scope, "mqtt-03", key)},
		{"another ID scope", dpsUsername("0ne00000000", "mqtt-02"), "mqtt-02", dpsToken("0ne00000000", "mqtt-02", key)},
		{"client ID not the registration ID", dpsUsername(scope, "mqtt-02"), "someone-else", dpsToken(scope, "mqtt-02", key)},
	} {
		if _, code := e.dialDPS(t, addr, tc.username, tc.clientID, tc.password, nil); code != mqtt.RefusedNotAuthorized {
			t.Errorf("%s: CONNACK %d, want 5", tc.what, code)
		}
	}
	// The ID scope is case-insensitive.
	if _, code := e.dialDPS(t, addr, dpsUsername(strings.ToLower(scope), "mqtt-02"), "mqtt-02", dpsToken(scope, "mqtt-02", key), nil); code != mqtt.Accepted {
		t.Errorf("lower-case ID scope: CONNACK %d", code)
	}

	// A session only subscribes to the response topic.
	c, code := e.dialDPS(t, addr, dpsUsername(scope, "mqtt-02"), "mqtt-02", dpsToken(scope, "mqtt-02", key), nil)
	if code != mqtt.Accepted {
		t.Fatalf("CONNACK %d", code)
	}
	if g := c.subscribe("$iothub/twin/res/#"); g != mqtt.SubscribeFailure {
		t.Errorf("hub subscription granted %#x", g)
	}
	if g := c.subscribe("$dps/registrations/res/#"); g != 1 {
		t.Fatalf("SUBACK %#x", g)
	}
	// Errors come back in the DPS shape on the response topic.
	r := c.poll("a", "5.0000000000000000.0000000000000000")
	if r.status != 404 || r.body["errorCode"] != float64(404201) || r.body["trackingId"] == "" || r.body["timestampUtc"] == "" {
		t.Fatalf("unknown operation: %d %v", r.status, r.body)
	}
	r = c.register("b", `{"registrationId":"not-me"}`)
	if msg, _ := r.body["message"].(string); r.status != 400 || r.body["errorCode"] != float64(400004) || !strings.Contains(msg, "MQTT username") {
		t.Fatalf("other registrationId in the body: %d %v", r.status, r.body)
	}
	// A disabled enrollment: the session authenticated, the registration is refused.
	en.ProvisioningStatus = "disabled"
	e.putEnrollment(en)
	r = c.register("c", `{"registrationId":"mqtt-02"}`)
	if msg, _ := r.body["message"].(string); r.status != 401 || r.body["errorCode"] != float64(401002) || !strings.Contains(msg, "disabled") {
		t.Fatalf("disabled enrollment: %d %v", r.status, r.body)
	}
	// Publishing to a hub topic ends the session.
	c.publish("devices/mqtt-02/messages/events/", []byte("{}"))
	if !c.closed() {
		t.Fatal("connection still open after publishing to a hub topic")
	}

	// An X.509 device nobody enrolled is refused at CONNECT; a session with
	// neither token nor certificate is told what to send.
	cert := testutil.NewCert(t, "x509-dev", false, nil)
	if _, code := e.dialDPS(t, addr, dpsUsername(scope, "x509-dev"), "x509-dev", "", &cert); code != mqtt.RefusedNotAuthorized {
		t.Fatalf("unenrolled X.509 device: CONNACK %d", code)
	}
	c, code = e.dialDPS(t, addr, dpsUsername(scope, "mqtt-02"), "mqtt-02", "", nil)
	if code != mqtt.Accepted {
		t.Fatalf("session without credentials: CONNACK %d", code)
	}
	c.subscribe("$dps/registrations/res/#")
	r = c.register("d", `{"registrationId":"mqtt-02"}`)
	if msg, _ := r.body["message"].(string); r.status != 401 || !strings.Contains(msg, "no SAS token in the MQTT password and no TLS client certificate") {
		t.Fatalf("registration without credentials: %d %v", r.status, r.body)
	}
	if n := e.counts()["dps.registration"]; n != 0 {
		t.Fatalf("%d registrations stored by refused requests", n)
	}
}

// A device whose username has the DPS shape but names the hub stays a hub
// device (one named "registrations", connecting as a module).
func TestDPSUsernameDispatch(t *testing.T) {
	for _, tc := range []struct {
		u         string
		scope, id string
		ok        bool
	}{
		{"0ne0001/registrations/dev-1/api-version=2019-03-31&ClientVersion=x", "0ne0001", "dev-1", true},
		{"0ne0001/Registrations/dev-1", "0ne0001", "dev-1", true},
		{"hub.example/dev-1/?api-version=2021-04-12", "", "", false},
		{"0ne0001/registrations//api-version=1", "", "", false},
	} {
		scope, id, ok := parseDPSUsername(tc.u)
		if scope != tc.scope || id != tc.id || ok != tc.ok {
			t.Errorf("parseDPSUsername(%q) = %q %q %v", tc.u, scope, id, ok)
		}
	}
	e := newEnv(t)
	d := NewDeviceEndpointWithDPS(e.hub, e.dps)
	if d.isDPSConnect(&mqtt.Connect{Username: host + "/registrations/m1/?api-version=2021-04-12"}) {
		t.Error("a hub module session taken for DPS")
	}
	if !d.isDPSConnect(&mqtt.Connect{Username: dpsUsername(e.dps.IDScope(), "r1")}) {
		t.Error("a DPS session not recognized")
	}
}

// A registration over MQTT waits as long as the custom allocation webhook
// may take, and more: the request's bound derives from WebhookTimeout, so
// a webhook slower than the room for the hub writes still assigns.
func TestDPSOverMQTTSlowWebhook(t *testing.T) {
	e := newEnv(t)
	e.dps.WebhookTimeout = 5 * time.Second
	d := NewDeviceEndpointWithDPS(e.hub, e.dps)
	d.dpsEP.hubWrites = 300 * time.Millisecond
	addr := e.serveMQTT(d)
	hook := slowWebhook(t, time.Second)
	en := e.putEnrollment(&dps.Enrollment{RegistrationID: "mqtt-slow-hook", AllocationPolicy: dps.PolicyCustom,
		CustomAllocationDefinition: &dps.CustomAllocationDefinition{WebhookURL: hook.URL, APIVersion: "2021-10-01"},
		Attestation:                dps.Attestation{Type: dps.AttestationSymmetricKey}})
	key, _ := base64.StdEncoding.DecodeString(en.Attestation.SymmetricKey.PrimaryKey)
	if st := e.registerOverMQTT(t, addr, "mqtt-slow-hook", key, nil, `null`); st["status"] != "assigned" || st["assignedHub"] != host {
		t.Fatalf("registration state %v", st)
	}
}

// TPM attestation is not served over MQTT, as in Azure: a TPM device is
// told so, and not that its token or credentials are wrong.
func TestDPSOverMQTTRefusesTPM(t *testing.T) {
	e := newEnv(t)
	addr := e.startDPSMQTT()
	scope := e.dps.IDScope()
	logs := captureLog(t)
	e.putEnrollment(&dps.Enrollment{RegistrationID: "tpm-mqtt", Attestation: dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EndorsementKey: testEK(t)}}})

	// With a SAS token: refused at CONNECT, the reason logged.
	tok := dpsToken(scope, "tpm-mqtt", []byte("0123456789abcdef0123456789abcdef"))
	if _, code := e.dialDPS(t, addr, dpsUsername(scope, "tpm-mqtt"), "tpm-mqtt", tok, nil); code != mqtt.RefusedNotAuthorized {
		t.Fatalf("TPM enrollment with a SAS token: CONNACK %d, want 5", code)
	}
	if !strings.Contains(logs.String(), "TPM attestation is not supported over MQTT: register over HTTPS") {
		t.Fatalf("the refusal's reason is not logged:\n%s", logs)
	}

	// Without credentials, asking with its TPM as over HTTPS: told to use HTTPS.
	c, code := e.dialDPS(t, addr, dpsUsername(scope, "tpm-mqtt"), "tpm-mqtt", "", nil)
	if code != mqtt.Accepted {
		t.Fatalf("session without credentials: CONNACK %d", code)
	}
	c.subscribe("$dps/registrations/res/#")
	r := c.register("1", `{"registrationId":"tpm-mqtt","tpm":{"endorsementKey":"`+testEK(t)+`"}}`)
	if msg, _ := r.body["message"].(string); r.status != 401 || !strings.Contains(msg, "TPM attestation is not supported over MQTT: register over HTTPS") {
		t.Fatalf("TPM registration without credentials: %d %v", r.status, r.body)
	}
	if n := e.counts()["dps.challenge"]; n != 0 {
		t.Fatalf("%d challenges issued over MQTT", n)
	}
	if n := strings.Count(logs.String(), "reason=\"TPM attestation is not supported over MQTT"); n != 2 {
		t.Fatalf("the reason logged %d times, want at CONNECT and for the request:\n%s", n, logs)
	}
}

// A request published before the response subscription would be answered
// to nobody: it is not done (no throttling spent, nothing written), and
// the log says why, once.
func TestDPSOverMQTTPublishBeforeSubscribe(t *testing.T) {
	e := newEnv(t)
	addr := e.startDPSMQTT()
	scope := e.dps.IDScope()
	logs := captureLog(t)
	e.dps.Throttle = dps.NewThrottle(0, 1, 1) // one request: a done one would leave the next throttled
	en := e.putEnrollment(&dps.Enrollment{RegistrationID: "eager-1", Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
	key, _ := base64.StdEncoding.DecodeString(en.Attestation.SymmetricKey.PrimaryKey)
	c, code := e.dialDPS(t, addr, dpsUsername(scope, "eager-1"), "eager-1", dpsToken(scope, "eager-1", key), nil)
	if code != mqtt.Accepted {
		t.Fatalf("CONNACK %d", code)
	}
	for range 2 {
		c.publish("$dps/registrations/PUT/iotdps-register/?$rid=early", []byte(`{"registrationId":"eager-1"}`))
		if _, ok := c.read().(*mqtt.Puback); !ok {
			t.Fatal("no PUBACK for the early request")
		}
	}
	if n := e.counts()["dps.registration"] + e.counts()["hub.device"]; n != 0 {
		t.Fatalf("%d records written by a request answered to nobody", n)
	}
	const want = "request ignored: subscribe to $dps/registrations/res/# before publishing"
	if n := strings.Count(logs.String(), want); n != 1 {
		t.Fatalf("logged %d times, want once:\n%s", n, logs)
	}
	c.subscribe("$dps/registrations/res/#")
	if r := c.register("1", `{"registrationId":"eager-1"}`); r.status != 202 {
		t.Fatalf("register after subscribing: %d %v", r.status, r.body)
	}
}

// Throttling over MQTT: the reply topic carries the status and retry-after,
// and a device that waits that long registers.
func TestDPSOverMQTTThrottled(t *testing.T) {
	e := newEnv(t)
	addr := e.startDPSMQTT()
	scope := e.dps.IDScope()
	session := func(regID string) *rawClient {
		en := e.putEnrollment(&dps.Enrollment{RegistrationID: regID, Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
		key, _ := base64.StdEncoding.DecodeString(en.Attestation.SymmetricKey.PrimaryKey)
		c, code := e.dialDPS(t, addr, dpsUsername(scope, regID), regID, dpsToken(scope, regID, key), nil)
		if code != mqtt.Accepted {
			t.Fatalf("%s: CONNACK %d", regID, code)
		}
		c.subscribe("$dps/registrations/res/#")
		return c
	}
	body := func(regID string) string { return `{"registrationId":"` + regID + `"}` }
	for _, tc := range []struct {
		what            string
		throttle        *dps.Throttle
		device, spender string // the spender's registration spends the allowance
	}{
		{"per device", dps.NewThrottle(0, 1, 1), "busy-1", "busy-1"},
		{"global", dps.NewThrottle(1, 0, 1), "busy-2", "calm-2"},
	} {
		e.dps.Throttle = tc.throttle
		c := session(tc.device)
		spender := c
		if tc.spender != tc.device {
			spender = session(tc.spender)
		}
		if r := spender.register("1", body(tc.spender)); r.status != 202 {
			t.Fatalf("%s: first registration: %d %v", tc.what, r.status, r.body)
		}
		r := c.register("2", body(tc.device))
		wait, err := strconv.Atoi(r.query.Get("retry-after"))
		if r.status != 429 || r.body["errorCode"] != float64(429001) || err != nil || wait < 1 {
			t.Fatalf("%s: throttled registration: %d %v %v, want 429 with retry-after", tc.what, r.status, r.query, r.body)
		}
		time.Sleep(time.Duration(wait) * time.Second)
		if r := c.register("3", body(tc.device)); r.status != 202 {
			t.Fatalf("%s: registration after retry-after=%d: %d %v", tc.what, wait, r.status, r.body)
		}
	}
}
