package dps

import (
	"cmp"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/store"
)

// assign allocates the device to a hub, creates or updates it there
// following the reprovisioning policy, and records the registration and
// its operation.
func (s *Service) assign(ctx context.Context, req RegisterRequest, regID string, att *attestation, payload json.RawMessage) (*Operation, error) {
	now := s.Now().UTC()
	// The device's payload goes to a custom allocation webhook only; the
	// result carries the webhook's payload, as in the hosted service.
	state := &RegistrationState{RegistrationID: regID, CreatedDateTimeUtc: &now, LastUpdatedDateTimeUtc: &now}
	read, etag, err := get[registrationRecord](ctx, s.store, kindRegistration, regID, nil)
	if err != nil {
		return nil, err
	}
	if read != nil && read.CreatedDateTimeUtc != nil {
		state.CreatedDateTimeUtc = read.CreatedDateTimeUtc
	}
	prev := read.lastAssignment() // what to reprovision from
	ekKey, err := s.tpmIdentity(ctx, regID, att)
	if err != nil {
		return nil, err
	}
	// A group's credentials do not reach devices that another enrollment
	// provisioned: a certificate or key of group B whose registration ID
	// happens to be a device of group A must not take it over. A
	// certificate that group A trusts too may move to B (a group made for
	// its intermediate CA), as may a TPM, whose EK names it.
	if att.group != nil && prev != nil && !strings.EqualFold(prev.EnrollmentGroupID, att.group.EnrollmentGroupID) &&
		att.challenge == nil && !slices.ContainsFunc(att.matched, func(id string) bool { return strings.EqualFold(id, prev.EnrollmentGroupID) }) {
		how := "its individual enrollment"
		if prev.EnrollmentGroupID != "" {
			how = "enrollment group " + prev.EnrollmentGroupID
		}
		return nil, unauthorized(regID, fmt.Sprintf("the device was provisioned through %s, not group %s: to move it, delete its registration record (DELETE /registrations/%s)",
			how, att.group.EnrollmentGroupID, regID))
	}

	dev := HubDevice{DeviceID: regID}
	alloc := allocation{runtime: deviceRuntimeContext{RegistrationID: regID, Payload: payload}, addr: req.Addr}
	t := att.terms(&dev, &alloc)
	if att.enrollment == nil {
		state.EnrollmentGroupID = att.group.EnrollmentGroupID
	}
	// Devices of a symmetric-key or X.509 group choose their registration
	// IDs, so one the group has not provisioned before must not seize a
	// hub device made another way (TPM group IDs derive from the EK).
	dev.NoTakeover = att.group != nil && att.challenge == nil && prev == nil
	if err := s.hubCredentials(att, regID, &dev, state, &alloc); err != nil {
		return nil, err
	}
	if prev != nil {
		alloc.runtime.CurrentIoTHubHostName, alloc.runtime.CurrentDeviceID = prev.Hub, prev.DeviceID
	}

	hub, former, err := s.place(ctx, alloc, prev, t.repro, t.twin, &dev, state)
	if errors.Is(err, ErrDeviceTaken) {
		return nil, unauthorized(regID, fmt.Sprintf("the hub already has a device %s with other credentials, which group %s did not provision: delete that device from its hub to let the group provision it",
			dev.DeviceID, att.group.EnrollmentGroupID))
	}
	if err != nil && errors.Is(ctx.Err(), context.Canceled) {
		// The device hung up (a slow webhook, say): nobody waits for this
		// failure, and recording it would show a device assigned before
		// as failed. An UpsertDevice on a new hub may have succeeded while
		// the record still names the old one: the next registration repairs it.
		return nil, err
	}
	if err != nil {
		slog.Warn("assignment failed", "registrationId", regID, "error", err)
		state.Status, state.Substatus, state.TPM = StatusFailed, "", nil
		state.ErrorCode = azerr.As(err).Code
		state.ErrorMessage = "assigning the device to a hub failed: " + err.Error()
		if azerr.HasStatus(err, 401) { // the linked hub's policy and rights are the operator's business
			state.ErrorMessage = "assigning the device to a hub failed: the hub refused the provisioning service's credentials (the service's log says why)"
		}
	} else {
		state.Status, state.AssignedHub, state.DeviceID = StatusAssigned, hub.HostName, dev.DeviceID
	}
	op := &Operation{OperationID: s.operationID(), Status: state.Status, RegistrationState: state}
	rec := registrationRecord{RegistrationState: *state, Operations: []string{op.OperationID}, EndorsementKeyID: ekKey}
	if state.Status == StatusAssigned {
		rec.HubCredential = dev.Credential()
		if att.challenge != nil {
			rec.StorageRootKey = att.challenge.StorageRootKey
		}
	}
	// From the record's write on, what it implies is done whether or not
	// the device still waits for the answer.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	var note string
	if former != nil {
		if note, err = s.noteLeaving(ctx, regID, former); err != nil {
			return nil, err
		}
	}
	written, recETag, err := s.record(ctx, rec, &current[registrationRecord]{read, etag})
	if err != nil {
		return nil, err // the note finds the record unchanged, and goes
	}
	if state.Status == StatusAssigned && !written.lastAssignment().at(hub.HostName, dev.DeviceID) {
		// Another registration of the device placed it elsewhere meanwhile
		// and stands: the device is told what it was, and the identity made
		// here goes, unless the record names it by now.
		*state = written.RegistrationState
		op.Status = state.Status
		s.leaveNoted(ctx, regID, &formerIdentity{hub: *hub, deviceID: dev.DeviceID, credential: dev.Credential()})
	}
	state.ETag = recETag
	if ekKey != "" {
		// A DELETE of the record while this registration ran freed the
		// claim, and the record is back: claim the ID again. If the TPM
		// took another ID meanwhile, this registration is undone.
		if err = s.claimID(ctx, regID, ekKey); azerr.HasStatus(err, 401) {
			s.undo(ctx, regID, state.ETag, hub, &dev)
			if former != nil {
				s.dropNote(ctx, regID, former, note)
			}
			return nil, err
		}
	}
	if former != nil && s.leave(ctx, regID, former) { // the record names where the device went
		s.dropNote(ctx, regID, former, note)
	}
	if err != nil {
		return nil, err
	}
	if a := (answered{op: *op, proof: proof{keys: att.keys, certificate: att.certificate}}); a.small() {
		s.recentOperations.put(regID, a, s.Now())
	}
	return op, nil
}

