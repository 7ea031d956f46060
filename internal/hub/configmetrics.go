package hub

import (
	"context"

	"github.com/hatchery/hatchery/internal/hub/query"
)

// countMetrics fills the system metrics and the custom metrics' results,
// each the number of rows its query gives over the twins, so that running
// a metric's query through /devices/query gives its count.
func (s *Service) countMetrics(ctx context.Context, cs []*Configuration) error {
	type result struct {
		of   map[string]int64
		name string
	}
	var qs []*query.Query
	var results []result
	for _, c := range cs {
		c.SystemMetrics = Metrics{Queries: systemQueries(c), Results: map[string]int64{}}
		// Empty, not null, where there are none, as the SDKs iterate them.
		if c.Metrics.Queries == nil {
			c.Metrics.Queries = map[string]string{}
		}
		c.Metrics.Results = map[string]int64{}
		for _, m := range []Metrics{c.SystemMetrics, c.Metrics} {
			for name, text := range m.Queries {
				m.Results[name] = 0
				if q, err := query.Parse(text); err == nil { // custom ones were checked when stored
					qs = append(qs, q)
					results = append(results, result{m.Results, name})
				}
			}
		}
	}
	counts, err := s.countRows(ctx, qs)
	if err != nil {
		return err
	}
	for i, n := range counts {
		results[i].of[results[i].name] = n
	}
	return nil
}

// systemQueries are a configuration's system metric queries, the hosted
// hub's, written with its target condition parsed and printed back, so
// that they run whatever form the condition took ("*", "FROM devices
// WHERE ...") and keep its precedence within the WHERE clause.
func systemQueries(c *Configuration) map[string]string {
	cond, err := query.ParseCondition(c.TargetCondition)
	if err != nil { // targets passes it by too
		return map[string]string{}
	}
	target := cond.Where()
	applied := "configurations.[[" + c.ID + "]].status = 'Applied'"
	if c.forEdge() {
		targeted := "SELECT deviceId FROM devices WHERE capabilities.iotEdge = true"
		if target != "" {
			targeted += " AND (" + target + ")"
		}
		agent := "SELECT deviceId FROM devices.modules WHERE moduleId = '$edgeAgent' AND " + applied
		reported := agent + " AND properties.desired.$version = properties.reported.lastDesiredVersion AND properties.reported.lastDesiredStatus.code "
		return map[string]string{
			"targetedCount":           targeted,
			"appliedCount":            agent,
			"reportedSuccessfulCount": reported + "= 200",
			"reportedFailedCount":     reported + "!= 200",
		}
	}
	sel := "SELECT deviceId FROM devices"
	if c.forModules() {
		sel = "SELECT deviceId, moduleId FROM devices.modules"
	}
	targeted := sel
	if target != "" {
		targeted += " WHERE " + target
	}
	return map[string]string{"targetedCount": targeted, "appliedCount": sel + " WHERE " + applied}
}

// countRows counts the rows each query gives, as Query would, reading
// each twin once for all of them; only aggregate queries, whose rows are
// groups, keep the twins they read.
func (s *Service) countRows(ctx context.Context, qs []*query.Query) ([]int64, error) {
	n := make([]int64, len(qs))
	for kind, from := range map[string]string{kindDevice: query.Devices, kindModule: query.Modules} {
		var plain, agg []int
		for i, q := range qs {
			switch {
			case q.From != from:
			case q.IsAggregate():
				agg = append(agg, i)
			default:
				plain = append(plain, i)
			}
		}
		if len(plain)+len(agg) == 0 {
			continue
		}
		var docs []map[string]any
		err := s.eachRecord(ctx, kind, func(r *record) error {
			doc := r.twinDoc()
			for _, i := range plain {
				if q := qs[i]; (q.Top < 0 || n[i] < int64(q.Top)) && q.Match(doc) {
					n[i]++
				}
			}
			if len(agg) > 0 {
				docs = append(docs, doc)
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
		for _, i := range agg {
			rows, _ := qs[i].Run(docs) // a query that cannot run counts nothing
			n[i] = int64(len(rows))
		}
	}
	return n, nil
}

// allDocs returns every twin of a kind as queries see it.
func (s *Service) allDocs(ctx context.Context, kind string) ([]map[string]any, error) {
	var out []map[string]any
	err := s.eachRecord(ctx, kind, func(r *record) error {
		out = append(out, r.twinDoc())
		return nil
	})
	return out, err
}
