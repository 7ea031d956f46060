package server

// Device registration over MQTT: the Device Provisioning Service's MQTT
// device API, served on the hub's MQTT listener (port 8883). The Python and
// Embedded C SDKs register only this way.
//
//	CONNECT   username  {idScope}/registrations/{registrationId}/api-version=…&ClientVersion=…
//	          client ID {registrationId}
//	          password  SAS token, sr={idScope}/registrations/{registrationId}, skn=registration;
//	                    none for X.509 devices, which present their certificate in TLS
//	SUBSCRIBE $dps/registrations/res/#
//	PUBLISH   $dps/registrations/PUT/iotdps-register/?$rid={rid}
//	          body {"registrationId": "...", "payload": <any JSON>}
//	PUBLISH   $dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={id}
//	replies   $dps/registrations/res/{status}/?$rid={rid}[&retry-after={seconds}]
//	          202 + the operation while assigning, 200 once done, else the DPS error body.
//
// Symmetric-key and X.509 attestation are served; TPM attestation is not,
// as in Azure (its challenge is an HTTPS 401), and is refused saying so.
// The credentials are checked at CONNECT and, through
// dps.Service, again with every request, exactly as the HTTPS API checks
// its Authorization header and client certificate.

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"iter"
	"log/slog"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/mqtt"
)

const (
	dpsResponseFilter = "$dps/registrations/res/#"
	dpsResponsePrefix = "$dps/registrations/res/"
	dpsRegisterTopic  = "$dps/registrations/PUT/iotdps-register/"
	dpsStatusTopic    = "$dps/registrations/GET/iotdps-get-operationstatus/"
	// dpsNoCredentialsGrace bounds how long a session without credentials
	// stays open: long enough to be told why it cannot register.
	dpsNoCredentialsGrace = 30 * time.Second
)

// dpsEndpoint serves DPS registration sessions on the device endpoint.
type dpsEndpoint struct {
	svc *dps.Service
	// hubWrites is how long a registration may take beyond its custom
	// allocation webhook (default 30 s): the hub writes and the record.
	hubWrites time.Duration
}

// requestTimeout bounds a registration request: the webhook's own bound
// plus the hub writes, so a slow webhook fails as the webhook's and not as
// a request cut short.
func (e *dpsEndpoint) requestTimeout() time.Duration {
	return e.svc.WebhookTimeoutOrDefault() + cmp.Or(e.hubWrites, 30*time.Second)
}

// dpsSession is the state of a registration connection.
type dpsSession struct {
	regID string // from the username, as the device spelled it
	// cred is the CONNECT password (a SAS token) or the TLS client
	// certificate chain; empty when the device sent neither.
	cred dps.Credentials
	// toldUnsubscribed is set once a request without the response
	// subscription has been logged: a device retrying it logs once.
	toldUnsubscribed atomic.Bool
}

// NewDeviceEndpointWithDPS returns the device endpoint that also accepts
// registration sessions of the provisioning service p on the same listener.
func NewDeviceEndpointWithDPS(h *hub.Service, p *dps.Service) *DeviceEndpoint {
	d := NewDeviceEndpoint(h)
	d.dpsEP = &dpsEndpoint{svc: p}
	return d
}

func dpsSess(c *mqtt.Conn) *dpsSession { s, _ := c.Value().(*dpsSession); return s }

// parseDPSUsername reads "{idScope}/registrations/{registrationId}/…".
func parseDPSUsername(u string) (scope, regID string, ok bool) {
	parts := strings.SplitN(u, "/", 4)
	if len(parts) < 3 || !strings.EqualFold(parts[1], "registrations") || parts[0] == "" || parts[2] == "" {
		return "", "", false
	}
	return parts[0], parts[2], true
}

// isDPSConnect reports whether a CONNECT is a registration session: its
// username has the DPS shape and does not name this hub (a device called
// "registrations" with a module keeps its hub session).
func (d *DeviceEndpoint) isDPSConnect(p *mqtt.Connect) bool {
	if d.dpsEP == nil {
		return false
	}
	host, _, ok := parseDPSUsername(p.Username)
	return ok && !strings.EqualFold(host, d.hub.Host())
}