// enrollmentTerms are what the enrollment or group that attested a device
// says of its registration beyond the hub device.
type enrollmentTerms struct {
	twin  *InitialTwin
	repro *ReprovisionPolicy
}

// terms reads the attesting enrollment or group into dev and alloc.
func (att *attestation) terms(dev *HubDevice, alloc *allocation) enrollmentTerms {
	var caps *Capabilities
	var t enrollmentTerms
	var enroll any
	if e := att.enrollment; e != nil {
		if e.DeviceID != "" {
			dev.DeviceID = e.DeviceID
		}
		caps, t.twin, t.repro = e.Capabilities, e.InitialTwin, e.ReprovisionPolicy
		alloc.policy, alloc.hubs, alloc.static, alloc.webhook = e.AllocationPolicy, e.IoTHubs, e.IoTHubHostName, e.CustomAllocationDefinition
		alloc.enrollmentField, enroll = "individualEnrollment", e
	} else {
		g := att.group
		caps, t.twin, t.repro = g.Capabilities, g.InitialTwin, g.ReprovisionPolicy
		alloc.policy, alloc.hubs, alloc.static, alloc.webhook = g.AllocationPolicy, g.IoTHubs, g.IoTHubHostName, g.CustomAllocationDefinition
		alloc.enrollmentField, enroll = "enrollmentGroup", g
	}
	alloc.enrollment, alloc.deviceID = enroll, dev.DeviceID
	dev.IoTEdge = caps != nil && caps.IoTEdge
	return t
}

