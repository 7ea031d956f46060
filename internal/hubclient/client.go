// Package hubclient calls an IoT hub's registry REST API with a shared
// access policy's connection string. The provisioning service reaches every
// linked hub this way, Hatchery's own or any compatible one — except the
// hub served by its own process, which it calls in process, as the REST API
// would: the connection string is checked as a token made from it would be,
// and what the hub fills in does not show in what was passed
// (docs/decisions/0004).
package hubclient

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/twindoc"
)

// registry is what the provisioning service does to a hub.
type registry interface {
	GetDevice(ctx context.Context, id string) (*hub.Device, error)
	PutDevice(ctx context.Context, d *hub.Device, ifMatch string) (*hub.Device, error)
	DeleteDevice(ctx context.Context, id, ifMatch string) error
	GetTwin(ctx context.Context, id string) (*hub.Twin, error)
	// SetTwin merges p into the twin, or replaces tags and desired properties.
	SetTwin(ctx context.Context, id string, p *hub.TwinPatch, replace bool) error
}

// Client talks to one hub over its REST API.
type Client struct{ rest *azclient.Client }

// New makes a client for the hub of connString; endpoint overrides
// https://HostName (for a hub on another port).
func New(connString, endpoint string, tlsConfig *tls.Config) (*Client, error) {
	c, err := azclient.New(connString, endpoint, "2021-04-12", tlsConfig)
	if err != nil {
		return nil, err
	}
	return &Client{rest: c}, nil
}

func (c *Client) do(ctx context.Context, method, path, ifMatch string, in, out any) error {
	return c.rest.Do(ctx, method, path, ifMatch, in, out)
}

// GetDevice reads a device identity.
func (c *Client) GetDevice(ctx context.Context, id string) (*hub.Device, error) {
	var d hub.Device
	return &d, c.do(ctx, http.MethodGet, "/devices/"+url.PathEscape(id), "", nil, &d)
}

// PutDevice creates (ifMatch "") or updates a device identity.
func (c *Client) PutDevice(ctx context.Context, d *hub.Device, ifMatch string) (*hub.Device, error) {
	var out hub.Device
	return &out, c.do(ctx, http.MethodPut, "/devices/"+url.PathEscape(d.DeviceID), ifMatch, d, &out)
}

// DeleteDevice removes a device, if it is still the version of ifMatch ("*": any).
func (c *Client) DeleteDevice(ctx context.Context, id, ifMatch string) error {
	return c.do(ctx, http.MethodDelete, "/devices/"+url.PathEscape(id), ifMatch, nil, nil)
}

// GetTwin reads a device twin.
func (c *Client) GetTwin(ctx context.Context, id string) (*hub.Twin, error) {
	var t hub.Twin
	return &t, c.do(ctx, http.MethodGet, "/twins/"+url.PathEscape(id), "", nil, &t)
}

// SetTwin PATCHes (merges) or PUTs (replaces) a twin.
func (c *Client) SetTwin(ctx context.Context, id string, p *hub.TwinPatch, replace bool) error {
	method := http.MethodPatch
	if replace {
		method = http.MethodPut
	}
	return c.do(ctx, method, "/twins/"+url.PathEscape(id), "*", p, nil)
}

// local is the hub of this process, reached without a network round trip.
// Each call needs the right its REST route needs, of the linked hub's
// connection string.
type local struct {
	h    *hub.Service
	need func(right string) error
}

// authorize refuses a connection string that the hub's REST API would
// refuse a token of for right: unknown policy, wrong key, or a policy
// without the right.
func authorize(h *hub.Service, connString, right string) error {
	cs, err := sas.ParseConnectionString(connString)
	if err != nil {
		return err
	}
	return h.AuthorizeService(sas.Build(cs.Key, cs.HostName, cs.KeyName, time.Now().Add(time.Minute)), "/devices", right)
}

func (l local) GetDevice(ctx context.Context, id string) (*hub.Device, error) {
	return l.h.GetIdentity(ctx, hub.Ref{Device: id})
}

// PutDevice passes a copy: the hub fills in what the request leaves out
// (a secondary key), which must not show in the caller's device.
func (l local) PutDevice(ctx context.Context, d *hub.Device, ifMatch string) (*hub.Device, error) {
	in := *d
	return l.h.PutIdentity(ctx, hub.Ref{Device: d.DeviceID}, ifMatch, &in)
}

func (l local) DeleteDevice(ctx context.Context, id, ifMatch string) error {
	return l.h.DeleteIdentity(ctx, hub.Ref{Device: id}, ifMatch)
}

func (l local) GetTwin(ctx context.Context, id string) (*hub.Twin, error) {
	if err := l.need(sas.ServiceConnect); err != nil {
		return nil, err
	}
	return l.h.GetTwin(ctx, hub.Ref{Device: id})
}

