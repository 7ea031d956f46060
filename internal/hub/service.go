package hub

import (
	"context"
	"crypto/x509"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/periodic"
	"github.com/hatchery/hatchery/internal/ratelimit"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/store"
)

const kindSettings = "hub.settings"

// Settings are the hub's access policies.
type Settings struct {
	Policies []sas.Policy `json:"policies"`
	// LeftoversSwept records that SweepLeftovers went through the
	// database; a new one has nothing to sweep.
	LeftoversSwept bool `json:"leftoversSwept,omitempty"`
}

// Service is one IoT hub.
type Service struct {
	store    store.Store
	host     string
	settings Settings
	Now      func() time.Time
	// MessageBytes throttles each device's device-to-cloud messages
	// (NewMessageLimit); nil is no limit.
	MessageBytes *ratelimit.Keyed

	desiredWatchers watchers[Ref, func(desiredChange)]
	c2dWatchers     watchers[string, func()]
	conns           watchers[string, *connection] // this replica's connections, by device
	targetMemo      targetMemo                    // the configurations, for evaluate
	jobsWake        chan struct{}                 // RunJobs looks for jobs at once

	mu        sync.Mutex
	methods   map[Ref]*MethodHandler  // the connection answering each device's methods
	twinLocks [64]sync.Mutex          // see twinLock
	evalLocks [64]sync.Mutex          // see evaluate
	c2dLocks  [64]sync.Mutex          // see SendC2D
	c2dExpiry map[string]*expiryTimer // see recountAtExpiry (mu)
	c2dStale  map[string]bool         // devices whose count could not be written (mu); see SweepC2D

	relay  store.Relay              // to the other replicas; nil with SQLite
	origin string                   // this replica's name on the relay
	calls  map[string]chan struct{} // method calls relayed from here, awaiting answers (mu)

	runningJobs map[string]bool // jobs this replica runs (mu)
	unrecorded  map[Ref]string  // connections closed whose end could not be recorded yet (mu)
	activity    activity        // when devices' lastActivityTime was last recorded here
	jobBatch    int             // devices a job runner works on at once
	// configurationSweep is how often EvaluateConfigurations runs.
	configurationSweep time.Duration
}

// Ready reports why the hub cannot serve now (its database out of reach),
// or nil: what a load balancer's health check asks.
func (s *Service) Ready(ctx context.Context) error {
	_, err := s.store.Get(ctx, kindSettings, "hub")
	return err
}

// Open loads the hub's settings, creating the iothubowner policy on first start.
func Open(ctx context.Context, st store.Store, host string) (*Service, error) {
	s := &Service{store: st, host: host, Now: time.Now, methods: map[Ref]*MethodHandler{}, origin: newOrigin(), calls: map[string]chan struct{}{},
		jobsWake: make(chan struct{}, 1), runningJobs: map[string]bool{}, unrecorded: map[Ref]string{}, jobBatch: 32, c2dExpiry: map[string]*expiryTimer{}, c2dStale: map[string]bool{},
		configurationSweep: configurationSweep}
	s.relay, _ = st.(store.Relay)
	err := store.LoadOrCreate(ctx, st, kindSettings, "hub", func() any {
		return Settings{Policies: []sas.Policy{
			sas.NewPolicy("iothubowner", sas.AllRights),
			sas.NewPolicy("service", sas.ServiceConnect),
			sas.NewPolicy("registryReadWrite", sas.RegistryWrite),
		}, LeftoversSwept: true}
	}, &s.settings)
	if err != nil {
		return nil, fmt.Errorf("loading hub settings: %w", err)
	}
	return s, nil
}

// Host is the hub's host name, the one devices and tokens use.
func (s *Service) Host() string { return s.host }

// OwnerConnectionString is the iothubowner connection string.
func (s *Service) OwnerConnectionString() string {
	cs, _ := s.PolicyConnectionString("iothubowner")
	return cs
}

