package hub

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"regexp"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/store"
)

const (
	kindDevice   = "hub.device"
	kindSettings = "hub.settings"
)

// Settings are the hub's access policies.
type Settings struct {
	Policies []sas.Policy `json:"policies"`
}

// Service is one IoT hub.
type Service struct {
	store    store.Store
	host     string
	settings Settings
	Now      func() time.Time
}

// Open loads the hub's settings, creating the iothubowner policy on first start.
func Open(ctx context.Context, st store.Store, host string) (*Service, error) {
	s := &Service{store: st, host: host, Now: time.Now}
	d, err := st.Get(ctx, kindSettings, "hub")
	if errors.Is(err, store.ErrNotFound) {
		body, _ := json.Marshal(Settings{Policies: []sas.Policy{
			sas.NewPolicy("iothubowner", "RegistryWrite, ServiceConnect, DeviceConnect"),
			sas.NewPolicy("service", "ServiceConnect"),
			sas.NewPolicy("registryReadWrite", "RegistryWrite"),
		}})
		if _, err := st.Create(ctx, store.Doc{Kind: kindSettings, ID: "hub", Body: body}); err != nil && !errors.Is(err, store.ErrExists) {
			return nil, err
		}
		d, err = st.Get(ctx, kindSettings, "hub")
	}
	if err != nil {
		return nil, fmt.Errorf("loading hub settings: %w", err)
	}
	if err := json.Unmarshal(d.Body, &s.settings); err != nil {
		return nil, fmt.Errorf("hub settings are corrupt: %w", err)
	}
	return s, nil
}

// Host is the hub's host name, the one devices and tokens use.
func (s *Service) Host() string { return s.host }

// OwnerConnectionString is the iothubowner connection string.
func (s *Service) OwnerConnectionString() string {
	p := s.settings.Policies[0]
	return "HostName=" + s.host + ";SharedAccessKeyName=" + p.KeyName + ";SharedAccessKey=" + p.PrimaryKey
}

// AuthorizeService checks a service-API Authorization header.
func (s *Service) AuthorizeService(header string) error {
	if _, err := sas.AuthorizeService(header, s.host, s.settings.Policies, s.Now()); err != nil {
		return azerr.Unauthorized("%v", err)
	}
	return nil
}

// AuthenticateDevice checks a device's SAS token for deviceID: the token's
// resource must be this hub's device, signed by one of its keys; a disabled
// device is refused like a bad key.
func (s *Service) AuthenticateDevice(ctx context.Context, deviceID, token string) error {
	tok, err := sas.Parse(token)
	if err != nil {
		return azerr.Unauthorized("%v", err)
	}
	if want := s.host + "/devices/" + deviceID; !tok.AudienceIs(want) {
		return azerr.Unauthorized("the token is for %q, not %q", tok.Audience, want)
	}
	r, _, err := s.load(ctx, deviceID)
	if err != nil {
		var ae *azerr.Error
		if errors.As(err, &ae) && ae.Status() == 404 {
			return azerr.Unauthorized("device %q is not registered in this hub", deviceID)
		}
		return err
	}
	k := r.Device.Authentication.SymmetricKey
	if err := tok.Verify(s.Now(), sas.Keys(k.PrimaryKey, k.SecondaryKey)...); err != nil {
		return azerr.Unauthorized("device %q: %v", deviceID, err)
	}
	if r.Device.Status != "enabled" {
		return azerr.Unauthorized("device %q is disabled", deviceID)
	}
	return nil
}

var deviceIDPattern = regexp.MustCompile(`^[A-Za-z0-9\-.+%_#*?!(),:=@$']{1,128}$`)

func checkDeviceID(id string) error {
	if !deviceIDPattern.MatchString(id) {
		return azerr.New(400012, "ArgumentInvalid", "device ID %q is not valid: use 1 to 128 letters, digits or -.+%%_#*?!(),:=@$'", id)
	}
	return nil
}

func deviceNotFound(id string) error {
	return azerr.New(404001, "DeviceNotFound", "device %q is not registered in this hub", id)
}

func (s *Service) load(ctx context.Context, id string) (*record, string, error) {
	if err := checkDeviceID(id); err != nil {
		return nil, "", err
	}
	d, err := s.store.Get(ctx, kindDevice, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, "", deviceNotFound(id)
	}
	if err != nil {
		return nil, "", err
	}
	r := &record{}
	if err := json.Unmarshal(d.Body, r); err != nil {
		return nil, "", fmt.Errorf("stored device %q is corrupt: %w", id, err)
	}
	return r, d.ETag, nil
}

// update reads, changes and writes a device record, retrying when a
// concurrent writer got there first.
func (s *Service) update(ctx context.Context, id string, change func(*record) error) (*record, error) {
	for range 16 {
		r, etag, err := s.load(ctx, id)
		if err != nil {
			return nil, err
		}
		if err := change(r); err != nil {
			return nil, err
		}
		body, _ := json.Marshal(r)
		_, err = s.store.Put(ctx, store.Doc{Kind: kindDevice, ID: id, Body: body}, etag)
		if errors.Is(err, store.ErrPrecondition) {
			continue
		}
		return r, err
	}
	return nil, azerr.New(409002, "PreconditionFailed", "device %q is being changed concurrently: retry", id)
}