// hubCredentials gives dev the credentials it will have in its hub, as it
// attested, and says so in state and in what a custom allocation webhook
// is told.
func (s *Service) hubCredentials(att *attestation, regID string, dev *HubDevice, state *RegistrationState, alloc *allocation) error {
	switch {
	case att.challenge != nil:
		// The hub key chosen with the challenge, delivered wrapped to this
		// TPM: on the device it never exists outside the TPM.
		dev.PrimaryKey, dev.SecondaryKey = cmp.Or(att.challenge.HubKey, s.newKey()), s.newKey()
		ek, _ := base64.StdEncoding.DecodeString(att.challenge.EndorsementKey)
		srk, _ := base64.StdEncoding.DecodeString(att.challenge.StorageRootKey)
		blob, err := s.activationBlob(ek, srk, dev.PrimaryKey)
		if err != nil {
			return err
		}
		state.TPM = &TPMResult{AuthenticationKey: base64.StdEncoding.EncodeToString(blob)}
		alloc.runtime.TPM = &TPMAttestation{EndorsementKey: att.challenge.EndorsementKey, StorageRootKey: att.challenge.StorageRootKey}
	case att.certificate != nil:
		// The hub authenticates the device by this very certificate, so a
		// device must register again when it renews it.
		info := CertificateInfo(att.certificate)
		dev.Thumbprint = info.SHA256Thumbprint
		state.X509 = &X509Result{CertificateInfo: info}
		if att.group != nil {
			state.X509.EnrollmentGroupID = att.group.EnrollmentGroupID
			state.X509.SigningCertificateInfo = CertificateInfo(att.signer)
		}
		alloc.runtime.X509 = state.X509
	case att.group != nil:
		// Both, as in the hosted service: a device that signs with its
		// secondary key while the group's primary is rotated keeps working.
		dev.PrimaryKey = base64.StdEncoding.EncodeToString(att.keys[0])
		if len(att.keys) > 1 {
			dev.SecondaryKey = base64.StdEncoding.EncodeToString(att.keys[1])
		}
		state.SymmetricKey = &SymKeyResult{RegistrationID: regID, EnrollmentGroupID: att.group.EnrollmentGroupID}
		alloc.runtime.SymmetricKey = state.SymmetricKey
	default:
		k := att.enrollment.Attestation.SymmetricKey
		dev.PrimaryKey, dev.SecondaryKey = k.PrimaryKey, k.SecondaryKey
		state.SymmetricKey = &SymKeyResult{RegistrationID: regID}
		alloc.runtime.SymmetricKey = state.SymmetricKey
	}
	return nil
}

// recordedOperations is how many of a device's operations stay answerable:
// a device that retried while its first request was still running may poll
// either. From the store, all of them answer with the latest state, the one
// in the hub.
const recordedOperations = 16

// record stores a registration and its operation, keeping the IDs of the
// device's recent operations; concurrent registrations of one device (on
// any replica) each add theirs. rec is the registration with its one
// operation; what it leaves empty of an SRK and hub credential stays as
// recorded, and a failed one keeps the last assignment. read is the record
// as assign found it. An assignment another registration recorded since
// then stands, wherever it put the device (retries answered differently by
// a custom webhook or by geoLatency, replicas whose lists of hubs differ
// for a moment): rec adds only its operation to it, so that the device is
// on one hub. So does a failure recorded since, when the assignment it
// keeps is not the one read (a third registration moved the device
// before it): the device, told of the failure, registers again
// (docs/decisions/0006). record returns what it wrote.
func (s *Service) record(ctx context.Context, rec registrationRecord, read *current[registrationRecord]) (registrationRecord, string, error) {
	prev := read.val.lastAssignment()
	var written registrationRecord
	attempt := 0
	etag, err := upsert(ctx, s.store, kindRegistration, rec.RegistrationID, read, func(old *registrationRecord) registrationRecord {
		r := rec               // a fresh copy for each attempt
		changed := attempt > 0 // the first attempt writes over read
		attempt++
		won := old.lastAssignment()
		placedElsewhere := won != nil && !won.at(r.AssignedHub, r.DeviceID) &&
			(old.Status == StatusAssigned || prev == nil || !won.at(prev.Hub, prev.DeviceID))
		switch {
		case changed && r.Status == StatusAssigned && placedElsewhere:
			r = *old
			r.Operations = append(rec.Operations[:1:1], old.Operations...)
		case old != nil:
			r.Operations = append(rec.Operations[:1:1], old.Operations...)
			r.StorageRootKey = cmp.Or(rec.StorageRootKey, old.StorageRootKey)
			r.HubCredential = cmp.Or(rec.HubCredential, old.HubCredential)
			r.EndorsementKeyID = cmp.Or(rec.EndorsementKeyID, old.EndorsementKeyID)
		}
		r.Operations = r.Operations[:min(len(r.Operations), recordedOperations)]
		if r.Status != StatusAssigned {
			r.Kept = old.lastAssignment()
		}
		written = r
		return r
	})
	return written, etag, err
}

