package hub

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"time"

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

// twinDoc is the twin as queries see it: twinView's fields as JSON would
// decode them (times as the strings it writes; empty tags and
// configurations as empty objects), built without a JSON round trip, as
// every query and target condition reads every twin.
func (r *record) twinDoc() map[string]any {
	cfg := map[string]any{}
	for k, v := range r.Configurations {
		cfg[k] = map[string]any{"status": v.Status}
	}
	thumb := func(p *string) any {
		if p == nil {
			return nil
		}
		return *p
	}
	a := r.Device.Authentication
	tags := r.Tags
	if tags == nil {
		tags = map[string]any{}
	}
	doc := map[string]any{
		"deviceId": r.Device.DeviceID, "modelId": r.ModelID, "etag": r.TwinETag, "deviceEtag": r.DeviceETag,
		"status": r.Device.Status, "statusUpdateTime": jsonTime(r.Device.StatusUpdatedTime),
		"connectionState": r.Device.ConnectionState, "lastActivityTime": jsonTime(r.Device.LastActivityTime),
		"cloudToDeviceMessageCount": float64(r.Device.CloudToDeviceMessageCount),
		"authenticationType":        a.Type,
		"x509Thumbprint":            map[string]any{"primaryThumbprint": thumb(a.X509Thumbprint.PrimaryThumbprint), "secondaryThumbprint": thumb(a.X509Thumbprint.SecondaryThumbprint)},
		"version":                   float64(r.TwinVersion),
		"tags":                      tags,
		"properties": map[string]any{
			"desired":  withMetadata(withVersion(r.Desired, r.DesiredVersion), r.DesiredUpdated),
			"reported": withMetadata(withVersion(r.Reported, r.ReportedVersion), r.ReportedUpdated),
		},
		"capabilities":   map[string]any{"iotEdge": r.Device.Capabilities.IoTEdge},
		"configurations": cfg,
	}
	if r.Device.ModuleID != "" {
		doc["moduleId"] = r.Device.ModuleID
	}
	return doc
}

// jsonTime is t as encoding/json writes it.
func jsonTime(t time.Time) string { return t.Format(time.RFC3339Nano) }

// withVersion is a property document as devices read it, with its $version.
func withVersion(m map[string]any, v int64) map[string]any {
	out := maps.Clone(m)
	if out == nil {
		out = map[string]any{}
	}
	out["$version"] = float64(v)
	return out
}

// withMetadata adds what the service side reads besides (twinView).
func withMetadata(doc map[string]any, updated time.Time) map[string]any {
	doc["$metadata"] = map[string]any{"$lastUpdated": jsonTime(updated)}
	return doc
}