// authenticateDPS accepts a registration session. A SAS token or client
// certificate is verified now, so a wrong one is refused with CONNACK 5
// ("not authorized", which the SDKs report as an authorization failure). A
// session with neither is accepted so that its requests can be answered
// with an error that says what to send, for a while and as long as the
// server's bound of unauthenticated connections leaves it room.
func (d *DeviceEndpoint) authenticateDPS(c *mqtt.Conn, p *mqtt.Connect) byte {
	svc := d.dpsEP.svc
	scope, regID, _ := parseDPSUsername(p.Username)
	refuse := func(reason string) byte {
		slog.Info("dps mqtt connection refused", "registrationId", regID, "clientId", p.ClientID, "reason", reason)
		return mqtt.RefusedNotAuthorized
	}
	if !strings.EqualFold(scope, svc.IDScope()) {
		return refuse(fmt.Sprintf("ID scope %q is not this service's (%s): check id_scope in the device configuration", scope, svc.IDScope()))
	}
	if !strings.EqualFold(p.ClientID, regID) {
		return refuse(fmt.Sprintf("the client ID must be the registration ID %q of the username", regID))
	}
	s := &dpsSession{regID: regID, cred: dps.Credentials{Authorization: string(p.Password)}}
	if c.TLS() != nil {
		s.cred.Certificates = c.TLS().PeerCertificates
	}
	if s.unauthenticated() {
		slog.Info("dps mqtt session without a SAS token or client certificate; its requests will be refused", "registrationId", regID)
		// It is there only to be told what to send: it stays among the
		// unauthenticated connections, which give way to new ones.
		c.MarkUnauthenticated()
		time.AfterFunc(dpsNoCredentialsGrace, c.Close)
		c.SetValue(s)
		return mqtt.Accepted
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := svc.AuthenticateDevice(ctx, scope, regID, s.cred); err != nil {
		code, logged := connackFor(err)
		switch {
		case code == mqtt.RefusedNotAuthorized:
			return refuse(azerr.Why(err))
		case !logged:
			slog.Warn("dps mqtt connection refused: authentication failed", "registrationId", regID, "error", err)
		}
		return code
	}
	c.SetValue(s)
	return mqtt.Accepted
}

func (s *dpsSession) unauthenticated() bool {
	return s.cred.Authorization == "" && len(s.cred.Certificates) == 0
}

// subscribeDPS grants the response topic and nothing else (the MQTT
// server logs what is refused, once a SUBSCRIBE).
func (d *DeviceEndpoint) subscribeDPS(_ *mqtt.Conn, _ *dpsSession, filter string, qos byte) byte {
	if filter == dpsResponseFilter {
		return min(qos, 1)
	}
	return mqtt.SubscribeFailure
}

// publishedDPS answers the two requests of a registration session. Any
// other topic (the hub's included) is an error, which closes the connection.
func (d *DeviceEndpoint) publishedDPS(c *mqtt.Conn, s *dpsSession, p *mqtt.Publish) error {
	svc := d.dpsEP.svc
	var register bool
	switch {
	case strings.HasPrefix(p.Topic, dpsRegisterTopic):
		register = true
	case strings.HasPrefix(p.Topic, dpsStatusTopic):
	default:
		return fmt.Errorf("%w: %q (a registration session publishes to %s and %s only)", errTopic, p.Topic, dpsRegisterTopic, dpsStatusTopic)
	}
	_, rawQuery, _ := strings.Cut(p.Topic, "?")
	q, _ := url.ParseQuery(rawQuery)
	rid := rawParam(rawQuery, "$rid")
	// Without the response subscription the reply would reach nobody: do
	// no work, which would spend throttling allowance and write records
	// the device never hears of.
	if !c.Subscribed(dpsResponsePrefix + "200/?$rid=" + rid) {
		if !s.toldUnsubscribed.Swap(true) {
			slog.Info("dps mqtt request ignored: subscribe to "+dpsResponseFilter+" before publishing", "registrationId", s.regID, "topic", p.Topic)
		}
		return nil
	}
	if s.unauthenticated() && register && dps.CarriesTPM(p.Payload) {
		err := azerr.Unauthorized("registration %q is not authorized: %s", s.regID, dps.TPMOverMQTT)
		err.Reason = dps.TPMOverMQTT // logged
		return d.replyDPSError(c, rid, err)
	}
	if s.unauthenticated() {
		return d.replyDPSError(c, rid, azerr.Unauthorized("registration %q is not authorized: no SAS token in the MQTT password and no TLS client certificate: "+
			"send a SAS token (sr={idScope}/registrations/{registrationId}, skn=registration) as the password, or connect with the device's X.509 certificate", s.regID))
	}
	ctx, cancel := context.WithTimeout(context.Background(), d.dpsEP.requestTimeout())
	defer cancel()
	if register {
		// No challenge comes back: the session has credentials.
		op, _, err := svc.Register(ctx, dps.RegisterRequest{IDScope: svc.IDScope(), RegistrationID: s.regID,
			Credentials: s.cred, Body: p.Payload, Addr: deviceAddr(c.RemoteAddr().String())})
		if err != nil {
			return d.replyDPSError(c, rid, err)
		}
		return d.replyDPS(c, 202, rid, dps.PollNow, op)
	}
	opID := q.Get("operationId")
	if opID == "" {
		return d.replyDPSError(c, rid, azerr.BadRequest("the operation status request has no operationId in its topic"))
	}
	op, err := svc.OperationStatus(ctx, svc.IDScope(), s.regID, opID, s.cred)
	if err != nil {
		return d.replyDPSError(c, rid, err)
	}
	if op.Status == dps.StatusAssigning {
		return d.replyDPS(c, 202, rid, dps.PollLater, op)
	}
	return d.replyDPS(c, 200, rid, -1, op)
}

// rawParam returns a query parameter as the client wrote it, so that the
// reply echoes the request ID byte for byte (a client may match it as text).
func rawParam(rawQuery, name string) string {
	for k, v := range rawPairs(rawQuery) {
		if k == name {
			return v
		}
	}
	return ""
}

// rawPairs yields a query's name=value pairs as written: split on '&', each
// on its first '='. Not url.ParseQuery, which refuses a ';' or a bad escape:
// Embedded C and hand-written firmware send values such as model IDs
// ("dtmi:com:example:Thermostat;1") or "100%" unencoded, and IoT Hub takes
// them.
func rawPairs(rawQuery string) iter.Seq2[string, string] {
	return func(yield func(string, string) bool) {
		for kv := range strings.SplitSeq(rawQuery, "&") {
			if kv == "" {
				continue
			}
			k, v, _ := strings.Cut(kv, "=")
			if !yield(k, v) {
				return
			}
		}
	}
}

// unescapeOr decodes a query name or value, or returns it as written when it
// is not a valid escape ("100%"): such a client did not encode it.
func unescapeOr(s string) string {
	if dec, err := url.QueryUnescape(s); err == nil {
		return dec
	}
	return s
}

// replyDPS sends a response to the device's $dps/registrations/res/# subscription.
// retryAfter < 0 sends none.
func (d *DeviceEndpoint) replyDPS(c *mqtt.Conn, status int, rid string, retryAfter int, v any) error {
	topic := dpsResponsePrefix + strconv.Itoa(status) + "/?$rid=" + rid
	if retryAfter >= 0 {
		topic += "&retry-after=" + strconv.Itoa(retryAfter)
	}
	body, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return d.reply(c, topic, body)
}

// replyDPSError sends err in the shape of azerr.WriteDPS, with the HTTP
// status in the topic; throttling adds retry-after as the Retry-After header.
func (d *DeviceEndpoint) replyDPSError(c *mqtt.Conn, rid string, err error) error {
	u := unavailable(err) // logged there, once a period
	if u != nil {
		err = u
	}
	e, id := azerr.As(err), trackingID()
	switch {
	case e.Status() >= 500 && u == nil:
		slog.Warn("dps mqtt request failed", "clientId", c.ClientID(), "trackingId", id, "error", err)
	case e.Reason != "":
		slog.Info("dps mqtt request refused", "clientId", c.ClientID(), "trackingId", id, "reason", e.Reason)
	}
	topic := dpsResponsePrefix + strconv.Itoa(e.Status()) + "/?$rid=" + rid
	if e.RetryAfter > 0 {
		topic += "&retry-after=" + strconv.Itoa(e.RetryAfterSeconds())
	}
	body, _ := json.Marshal(azerr.DPSBody(e, id))
	return d.reply(c, topic, body)
}
