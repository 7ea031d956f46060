package hub

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/hubid"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/store"
	"github.com/hatchery/hatchery/internal/twindoc"
)

const (
	kindDevice = "hub.device"
	kindModule = "hub.module"
)

// Ref names a device, or a module of a device.
type Ref struct{ Device, Module string }

func (r Ref) String() string {
	if r.Module == "" {
		return r.Device
	}
	return r.Device + "/" + r.Module
}

func (r Ref) kind() string {
	if r.Module == "" {
		return kindDevice
	}
	return kindModule
}

// id is the document ID; '/' appears in neither device nor module IDs.
func (r Ref) id() string { return r.String() }

func (r Ref) check() error {
	if !hubid.Valid(r.Device) {
		return azerr.BadRequest("device ID %q is not valid: use %s", r.Device, hubid.Rule)
	}
	if r.Module != "" && !hubid.Valid(r.Module) {
		return azerr.BadRequest("module ID %q is not valid: use %s", r.Module, hubid.Rule)
	}
	return nil
}

func (r Ref) notFound() error {
	if r.Module == "" {
		return azerr.New(404001, "DeviceNotFound", "device %q is not registered in this hub", r.Device)
	}
	return azerr.New(404010, "ModuleNotFound", "module %q of device %q is not registered in this hub", r.Module, r.Device)
}

func (s *Service) load(ctx context.Context, r Ref) (*record, string, error) {
	if err := r.check(); err != nil {
		return nil, "", err
	}
	d, err := s.store.Get(ctx, r.kind(), r.id())
	if errors.Is(err, store.ErrNotFound) {
		return nil, "", r.notFound()
	}
	if err != nil {
		return nil, "", err
	}
	rec := &record{}
	if err := twindoc.Unmarshal(d.Body, rec); err != nil {
		return nil, d.ETag, fmt.Errorf("stored %s is corrupt (%w: restore it from a backup, or delete it with If-Match: *): %w", r, errCorrupt, err)
	}
	return rec, d.ETag, nil
}

// errCorrupt marks a stored record that does not decode; load returns its
// etag with it, so that it can still be deleted.
var errCorrupt = errors.New("it does not decode")

// update reads, changes and writes a record, retrying when a concurrent
// writer got there first.
func (s *Service) update(ctx context.Context, r Ref, change func(*record) error) (*record, error) {
	return modify(ctx, s.store, r.kind(), r.id(), r.String(), func() (*record, string, error) { return s.load(ctx, r) }, change)
}

// errUnchanged from a change given to modify leaves the document as read.
var errUnchanged = errors.New("unchanged")

// modify reads a JSON document with load, lets change alter it, and
// writes it back on the etag it was read with, reading it again when
// another writer got there first; it returns the document as written, or
// as read when change says errUnchanged. what names it in the error when
// the writers never let up.
func modify[T any](ctx context.Context, st store.Store, kind, id, what string, load func() (*T, string, error), change func(*T) error) (*T, error) {
	for range 16 {
		v, etag, err := load()
		if err != nil {
			return nil, err
		}
		if err := change(v); errors.Is(err, errUnchanged) {
			return v, nil
		} else if err != nil {
			return nil, err
		}
		body, _ := json.Marshal(v)
		_, err = st.Put(ctx, store.Doc{Kind: kind, ID: id, Body: body}, etag)
		if store.Raced(err) {
			continue // read again: what load says now (404, say) is the answer
		}
		return v, err
	}
	return nil, azerr.PreconditionFailed("%s is being changed concurrently: retry", what)
}

// newETag is a fresh identity or twin etag: eight bytes, base64, the shape
// of IoT Hub's ("AAAAAAAAAAE="), not the store's document etags.
func newETag() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return base64.StdEncoding.EncodeToString(b[:])
}

func generationID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%018d", binary.BigEndian.Uint64(b[:])%1e18)
}

// matches applies If-Match: empty or * (quoted or not, as the SDKs send it)
// matches anything.
func matches(ifMatch, etag string) bool {
	m := strings.Trim(ifMatch, `"`)
	return m == "" || m == "*" || m == etag
}

