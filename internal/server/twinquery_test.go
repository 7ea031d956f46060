package server

import (
	"encoding/base64"
	"fmt"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/azerr"
)

// Twin query pages follow on from the last twin of the page before, so
// that twins deleted or added between pages make the others be neither
// skipped nor repeated; TOP counts over every page; aggregates come in one
// page; a continuation token that is not the query's own is refused.
func TestTwinQueryPaging(t *testing.T) {
	e := newEnv(t)
	put := func(path string, tags map[string]any) {
		t.Helper()
		if err := e.hubAPI.Do(ctx, "PUT", "/devices/"+path, "", map[string]any{}, nil); err != nil {
			t.Fatal(err)
		}
		if tags != nil {
			if err := e.hubAPI.Do(ctx, "PATCH", "/twins/"+path, "", map[string]any{"tags": tags}, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, id := range []string{"a1", "a2", "a3", "a4", "a5", "b1"} {
		put(id, map[string]any{"grp": strings.ToUpper(id[:1])})
	}
	// page asks for a page of up to two rows and returns the value of
	// column of each, and the continuation token.
	page := func(q, token, column string) (string, string, error) {
		t.Helper()
		h := map[string]string{"x-ms-max-item-count": "2"}
		if token != "" {
			h["x-ms-continuation"] = token
		}
		var rows []map[string]any
		hdr, err := e.hubAPI.DoHeaders(ctx, "POST", "/devices/query", "", h, map[string]string{"query": q}, &rows)
		if err != nil {
			return "", "", err
		}
		var vals []string
		for _, r := range rows {
			vals = append(vals, fmt.Sprint(r[column]))
		}
		return strings.Join(vals, ","), hdr.Get("x-ms-continuation"), nil
	}
	must := func(q, token, column, want string, more bool) string {
		t.Helper()
		got, next, err := page(q, token, column)
		if err != nil || got != want || (next != "") != more {
			t.Fatalf("%s after %q: %q, next %q, %v; want %q (more: %v)", q, token, got, next, err, want, more)
		}
		return next
	}
	const grpA = "SELECT deviceId FROM devices WHERE tags.grp = 'A'"
	next := must(grpA, "", "deviceId", "a1,a2", true)
	if err := e.hubAPI.Do(ctx, "DELETE", "/devices/a1", "*", nil, nil); err != nil {
		t.Fatal(err)
	}
	next = must(grpA, next, "deviceId", "a3,a4", true)
	put("a0", map[string]any{"grp": "A"}) // before the cursor: this query has passed it
	put("a9", map[string]any{"grp": "A"})
	must(grpA, next, "deviceId", "a5,a9", false) // the last page says so: no empty page after it

	const top = "SELECT TOP 3 deviceId FROM devices WHERE tags.grp = 'A'"
	next = must(top, "", "deviceId", "a0,a2", true)
	must(top, next, "deviceId", "a3", false)

	put("b1/modules/m1", nil)
	put("b1/modules/m2", nil)
	put("a2/modules/m3", nil)
	const mods = "SELECT moduleId FROM devices.modules"
	next = must(mods, "", "moduleId", "m3,m1", true)
	must(mods, next, "moduleId", "m2", false)

	must("SELECT COUNT() AS n FROM devices", "", "n", "7", false)
	must("SELECT tags.grp AS g, COUNT() AS n FROM devices GROUP BY tags.grp", "", "g", "A,B", false)

	first := must(grpA, "", "deviceId", "a0,a2", true)
	for name, token := range map[string]string{
		"garbled":           "%%%garbage",
		"an offset":         "2",
		"another service's": base64.RawURLEncoding.EncodeToString([]byte("a2")),
		"another query's":   first,
		"for an aggregate":  first,
	} {
		q := "SELECT * FROM devices WHERE tags.grp = 'B'"
		if name == "for an aggregate" {
			q = "SELECT COUNT() FROM devices"
		}
		if _, _, err := page(q, token, "deviceId"); azerr.As(err).Status() != 400 || !strings.Contains(err.Error(), "x-ms-continuation") {
			t.Errorf("%s token: %v", name, err)
		}
	}
}