func (l local) SetTwin(ctx context.Context, id string, p *hub.TwinPatch, replace bool) error {
	if err := l.need(sas.ServiceConnect); err != nil {
		return err
	}
	_, err := l.h.UpdateTwin(ctx, hub.Ref{Device: id}, "", p, replace)
	return err
}

// Pool reaches the linked hubs and implements dps.Registry: one REST
// client per hub, and Local, when set, directly.
type Pool struct {
	TLS *tls.Config
	// Local is the hub served by this process (on every replica, the same
	// hub on the same database).
	Local   *hub.Service
	mu      sync.Mutex
	clients map[string]*Client
	localOK map[string]bool // rights and connection strings Local took
}

// allowedLocally checks connString for right against Local. The hub's
// policies do not change while it runs: what it took once, it takes again.
func (p *Pool) allowedLocally(connString, right string) error {
	key := right + "\n" + connString
	p.mu.Lock()
	ok := p.localOK[key]
	p.mu.Unlock()
	if ok {
		return nil
	}
	if err := authorize(p.Local, connString, right); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.localOK == nil {
		p.localOK = map[string]bool{}
	}
	p.localOK[key] = true
	return nil
}

func (p *Pool) registry(h dps.LinkedHub) (registry, error) {
	if p.Local != nil && strings.EqualFold(h.HostName, p.Local.Host()) {
		// Every registration writes the device: a string without the
		// right fails at once, as its first REST call would.
		if err := p.allowedLocally(h.ConnectionString, sas.RegistryWrite); err != nil {
			return nil, err
		}
		return local{p.Local, func(right string) error { return p.allowedLocally(h.ConnectionString, right) }}, nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	key := h.ConnectionString + "|" + h.Endpoint + "|" + h.CACertificate
	if c, ok := p.clients[key]; ok {
		return c, nil
	}
	conf := p.TLS
	if h.CACertificate != "" { // trusted for this hub besides the pool's roots
		conf = p.TLS.Clone()
		if conf == nil {
			conf = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		if conf.RootCAs == nil {
			conf.RootCAs, _ = x509.SystemCertPool()
		}
		if conf.RootCAs == nil {
			conf.RootCAs = x509.NewCertPool()
		}
		conf.RootCAs = conf.RootCAs.Clone()
		conf.RootCAs.AppendCertsFromPEM([]byte(h.CACertificate))
	}
	c, err := New(h.ConnectionString, h.Endpoint, conf)
	if err != nil {
		return nil, err
	}
	if p.clients == nil {
		p.clients = map[string]*Client{}
	}
	p.clients[key] = c
	return c, nil
}

// Check asks h for the identity and the twin of a device that most likely
// does not exist: "not found" (or the device) proves the endpoint, its
// certificate, the key and the rights provisioning needs, RegistryWrite
// and ServiceConnect (for initial twins and migrated ones).
func (p *Pool) Check(ctx context.Context, h dps.LinkedHub) error {
	c, err := p.registry(h)
	if err != nil {
		return err
	}
	if _, err = c.GetDevice(ctx, "hatchery-link-check"); err != nil && azerr.As(err).Status() != http.StatusNotFound {
		return err
	}
	if _, err = c.GetTwin(ctx, "hatchery-link-check"); err != nil && azerr.As(err).Status() != http.StatusNotFound {
		return err
	}
	return nil
}

// UpsertDevice creates the device with its initial twin, or, if it exists,
// updates its keys and capabilities and leaves its twin as it is.
func (p *Pool) UpsertDevice(ctx context.Context, h dps.LinkedHub, d dps.HubDevice) (string, error) {
	c, err := p.registry(h)
	if err != nil {
		return "", err
	}
	auth := hub.Authentication{Type: "sas", SymmetricKey: hub.SymmetricKey{PrimaryKey: d.PrimaryKey, SecondaryKey: d.SecondaryKey}}
	if d.Thumbprint != "" {
		auth = hub.Authentication{Type: "selfSigned", X509Thumbprint: hub.X509Thumbprint{PrimaryThumbprint: &d.Thumbprint}}
	}
	dev := &hub.Device{DeviceID: d.DeviceID, Status: "enabled", Authentication: auth, Capabilities: hub.Capabilities{IoTEdge: d.IoTEdge}}
	// Most registrations are of new devices: try to create first.
	created, err := c.PutDevice(ctx, dev, "")
	if err != nil {
		if azerr.As(err).Status() != http.StatusConflict {
			return "", err
		}
		existing, err := c.GetDevice(ctx, d.DeviceID)
		if err != nil {
			return "", err
		}
		if d.NoTakeover && !samePrimary(existing.Authentication, auth) {
			return "", dps.ErrDeviceTaken
		}
		dev.Status, dev.StatusReason = existing.Status, existing.StatusReason
		if auth.Type == "sas" && dev.Authentication.SymmetricKey.SecondaryKey == "" && existing.Authentication.Type == "sas" {
			dev.Authentication.SymmetricKey.SecondaryKey = existing.Authentication.SymmetricKey.SecondaryKey
		}
		updated, err := c.PutDevice(ctx, dev, "*")
		if err != nil {
			return "", err
		}
		return updated.GenerationID, nil
	}
	if len(d.Tags) == 0 && len(d.Desired) == 0 {
		return created.GenerationID, nil
	}
	patch, err := twinPatch(d.Tags, d.Desired, false)
	if err != nil {
		return "", err
	}
	return created.GenerationID, c.SetTwin(ctx, d.DeviceID, patch, false)
}

// samePrimary reports whether a and b let in the same device: the same
// primary key or the same certificate.
func samePrimary(a, b hub.Authentication) bool {
	switch {
	case a.Type != b.Type:
		return false
	case a.Type == "sas":
		return subtle.ConstantTimeCompare([]byte(a.SymmetricKey.PrimaryKey), []byte(b.SymmetricKey.PrimaryKey)) == 1
	case a.X509Thumbprint.PrimaryThumbprint != nil && b.X509Thumbprint.PrimaryThumbprint != nil:
		return strings.EqualFold(*a.X509Thumbprint.PrimaryThumbprint, *b.X509Thumbprint.PrimaryThumbprint)
	}
	return false
}

// DeleteDevice removes a device from h if its credential is still the one
// of that fingerprint ("": any); one already gone is no error, one with
// other credentials dps.ErrDeviceTaken.
func (p *Pool) DeleteDevice(ctx context.Context, h dps.LinkedHub, deviceID, credential string) error {
	c, err := p.registry(h)
	if err != nil {
		return err
	}
	d, err := c.GetDevice(ctx, deviceID)
	if azerr.HasStatus(err, http.StatusNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	thumbprint := ""
	if t := d.Authentication.X509Thumbprint.PrimaryThumbprint; t != nil {
		thumbprint = *t
	}
	if credential != "" && dps.CredentialOf(d.Authentication.SymmetricKey.PrimaryKey, thumbprint) != credential {
		return dps.ErrDeviceTaken
	}
	// The version read: a device changed since is left alone.
	switch err := c.DeleteDevice(ctx, deviceID, d.ETag); {
	case azerr.HasStatus(err, http.StatusNotFound):
		return nil
	case azerr.HasStatus(err, http.StatusPreconditionFailed):
		return dps.ErrDeviceTaken
	default:
		return err
	}
}

// ReadTwin returns a device's tags and desired properties.
func (p *Pool) ReadTwin(ctx context.Context, h dps.LinkedHub, deviceID string) (*dps.InitialTwin, error) {
	c, err := p.registry(h)
	if err != nil {
		return nil, err
	}
	t, err := c.GetTwin(ctx, deviceID)
	if err != nil {
		return nil, err
	}
	return &dps.InitialTwin{Tags: t.Tags, Properties: &dps.InitialTwinDesired{Desired: t.Properties.Desired}}, nil
}

// ReplaceTwin sets a device's tags and desired properties to t's (the
// registry drops $metadata and $version from what it is given).
func (p *Pool) ReplaceTwin(ctx context.Context, h dps.LinkedHub, deviceID string, t *dps.InitialTwin) error {
	c, err := p.registry(h)
	if err != nil {
		return err
	}
	var desired json.RawMessage
	if t.Properties != nil {
		desired = t.Properties.Desired
	}
	patch, err := twinPatch(t.Tags, desired, true)
	if err != nil {
		return err
	}
	return c.SetTwin(ctx, deviceID, patch, true)
}

// twinPatch makes a twin patch of JSON tags and desired properties; a
// merge leaves out desired properties it does not change.
func twinPatch(tags, desired json.RawMessage, replace bool) (*hub.TwinPatch, error) {
	p := &hub.TwinPatch{Tags: map[string]any{}}
	if err := decodeObject(tags, &p.Tags); err != nil {
		return nil, err
	}
	if replace || !isNull(desired) {
		p.Properties = &hub.DesiredPatch{Desired: map[string]any{}}
		if err := decodeObject(desired, &p.Properties.Desired); err != nil {
			return nil, err
		}
	}
	return p, nil
}

func isNull(raw json.RawMessage) bool { return len(raw) == 0 || string(raw) == "null" }

func decodeObject(raw json.RawMessage, to *map[string]any) error {
	if isNull(raw) {
		return nil
	}
	return twindoc.Unmarshal(raw, to)
}
