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

// MaxBulk bounds the enrollments of one bulk operation. The hosted service
// takes 10; importing a fleet wants far more per round trip.
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

// Bulk applies one operation to many enrollments. Each succeeds or fails on
// its own: the result lists the failures, in request order.
func (s *Service) Bulk(ctx context.Context, op *BulkOperation) (*BulkResult, error) {
	mode := strings.ToLower(op.Mode)
	switch mode {
	case "create", "update", "updateifmatchetag", "delete":
	default:
		return nil, azerr.BadRequest("mode %q is not valid: use create, update, updateIfMatchETag or delete", op.Mode)
	}
	if len(op.Enrollments) == 0 {
		return nil, azerr.BadRequest("enrollments is empty: give the enrollments to %s", op.Mode)
	}
	if len(op.Enrollments) > MaxBulk {
		return nil, azerr.BadRequest("%d enrollments in one bulk operation: send at most %d at a time", len(op.Enrollments), MaxBulk)
	}
	res := &BulkResult{IsSuccessful: true, Errors: []*BulkError{}}
	for _, e := range op.Enrollments {
		if e == nil {
			e = &Enrollment{}
		}
		var err error
		switch mode {
		case "create":
			if _, err = s.putEnrollment(ctx, e.RegistrationID, write{}, e); azerr.HasStatus(err, 409) {
				err = azerr.New(409203, "Conflict", "enrollment %s exists already: use mode update to replace it", e.RegistrationID)
			}
		case "update": // whatever version is there, if any
			_, err = s.putEnrollment(ctx, e.RegistrationID, write{upsert: true}, e)
		case "updateifmatchetag":
			if e.ETag == "" {
				err = azerr.BadRequest("enrollment %s has no etag: updateIfMatchETag replaces only the version read", e.RegistrationID)
				break
			}
			_, err = s.putEnrollment(ctx, e.RegistrationID, writeIf(e.ETag), e)
		case "delete":
			err = s.DeleteEnrollment(ctx, e.RegistrationID, e.ETag)
		}
		if err != nil {
			ae := azerr.As(err)
			if ae.Status() >= 500 {
				return nil, err // the store failed: the caller retries the whole operation
			}
			res.IsSuccessful = false
			res.Errors = append(res.Errors, &BulkError{RegistrationID: e.RegistrationID, ErrorCode: ae.Code, ErrorStatus: ae.Message})
		}
	}
	return res, nil
}
