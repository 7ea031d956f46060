package dps

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"time"

	"github.com/hatchery/hatchery/internal/periodic"
	"github.com/hatchery/hatchery/internal/store"
)

// A moved device's former identity is deleted only after its registration
// record names where the device went. So that a process that stops between
// the two, or a former hub unreachable then, does not leave an identity
// that admits the device where it no longer belongs, a registration first
// notes what it is to delete; the note goes once the delete is done, and
// FinishLeaving does what notes are left (kindLeaving).

// leaveNote is a former identity still to delete.
type leaveNote struct {
	RegistrationID string    `json:"registrationId"`
	Hub            string    `json:"hub"`
	DeviceID       string    `json:"deviceId"`
	Credential     string    `json:"credential"` // HubDevice.Credential's fingerprint
	Noted          time.Time `json:"noted"`
}

// leaveNoteID names the note of one registration ID leaving one identity.
func leaveNoteID(regID string, f *formerIdentity) string {
	sum := sha256.Sum256([]byte(f.hub.HostName + "\n" + f.deviceID))
	return regID + "." + hex.EncodeToString(sum[:8])
}

// noteLeaving notes that regID is to leave f, before the record that says
// so is written; it returns the note's etag.
func (s *Service) noteLeaving(ctx context.Context, regID string, f *formerIdentity) (string, error) {
	body, _ := json.Marshal(leaveNote{RegistrationID: regID, Hub: f.hub.HostName, DeviceID: f.deviceID, Credential: f.credential, Noted: s.Now().UTC()})
	d, err := s.store.Put(ctx, store.Doc{Kind: kindLeaving, ID: leaveNoteID(regID, f), Body: body}, "")
	return d.ETag, err
}

// dropNote removes the note at etag: a later registration's note of the
// same identity is its own to finish.
func (s *Service) dropNote(ctx context.Context, regID string, f *formerIdentity, etag string) {
	err := s.store.Delete(ctx, kindLeaving, leaveNoteID(regID, f), etag)
	if err != nil && !errors.Is(err, store.ErrNotFound) && !errors.Is(err, store.ErrPrecondition) {
		slog.Warn("removing the note of a former identity deleted", "registrationId", regID, "error", err)
	}
}

// FinishLeaving deletes the former identities that notes older than age
// still name (age leaves registrations in flight to finish their own). It
// says how many notes it finished.
func (s *Service) FinishLeaving(ctx context.Context, age time.Duration) (int, error) {
	hubs, err := s.LinkedHubs(ctx)
	if err != nil {
		return 0, err
	}
	cutoff := s.Now().Add(-age)
	finished, after := 0, ""
	for {
		docs, err := s.store.List(ctx, kindLeaving, after, 500)
		if err != nil || len(docs) == 0 {
			return finished, err
		}
		after = docs[len(docs)-1].ID
		for _, d := range docs {
			var n leaveNote
			if json.Unmarshal(d.Body, &n) != nil {
				slog.Warn("a stored note of a former identity is corrupt; dropping it", "id", d.ID)
				_ = s.store.Delete(ctx, kindLeaving, d.ID, d.ETag)
				continue
			}
			if n.Noted.After(cutoff) {
				continue
			}
			hub := hubNamed(hubs, n.Hub)
			f := &formerIdentity{deviceID: n.DeviceID, credential: n.Credential}
			if hub == nil {
				slog.Warn("a reprovisioned device's former hub is no longer linked; delete its former identity there",
					"registrationId", n.RegistrationID, "hub", n.Hub, "deviceId", n.DeviceID)
				f.hub.HostName = n.Hub
			} else {
				f.hub = *hub
				if !s.leave(ctx, n.RegistrationID, f) {
					continue
				}
			}
			s.dropNote(ctx, n.RegistrationID, f, d.ETag)
			finished++
		}
	}
}

// KeepLeaving runs FinishLeaving every few minutes until ctx ends.
func (s *Service) KeepLeaving(ctx context.Context) {
	const every, age = 5 * time.Minute, 2 * time.Minute // a registration's post-record steps take at most 30 s
	periodic.Run(ctx, every, "deleting reprovisioned devices' former identities", func(ctx context.Context) error {
		_, err := s.FinishLeaving(ctx, age)
		return err
	})
}
