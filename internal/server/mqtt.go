package server

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/mqtt"
	"github.com/hatchery/hatchery/internal/twindoc"
)

// DeviceEndpoint is the hub's MQTT front end: it maps the Azure IoT Hub
// device topics onto the hub service and keeps one connection per identity.
type DeviceEndpoint struct {
	hub *hub.Service
	// dpsEP serves DPS registrations over MQTT on the same listener
	// (dpsmqtt.go); nil when the endpoint was made without DPS.
	dpsEP *dpsEndpoint

	mu       sync.Mutex
	sessions map[hub.Ref]*mqtt.Conn
	idLocks  map[hub.Ref]*identityLock // lockIdentity's, while held or waited for

	// hooks, for tests, run in Authenticate; nil in service.
	hooks *endpointHooks
}

// endpointHooks let a test hold a connection at a point of Authenticate, to
// interleave another with it.
type endpointHooks struct {
	beforeSwap   func(*mqtt.Conn) // authenticated, before it replaces the identity's connection
	beforeAttach func(*mqtt.Conn) // it replaced it, before the hub records it connected
}

// NewDeviceEndpoint returns the mqtt.Handler of the hub's device endpoint.
func NewDeviceEndpoint(h *hub.Service) *DeviceEndpoint {
	return &DeviceEndpoint{hub: h, sessions: map[hub.Ref]*mqtt.Conn{}, idLocks: map[hub.Ref]*identityLock{}}
}

// session is what a connection is allowed to do and what it listens to.
type session struct {
	ref      hub.Ref
	mu       sync.Mutex
	cancels  []func()
	watching map[string]bool              // filters whose watcher runs: one each, however often subscribed
	c2dSent  map[string]bool              // C2D messages sent on this connection and still queued, by store ID
	methods  map[string]chan methodAnswer // by $rid
	gone     chan struct{}                // closed with the connection: calls waiting on it end
	nextRID  atomic.Uint64
	// kept is what a persistent session (CleanSession 0) is subscribed
	// to, as the hub keeps it; a clean session keeps nothing. Only the
	// connection's packet handling touches it, one packet at a time.
	kept       []hub.Subscription
	persistent bool
	// unlocked delivers again when the lock of a message received over
	// HTTPS runs out, which changes nothing a watcher hears of; none is
	// started once the connection has closed (unlockClosed).
	unlocked     *time.Timer
	unlockClosed bool
	// will is the telemetry the CONNECT's last will sends if the
	// connection drops without DISCONNECT; nil: none.
	will *hub.Message
	// delivery is whether C2D delivery runs (deliveryRunning) and is
	// asked for again meanwhile (deliveryAgain): one at a time, and
	// however often it is asked for, by SUBSCRIBEs or new messages, one
	// at most waits.
	delivery atomic.Int32
	// c2dSubscribed: the device is subscribed to its devicebound topic
	// (by its packet handling only, one packet at a time), so that a
	// SUBSCRIBE repeated meanwhile reads no queue.
	c2dSubscribed bool
}

// withSubscription is kept with filter subscribed at qos
// (mqtt.SubscribeFailure: not subscribed), changed in place, so that
// resuming a session, or subscribing again, changes nothing.
func withSubscription(kept []hub.Subscription, filter string, qos byte) []hub.Subscription {
	kept = slices.Clone(kept)
	i := slices.IndexFunc(kept, func(k hub.Subscription) bool { return k.Filter == filter })
	switch {
	case qos == mqtt.SubscribeFailure && i >= 0:
		return slices.Delete(kept, i, i+1)
	case qos == mqtt.SubscribeFailure:
		return kept
	case i >= 0:
		kept[i].QoS = qos
		return kept
	}
	return append(kept, hub.Subscription{Filter: filter, QoS: qos})
}