// PolicyConnectionString is the connection string of the shared access
// policy named name: iothubowner, service (ServiceConnect) or
// registryReadWrite (RegistryWrite).
func (s *Service) PolicyConnectionString(name string) (string, bool) {
	for _, p := range s.settings.Policies {
		if p.KeyName == name {
			return sas.PolicyConnectionString(s.host, p.KeyName, p.PrimaryKey), true
		}
	}
	return "", false
}

// AuthorizeService checks a service-API Authorization header of a request
// to path.
func (s *Service) AuthorizeService(header, path, right string) error {
	p, err := sas.AuthorizeService(header, s.host, path, s.settings.Policies, s.Now())
	if err != nil {
		return azerr.Unauthorized("%v", err)
	}
	if !p.Grants(right) {
		return azerr.Unauthorized("shared access policy %q has the rights %q, and this request needs %s: use iothubowner or a policy with %s", p.KeyName, p.Rights, right, right)
	}
	return nil
}

// Grant is what a connection was authenticated against: its device's
// credentials and its own (a module may sign with either), as they were,
// and when the token or certificate it presented expires; and the session
// the identity kept.
type Grant struct {
	device, identity Authentication
	until            time.Time
	session          []Subscription
	// ModelID is the IoT Plug and Play model the device announced as it
	// connected (MQTT's model-id), which Attach records in its twin.
	ModelID string
}

// Session is what the identity's persistent session was subscribed to
// when it authenticated (KeepSession).
func (g Grant) Session() []Subscription { return g.session }

// Authenticate checks a device (or module) by its SAS token or, without
// one, the client certificate chain of its TLS connection (x509.go); a
// disabled device is refused like a bad key.
func (s *Service) Authenticate(ctx context.Context, r Ref, token string, chain []*x509.Certificate) (Grant, error) {
	dev, id, until, err := s.byCredentials(ctx, r, token, chain)
	if err != nil {
		return Grant{}, err
	}
	return Grant{device: dev.Device.Authentication, identity: id.Device.Authentication, until: until, session: id.Session}, nil
}

// byCredentials is Authenticate, returning the device's record and the
// identity's (the same for a device), and when the credentials expire.
func (s *Service) byCredentials(ctx context.Context, r Ref, token string, chain []*x509.Certificate) (dev, id *record, until time.Time, err error) {
	if strings.TrimSpace(token) == "" {
		if len(chain) == 0 {
			return nil, nil, time.Time{}, azerr.Unauthorized("no client certificate and no SAS token for %q: send a SAS token signed with its key (the HTTPS Authorization header, the MQTT password), or connect with its X.509 certificate", r)
		}
		dev, id, err = s.deviceByCertificate(ctx, r, chain)
		return dev, id, chain[0].NotAfter, err
	}
	tok, err := sas.Parse(token)
	if err != nil {
		return nil, nil, time.Time{}, azerr.Unauthorized("%v", err)
	}
	dev, id, err = s.deviceByToken(ctx, r, tok)
	return dev, id, tok.Expiry, err
}

// deviceByToken checks a SAS token: its resource must be this hub's device
// or module, signed by one of its keys (or, for a module, its device's).
func (s *Service) deviceByToken(ctx context.Context, r Ref, tok *sas.Token) (dev, id *record, err error) {
	device := s.host + "/devices/" + r.Device
	want := device
	if r.Module != "" && !tok.AudienceIs(device) {
		want += "/modules/" + r.Module
	}
	if !tok.AudienceIs(want) {
		return nil, nil, azerr.Unauthorized("the token is for %q, not %q", tok.Audience, want)
	}
	if err := tok.Expired(s.Now()); err != nil {
		return nil, nil, azerr.Unauthorized("%s: %v", r, err)
	}
	if dev, id, err = s.connecting(ctx, r); err != nil {
		return nil, nil, err
	}
	// A module authenticates with its own keys, or with the device's (a
	// device-scoped token, as the edge runtime's modules use). The device's
	// key signs for all its modules, so then the token's path must name
	// this one exactly: module IDs may differ by case alone.
	keys := id.Device.Authentication.sasKeys()
	if r.Module != "" && (tok.AudienceIsExactly(device) || tok.AudienceIsExactly(want)) {
		keys = append(keys, dev.Device.Authentication.sasKeys()...)
	}
	if len(keys) == 0 {
		return nil, nil, denied(r, "it authenticates with "+id.Device.Authentication.Type+", not with SAS tokens")
	}
	if err := tok.Verify(s.Now(), keys...); err != nil {
		return nil, nil, denied(r, err.Error())
	}
	return dev, id, enabled(dev)
}

