package dps

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/url"
	"slices"
	"strings"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/hubid"
	"github.com/hatchery/hatchery/internal/store"
	"github.com/hatchery/hatchery/internal/twindoc"
)

// enrollmentDefaults fills what Azure fills and validates the rest. The
// fields both kinds share are passed by pointer so one check serves both.
func (s *Service) enrollmentDefaults(ctx context.Context, group bool, att *Attestation, status *string, repro **ReprovisionPolicy, alloc *string, caps **Capabilities, twin *InitialTwin) error {
	// Enum values are taken in any case, as attestation types are, and
	// stored in their canonical spelling, which the rest of the service
	// compares against.
	if *status == "" {
		*status = "enabled"
	}
	if !canonicalize(status, "enabled", "disabled") {
		return azerr.BadRequest("provisioningStatus %q is not valid: use \"enabled\" or \"disabled\"", *status)
	}
	if *repro == nil {
		*repro = &ReprovisionPolicy{UpdateHubAssignment: true, MigrateDeviceData: true}
	}
	if *alloc == "" {
		*alloc = PolicyHashed
	}
	if !canonicalize(alloc, PolicyHashed, PolicyStatic, PolicyGeoLatency, PolicyCustom) {
		return azerr.BadRequest("allocationPolicy %q is not valid: use hashed, static, geoLatency or custom", *alloc)
	}
	if *caps == nil {
		*caps = &Capabilities{}
	}
	if twin != nil {
		if err := checkTwin(twin); err != nil {
			return err
		}
	}
	switch att.Type {
	case AttestationSymmetricKey:
		if att.SymmetricKey == nil {
			att.SymmetricKey = &SymmetricKeyAttestation{}
		}
		// Generated keys are 64 bytes, as the hosted service makes them.
		k := att.SymmetricKey
		if k.PrimaryKey == "" {
			k.PrimaryKey = s.randomKey(64)
		}
		if k.SecondaryKey == "" {
			k.SecondaryKey = s.randomKey(64)
		}
		if err := checkKey("attestation.symmetricKey.primaryKey", k.PrimaryKey); err != nil {
			return err
		}
		return checkKey("attestation.symmetricKey.secondaryKey", k.SecondaryKey)
	case AttestationTPM:
		if group {
			return checkTPMGroup(att.TPM, s.Now())
		}
		if att.TPM == nil || att.TPM.EndorsementKey == "" {
			return azerr.BadRequest("attestation.tpm.endorsementKey is required for a TPM enrollment: " +
				"read it on the device with `iotedge tpm provision-info`")
		}
		if _, err := decodeEK("attestation.tpm.endorsementKey", att.TPM.EndorsementKey); err != nil {
			return err
		}
		if att.TPM.StorageRootKey != "" {
			if _, err := decodeEK("attestation.tpm.storageRootKey", att.TPM.StorageRootKey); err != nil {
				return err
			}
		}
		return nil
	case AttestationX509:
		if att.X509 == nil {
			att.X509 = &X509Attestation{}
		}
		return s.checkX509(ctx, att.X509, group)
	case "":
		return azerr.BadRequest("attestation.type is required: tpm, symmetricKey or x509")
	}
	return azerr.BadRequest("attestation.type %q is not valid: use tpm, symmetricKey or x509", att.Type)
}

// canonicalize replaces *v with the one of names it equals but for case,
// and reports whether there was one.
func canonicalize(v *string, names ...string) bool {
	for _, n := range names {
		if strings.EqualFold(*v, n) {
			*v = n
			return true
		}
	}
	return false
}