// keep records in the hub that the session is subscribed to filter with
// qos (mqtt.SubscribeFailure: no longer), for its next connection to
// resume; a clean session keeps nothing.
func (d *DeviceEndpoint) keep(s *session, filter string, qos byte) {
	if !s.persistent {
		return
	}
	kept := withSubscription(s.kept, filter, qos)
	if slices.Equal(kept, s.kept) {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := d.hub.KeepSession(ctx, s.ref, kept); err != nil {
		slog.Warn("keeping a device's MQTT session", "identity", s.ref.String(), "error", err)
		return
	}
	s.kept = kept
}

// watch reports whether filter's watcher is to be started: the first time
// only, so that repeated SUBSCRIBEs cannot pile up watchers.
func (s *session) watch(filter string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.watching[filter] {
		return false
	}
	if s.watching == nil {
		s.watching = map[string]bool{}
	}
	s.watching[filter] = true
	return true
}

type methodAnswer struct {
	status  int
	payload json.RawMessage
}

func (s *session) onClose(f func()) {
	s.mu.Lock()
	s.cancels = append(s.cancels, f)
	s.mu.Unlock()
}

func sess(c *mqtt.Conn) *session { s, _ := c.Value().(*session); return s }

// parseUsername reads "{hub}/{clientID}/?api-version=…[&model-id=…]",
// clientID being "{device}" or "{device}/{module}" as the CONNECT's client
// ID says (device IDs may hold '?', which the SDKs do not encode; they may
// not hold '/'). Some clients leave out the '?'. It returns the hub, the
// identity and the raw query (where a Plug and Play device announces its
// model: announcedModel).
func parseUsername(u, clientID string) (host string, r hub.Ref, query string, ok bool) {
	host, rest, _ := strings.Cut(u, "/")
	device, module, hasModule := strings.Cut(clientID, "/")
	rest, found := strings.CutPrefix(rest, clientID)
	if host == "" || device == "" || hasModule && (module == "" || strings.Contains(module, "/")) || !found {
		return "", hub.Ref{}, "", false
	}
	if rest != "" && !strings.HasPrefix(rest, "/") && !strings.HasPrefix(rest, "?") {
		return "", hub.Ref{}, "", false
	}
	rest = strings.TrimPrefix(rest, "/")
	if rest != "" {
		q := strings.TrimPrefix(rest, "?")
		first, _, _ := strings.Cut(q, "=")
		if strings.ContainsAny(first, "/?") || !strings.HasPrefix(q, "api-version=") && !strings.Contains(q, "&api-version=") {
			return "", hub.Ref{}, "", false
		}
		query = q
	}
	return host, hub.Ref{Device: device, Module: module}, query, true
}

// announcedModel is the model-id of a username's query, decoded if encoded:
// the Node SDK sends model IDs ("dtmi:com:example:Thermostat;1") unencoded,
// others encode them (rawPairs).
func announcedModel(query string) string {
	return unescapeOr(rawParam(query, "model-id"))
}

// Authenticate accepts a device whose username names it on this hub, whose
// client ID matches, and whose password is a valid SAS token for it. A
// refusal is "not authorized", the code edge devices reprovision on, only
// when the credentials are at fault or the device asks for what it may not
// do (a last will it could not publish); when the hub could not check them
// (its database out of reach), it is "server unavailable".
func (d *DeviceEndpoint) Authenticate(c *mqtt.Conn, p *mqtt.Connect) byte {
	if d.isDPSConnect(p) { // DPS registration session ({idScope}/registrations/{id}/…): dpsmqtt.go
		return d.authenticateDPS(c, p)
	}
	host, r, query, ok := parseUsername(p.Username, p.ClientID)
	if !ok || !strings.EqualFold(host, d.hub.Host()) {
		slog.Info("mqtt connection refused", "clientId", p.ClientID, "reason", "username must be {hub}/{deviceId}/?api-version=… with the client ID the device ID")
		return mqtt.RefusedNotAuthorized
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var chain []*x509.Certificate
	if c.TLS() != nil {
		chain = c.TLS().PeerCertificates
	}
	sess := &session{ref: r, methods: map[string]chan methodAnswer{}, gone: make(chan struct{})}
	if p.Will != nil {
		props, ok := eventProps(sess.own(), p.Will.Topic, p.Will.Retain)
		if !ok {
			reason := fmt.Sprintf("the last will goes to %q: a will is telemetry, to %smessages/events/ with a property bag or none", p.Will.Topic, sess.own())
			slog.Info("mqtt connection refused", "identity", r.String(), "reason", reason)
			return mqtt.RefusedNotAuthorized
		}
		props["iothub-MessageType"] = "Will" // as Azure IoT Hub marks it
		sess.will = &hub.Message{Properties: props, Body: p.Will.Payload}
	}
	grant, err := d.hub.Authenticate(ctx, r, string(p.Password), chain)
	if err != nil {
		return refusal(r, err)
	}
	grant.ModelID = announcedModel(query)
	c.SetValue(sess)
	if d.hooks != nil {
		d.hooks.beforeSwap(c)
	}
	detach, refused, ok := d.swapIn(ctx, c, r, grant)
	if !ok {
		return refused
	}
	sess.onClose(detach)
	// A persistent session resumes what the identity subscribed to in its
	// last one (the SDKs reconnect to renew their token without
	// subscribing again); a clean one ends it.
	switch kept := grant.Session(); {
	case !p.CleanSession:
		sess.persistent, sess.kept = true, kept
		subs := make([]mqtt.Subscription, len(kept))
		for i, k := range kept {
			subs[i] = mqtt.Subscription{Filter: k.Filter, QoS: k.QoS}
		}
		if len(subs) > 0 {
			c.ResumeSession(subs)
		}
	case len(kept) > 0:
		if err := d.hub.KeepSession(ctx, r, nil); err != nil {
			slog.Warn("ending a device's MQTT session", "identity", r.String(), "error", err)
		}
	}
	return mqtt.Accepted
}

// Closed releases what the connection listened to, and sends its last
// will if it dropped without DISCONNECT: not when the hub ended it (a new
// connection of the identity, its credentials revoked or expired) or the
// server stops.
func (d *DeviceEndpoint) Closed(c *mqtt.Conn, err error) {
	s := sess(c)
	if s == nil {
		return
	}
	s.mu.Lock()
	cancels := s.cancels
	s.cancels = nil
	s.mu.Unlock()
	for _, f := range cancels {
		f()
	}
	s.mu.Lock()
	select {
	case <-s.gone:
	default:
		close(s.gone)
	}
	s.mu.Unlock()
	d.forget(s.ref, c)
	if s.will != nil && err != nil && !errors.Is(err, mqtt.ErrConnClosed) && !errors.Is(err, mqtt.ErrServerClosed) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := d.hub.SendEvent(ctx, s.ref, s.will.Properties, s.will.Body); err != nil {
			slog.Info("sending a device's last will", "identity", s.ref.String(), "error", err)
		}
	}
}

// identityLock serializes the connects of one identity.
type identityLock struct {
	mu      sync.Mutex
	holders int // holding or waiting: the lock is dropped at 0
}

// swapIn makes c the identity's connection and records it connected.
// Replacing the identity's connection and recording the new one are one
// step per identity, so the hub records connections in the order they
// replace each other: else an older connection could record itself after
// the newer one that replaced it, and its end then record the identity
// disconnected while the newer one lives. The unlock is deferred: a hook,
// Close or Attach that panics (mqtt recovers it) must not leave the
// identity's later connects waiting forever.
func (d *DeviceEndpoint) swapIn(ctx context.Context, c *mqtt.Conn, r hub.Ref, grant hub.Grant) (detach func(), refused byte, ok bool) {
	unlock := d.lockIdentity(r)
	defer unlock()
	if c.IsClosed() { // closed while it authenticated: the live connection stays
		return nil, mqtt.RefusedServerUnavailable, false
	}
	d.mu.Lock()
	old := d.sessions[r]
	d.sessions[r] = c
	d.mu.Unlock()
	if old != nil {
		old.Close() // as the hosted hub: a new connection replaces the old one
	}
	if d.hooks != nil {
		d.hooks.beforeAttach(c)
	}
	// A device or module disabled, deleted or given new keys while
	// connected is cut off, as in the hosted hub.
	detach, err := d.hub.Attach(ctx, r, grant, func() { go c.Close() })
	if err != nil {
		d.forget(r, c)
		return nil, refusal(r, err), false
	}
	return detach, 0, true
}

// lockIdentity locks r's connects, and returns the unlock.
func (d *DeviceEndpoint) lockIdentity(r hub.Ref) (unlock func()) {
	d.mu.Lock()
	l := d.idLocks[r]
	if l == nil {
		l = &identityLock{}
		d.idLocks[r] = l
	}
	l.holders++
	d.mu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		d.mu.Lock()
		if l.holders--; l.holders == 0 {
			delete(d.idLocks, r)
		}
		d.mu.Unlock()
	}
}