// PutIdentity is PUT /devices/{id} or /devices/{id}/modules/{m}: without
// If-Match it creates (409 if it exists); with If-Match it updates.
func (s *Service) PutIdentity(ctx context.Context, r Ref, ifMatch string, in *Device) (*Device, error) {
	if err := r.check(); err != nil {
		return nil, err
	}
	if in.DeviceID != "" && in.DeviceID != r.Device {
		return nil, azerr.BadRequest("deviceId %q in the body differs from %q in the URL", in.DeviceID, r.Device)
	}
	if in.ModuleID != "" && in.ModuleID != r.Module {
		return nil, azerr.BadRequest("moduleId %q in the body differs from %q in the URL", in.ModuleID, r.Module)
	}
	if err := normalizeIdentity(in, r.Module != ""); err != nil {
		return nil, err
	}
	now := s.Now().UTC()
	if ifMatch == "" {
		if r.Module != "" {
			if _, _, err := s.load(ctx, Ref{Device: r.Device}); err != nil {
				return nil, err
			}
			if err := s.checkModuleCount(ctx, r); err != nil {
				return nil, err
			}
		}
		rec := &record{Device: *in, DeviceETag: newETag(), TwinETag: newETag(), TwinVersion: 1,
			Tags: map[string]any{}, Desired: map[string]any{}, Reported: map[string]any{},
			DesiredVersion: 1, ReportedVersion: 1, DesiredUpdated: now, ReportedUpdated: now}
		rec.Device.DeviceID, rec.Device.ModuleID, rec.Device.GenerationID = r.Device, r.Module, generationID()
		rec.Device.ConnectionState, rec.Device.StatusUpdatedTime = "Disconnected", now
		body, _ := json.Marshal(rec)
		doc := store.Doc{Kind: r.kind(), ID: r.id(), Body: body}
		var err error
		if r.Module == "" {
			_, err = s.store.Create(ctx, doc)
		} else {
			// Under its device: a module whose device is being deleted
			// goes with it, or is refused.
			_, err = s.store.CreateUnder(ctx, doc, kindDevice, r.Device)
		}
		switch {
		case errors.Is(err, store.ErrExists) && r.Module != "":
			return nil, azerr.New(409301, "ModuleAlreadyExistsOnDevice", "%s already exists: update it with If-Match", r)
		case errors.Is(err, store.ErrExists):
			return nil, azerr.Conflict("DeviceAlreadyExists", "%s already exists: update it with If-Match", r)
		case errors.Is(err, store.ErrNotFound):
			return nil, Ref{Device: r.Device}.notFound()
		case err != nil:
			return nil, err
		}
		if r.Module == "" && in.Capabilities.IoTEdge {
			if err := s.ensureEdgeModules(ctx, r.Device); err != nil {
				s.undoCreate(ctx, r, rec.DeviceETag)
				return nil, err
			}
		}
		s.reapply(ctx, r) // configurations targeting every device ("*") target it too
		return rec.identityView(), nil
	}
	revoked := false
	rec, err := s.update(ctx, r, func(rec *record) error {
		if !matches(ifMatch, rec.DeviceETag) {
			return azerr.PreconditionFailed("%s was changed since etag %s: read it again", r, ifMatch)
		}
		revoked = in.Status == "disabled" && rec.Device.Status != "disabled" ||
			!sameCredentials(in.Authentication, rec.Device.Authentication)
		if rec.Device.Status != in.Status {
			rec.Device.StatusUpdatedTime = now
		}
		rec.Device.Status, rec.Device.StatusReason = in.Status, in.StatusReason
		rec.Device.Authentication, rec.Device.Capabilities = in.Authentication, in.Capabilities
		if in.ManagedBy != "" {
			rec.Device.ManagedBy = in.ManagedBy
		}
		rec.DeviceETag = newETag()
		return nil
	})
	if err != nil {
		return nil, err
	}
	if revoked {
		s.revoke(r)
	}
	if r.Module == "" && in.Capabilities.IoTEdge {
		if err := s.ensureEdgeModules(ctx, r.Device); err != nil {
			return nil, err
		}
	}
	s.reapply(ctx, r) // an edge device no more, or one now, is targeted anew
	return rec.identityView(), nil
}

// MaxModules is how many module identities a device may have, as in the
// hosted hub (IoT Hub quotas: 50 modules per device).
const MaxModules = 50

// checkModuleCount refuses to add the module r to a device that has
// MaxModules already. (Creates racing each other may pass it together.)
func (s *Service) checkModuleCount(ctx context.Context, r Ref) error {
	prefix := r.Device + "/"
	mods, _, err := s.scan(ctx, kindModule, prefix, prefix, MaxModules)
	if err != nil {
		return err
	}
	if len(mods) >= MaxModules {
		return azerr.New(413003, "TooManyModulesOnDevice", "device %q has %d module identities, the most a device may have: delete one before adding %q", r.Device, MaxModules, r.Module)
	}
	return nil
}

