package hub

import (
	"context"
	"strings"

	"github.com/hatchery/hatchery/internal/azerr"
)

// MaxBulkIdentities is the hosted registry's limit of one bulk request.
const MaxBulkIdentities = 100

// ImportDevice is one identity of a bulk registry request (POST /devices):
// a device or module as the registry shows it, with its ID as "id", what
// to do with it, and for the IfMatchETag modes its etag; or, for the
// updateTwin modes, a twin patch and the twin's etag.
type ImportDevice struct {
	Device
	TwinPatch
	ID         string `json:"id"`
	ImportMode string `json:"importMode"`
	TwinETag   string `json:"twinETag"`
}

// BulkResult answers a bulk registry request: the identities it failed
// for, each with why.
type BulkResult struct {
	IsSuccessful bool        `json:"isSuccessful"`
	Errors       []BulkError `json:"errors"`
	Warnings     []BulkError `json:"warnings"`
}

// BulkError is why one identity of a bulk request failed.
type BulkError struct {
	DeviceID    string `json:"deviceId"`
	ModuleID    string `json:"moduleId,omitempty"`
	ErrorCode   string `json:"errorCode"`
	ErrorStatus string `json:"errorStatus"`
}

// BulkIdentities creates, updates or deletes up to MaxBulkIdentities
// identities, each on its own, as the hosted registry does: one failing
// does not stop the others. A failure of the service's own (5xx) stops
// them all, with an azerr.BulkStoppedError saying where.
func (s *Service) BulkIdentities(ctx context.Context, ops []ImportDevice) (*BulkResult, error) {
	if len(ops) == 0 || len(ops) > MaxBulkIdentities {
		return nil, azerr.BadRequest("a bulk registry request carries 1 to %d identities, not %d", MaxBulkIdentities, len(ops))
	}
	seen := map[Ref]bool{}
	for i, op := range ops {
		r := Ref{Device: op.ID, Module: op.ModuleID}
		if op.ID == "" {
			return nil, azerr.BadRequest("identity %d has no id", i)
		}
		if seen[r] {
			return nil, azerr.BadRequest("%s is in the request twice: one operation per identity", r)
		}
		seen[r] = true
	}
	res := &BulkResult{Errors: []BulkError{}, Warnings: []BulkError{}}
	for i, op := range ops {
		r := Ref{Device: op.ID, Module: op.ModuleID}
		err := s.importIdentity(ctx, r, op)
		if err == nil {
			continue
		}
		e := azerr.As(err)
		if e.Status() >= 500 { // the store, not this identity: say what was done
			what := "device"
			if r.Module != "" {
				what = "module"
			}
			return nil, &azerr.BulkStoppedError{Index: i, Applied: i - len(res.Errors), What: what, ID: r.String(), Err: err}
		}
		res.Errors = append(res.Errors, BulkError{DeviceID: r.Device, ModuleID: r.Module, ErrorCode: e.Name, ErrorStatus: e.Message})
	}
	res.IsSuccessful = len(res.Errors) == 0
	return res, nil
}

func (s *Service) importIdentity(ctx context.Context, r Ref, op ImportDevice) error {
	mode := strings.ToLower(op.ImportMode)
	switch {
	case mode == "updatetwin":
		_, err := s.UpdateTwin(ctx, r, "*", &op.TwinPatch, false)
		return err
	case mode == "updatetwinifmatchetag":
		if op.TwinETag == "" {
			return azerr.BadRequest("%s: updateTwinIfMatchETag needs the twin's twinETag", r)
		}
		_, err := s.UpdateTwin(ctx, r, op.TwinETag, &op.TwinPatch, false)
		return err
	case len(op.Tags) > 0 || op.Properties != nil && len(op.Properties.Desired) > 0 || op.TwinETag != "":
		// Not dropped unseen: the other modes change the identity only.
		return azerr.BadRequest("%s: tags, properties and twinETag go with importMode updateTwin or updateTwinIfMatchETag, not %q: send the twin update in a request of its own", r, op.ImportMode)
	}
	d := op.Device
	d.DeviceID, d.ModuleID = r.Device, r.Module
	switch mode {
	case "create":
		_, err := s.PutIdentity(ctx, r, "", &d)
		return err
	case "update":
		_, err := s.PutIdentity(ctx, r, "*", &d)
		return err
	case "updateifmatchetag":
		if d.ETag == "" {
			return azerr.BadRequest("%s: updateIfMatchETag needs the identity's eTag", r)
		}
		_, err := s.PutIdentity(ctx, r, d.ETag, &d)
		return err
	case "createorupdate":
		_, err := s.PutIdentity(ctx, r, "", &d)
		if azerr.HasStatus(err, 409) {
			_, err = s.PutIdentity(ctx, r, "*", &d)
		}
		return err
	case "delete":
		return s.DeleteIdentity(ctx, r, "*")
	case "deleteifmatchetag":
		if d.ETag == "" {
			return azerr.BadRequest("%s: deleteIfMatchETag needs the identity's eTag", r)
		}
		return s.DeleteIdentity(ctx, r, d.ETag)
	}
	return azerr.BadRequest("%s: importMode %q is not one of create, update, updateIfMatchETag, createOrUpdate, delete, deleteIfMatchETag, updateTwin, updateTwinIfMatchETag", r, op.ImportMode)
}