// forget drops c as r's connection, unless another has replaced it.
func (d *DeviceEndpoint) forget(r hub.Ref, c *mqtt.Conn) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.sessions[r] == c {
		delete(d.sessions, r)
	}
}

// own is the topic prefix of the connection's identity.
func (s *session) own() string {
	if s.ref.Module == "" {
		return "devices/" + s.ref.Device + "/"
	}
	return "devices/" + s.ref.Device + "/modules/" + s.ref.Module + "/"
}

var errTopic = errors.New("topic is not one a device may publish to")

// maxEventBackpressure is how long a device over its message rate is held
// before its message is taken (and acknowledged), rather than
// disconnected: the SDKs would reconnect at once, and again, each time
// with a TLS handshake, while their method calls and messages wait.
const maxEventBackpressure = 30 * time.Second

// sendEvent stores a device's telemetry message, holding the connection
// (it reads nothing meanwhile, the PUBACK waits) while the device is over
// its rate, as the hosted hub slows a device down. Only a device whose
// wait would be longer still is disconnected.
func (d *DeviceEndpoint) sendEvent(r hub.Ref, props map[string]string, body []byte) error {
	held := time.Duration(0)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err := d.hub.SendEvent(ctx, r, props, body)
		cancel()
		e, throttled := errors.AsType[*azerr.Error](err)
		if !throttled || e.Code != 429001 || held+e.RetryAfter > maxEventBackpressure {
			return err
		}
		time.Sleep(e.RetryAfter)
		held += e.RetryAfter
	}
}