// checkAllocation checks that the policy has what it needs: static a hub
// to assign to, custom a webhook to ask; and that the hubs it names are
// linked, as the hosted service does.
func (s *Service) checkAllocation(ctx context.Context, policy string, hubs []string, static string, custom *CustomAllocationDefinition) error {
	for _, h := range append(slices.Clip(hubs), static) {
		if h == "" {
			continue
		}
		linked, err := s.isLinked(ctx, h)
		if err != nil {
			return err
		}
		if !linked {
			return azerr.BadRequest("hub %s is not linked to this service: link it first (`hatchery hub link --hostname %s --connection-string ...`)", h, h)
		}
	}
	switch {
	case policy == PolicyStatic && static == "" && len(hubs) != 1:
		return azerr.BadRequest("allocationPolicy static needs the hub: set iotHubHostName (or exactly one iotHubs entry)")
	case policy == PolicyCustom && (custom == nil || custom.WebhookURL == ""):
		return azerr.BadRequest("allocationPolicy custom needs customAllocationDefinition.webhookUrl: the URL the service asks which hub to use")
	case custom != nil && custom.WebhookURL != "":
		u, err := url.Parse(custom.WebhookURL)
		if err != nil || u.Host == "" || (u.Scheme != "https" && !(u.Scheme == "http" && isLoopback(u.Hostname()))) {
			return azerr.BadRequest("customAllocationDefinition.webhookUrl must be an https URL (http only on this machine, for localhost)")
		}
	}
	return nil
}

func isLoopback(host string) bool {
	ip := net.ParseIP(host)
	return host == "localhost" || (ip != nil && ip.IsLoopback())
}

// checkTwin checks that an initial twin's tags and desired properties are objects.
func checkTwin(twin *InitialTwin) error {
	if err := checkObject("initialTwin.tags", twin.Tags, twindoc.TagsLimit); err != nil {
		return err
	}
	if twin.Properties != nil {
		return checkObject("initialTwin.properties.desired", twin.Properties.Desired, twindoc.PropertiesLimit)
	}
	return nil
}

// checkObject accepts an absent value, null or a JSON object that IoT Hub
// would take as a twin document of at most limit.
func checkObject(field string, raw json.RawMessage, limit int) error {
	t := strings.TrimSpace(string(raw))
	if t == "" || t == "null" {
		return nil
	}
	var doc map[string]any
	if !strings.HasPrefix(t, "{") || twindoc.Unmarshal(raw, &doc) != nil {
		return azerr.BadRequest("%s must be a JSON object", field)
	}
	if err := twindoc.CheckDocument(field, doc, limit); err != nil {
		return azerr.BadRequest("%v", err)
	}
	return nil
}

// PutEnrollment creates or replaces an individual enrollment. ifMatch is the
// If-Match header, or else the body's etag (the service SDKs send it
// there): without either it only creates, as the hosted service does, so
// that nobody replaces an enrollment (and its keys) by mistake; "*"
// replaces any version, an etag only that one.
func (s *Service) PutEnrollment(ctx context.Context, id, ifMatch string, e *Enrollment) (*Enrollment, error) {
	return s.putEnrollment(ctx, id, writeIf(cmp.Or(ifMatch, e.ETag)), e)
}

// write is how putEnrollment and PutGroup write: create only (ifMatch ""),
// replace the version ifMatch names ("*": any), or, with upsert, create or
// replace whatever is there (bulk mode update).
type write struct {
	ifMatch string
	upsert  bool
}

func writeIf(ifMatch string) write { return write{ifMatch: ifMatch} }

// replaces says whether the write may find a version to replace.
func (w write) replaces() bool { return w.upsert || w.ifMatch != "" }