// ensureEdgeModules gives an IoT Edge device its $edgeAgent and $edgeHub
// module identities, as the hosted hub does.
func (s *Service) ensureEdgeModules(ctx context.Context, device string) error {
	for _, m := range []string{"$edgeAgent", "$edgeHub"} {
		_, err := s.PutIdentity(ctx, Ref{device, m}, "", &Device{ManagedBy: "iotEdge"})
		if err != nil && azerr.As(err).Status() != 409 {
			return err
		}
	}
	return nil
}

// undoCreate deletes the device r, with the modules it got, that a create
// which failed after storing it made: its retry would be refused, as a
// create of a device that exists, and an edge device without its agent's
// identity never runs. One deleted, or created anew, or changed, since
// (its identity etag no longer etag) is someone else's, and stays.
func (s *Service) undoCreate(ctx context.Context, r Ref, etag string) {
	err := s.DeleteIdentity(context.WithoutCancel(ctx), r, etag)
	if err != nil && !azerr.HasStatus(err, 404) && !azerr.HasStatus(err, 412) {
		slog.Error("undoing a device's create that failed halfway: delete it and create it again", "device", r.Device, "error", err)
	}
}

// sameCredentials reports whether two authentications admit the same
// credentials: sessions opened with the old ones end when they change.
func sameCredentials(a, b Authentication) bool {
	str := func(p *string) string {
		if p == nil {
			return ""
		}
		return strings.ToLower(*p)
	}
	return a.Type == b.Type && a.SymmetricKey == b.SymmetricKey &&
		str(a.X509Thumbprint.PrimaryThumbprint) == str(b.X509Thumbprint.PrimaryThumbprint) &&
		str(a.X509Thumbprint.SecondaryThumbprint) == str(b.X509Thumbprint.SecondaryThumbprint)
}

// normalizeIdentity fills defaults and checks keys, as the hosted registry does.
func normalizeIdentity(d *Device, module bool) error {
	switch d.Status {
	case "":
		d.Status = "enabled"
	case "enabled", "disabled":
		if module && d.Status == "disabled" {
			return azerr.BadRequest("modules have no status: disable the device instead")
		}
	default:
		return azerr.BadRequest("status %q is not valid: use enabled or disabled", d.Status)
	}
	// An identity keeps only the credentials of its type, as the hosted
	// registry does: keys read back with a device and sent again with
	// its new type "selfSigned" must not go on admitting SAS tokens.
	a := &d.Authentication
	if a.Type != "" && a.Type != "sas" {
		a.SymmetricKey = SymmetricKey{}
	}
	if a.Type != "selfSigned" {
		a.X509Thumbprint = X509Thumbprint{}
	}
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
			if !sas.ValidKey(k) {
				return azerr.BadRequest("authentication.symmetricKey.%s must be %s", name, sas.KeyRule)
			}
		}
	case "selfSigned":
		for name, tp := range map[string]*string{"primaryThumbprint": a.X509Thumbprint.PrimaryThumbprint, "secondaryThumbprint": a.X509Thumbprint.SecondaryThumbprint} {
			if tp == nil || *tp == "" {
				if name == "primaryThumbprint" {
					return azerr.BadRequest("authentication.x509Thumbprint.primaryThumbprint is required for a selfSigned device: the SHA-1 or SHA-256 of its certificate, in hex")
				}
				continue
			}
			if h := strings.ReplaceAll(*tp, ":", ""); (len(h) != 40 && len(h) != 64) || strings.Trim(strings.ToLower(h), "0123456789abcdef") != "" {
				return azerr.BadRequest("authentication.x509Thumbprint.%s %q is not a SHA-1 or SHA-256 thumbprint in hex", name, *tp)
			}
		}
	case "certificateAuthority", "none":
	default:
		return azerr.BadRequest("authentication.type %q is not valid: use sas, selfSigned, certificateAuthority or none", a.Type)
	}
	return nil
}

func (r *record) identityView() *Device {
	d := r.Device
	d.ETag = r.DeviceETag
	return &d
}

// GetIdentity returns a device or module identity.
func (s *Service) GetIdentity(ctx context.Context, r Ref) (*Device, error) {
	rec, _, err := s.load(ctx, r)
	if err != nil {
		return nil, err
	}
	return rec.identityView(), nil
}