// Published handles telemetry, twin requests and method answers. Anything
// else, including another device's topics, closes the connection, as the
// hosted hub does.
func (d *DeviceEndpoint) Published(c *mqtt.Conn, p *mqtt.Publish) error {
	if ds := dpsSess(c); ds != nil { // DPS registration session: dpsmqtt.go
		return d.publishedDPS(c, ds, p)
	}
	s := sess(c)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if props, ok := eventProps(s.own(), p.Topic, p.Retain); ok {
		return d.sendEvent(s.ref, props, p.Payload)
	}
	switch {
	case strings.HasPrefix(p.Topic, "$iothub/twin/GET/"):
		rid := ridOf(p.Topic)
		doc, err := d.hub.DeviceTwinDocument(ctx, s.ref)
		if err != nil {
			slog.Warn("reading a twin for its device", "identity", s.ref.String(), "error", err)
			return d.reply(c, "$iothub/twin/res/"+strconv.Itoa(azerr.As(err).Status())+"/?$rid="+rid, nil)
		}
		return d.reply(c, "$iothub/twin/res/200/?$rid="+rid, doc)
	case strings.HasPrefix(p.Topic, "$iothub/twin/PATCH/properties/reported/"):
		rid := ridOf(p.Topic)
		var patch map[string]any
		var err error
		if err = twindoc.Unmarshal(p.Payload, &patch); err != nil || patch == nil {
			err = azerr.BadRequest("the reported-properties patch must be a JSON object, such as {\"firmware\":\"1.2\"}")
		}
		var v int64
		if err == nil {
			v, err = d.hub.UpdateReported(ctx, s.ref, patch)
		}
		if err != nil { // a patch IoT Hub refuses is the device's to fix, not to retry
			e := azerr.As(err)
			body, _ := json.Marshal(map[string]any{"errorCode": e.Code, "message": e.Message})
			return d.reply(c, "$iothub/twin/res/"+strconv.Itoa(e.Status())+"/?$rid="+rid, body)
		}
		return d.reply(c, "$iothub/twin/res/204/?$rid="+rid+"&$version="+strconv.FormatInt(v, 10), nil)
	case strings.HasPrefix(p.Topic, "$iothub/methods/res/"):
		statusText, _, _ := strings.Cut(strings.TrimPrefix(p.Topic, "$iothub/methods/res/"), "/")
		status, err := strconv.Atoi(statusText)
		if err != nil {
			return fmt.Errorf("method response status %q is not a number", statusText)
		}
		rid := ridOf(p.Topic)
		s.mu.Lock()
		ch := s.methods[rid]
		delete(s.methods, rid)
		s.mu.Unlock()
		if ch != nil {
			ch <- methodAnswer{status: status, payload: json.RawMessage(p.Payload)}
		}
		return nil
	}
	return fmt.Errorf("%w: %q (a device publishes to %smessages/events/ and $iothub/ topics)", errTopic, p.Topic, s.own())
}