func newETag() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return base64.StdEncoding.EncodeToString(b[:])
}

// CreateOrUpdateDevice is PUT /devices/{id}: without If-Match it creates
// (409 if the device exists); with If-Match it updates.
func (s *Service) CreateOrUpdateDevice(ctx context.Context, id, ifMatch string, in *Device) (*Device, error) {
	if err := checkDeviceID(id); err != nil {
		return nil, err
	}
	if in.DeviceID != "" && in.DeviceID != id {
		return nil, azerr.BadRequest("deviceId %q in the body differs from %q in the URL", in.DeviceID, id)
	}
	if err := normalizeDevice(in); err != nil {
		return nil, err
	}
	now := s.Now().UTC()
	if ifMatch == "" {
		r := &record{Device: *in, DeviceETag: newETag(), TwinETag: newETag(), TwinVersion: 1,
			Tags: map[string]any{}, Desired: map[string]any{}, Reported: map[string]any{},
			DesiredVersion: 1, ReportedVersion: 1, DesiredUpdated: now, ReportedUpdated: now}
		r.Device.DeviceID, r.Device.GenerationID = id, generationID()
		r.Device.ConnectionState, r.Device.StatusUpdatedTime = "Disconnected", now
		body, _ := json.Marshal(r)
		if _, err := s.store.Create(ctx, store.Doc{Kind: kindDevice, ID: id, Body: body}); err != nil {
			if errors.Is(err, store.ErrExists) {
				return nil, azerr.Conflict("DeviceAlreadyExists", "device %q already exists: update it with If-Match", id)
			}
			return nil, err
		}
		return r.deviceView(), nil
	}
	r, err := s.update(ctx, id, func(r *record) error {
		if ifMatch != "*" && strings.Trim(ifMatch, `"`) != r.DeviceETag {
			return azerr.PreconditionFailed("device %q was changed since etag %s: read it again", id, ifMatch)
		}
		if r.Device.Status != in.Status {
			r.Device.StatusUpdatedTime = now
		}
		r.Device.Status, r.Device.StatusReason = in.Status, in.StatusReason
		r.Device.Authentication, r.Device.Capabilities = in.Authentication, in.Capabilities
		r.DeviceETag = newETag()
		return nil
	})
	if err != nil {
		return nil, err
	}
	return r.deviceView(), nil
}

func generationID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%018d", (uint64(b[0])<<48|uint64(b[1])<<40|uint64(b[2])<<32|uint64(b[3])<<24|uint64(b[4])<<16|uint64(b[5])<<8|uint64(b[6]))%1e18)
}

// normalizeDevice fills defaults and checks keys, as the hosted registry does.
func normalizeDevice(d *Device) error {
	switch d.Status {
	case "":
		d.Status = "enabled"
	case "enabled", "disabled":
	default:
		return azerr.BadRequest("status %q is not valid: use enabled or disabled", d.Status)
	}
	a := &d.Authentication
	switch a.Type {
	case "", "sas":
		a.Type = "sas"
		if a.SymmetricKey.PrimaryKey == "" {
			a.SymmetricKey.PrimaryKey = sas.NewKey()
		}
		if a.SymmetricKey.SecondaryKey == "" {
			a.SymmetricKey.SecondaryKey = sas.NewKey()
		}
		for name, k := range map[string]string{"primaryKey": a.SymmetricKey.PrimaryKey, "secondaryKey": a.SymmetricKey.SecondaryKey} {
			if b, err := base64.StdEncoding.DecodeString(k); err != nil || len(b) < 16 || len(b) > 64 {
				return azerr.BadRequest("authentication.symmetricKey.%s must be a base64 key of 16 to 64 bytes", name)
			}
		}
	case "selfSigned", "certificateAuthority", "none":
	default:
		return azerr.BadRequest("authentication.type %q is not valid: use sas, selfSigned, certificateAuthority or none", a.Type)
	}
	return nil
}

func (r *record) deviceView() *Device {
	d := r.Device
	d.ETag = r.DeviceETag
	return &d
}

// GetDevice returns a device identity.
func (s *Service) GetDevice(ctx context.Context, id string) (*Device, error) {
	r, _, err := s.load(ctx, id)
	if err != nil {
		return nil, err
	}
	return r.deviceView(), nil
}