// DeleteIdentity removes a device, with its modules and its queued
// cloud-to-device messages in the same transaction, or a module. It deletes
// under the etag read: a twin or connection write meanwhile (which changes
// the document, not the identity) only makes it try again, and a delete
// meanwhile finds it gone (404), never a store error.
func (s *Service) DeleteIdentity(ctx context.Context, r Ref, ifMatch string) error {
	for range 16 {
		rec, etag, err := s.load(ctx, r)
		switch {
		case errors.Is(err, errCorrupt) && matches(ifMatch, ""):
			// Unconditional: a record nobody can read can still go.
		case err != nil:
			return err
		case !matches(ifMatch, rec.DeviceETag):
			return azerr.PreconditionFailed("%s was changed since etag %s", r, ifMatch)
		}
		var gone []store.Doc
		if r.Module != "" {
			err = s.store.Delete(ctx, r.kind(), r.id(), etag)
		} else {
			gone, err = s.store.DeleteTree(ctx, kindDevice, r.Device, etag, kindModule, kindC2D)
		}
		if store.Raced(err) {
			continue // deleted meanwhile, load says 404
		}
		if err != nil {
			return err
		}
		s.revoke(r)
		for _, d := range gone {
			if d.Kind == kindModule {
				s.revoke(Ref{Device: r.Device, Module: strings.TrimPrefix(d.ID, r.Device+"/")})
			}
		}
		return nil
	}
	return azerr.PreconditionFailed("%s kept changing while being deleted: retry", r)
}

// ListDevices returns up to top devices.
func (s *Service) ListDevices(ctx context.Context, top int) ([]*Device, error) {
	if top <= 0 || top > 1000 {
		top = 1000
	}
	recs, _, err := s.scan(ctx, kindDevice, "", "", top)
	if err != nil {
		return nil, err
	}
	out := make([]*Device, len(recs))
	for i, r := range recs {
		out[i] = r.identityView()
	}
	return out, nil
}

// RegistryStatistics counts the hub's devices, as GET /statistics/devices.
type RegistryStatistics struct {
	TotalDeviceCount    int64 `json:"totalDeviceCount"`
	EnabledDeviceCount  int64 `json:"enabledDeviceCount"`
	DisabledDeviceCount int64 `json:"disabledDeviceCount"`
}

// Statistics counts the devices by status.
func (s *Service) Statistics(ctx context.Context) (*RegistryStatistics, error) {
	st := &RegistryStatistics{}
	err := s.eachRecord(ctx, kindDevice, func(r *record) error {
		st.TotalDeviceCount++
		if r.Device.Status == "disabled" {
			st.DisabledDeviceCount++
		} else {
			st.EnabledDeviceCount++
		}
		return nil
	})
	return st, err
}

// ServiceStatistics is GET /statistics/service.
type ServiceStatistics struct {
	ConnectedDeviceCount int64 `json:"connectedDeviceCount"`
}

// ServiceStatistics counts the connected devices.
func (s *Service) ServiceStatistics(ctx context.Context) (*ServiceStatistics, error) {
	st := &ServiceStatistics{}
	err := s.eachRecord(ctx, kindDevice, func(r *record) error {
		if r.Device.ConnectionState == "Connected" {
			st.ConnectedDeviceCount++
		}
		return nil
	})
	return st, err
}

// ListModules returns a device's module identities.
func (s *Service) ListModules(ctx context.Context, device string) ([]*Device, error) {
	if _, _, err := s.load(ctx, Ref{Device: device}); err != nil {
		return nil, err
	}
	out := []*Device{}
	err := s.eachModule(ctx, device, func(r *record) error {
		out = append(out, r.identityView())
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// eachModule calls f with every module record of device, in ID order, a
// page at a time: all of them, though a device may have only MaxModules,
// as stores written before that limit may hold more.
func (s *Service) eachModule(ctx context.Context, device string, f func(*record) error) error {
	prefix := device + "/"
	for after := prefix; after != ""; {
		recs, next, err := s.scan(ctx, kindModule, prefix, after, 500)
		if err != nil {
			return err
		}
		for _, r := range recs {
			if err := f(r); err != nil {
				return err
			}
		}
		after = next
	}
	return nil
}

// corruptLogged holds the IDs of corrupt records already logged.
var corruptLogged sync.Map

// docPage is how many documents a walk reads at once.
const docPage = 500