// eventProps reads the property bag of topic if it is a telemetry topic of
// the identity whose topics start with own (ok false if it is not one), with
// mqtt-retain if it was published retained: nothing is retained, and Azure
// IoT Hub says so in that property.
func eventProps(own, topic string, retain bool) (props map[string]string, ok bool) {
	if !strings.HasPrefix(topic, own+"messages/events/") && topic+"/" != own+"messages/events/" {
		return nil, false
	}
	// The property bag may end in "/", as the Node SDK's output events do.
	// Read leniently (rawPairs): a bag the SDKs would have encoded is
	// still telemetry, and refusing it would disconnect the device, whose
	// QoS 1 publish then comes back on every reconnect.
	bag := strings.TrimSuffix(strings.TrimPrefix(strings.TrimPrefix(topic, own+"messages/events"), "/"), "/")
	props = map[string]string{}
	for k, v := range rawPairs(bag) {
		if k = unescapeOr(k); k == "" {
			continue
		}
		if _, dup := props[k]; !dup { // the first of a repeated name, as before
			props[k] = unescapeOr(v)
		}
	}
	if retain {
		props["mqtt-retain"] = "true"
	}
	return props, true
}

// reply sends a response topic; the device subscribed to $iothub/twin/res/#.
func (d *DeviceEndpoint) reply(c *mqtt.Conn, topic string, body []byte) error {
	if err := c.Send(topic, body, 0, nil); err != nil && !errors.Is(err, mqtt.ErrNotSubscribed) {
		return err
	}
	return nil
}

// ridOf reads the $rid of a request topic as the device wrote it, for the
// reply to echo: decoded, "a%23b" would put a wildcard in the reply topic.
func ridOf(topic string) string {
	_, q, _ := strings.Cut(topic, "?")
	return rawParam(q, "$rid")
}

// Subscribe grants the device's own topics and starts what each implies.
func (d *DeviceEndpoint) Subscribe(c *mqtt.Conn, filter string, qos byte) byte {
	if ds := dpsSess(c); ds != nil { // DPS registration session: dpsmqtt.go
		return d.subscribeDPS(c, ds, filter, qos)
	}
	s := sess(c)
	g := d.subscribe(c, s, filter, qos)
	d.keep(s, filter, g) // a resumed filter refused now leaves the session
	return g
}

func (d *DeviceEndpoint) subscribe(c *mqtt.Conn, s *session, filter string, qos byte) byte {
	switch filter {
	case "$iothub/twin/res/#":
		return min(qos, 1)
	case "$iothub/twin/PATCH/properties/desired/#":
		if s.watch(filter) {
			d.sendDesired(c, s)
		}
		return min(qos, 1)
	case "$iothub/methods/POST/#":
		if s.watch(filter) {
			s.onClose(d.hub.ServeMethods(s.ref, func(ctx context.Context, name string, payload json.RawMessage) (int, json.RawMessage, error) {
				return d.callMethod(ctx, c, s, name, payload)
			}))
		}
		return 0
	case s.own() + "messages/devicebound/#":
		if s.ref.Module != "" {
			break
		}
		deliver := func() { d.deliverSoon(c, s) }
		if s.watch(filter) {
			s.onClose(d.hub.WatchC2D(s.ref.Device, deliver))
			s.onClose(s.stopUnlocked)
		}
		// What waited while the device was away, or while it was not
		// subscribed (the watcher outlives an UNSUBSCRIBE; the Node SDK
		// unsubscribes and subscribes again as 'message' listeners come
		// and go).
		if !s.c2dSubscribed {
			s.c2dSubscribed = true
			deliver()
		}
		return 1
	}
	return mqtt.SubscribeFailure // logged by the server, once a SUBSCRIBE
}