// place chooses the device's hub and writes the device there. A device
// registering again follows the enrollment's reprovisionPolicy:
// updateHubAssignment false keeps it on its hub, as the device it was;
// otherwise it goes where the allocation says and its twin is carried over
// (migrateDeviceData) or reset to the initial twin, and a device that moved
// (to another hub or device ID) is to be removed from where it was: place
// returns that former identity. state.Substatus records which happened.
func (s *Service) place(ctx context.Context, alloc allocation, prev *assignment, repro *ReprovisionPolicy,
	twin *InitialTwin, dev *HubDevice, state *RegistrationState) (*LinkedHub, *formerIdentity, error) {
	if repro == nil {
		repro = &ReprovisionPolicy{UpdateHubAssignment: true, MigrateDeviceData: true}
	}
	var prevHub *LinkedHub
	var err error
	if prev != nil {
		hubs, err := s.cachedHubs(ctx)
		if err != nil {
			return nil, nil, err
		}
		prevHub = hubNamed(hubs, prev.Hub)
	}
	if prevHub != nil && !repro.UpdateHubAssignment {
		// Never reprovisioned: the device stays the identity it was, even
		// if the enrollment's deviceId changed since; writing the new one
		// would leave a second device beside the old, whose credentials
		// still work.
		dev.DeviceID = prev.DeviceID
		state.Substatus = "reprovisionedToInitialAssignment"
		if alloc.policy == PolicyCustom {
			// As in the hosted service, the webhook is still asked, with
			// only the device's hub to choose, for the payload it may
			// give the device; the initial twin does not apply.
			placed, err := s.custom(ctx, alloc, []*LinkedHub{prevHub})
			if err != nil {
				return nil, nil, err
			}
			state.Payload = placed.payload
		}
		state.GenerationID, err = s.registry.UpsertDevice(ctx, *prevHub, *dev)
		return prevHub, nil, err
	}
	placed, err := s.allocate(ctx, alloc)
	if err != nil {
		return nil, nil, err
	}
	if placed.twin != nil {
		twin = placed.twin // the webhook's choice
	}
	if placed.payload != nil {
		state.Payload = placed.payload
	}
	if twin != nil {
		dev.Tags = twin.Tags
		if twin.Properties != nil {
			dev.Desired = twin.Properties.Desired
		}
	}
	hub := placed.hub
	if prevHub == nil {
		state.Substatus = "initialAssignment"
		state.GenerationID, err = s.registry.UpsertDevice(ctx, *hub, *dev)
		return hub, nil, err
	}
	// Registering again: the device may exist on the new hub already, so
	// its twin is set explicitly — the old one, or the initial one.
	sameDevice := prev.at(hub.HostName, dev.DeviceID)
	keep, movedAlready := twin, false
	state.Substatus = "deviceDataReset"
	if repro.MigrateDeviceData {
		state.Substatus = "deviceDataMigrated"
		old, err := s.registry.ReadTwin(ctx, *prevHub, prev.DeviceID)
		switch {
		case err == nil:
			keep = old
		case !sameDevice && azerr.HasStatus(err, 404):
			// The former identity is gone. If a concurrent registration
			// from the same record moved the device and its twin already
			// (it deletes that identity only once its record says so),
			// resetting the twin now would lose what it carried; if the
			// operator deleted it, there is nothing to migrate.
			if movedAlready, err = s.movedMeanwhile(ctx, state.RegistrationID, prev); err != nil {
				return nil, nil, err
			}
			if !movedAlready {
				state.Substatus = "deviceDataReset"
			}
		default:
			slog.Warn("reading the twin to migrate failed; the device starts from its initial twin",
				"registrationId", state.RegistrationID, "hub", prevHub.HostName, "error", err)
			state.Substatus = "deviceDataReset"
		}
	}
	if state.GenerationID, err = s.registry.UpsertDevice(ctx, *hub, *dev); err != nil {
		return nil, nil, err
	}
	var former *formerIdentity
	if !sameDevice {
		former = &formerIdentity{hub: *prevHub, deviceID: prev.DeviceID, credential: prev.HubCredential}
	}
	if sameDevice && state.Substatus == "deviceDataMigrated" {
		// Back on the hub it was on, as the device it was: nothing moved.
		state.Substatus = "reprovisionedToInitialAssignment"
		return hub, former, nil
	}
	if movedAlready && state.Substatus == "deviceDataMigrated" {
		return hub, former, nil // the data is where the other registration put it
	}
	if keep == nil {
		keep = &InitialTwin{}
	}
	if err := s.registry.ReplaceTwin(ctx, *hub, dev.DeviceID, keep); err != nil {
		return nil, nil, err
	}
	return hub, former, nil
}