// AuthorizeServiceOrEdgeDevice admits a token of a hub policy (one naming
// it with skn) with right, or the IoT Edge device itself, by its own SAS
// token or client certificate, to manage identities under it: the
// device-scope registry API the edge runtime creates and reads its
// modules' identities with.
func (s *Service) AuthorizeServiceOrEdgeDevice(ctx context.Context, device, path, header string, chain []*x509.Certificate, right string) error {
	if tok, err := sas.Parse(header); err == nil && tok.KeyName != "" {
		return s.AuthorizeService(header, path, right)
	}
	return s.authorizeEdgeDevice(ctx, device, header, chain)
}

func (s *Service) authorizeEdgeDevice(ctx context.Context, device, token string, chain []*x509.Certificate) error {
	dev, _, _, err := s.byCredentials(ctx, Ref{Device: device}, token, chain)
	if err != nil {
		return err
	}
	if !dev.Device.Capabilities.IoTEdge {
		return azerr.Unauthorized("device %q is not an IoT Edge device: only edge devices manage their module identities", device)
	}
	return nil
}

// connecting loads what an identity connecting as r authenticates against:
// its device and, for a module, the module. Unknown ones are refused like
// bad credentials.
func (s *Service) connecting(ctx context.Context, r Ref) (dev, id *record, err error) {
	if dev, _, err = s.load(ctx, Ref{Device: r.Device}); err != nil {
		if azerr.As(err).Status() == 404 {
			return nil, nil, denied(r, "the device is not registered in this hub")
		}
		return nil, nil, err
	}
	if r.Module == "" {
		return dev, dev, nil
	}
	if id, _, err = s.load(ctx, r); err != nil {
		if azerr.As(err).Status() == 404 {
			return nil, nil, denied(r, "the module is not registered in this hub")
		}
		return nil, nil, err
	}
	return dev, id, nil
}

// denied refuses credentials that do not match the registry. Unknown
// identities and bad credentials get the same answer, so that nobody can
// probe which devices exist; why goes to the hub's log.
func denied(r Ref, why string) error {
	return azerr.Denied(why, "%s is not authorized: check its credentials and that it is registered in this hub "+
		"(the hub's log says what did not match, under this answer's tracking ID)", r)
}

// enabled refuses a disabled device. It is checked after the credentials,
// so only the device itself learns it is disabled.
func enabled(dev *record) error {
	if dev.Device.Status != "enabled" {
		return azerr.Unauthorized("device %q is disabled", dev.Device.DeviceID)
	}
	return nil
}

// MaxMessageSize is the hosted hub's largest device-to-cloud message.
const MaxMessageSize = 256 << 10

// SendEvent appends a device-to-cloud message to the durable event stream,
// within the device's share of MessageBytes.
func (s *Service) SendEvent(ctx context.Context, r Ref, props map[string]string, body []byte) (int64, error) {
	now := s.Now().UTC()
	if err := s.admit(r, now, Message{Properties: props, Body: body}); err != nil {
		return 0, err
	}
	seq, err := s.store.AppendEvent(ctx, store.Event{DeviceID: r.Device, ModuleID: r.Module, Properties: props, Body: body, Enqueued: now})
	if err == nil {
		s.noteActivity(ctx, r.Device)
	}
	return seq, err
}

// Message is a device-to-cloud message as a device sends it.
type Message struct {
	Properties map[string]string
	Body       []byte
}

// MaxBatchSize bounds the messages of one batch together, as the hosted
// hub's 256 KiB.
const MaxBatchSize = 256 << 10