// sendDesired forwards the device's desired-property patches in order,
// from whichever replica the twin changes through; whoever changes it never
// waits for a device that does not read: one that falls behind is cut off,
// and reads its twin again when it reconnects.
func (d *DeviceEndpoint) sendDesired(c *mqtt.Conn, s *session) {
	s.onClose(d.hub.FollowDesired(s.ref, func(patch []byte, version int64) {
		_ = c.Send("$iothub/twin/PATCH/properties/desired/?$version="+strconv.FormatInt(version, 10), patch, 0, nil)
	}, func() {
		slog.Info("mqtt: device not reading its desired properties; disconnecting", "identity", s.ref.String())
		go c.Close()
	}))
}

// Unsubscribe takes the filter out of a persistent session; watchers end
// with the connection.
func (d *DeviceEndpoint) Unsubscribe(c *mqtt.Conn, filter string) {
	if s := sess(c); s != nil {
		d.keep(s, filter, mqtt.SubscribeFailure)
		if filter == s.own()+"messages/devicebound/#" {
			s.c2dSubscribed = false
		}
	}
}

func (d *DeviceEndpoint) callMethod(ctx context.Context, c *mqtt.Conn, s *session, name string, payload json.RawMessage) (int, json.RawMessage, error) {
	rid := strconv.FormatUint(s.nextRID.Add(1), 16)
	ch := make(chan methodAnswer, 1)
	s.mu.Lock()
	s.methods[rid] = ch
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.methods, rid)
		s.mu.Unlock()
	}()
	// The caller's timeout holds even while a device that does not read
	// keeps the write waiting.
	sent := make(chan error, 1)
	go func() { sent <- c.Send("$iothub/methods/POST/"+name+"/?$rid="+rid, payload, 0, nil) }()
	select {
	case err := <-sent:
		if err != nil {
			return 0, nil, err
		}
	case <-ctx.Done():
		return 0, nil, ctx.Err()
	}
	select {
	case a := <-ch:
		return a.status, a.payload, nil
	case <-s.gone: // the caller need not wait out its timeout
		return 0, nil, azerr.New(404103, "DeviceNotOnline", "%s disconnected before it answered method %q", s.ref, name)
	case <-ctx.Done():
		return 0, nil, ctx.Err()
	}
}

// refusal is the CONNACK code refusing r for err, logged.
func refusal(r hub.Ref, err error) byte {
	code, logged := connackFor(err)
	switch {
	case code == mqtt.RefusedNotAuthorized:
		slog.Info("mqtt connection refused", "identity", r.String(), "reason", azerr.Why(err))
	case !logged:
		slog.Warn("mqtt connection refused: the hub could not check it", "identity", r.String(), "error", err)
	}
	return code
}

// connackFor is the CONNACK code refusing a connection for err: "not
// authorized" only when the connection itself was at fault (its
// credentials, a 4xx), as edge devices provision again on that code;
// "server unavailable", which they retry, when the service failed or was
// busy (5xx, and the retryable 409, 412 and 429). logged says that the
// failure was logged already (a database out of reach, once a period).
func connackFor(err error) (code byte, logged bool) {
	if unavailable(err) != nil {
		return mqtt.RefusedServerUnavailable, true
	}
	switch st := azerr.As(err).Status(); {
	case st == 409, st == 412, st == 429, st >= 500:
		return mqtt.RefusedServerUnavailable, false
	}
	return mqtt.RefusedNotAuthorized, false
}
