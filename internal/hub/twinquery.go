package hub

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/hub/query"
)

// A twin query is paged by a cursor, not an offset: the next page starts
// after the twin of the last row given, in ID order, so that twins added
// or deleted between pages make none of the others be skipped or repeated.
type queryCursor struct {
	Query string `json:"q"` // queryDigest of the query it pages
	After string `json:"a"` // the document ID of the last row's twin
	Given int    `json:"n"` // the rows given so far, which TOP counts
}

// errEnough stops a walk over the twins once a page is full.
var errEnough = errors.New("enough")

// Query runs an IoT Hub query over device or module twins, returning one
// page of up to limit rows from where continuation (from the previous
// page; "" to start) says, and the continuation of the next page ("" after
// the last) (queryPage).
func (s *Service) Query(ctx context.Context, q, continuation string, limit int) ([]map[string]any, string, error) {
	parsed, err := query.Parse(q)
	if err != nil {
		return nil, "", azerr.BadRequest("%v", err)
	}
	return s.queryPage(ctx, parsed, continuation, limit)
}

// queryPage is a page of q's rows (Query).
func (s *Service) queryPage(ctx context.Context, q *query.Query, continuation string, limit int) ([]map[string]any, string, error) {
	kind := kindDevice
	if q.From == query.Modules {
		kind = kindModule
	}
	digest := queryDigest(q)
	var c queryCursor
	if continuation != "" {
		// Aggregate queries have one page: no token is theirs.
		if err := json.Unmarshal([]byte(continuation), &c); err != nil || c.Query != digest || c.After == "" || c.Given <= 0 || q.IsAggregate() {
			return nil, "", azerr.BadRequest("x-ms-continuation is not a token of this query: send the one its previous page came with, or none to start")
		}
	}
	if q.IsAggregate() {
		docs, err := s.allDocs(ctx, kind)
		if err != nil {
			return nil, "", err
		}
		rows, err := q.Run(docs)
		if err != nil {
			return nil, "", azerr.BadRequest("%v", err)
		}
		return rows, "", nil
	}
	want := limit
	if q.Top >= 0 {
		want = min(want, q.Top-c.Given)
	}
	if want <= 0 {
		return []map[string]any{}, "", nil
	}
	var matched []map[string]any
	last, more := "", false
	err := s.eachRecordAfter(ctx, kind, c.After, func(r *record) error {
		doc := r.twinDoc()
		if !q.Match(doc) {
			return nil
		}
		if len(matched) == want {
			more = true
			return errEnough
		}
		matched = append(matched, doc)
		last = Ref{Device: r.Device.DeviceID, Module: r.Device.ModuleID}.id()
		return nil
	})
	if err != nil && !errors.Is(err, errEnough) {
		return nil, "", err
	}
	rows, err := q.Run(matched) // each matched twin gives its row
	if err != nil {
		return nil, "", azerr.BadRequest("%v", err)
	}
	c.Given += len(rows)
	if !more || q.Top >= 0 && c.Given >= q.Top {
		return rows, "", nil
	}
	next, _ := json.Marshal(queryCursor{Query: digest, After: last, Given: c.Given})
	return rows, string(next), nil
}

// queryDigest tells queries apart, so that a continuation token is not
// taken for another query's.
func queryDigest(q *query.Query) string {
	h := fnv.New64a()
	h.Write([]byte(q.String()))
	return fmt.Sprintf("%016x", h.Sum64())
}