// DeleteDevice removes a device and its twin.
func (s *Service) DeleteDevice(ctx context.Context, id, ifMatch string) error {
	r, etag, err := s.load(ctx, id)
	if err != nil {
		return err
	}
	if ifMatch != "" && ifMatch != "*" && strings.Trim(ifMatch, `"`) != r.DeviceETag {
		return azerr.PreconditionFailed("device %q was changed since etag %s", id, ifMatch)
	}
	if err := s.store.Delete(ctx, kindDevice, id, etag); err != nil {
		if errors.Is(err, store.ErrPrecondition) {
			return azerr.PreconditionFailed("device %q changed while being deleted: retry", id)
		}
		return err
	}
	return nil
}

// ListDevices returns up to top devices.
func (s *Service) ListDevices(ctx context.Context, top int) ([]*Device, error) {
	if top <= 0 || top > 1000 {
		top = 1000
	}
	docs, err := s.store.List(ctx, kindDevice, "", top)
	if err != nil {
		return nil, err
	}
	out := make([]*Device, 0, len(docs))
	for _, d := range docs {
		r := &record{}
		if err := json.Unmarshal(d.Body, r); err != nil {
			return nil, err
		}
		out = append(out, r.deviceView())
	}
	return out, nil
}

// GetTwin returns a device twin.
func (s *Service) GetTwin(ctx context.Context, id string) (*Twin, error) {
	r, _, err := s.load(ctx, id)
	if err != nil {
		return nil, err
	}
	return r.twinView(), nil
}

// UpdateTwin is PATCH (merge) or PUT (replace) of tags and desired properties.
func (s *Service) UpdateTwin(ctx context.Context, id, ifMatch string, p *TwinPatch, replace bool) (*Twin, error) {
	now := s.Now().UTC()
	r, err := s.update(ctx, id, func(r *record) error {
		if ifMatch != "" && ifMatch != "*" && strings.Trim(ifMatch, `"`) != r.TwinETag {
			return azerr.PreconditionFailed("twin of %q was changed since etag %s: read it again", id, ifMatch)
		}
		if replace {
			r.Tags = map[string]any{}
		}
		if p.Tags != nil || replace {
			mergePatch(r.Tags, p.Tags)
		}
		if p.Properties != nil && (p.Properties.Desired != nil || replace) {
			if replace {
				r.Desired = map[string]any{}
			}
			mergePatch(r.Desired, withoutMeta(p.Properties.Desired))
			r.DesiredVersion++
			r.DesiredUpdated = now
		}
		r.TwinVersion++
		r.TwinETag = newETag()
		return nil
	})
	if err != nil {
		return nil, err
	}
	return r.twinView(), nil
}

// withoutMeta drops the read-only $version and $metadata a client may echo back.
func withoutMeta(m map[string]any) map[string]any {
	out := maps.Clone(m)
	delete(out, "$version")
	delete(out, "$metadata")
	return out
}

// mergePatch applies a JSON merge patch (RFC 7386): null removes a key.
func mergePatch(dst, patch map[string]any) {
	for k, v := range patch {
		switch pv := v.(type) {
		case nil:
			delete(dst, k)
		case map[string]any:
			sub, ok := dst[k].(map[string]any)
			if !ok {
				sub = map[string]any{}
			}
			mergePatch(sub, pv)
			dst[k] = sub
		default:
			dst[k] = v
		}
	}
}

func (r *record) twinView() *Twin {
	props := func(doc map[string]any, version int64, updated time.Time) json.RawMessage {
		m := maps.Clone(doc)
		if m == nil {
			m = map[string]any{}
		}
		m["$version"] = version
		m["$metadata"] = map[string]any{"$lastUpdated": updated}
		b, _ := json.Marshal(m)
		return b
	}
	tags, _ := json.Marshal(r.Tags)
	if r.Tags == nil {
		tags = []byte("{}")
	}
	return &Twin{
		DeviceID: r.Device.DeviceID, ETag: r.TwinETag, DeviceETag: r.DeviceETag,
		Status: r.Device.Status, StatusUpdateTime: r.Device.StatusUpdatedTime,
		ConnectionState: r.Device.ConnectionState, LastActivityTime: r.Device.LastActivityTime,
		CloudToDeviceMessageCount: r.Device.CloudToDeviceMessageCount,
		AuthenticationType:        r.Device.Authentication.Type, X509Thumbprint: r.Device.Authentication.X509Thumbprint,
		Version: r.TwinVersion, Tags: tags, Capabilities: r.Device.Capabilities,
		Properties: TwinProperties{
			Desired:  props(r.Desired, r.DesiredVersion, r.DesiredUpdated),
			Reported: props(r.Reported, r.ReportedVersion, r.ReportedUpdated),
		},
	}
}

// SendEvent appends a device-to-cloud message to the durable event stream.
func (s *Service) SendEvent(ctx context.Context, deviceID string, props map[string]string, body []byte) (int64, error) {
	return s.store.AppendEvent(ctx, store.Event{DeviceID: deviceID, Properties: props, Body: body, Enqueued: s.Now().UTC()})
}

// Events reads the event stream.
func (s *Service) Events(ctx context.Context, deviceID string, after int64, limit int) ([]store.Event, error) {
	return s.store.Events(ctx, deviceID, after, limit)
}