// putEnrollment writes e as w says.
func (s *Service) putEnrollment(ctx context.Context, id string, w write, e *Enrollment) (*Enrollment, error) {
	id, err := normalizeID("registration ID", id)
	if err != nil {
		return nil, err
	}
	if e.RegistrationID != "" && !strings.EqualFold(e.RegistrationID, id) {
		return nil, azerr.BadRequest("registrationId %q in the body differs from %q in the URL", e.RegistrationID, id)
	}
	e.RegistrationID = id
	if e.DeviceID != "" && !hubid.Valid(e.DeviceID) {
		return nil, azerr.BadRequest("deviceId %q is not valid in IoT Hub: use %s, or leave it out to use the registration ID", e.DeviceID, hubid.Rule)
	}
	if info := bytes.TrimSpace(e.OptionalDeviceInformation); len(info) > 0 && info[0] != '{' && !bytes.Equal(info, []byte("null")) {
		return nil, azerr.BadRequest("optionalDeviceInformation must be a JSON object, such as {\"model\": \"x1\"}")
	}
	now := s.Now().UTC()
	e.RegistrationState, e.LastUpdatedDateTimeUtc, e.CreatedDateTimeUtc, e.ETag = nil, &now, &now, ""
	d, e, err := replaceDoc(ctx, s.store, kindEnrollment, id, w, e, func(e, old *Enrollment) error {
		if old != nil {
			e.CreatedDateTimeUtc = old.CreatedDateTimeUtc
			e.Attestation.keepKeys(old.Attestation)
		}
		if err := s.enrollmentDefaults(ctx, false, &e.Attestation, &e.ProvisioningStatus, &e.ReprovisionPolicy, &e.AllocationPolicy, &e.Capabilities, e.InitialTwin); err != nil {
			return err
		}
		if err := s.checkAllocation(ctx, e.AllocationPolicy, e.IoTHubs, e.IoTHubHostName, e.CustomAllocationDefinition); err != nil {
			return err
		}
		return checkRegistrationCN(e)
	})
	s.recentOperations.forget(id) // its keys or certificate may have changed
	if err != nil {
		return nil, storeErr(err, "enrollment "+id)
	}
	e.ETag = d.ETag
	return e, nil
}

// replaceDoc writes v as w says, after complete has finished it against
// the version it replaces (nil when it creates): v keeps what complete takes
// from that version (the stored keys) only if that is the version replaced,
// so where w leaves the version open ("*", upsert) it writes under the etag
// read and reads again when another write came between — a key rotated
// meanwhile is never brought back. It returns the document and v as
// written.
func replaceDoc[T any](ctx context.Context, st store.Store, kind, id string, w write, v *T, complete func(v, old *T) error) (store.Doc, *T, error) {
	given, _ := json.Marshal(v)
	for attempt := 1; ; attempt++ {
		var old *T
		etag := w.ifMatch
		if w.replaces() {
			var read string
			var err error
			if old, read, err = get[T](ctx, st, kind, id, nil); err != nil {
				return store.Doc{}, nil, err
			}
			if old != nil && (w.upsert || w.ifMatch == "*") {
				etag = read // the version complete saw
			}
		}
		v = new(T) // each attempt completes the request as given
		_ = json.Unmarshal(given, v)
		if err := complete(v, old); err != nil {
			return store.Doc{}, nil, err
		}
		body, _ := json.Marshal(v)
		doc := store.Doc{Kind: kind, ID: id, Body: body}
		var d store.Doc
		var err error
		if etag == "" {
			d, err = st.Create(ctx, doc)
		} else {
			d, err = st.Put(ctx, doc, etag)
		}
		raced := etag != w.ifMatch || (w.upsert && etag == "")
		if raced && attempt < 10 && store.Raced(err) {
			continue
		}
		return d, v, err
	}
}

// GetEnrollment returns an enrollment with its registration state.
func (s *Service) GetEnrollment(ctx context.Context, id string) (*Enrollment, error) {
	id, err := normalizeID("registration ID", id)
	if err != nil {
		return nil, err
	}
	e, etag, err := get[Enrollment](ctx, s.store, kindEnrollment, id,
		azerr.New(404201, "NotFound", "no enrollment with registration ID %q: create one with `hatchery enrollment create`", id))
	if err != nil {
		return nil, err
	}
	e.ETag = etag
	e.Attestation.certificatesOnly()
	if r, retag, err := get[RegistrationState](ctx, s.store, kindRegistration, id, nil); err == nil && r != nil {
		r.ETag, r.TPM = retag, nil
		e.RegistrationState = r
	}
	return e, nil
}

// DeleteEnrollment removes an enrollment (and so the device's right to register).
func (s *Service) DeleteEnrollment(ctx context.Context, id, ifMatch string) error {
	id, err := normalizeID("registration ID", id)
	if err != nil {
		return err
	}
	err = s.store.Delete(ctx, kindEnrollment, id, ifMatch)
	s.recentOperations.forget(id)
	return storeErr(err, "enrollment "+id)
}