// formerIdentity is where a device that moved was.
type formerIdentity struct {
	hub                  LinkedHub
	deviceID, credential string
}

// leave removes a moved device from where it was, as the hosted service
// does: its credentials there would otherwise go on admitting it; unless
// the identity there has other credentials now (a concurrent
// registration's, or a device made there since). It runs once the record
// names where the device went, so that a concurrent registration finding
// the identity gone finds the move recorded (a note made before the record
// finishes it after a crash between the two). It says whether it is done;
// false means try again later.
func (s *Service) leave(ctx context.Context, regID string, f *formerIdentity) bool {
	// A later registration may have moved the device back meanwhile.
	rec, _, err := get[registrationRecord](ctx, s.store, kindRegistration, regID, nil)
	if err != nil {
		slog.Warn("reading the record of a reprovisioned device; its former identity is deleted later",
			"registrationId", regID, "error", err)
		return false
	}
	if rec.lastAssignment().at(f.hub.HostName, f.deviceID) {
		return true
	}
	switch err := s.registry.DeleteDevice(ctx, f.hub, f.deviceID, f.credential); {
	case errors.Is(err, ErrDeviceTaken):
		slog.Info("a reprovisioned device's former identity has other credentials now; it stays",
			"registrationId", regID, "hub", f.hub.HostName, "deviceId", f.deviceID)
	case err != nil:
		slog.Warn("removing a reprovisioned device from its former hub failed; it is tried again in a few minutes",
			"registrationId", regID, "hub", f.hub.HostName, "deviceId", f.deviceID, "error", err)
		return false
	}
	return true
}

// leaveNoted leaves f after the record was written, noting it first so
// that FinishLeaving deletes it if this cannot.
func (s *Service) leaveNoted(ctx context.Context, regID string, f *formerIdentity) {
	note, err := s.noteLeaving(ctx, regID, f)
	if err != nil {
		slog.Warn("noting an identity to delete", "registrationId", regID, "hub", f.hub.HostName, "deviceId", f.deviceID, "error", err)
	}
	if s.leave(ctx, regID, f) && err == nil {
		s.dropNote(ctx, regID, f, note)
	}
}

// undo takes back a registration whose TPM claimed another ID while it
// ran: its record (as it wrote it, at etag) and its hub device (hub nil:
// it made none), which would otherwise admit the TPM under a second ID.
func (s *Service) undo(ctx context.Context, regID, etag string, hub *LinkedHub, dev *HubDevice) {
	err := s.store.Delete(ctx, kindRegistration, regID, etag)
	s.recentOperations.forget(regID)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		slog.Warn("taking back the registration of a TPM that registered under another ID meanwhile", "registrationId", regID, "error", err)
	}
	if hub == nil {
		return
	}
	if err := s.registry.DeleteDevice(ctx, *hub, dev.DeviceID, dev.Credential()); err != nil && !errors.Is(err, ErrDeviceTaken) {
		slog.Warn("removing the hub device of a TPM that registered under another ID meanwhile; delete it there",
			"registrationId", regID, "hub", hub.HostName, "deviceId", dev.DeviceID, "error", err)
	}
}

// movedMeanwhile says whether another registration of regID recorded an
// assignment other than prev since this one read the record.
func (s *Service) movedMeanwhile(ctx context.Context, regID string, prev *assignment) (bool, error) {
	rec, _, err := get[registrationRecord](ctx, s.store, kindRegistration, regID, nil)
	if err != nil {
		return false, err
	}
	now := rec.lastAssignment()
	return now != nil && !now.at(prev.Hub, prev.DeviceID), nil
}
