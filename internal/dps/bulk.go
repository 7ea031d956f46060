package dps

import (
	"context"
	"strings"

	"github.com/hatchery/hatchery/internal/azerr"
)

// Bulk operation modes.
const (
	BulkCreate            = "create"
	BulkUpdate            = "update"
	BulkUpdateIfMatchETag = "updateIfMatchETag"
	BulkDelete            = "delete"
)

// MaxBulk bounds the enrollments (or groups) of one bulk operation. The
// hosted service takes 10; importing a fleet wants far more per round trip.
const MaxBulk = 10000

// BulkOperation is the body of POST /enrollments.
type BulkOperation struct {
	Mode        string        `json:"mode"`
	Enrollments []*Enrollment `json:"enrollments"`
}

// BulkResult says which enrollments of a bulk operation failed, and why.
type BulkResult struct {
	IsSuccessful bool         `json:"isSuccessful"`
	Errors       []*BulkError `json:"errors"`
}

// BulkError is one enrollment's failure.
type BulkError struct {
	RegistrationID string `json:"registrationId"`
	ErrorCode      int    `json:"errorCode"`
	ErrorStatus    string `json:"errorStatus"`
}

// BulkGroupOperation is the body of POST /enrollmentGroups.
type BulkGroupOperation struct {
	Mode             string             `json:"mode"`
	EnrollmentGroups []*EnrollmentGroup `json:"enrollmentGroups"`
}

// BulkGroupResult says which groups of a bulk operation failed, and why.
type BulkGroupResult struct {
	IsSuccessful bool              `json:"isSuccessful"`
	Errors       []*BulkGroupError `json:"errors"`
}

// BulkGroupError is one group's failure.
type BulkGroupError struct {
	EnrollmentGroupID string `json:"enrollmentGroupId"`
	ErrorCode         int    `json:"errorCode"`
	ErrorStatus       string `json:"errorStatus"`
}

// Bulk applies one operation to many enrollments. Each succeeds or fails on
// its own: the result lists the failures, in request order.
func (s *Service) Bulk(ctx context.Context, op *BulkOperation) (*BulkResult, error) {
	errs, err := runBulk(ctx, op.Mode, "enrollments", op.Enrollments, bulkItems[Enrollment]{
		what: "enrollment",
		key:  func(e *Enrollment) (string, string) { return e.RegistrationID, e.ETag },
		put: func(ctx context.Context, id string, w write, e *Enrollment) error {
			_, err := s.putEnrollment(ctx, id, w, e)
			return err
		},
		delete: s.DeleteEnrollment,
	}, func(id string, code int, status string) *BulkError {
		return &BulkError{RegistrationID: id, ErrorCode: code, ErrorStatus: status}
	})
	if err != nil {
		return nil, err
	}
	return &BulkResult{IsSuccessful: len(errs) == 0, Errors: errs}, nil
}

// BulkGroups applies one operation to many enrollment groups, as Bulk does
// to enrollments.
func (s *Service) BulkGroups(ctx context.Context, op *BulkGroupOperation) (*BulkGroupResult, error) {
	errs, err := runBulk(ctx, op.Mode, "enrollmentGroups", op.EnrollmentGroups, bulkItems[EnrollmentGroup]{
		what: "enrollment group",
		key:  func(g *EnrollmentGroup) (string, string) { return g.EnrollmentGroupID, g.ETag },
		put: func(ctx context.Context, id string, w write, g *EnrollmentGroup) error {
			_, err := s.putGroup(ctx, id, w, g)
			return err
		},
		delete: s.DeleteGroup,
	}, func(id string, code int, status string) *BulkGroupError {
		return &BulkGroupError{EnrollmentGroupID: id, ErrorCode: code, ErrorStatus: status}
	})
	if err != nil {
		return nil, err
	}
	return &BulkGroupResult{IsSuccessful: len(errs) == 0, Errors: errs}, nil
}

// bulkItems is how a bulk operation reads and writes one kind of item.
type bulkItems[T any] struct {
	what   string                     // "enrollment", in messages
	key    func(*T) (id, etag string) // the item's ID and the etag it carries
	put    func(context.Context, string, write, *T) error
	delete func(ctx context.Context, id, ifMatch string) error
}

// runBulk applies the operation of mode to each of items (listed under
// field in the request) on its own, and returns the failures, made by
// failure, in request order. A store failure stops the whole operation
// (azerr.BulkStoppedError), which the caller retries from the item it names.
func runBulk[T, E any](ctx context.Context, mode, field string, items []*T, ops bulkItems[T], failure func(id string, code int, status string) E) ([]E, error) {
	m := strings.ToLower(mode)
	switch m {
	case "create", "update", "updateifmatchetag", "delete":
	default:
		return nil, azerr.BadRequest("mode %q is not valid: use create, update, updateIfMatchETag or delete", mode)
	}
	if len(items) == 0 {
		return nil, azerr.BadRequest("%s is empty: give the %ss to %s", field, ops.what, mode)
	}
	if len(items) > MaxBulk {
		return nil, azerr.BadRequest("%d %ss in one bulk operation: send at most %d at a time", len(items), ops.what, MaxBulk)
	}
	errs := []E{}
	for i, item := range items {
		if item == nil {
			item = new(T)
		}
		id, etag := ops.key(item)
		var err error
		switch m {
		case "create":
			if err = ops.put(ctx, id, write{}, item); azerr.HasStatus(err, 409) {
				err = azerr.New(409203, "Conflict", "%s %s exists already: use mode update to replace it", ops.what, id)
			}
		case "update": // whatever version is there, if any
			err = ops.put(ctx, id, write{upsert: true}, item)
		case "updateifmatchetag":
			if etag == "" {
				err = azerr.BadRequest("%s %s has no etag: updateIfMatchETag replaces only the version read", ops.what, id)
				break
			}
			err = ops.put(ctx, id, writeIf(etag), item)
		case "delete":
			err = ops.delete(ctx, id, etag)
		}
		if err != nil {
			ae := azerr.As(err)
			if ae.Status() >= 500 {
				return nil, &azerr.BulkStoppedError{Index: i, Applied: i - len(errs), What: ops.what, ID: id, Err: err}
			}
			errs = append(errs, failure(id, ae.Code, ae.Message))
		}
	}
	return errs, nil
}
