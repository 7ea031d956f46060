package query

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"unicode/utf8"
)

var fuzzSeeds = []string{
	"*",
	"tags.environment='prod'",
	"tags.environment = 'prod' AND tags.site.floor >= 2",
	"NOT (status = 'disabled')",
	"capabilities.iotEdge = true",
	"IS_DEFINED(tags.x)",
	"deviceId IN ['a','b']",
	"tags.x NIN [1, -2.5e3, null, true, [1]]",
	"STARTSWITH(deviceId, 'sensor', true) OR CONTAINS(LOWER(tags.name), 'x')",
	"FROM devices.modules WHERE moduleId = '$edgeAgent'",
	"tags['my key'][0].$v = \"it''s \\u00e9\"",
	"(a + b) * -c / 2 % 3 <> SUBSTRING(s, 0, 2)",
	"devices.tags.x = 1 or devices.modules.x = 2",
	"ARRAY_CONTAINS(tags.list, 'b') and not is_null(tags.y)",
	"SELECT * FROM devices",
	"SELECT * FROM devices WHERE tags.environment = 'prod'",
	"SELECT TOP 10 deviceId, tags.environment AS env FROM devices WHERE status = 'enabled'",
	"SELECT COUNT() AS numberOfDevices FROM devices",
	"SELECT properties.reported.lastDesiredStatus.code AS status, COUNT() AS n FROM devices.modules WHERE moduleId = '$edgeAgent' GROUP BY properties.reported.lastDesiredStatus.code",
	"SELECT tags.a, SUM(version), AVG(version), MIN(deviceId), MAX(tags.a) FROM devices GROUP BY tags.a",
	"SELECT LENGTH(deviceId), CONCAT(deviceId, '/', moduleId) AS id FROM devices.modules",
	"SELECT * FROM devices WHERE",
	"((((((((x))))))))",
	"tags.x = 'unterminated",
	"configurations.[[dep-1]].status = 'Applied' AND properties.desired.$version = properties.reported.lastDesiredVersion",
}

// fuzzDocs are the documents fuzzed queries run over.
func fuzzDocs(t testing.TB) []map[string]any {
	docs := append(decode(t, deviceTwins), decode(t, moduleTwins)...)
	return append(docs, map[string]any{}, map[string]any{
		"a": 1.0, "b": "2", "c": -3.0, "s": "héllo", "x": nil, "v": []any{1.0, "a", nil, []any{}, map[string]any{}},
		"tags": map[string]any{"x": map[string]any{"y": []any{map[string]any{"z": true}}}},
	})
}

// checkError checks a parse error is an *Error placed inside the input.
func checkError(t *testing.T, src string, err error) {
	var qe *Error
	if !errors.As(err, &qe) {
		t.Fatalf("%q: error %T is not *Error: %v", src, err, err)
	}
	if !strings.HasPrefix(err.Error(), "query: ") || qe.Msg == "" {
		t.Fatalf("%q: bad message %q", src, err)
	}
	if qe.Column == 0 {
		return
	}
	lines := strings.Split(src, "\n")
	if qe.Line < 1 || qe.Line > len(lines) {
		t.Fatalf("%q: %v: line out of range", src, err)
	}
	if n := utf8.RuneCountInString(lines[qe.Line-1]); qe.Column < 1 || qe.Column > n+1 {
		t.Fatalf("%q: %v: column out of range (line has %d characters)", src, err, n)
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add(s)
		f.Add("SELECT * FROM devices WHERE " + s)
	}
	docs := fuzzDocs(f)
	f.Fuzz(func(t *testing.T, s string) {
		q, err := Parse(s)
		if err != nil {
			checkError(t, s, err)
			return
		}
		var matched []bool
		for _, d := range docs {
			matched = append(matched, q.Match(d))
		}
		rows, err := q.Run(docs)
		if err != nil {
			t.Fatalf("%q: Run: %v", s, err)
		}
		if _, err := json.Marshal(rows); err != nil {
			t.Fatalf("%q: rows do not encode: %v", s, err)
		}
		// What String prints parses back to the same query.
		printed := q.String()
		if len(printed) > MaxLength {
			return
		}
		q2, err := Parse(printed)
		if err != nil {
			t.Fatalf("%q printed as %q, which does not parse: %v", s, printed, err)
		}
		if again := q2.String(); again != printed {
			t.Fatalf("%q printed as %q, then as %q", s, printed, again)
		}
		for i, d := range docs {
			if q2.Match(d) != matched[i] {
				t.Fatalf("%q and its printed form %q disagree on document %d", s, printed, i)
			}
		}
	})
}

func FuzzParseCondition(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add(s)
	}
	docs := fuzzDocs(f)
	f.Fuzz(func(t *testing.T, s string) {
		c, err := ParseCondition(s)
		if err != nil {
			checkError(t, s, err)
			return
		}
		var matched []bool
		for _, d := range docs {
			matched = append(matched, c.Match(d))
		}
		printed := c.String()
		if len(printed) > MaxLength {
			return
		}
		c2, err := ParseCondition(printed)
		if err != nil {
			t.Fatalf("%q printed as %q, which does not parse: %v", s, printed, err)
		}
		if again := c2.String(); again != printed {
			t.Fatalf("%q printed as %q, then as %q", s, printed, again)
		}
		for i, d := range docs {
			if c2.Match(d) != matched[i] {
				t.Fatalf("%q and its printed form %q disagree on document %d", s, printed, i)
			}
		}
	})
}
