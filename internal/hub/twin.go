package hub

import (
	"context"
	"encoding/json"
	"hash/fnv"
	"maps"
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/twindoc"
)

// GetTwin returns a device or module twin.
func (s *Service) GetTwin(ctx context.Context, r Ref) (*Twin, error) {
	rec, _, err := s.load(ctx, r)
	if err != nil {
		return nil, err
	}
	return rec.twinView(), nil
}

// UpdateTwin is PATCH (merge) or PUT (replace) of tags and desired
// properties by the back end. Connected devices hear of desired changes.
func (s *Service) UpdateTwin(ctx context.Context, r Ref, ifMatch string, p *TwinPatch, replace bool) (*Twin, error) {
	return s.updateTwin(ctx, r, ifMatch, p, replace, replace)
}

// replaceDesired replaces a twin's desired properties and nothing else, as
// deployments do: its tags stay, for the conditions that target them.
func (s *Service) replaceDesired(ctx context.Context, r Ref, desired map[string]any) error {
	_, err := s.updateTwin(ctx, r, "", &TwinPatch{Properties: &DesiredPatch{Desired: desired}}, false, true)
	return err
}

// updateTwin merges p into a twin, first emptying its tags and its
// desired properties as replaceTags and replaceDesired say.
func (s *Service) updateTwin(ctx context.Context, r Ref, ifMatch string, p *TwinPatch, replaceTags, replaceDesired bool) (*Twin, error) {
	now := s.Now().UTC()
	setsDesired := p.Properties != nil && (p.Properties.Desired != nil || replaceDesired)
	var desired map[string]any
	if setsDesired {
		desired = twindoc.WithoutMeta(p.Properties.Desired)
	}
	if err := checkTwinPatch(p.Tags, desired); err != nil {
		return nil, err
	}
	var notify map[string]any
	// Devices apply desired patches in the order they hear them: one
	// writer at a time per twin, notifying before the next commits.
	unlock := s.twinLock(r)
	rec, err := s.update(ctx, r, func(rec *record) error {
		notify = nil
		if !matches(ifMatch, rec.TwinETag) {
			return azerr.PreconditionFailed("twin of %s was changed since etag %s: read it again", r, ifMatch)
		}
		if replaceTags {
			rec.Tags = map[string]any{}
		}
		twindoc.Merge(rec.Tags, p.Tags)
		if p.Tags != nil || replaceTags {
			if err := checkSize("tags", rec.Tags, twindoc.TagsLimit); err != nil {
				return err
			}
		}
		if setsDesired {
			old := rec.Desired
			if replaceDesired {
				rec.Desired = map[string]any{}
			}
			twindoc.Merge(rec.Desired, desired)
			if err := checkSize("properties.desired", rec.Desired, twindoc.PropertiesLimit); err != nil {
				return err
			}
			rec.DesiredVersion++
			rec.DesiredUpdated = now
			notify = desired
			if replaceDesired {
				notify = twindoc.ReplacePatch(old, rec.Desired)
			}
		}
		rec.TwinVersion++
		rec.TwinETag = newETag()
		return nil
	})
	if err == nil && notify != nil {
		s.notifyDesired(r, notify, rec.DesiredVersion)
	}
	unlock()
	if err != nil {
		return nil, err
	}
	if notify != nil {
		// Other replicas read the twin when told: the signal's order does
		// not matter, so it waits for nobody's lock.
		s.publish("desired", r)
	}
	if p.Tags != nil || replaceTags {
		s.reapply(ctx, r) // the twin may now match other configurations
	}
	return rec.twinView(), nil
}

// UpdateReported merges a device's reported-properties patch and returns
// the new reported version.
func (s *Service) UpdateReported(ctx context.Context, r Ref, patch map[string]any) (int64, error) {
	now := s.Now().UTC()
	patch = twindoc.WithoutMeta(patch)
	if err := checkPatch("properties.reported", patch); err != nil {
		return 0, err
	}
	rec, err := s.update(ctx, r, func(rec *record) error {
		twindoc.Merge(rec.Reported, patch)
		if err := checkSize("properties.reported", rec.Reported, twindoc.PropertiesLimit); err != nil {
			return err
		}
		rec.ReportedVersion++
		rec.ReportedUpdated = now
		rec.TwinVersion++
		rec.TwinETag = newETag()
		return nil
	})
	if err != nil {
		return 0, err
	}
	return rec.ReportedVersion, nil
}

// DeviceTwinDocument is the twin as a device sees it: desired and reported,
// each with its $version.
func (s *Service) DeviceTwinDocument(ctx context.Context, r Ref) ([]byte, error) {
	rec, _, err := s.load(ctx, r)
	if err != nil {
		return nil, err
	}
	return json.Marshal(map[string]any{"desired": withVersion(rec.Desired, rec.DesiredVersion), "reported": withVersion(rec.Reported, rec.ReportedVersion)})
}

// notifyDesired hands a committed patch to r's followers on this replica.
func (s *Service) notifyDesired(r Ref, patch map[string]any, version int64) {
	for _, f := range s.desiredWatchers.get(r) {
		(*f)(desiredChange{patch: patch, version: version})
	}
}

// checkPatch applies IoT Hub's rules for names and shapes to a client's
// twin patch.
func checkPatch(where string, patch map[string]any) error {
	if err := twindoc.Check(where, patch); err != nil {
		return azerr.BadRequest("%v", err)
	}
	return nil
}

// checkSize refuses a change that would grow a twin document past limit.
func checkSize(where string, doc map[string]any, limit int) error {
	if err := twindoc.CheckSize(where, doc, limit); err != nil {
		return azerr.BadRequest("%v", err)
	}
	return nil
}

// twinLock serializes the desired-property writes of one twin and returns
// the unlock.
func (s *Service) twinLock(r Ref) (unlock func()) {
	m := stripe(s.twinLocks[:], r.String())
	m.Lock()
	return m.Unlock
}

// stripe is key's lock among locks: striped, so that locks per device take
// no memory per device.
func stripe(locks []sync.Mutex, key string) *sync.Mutex {
	h := fnv.New32a()
	h.Write([]byte(key))
	return &locks[h.Sum32()%uint32(len(locks))]
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
		DeviceID: r.Device.DeviceID, ModuleID: r.Device.ModuleID, ModelID: r.ModelID, ETag: r.TwinETag, DeviceETag: r.DeviceETag,
		Status: r.Device.Status, StatusUpdateTime: r.Device.StatusUpdatedTime,
		ConnectionState: r.Device.ConnectionState, LastActivityTime: r.Device.LastActivityTime,
		CloudToDeviceMessageCount: r.Device.CloudToDeviceMessageCount,
		AuthenticationType:        r.Device.Authentication.Type, X509Thumbprint: r.Device.Authentication.X509Thumbprint,
		Version: r.TwinVersion, Tags: tags, Capabilities: r.Device.Capabilities, Configurations: r.Configurations,
		Properties: TwinProperties{
			Desired:  props(r.Desired, r.DesiredVersion, r.DesiredUpdated),
			Reported: props(r.Reported, r.ReportedVersion, r.ReportedUpdated),
		},
	}
}

// checkTwinPatch checks a patch's tags and desired properties (without
// their metadata) against the twin rules.
func checkTwinPatch(tags, desired map[string]any) error {
	if err := checkPatch("tags", tags); err != nil {
		return err
	}
	return checkPatch("properties.desired", desired)
}