// ListEnrollments pages through individual enrollments in ID order.
func (s *Service) ListEnrollments(ctx context.Context, after string, limit int) ([]*Enrollment, string, error) {
	return list[Enrollment](ctx, s.store, kindEnrollment, after, limit, func(e *Enrollment, etag string) {
		e.ETag = etag
		e.Attestation.certificatesOnly()
	})
}

// PutGroup creates or replaces an enrollment group, under PutEnrollment's
// If-Match rules.
func (s *Service) PutGroup(ctx context.Context, id, ifMatch string, g *EnrollmentGroup) (*EnrollmentGroup, error) {
	return s.putGroup(ctx, id, writeIf(cmp.Or(ifMatch, g.ETag)), g)
}

// putGroup writes g as w says.
func (s *Service) putGroup(ctx context.Context, id string, w write, g *EnrollmentGroup) (*EnrollmentGroup, error) {
	id, err := normalizeID("enrollment group ID", id)
	if err != nil {
		return nil, err
	}
	if g.EnrollmentGroupID != "" && !strings.EqualFold(g.EnrollmentGroupID, id) {
		return nil, azerr.BadRequest("enrollmentGroupId %q in the body differs from %q in the URL", g.EnrollmentGroupID, id)
	}
	g.EnrollmentGroupID = id
	now := s.Now().UTC()
	g.LastUpdatedDateTimeUtc, g.CreatedDateTimeUtc, g.ETag = &now, &now, ""
	d, g, err := replaceDoc(ctx, s.store, kindGroup, id, w, g, func(g, old *EnrollmentGroup) error {
		if old != nil {
			g.CreatedDateTimeUtc = old.CreatedDateTimeUtc
			g.Attestation.keepKeys(old.Attestation)
		}
		if err := s.enrollmentDefaults(ctx, true, &g.Attestation, &g.ProvisioningStatus, &g.ReprovisionPolicy, &g.AllocationPolicy, &g.Capabilities, g.InitialTwin); err != nil {
			return err
		}
		return s.checkAllocation(ctx, g.AllocationPolicy, g.IoTHubs, g.IoTHubHostName, g.CustomAllocationDefinition)
	})
	s.groups.forget()
	if err != nil {
		return nil, storeErr(err, "enrollment group "+id)
	}
	g.ETag = d.ETag
	return g, nil
}

// GetGroup returns an enrollment group.
func (s *Service) GetGroup(ctx context.Context, id string) (*EnrollmentGroup, error) {
	id, err := normalizeID("enrollment group ID", id)
	if err != nil {
		return nil, err
	}
	g, etag, err := get[EnrollmentGroup](ctx, s.store, kindGroup, id,
		azerr.New(404201, "NotFound", "no enrollment group %q: create one with `hatchery enrollment-group create`", id))
	if err != nil {
		return nil, err
	}
	g.ETag = etag
	g.Attestation.certificatesOnly()
	return g, nil
}

// DeleteGroup removes an enrollment group.
func (s *Service) DeleteGroup(ctx context.Context, id, ifMatch string) error {
	id, err := normalizeID("enrollment group ID", id)
	if err != nil {
		return err
	}
	err = s.store.Delete(ctx, kindGroup, id, ifMatch)
	s.groups.forget()
	return storeErr(err, "enrollment group "+id)
}

// ListGroups pages through enrollment groups.
func (s *Service) ListGroups(ctx context.Context, after string, limit int) ([]*EnrollmentGroup, string, error) {
	return list[EnrollmentGroup](ctx, s.store, kindGroup, after, limit, func(g *EnrollmentGroup, etag string) {
		g.ETag = etag
		g.Attestation.certificatesOnly()
	})
}

// GetRegistration returns a device's registration record.
func (s *Service) GetRegistration(ctx context.Context, id string) (*RegistrationState, error) {
	id, err := normalizeID("registration ID", id)
	if err != nil {
		return nil, err
	}
	r, etag, err := get[RegistrationState](ctx, s.store, kindRegistration, id,
		azerr.New(404201, "NotFound", "device %q has not registered", id))
	if err != nil {
		return nil, err
	}
	r.ETag, r.TPM = etag, nil // the activation blob is for the device only
	return r, nil
}