// SendEvents stores a batch of a device's messages (the HTTPS device API's
// sendEventBatch), admitted together: all, or, over a limit, none.
func (s *Service) SendEvents(ctx context.Context, r Ref, msgs []Message) error {
	now := s.Now().UTC()
	if err := s.admit(r, now, msgs...); err != nil {
		return err
	}
	for _, m := range msgs {
		if _, err := s.store.AppendEvent(ctx, store.Event{DeviceID: r.Device, ModuleID: r.Module, Properties: m.Properties, Body: m.Body, Enqueued: now}); err != nil {
			return err
		}
	}
	s.noteActivity(ctx, r.Device)
	return nil
}

// admit checks messages' sizes and takes them, together, from the
// device's byte rate. Each costs its body and properties, and at least
// minMessageCost, so that empty messages are not free.
func (s *Service) admit(r Ref, now time.Time, msgs ...Message) error {
	var cost float64
	for _, m := range msgs {
		if len(m.Body) > MaxMessageSize {
			return azerr.MessageTooLarge("the message body is %d bytes: device-to-cloud messages carry at most %d", len(m.Body), MaxMessageSize)
		}
		n := len(m.Body)
		for k, v := range m.Properties {
			n += len(k) + len(v)
		}
		cost += float64(max(n, minMessageCost))
	}
	if len(msgs) > 1 && cost > MaxBatchSize {
		return azerr.MessageTooLarge("the batch counts as %.0f bytes (each message at least %d): a batch carries at most %d", cost, minMessageCost, MaxBatchSize)
	}
	if ok, wait := s.MessageBytes.Take(r.Device, now, cost); !ok {
		return azerr.Throttled("device "+r.Device+" sends more device-to-cloud bytes than it may", wait)
	}
	return nil
}

// minMessageCost is what the smallest message costs of a device's rate.
const minMessageCost = 128

// NewMessageLimit lets each device (with its modules) send bytesPerSecond
// of device-to-cloud messages on average, in bursts of 16 seconds' worth
// and at least one message of the largest size; 0 is no limit.
func NewMessageLimit(bytesPerSecond float64) *ratelimit.Keyed {
	return ratelimit.NewKeyed(bytesPerSecond, max(16*bytesPerSecond, MaxMessageSize))
}

// expiryBatch bounds one deletion, so that writers never wait long for it.
const expiryBatch = 1000

// DeleteExpiredEvents removes the events enqueued longer than retention
// ago and says how many went.
func (s *Service) DeleteExpiredEvents(ctx context.Context, retention time.Duration) (int64, error) {
	var total int64
	for {
		n, err := s.store.DeleteEventsBefore(ctx, s.Now().Add(-retention), expiryBatch)
		total += n
		if err != nil || n < expiryBatch {
			return total, err
		}
	}
}

// ExpireEvents deletes expired events every minute until ctx ends: like the
// hosted hub's built-in endpoint, the stream keeps messages for a
// retention time, so that devices cannot fill the disk for good.
func (s *Service) ExpireEvents(ctx context.Context, retention time.Duration) {
	periodic.Run(ctx, time.Minute, "deleting expired device-to-cloud events", func(ctx context.Context) error {
		_, err := s.DeleteExpiredEvents(ctx, retention)
		return err
	})
}

// Event is a device-to-cloud message as the event stream keeps it.
type Event = store.Event

// FollowEvents hands the event stream after sequence number after — of
// device, or of all with "" — to emit, a page at a time, oldest first;
// with follow it goes on with events as they are stored (on any replica:
// it looks every 200 ms), until ctx ends. It ends without an error when
// emit returns one: the reader went away.
func (s *Service) FollowEvents(ctx context.Context, device string, after int64, follow bool, emit func([]Event) error) error {
	const page = 500
	for {
		evs, err := s.store.Events(ctx, device, after, page)
		if err != nil {
			return err
		}
		if len(evs) > 0 {
			after = evs[len(evs)-1].Seq
		}
		if err := emit(evs); err != nil {
			return nil
		}
		switch {
		case len(evs) == page:
			continue
		case !follow:
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(200 * time.Millisecond):
		}
	}
}
