// Package hubclient calls an IoT hub's registry REST API with a shared
// access policy's connection string. The provisioning service reaches every
// linked hub this way, Hatchery's own or any compatible one.
package hubclient

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"net/http"
	"net/url"
	"sync"

	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
)

// Client talks to one hub.
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

// DeleteDevice removes a device.
func (c *Client) DeleteDevice(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, "/devices/"+url.PathEscape(id), "*", nil, nil)
}

// GetTwin reads a device twin.
func (c *Client) GetTwin(ctx context.Context, id string) (*hub.Twin, error) {
	var t hub.Twin
	return &t, c.do(ctx, http.MethodGet, "/twins/"+url.PathEscape(id), "", nil, &t)
}

// PatchTwin merges tags and desired properties into a twin.
func (c *Client) PatchTwin(ctx context.Context, id string, patch any) (*hub.Twin, error) {
	var t hub.Twin
	return &t, c.do(ctx, http.MethodPatch, "/twins/"+url.PathEscape(id), "*", patch, &t)
}

// Pool keeps one client per linked hub and implements dps.Registry.
type Pool struct {
	TLS     *tls.Config
	mu      sync.Mutex
	clients map[string]*Client
}

func (p *Pool) client(h dps.LinkedHub) (*Client, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	key := h.ConnectionString + "|" + h.Endpoint
	if c, ok := p.clients[key]; ok {
		return c, nil
	}
	c, err := New(h.ConnectionString, h.Endpoint, p.TLS)
	if err != nil {
		return nil, err
	}
	if p.clients == nil {
		p.clients = map[string]*Client{}
	}
	p.clients[key] = c
	return c, nil
}

// UpsertDevice creates the device with its initial twin, or, if it exists,
// updates its keys and capabilities and leaves its twin as it is.
func (p *Pool) UpsertDevice(ctx context.Context, h dps.LinkedHub, d dps.HubDevice) error {
	c, err := p.client(h)
	if err != nil {
		return err
	}
	auth := hub.Authentication{Type: "sas", SymmetricKey: hub.SymmetricKey{PrimaryKey: d.PrimaryKey, SecondaryKey: d.SecondaryKey}}
	if d.Thumbprint != "" {
		auth = hub.Authentication{Type: "selfSigned", X509Thumbprint: hub.X509Thumbprint{PrimaryThumbprint: &d.Thumbprint}}
	}
	dev := &hub.Device{DeviceID: d.DeviceID, Status: "enabled", Authentication: auth, Capabilities: hub.Capabilities{IoTEdge: d.IoTEdge}}
	// Most registrations are of new devices: try to create first.
	if _, err := c.PutDevice(ctx, dev, ""); err != nil {
		if azerr.As(err).Status() != http.StatusConflict {
			return err
		}
		existing, err := c.GetDevice(ctx, d.DeviceID)
		if err != nil {
			return err
		}
		dev.Status, dev.StatusReason = existing.Status, existing.StatusReason
		if auth.Type == "sas" && dev.Authentication.SymmetricKey.SecondaryKey == "" && existing.Authentication.Type == "sas" {
			dev.Authentication.SymmetricKey.SecondaryKey = existing.Authentication.SymmetricKey.SecondaryKey
		}
		_, err = c.PutDevice(ctx, dev, "*")
		return err
	}
	if len(d.Tags) == 0 && len(d.Desired) == 0 {
		return nil
	}
	patch := map[string]any{}
	if len(d.Tags) > 0 {
		patch["tags"] = d.Tags
	}
	if len(d.Desired) > 0 {
		patch["properties"] = map[string]any{"desired": d.Desired}
	}
	_, err = c.PatchTwin(ctx, d.DeviceID, patch)
	return err
}

// ReadTwin returns a device's tags and desired properties.
func (p *Pool) ReadTwin(ctx context.Context, h dps.LinkedHub, deviceID string) (*dps.InitialTwin, error) {
	c, err := p.client(h)
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
	c, err := p.client(h)
	if err != nil {
		return err
	}
	body := map[string]any{"tags": orEmpty(t.Tags), "properties": map[string]any{"desired": json.RawMessage("{}")}}
	if t.Properties != nil {
		body["properties"] = map[string]any{"desired": orEmpty(t.Properties.Desired)}
	}
	return c.do(ctx, http.MethodPut, "/twins/"+url.PathEscape(deviceID), "*", body, nil)
}

func orEmpty(raw json.RawMessage) json.RawMessage {
	if len(raw) == 0 || string(raw) == "null" {
		return json.RawMessage("{}")
	}
	return raw
}