// DeleteRegistration forgets a device's registration record, and frees
// the TPM that claimed its ID. The record is deleted as read, so that the
// claim freed is the one it held: a registration that adds one meanwhile
// makes it read again.
func (s *Service) DeleteRegistration(ctx context.Context, id, ifMatch string) error {
	id, err := normalizeID("registration ID", id)
	if err != nil {
		return err
	}
	for attempt := 0; ; attempt++ {
		rec, etag, err := get[registrationRecord](ctx, s.store, kindRegistration, id, nil)
		if err != nil {
			return err
		}
		if rec == nil {
			// A claim left without its record is freed too, but not by a
			// DELETE for a version of the record: If-Match finds none.
			keyID := ""
			if ifMatch == "" {
				if keyID, err = s.claimedEK(ctx, id); err != nil {
					return err
				}
			}
			if keyID == "" {
				return storeErr(store.ErrNotFound, "registration "+id)
			}
			return s.freeEK(ctx, id, keyID)
		}
		if ifMatch != "" && ifMatch != "*" && ifMatch != etag {
			return storeErr(store.ErrPrecondition, "registration "+id)
		}
		err = s.store.Delete(ctx, kindRegistration, id, etag)
		if store.Raced(err) {
			if attempt == 20 { // (a stale If-Match is answered above)
				return azerr.New(409203, "Conflict", "registration %s kept changing while it was being deleted (its device is registering): try again", id)
			}
			continue // changed or deleted meanwhile
		}
		if err != nil {
			return storeErr(err, "registration "+id)
		}
		s.recentOperations.forget(id)
		keyID := rec.EndorsementKeyID
		if keyID == "" {
			if keyID, err = s.claimedEK(ctx, id); err != nil {
				return err
			}
		}
		if keyID != "" {
			return s.freeEK(ctx, id, keyID)
		}
		return nil
	}
}

// ListRegistrations pages through registration records of one enrollment
// group, which must exist; groupID "" or "*" means all (store.FilteredPage:
// one filtered by group may come back short).
func (s *Service) ListRegistrations(ctx context.Context, groupID, after string, limit int) ([]*RegistrationState, string, error) {
	if limit <= 0 || limit > 1000 {
		limit = 1000
	}
	all := groupID == "" || groupID == "*"
	if !all {
		// A group that does not exist is an error (404), as in Azure, not
		// a group without devices.
		if _, err := s.GetGroup(ctx, groupID); err != nil {
			return nil, "", err
		}
	}
	var out []*RegistrationState
	next, err := store.FilteredPage(ctx, s.store, kindRegistration, after, limit, 10, func(d store.Doc) (bool, error) {
		r := &RegistrationState{}
		if err := json.Unmarshal(d.Body, r); err != nil {
			return false, errors.New("stored registration " + d.ID + " is corrupt")
		}
		if !all && !strings.EqualFold(r.EnrollmentGroupID, groupID) {
			return false, nil
		}
		r.ETag, r.TPM = d.ETag, nil // the activation blob is for the device only
		out = append(out, r)
		return true, nil
	})
	if err != nil {
		return nil, "", err
	}
	return out, next, nil
}

// list decodes one page of documents, each finished by read with its etag;
// the continuation is the last ID.
func list[T any](ctx context.Context, st store.Store, kind, after string, limit int, read func(*T, string)) ([]*T, string, error) {
	if limit <= 0 || limit > 1000 {
		limit = 1000
	}
	docs, err := st.List(ctx, kind, after, limit)
	if err != nil {
		return nil, "", err
	}
	out := make([]*T, 0, len(docs))
	for _, d := range docs {
		v := new(T)
		if err := json.Unmarshal(d.Body, v); err != nil {
			return nil, "", errors.New("stored " + kind + " " + d.ID + " is corrupt")
		}
		read(v, d.ETag)
		out = append(out, v)
	}
	next := ""
	if len(docs) == limit {
		next = docs[len(docs)-1].ID
	}
	return out, next, nil
}
