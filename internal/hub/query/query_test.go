package query

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/twindoc"
)

const deviceTwins = `[
{"deviceId": "edge-1", "etag": "AAAAAAAAAAE=", "status": "enabled", "connectionState": "Connected",
 "lastActivityTime": "2024-05-01T10:00:00Z", "version": 5,
 "tags": {"environment": "prod", "site": {"floor": 3, "name": "Redmond 43"}, "my key": "x", "list": ["a", "b"]},
 "properties": {
   "desired": {"telemetryConfig": {"sendFrequencyInSecs": 300}, "$version": 4},
   "reported": {"os": "linux", "firmware": "1.2.0", "temps": [20, 25], "lastDesiredStatus": {"code": 200}, "$version": 7}},
 "capabilities": {"iotEdge": true},
 "configurations": {"web-v2:1,a=b;c'd": {"status": "Applied"}}},
{"deviceId": "sensor-2", "etag": "AAAAAAAAAAI=", "status": "disabled", "connectionState": "Disconnected",
 "lastActivityTime": "2023-01-01T00:00:00Z", "version": 2,
 "tags": {"environment": "dev", "site": {"floor": 1}, "owner": "O'Brien"},
 "properties": {"desired": {"$version": 1}, "reported": {"os": "windows", "$version": 2}},
 "capabilities": {"iotEdge": false},
 "configurations": {"and": {"status": "Targeted"}}},
{"deviceId": "sensor-3", "status": "enabled", "connectionState": "Disconnected",
 "tags": {"environment": "prod", "site": {"floor": "2"}, "x": null},
 "properties": {"desired": {}, "reported": {"os": "Linux"}},
 "capabilities": {"iotEdge": false}},
{"deviceId": "bare-4", "status": "enabled",
 "properties": {"desired": {}, "reported": {}}}
]`

const moduleTwins = `[
{"deviceId": "edge-1", "moduleId": "$edgeAgent", "configurations": {"dep-1": {"status": "Applied"}},
 "properties": {"desired": {"$version": 3}, "reported": {"lastDesiredVersion": 3, "lastDesiredStatus": {"code": 200}}}},
{"deviceId": "edge-1", "moduleId": "$edgeHub", "properties": {"reported": {"lastDesiredStatus": {"code": 200}}}},
{"deviceId": "edge-5", "moduleId": "$edgeAgent", "properties": {"reported": {"lastDesiredStatus": {"code": 417}}}},
{"deviceId": "edge-6", "moduleId": "$edgeAgent", "properties": {"reported": {}}}
]`

// decode reads documents as the hub reads twins, numbers as json.Number.
func decode(t testing.TB, s string) []map[string]any {
	t.Helper()
	var docs []map[string]any
	if err := twindoc.Unmarshal([]byte(s), &docs); err != nil {
		t.Fatal(err)
	}
	return docs
}

// ids lists the "deviceId/moduleId" (or deviceId) of the documents c matches.
func ids(docs []map[string]any, match func(map[string]any) bool) []string {
	out := []string{}
	for _, d := range docs {
		if match(d) {
			id := d["deviceId"].(string)
			if m, ok := d["moduleId"].(string); ok {
				id += "/" + m
			}
			out = append(out, id)
		}
	}
	return out
}

func TestConditionMatch(t *testing.T) {
	docs := decode(t, deviceTwins)
	all := []string{"edge-1", "sensor-2", "sensor-3", "bare-4"}
	for _, tc := range []struct {
		cond string
		want []string
	}{
		{"*", all},
		{"tags.environment='prod'", []string{"edge-1", "sensor-3"}},
		{`tags.environment = "prod"`, []string{"edge-1", "sensor-3"}},
		{`'prod' = tags.environment`, []string{"edge-1", "sensor-3"}},
		{"tags.environment = 'prod' AND tags.site.floor >= 2", []string{"edge-1"}}, // sensor-3's floor is the string "2"
		{"tags.environment = 'prod' OR tags.site.floor >= 2", []string{"edge-1", "sensor-3"}},
		{"tags.environment = 'prod' and properties.reported.os = 'linux'", []string{"edge-1"}},
		{"NOT (status = 'disabled')", []string{"edge-1", "sensor-3", "bare-4"}},
		{"status != 'disabled'", []string{"edge-1", "sensor-3", "bare-4"}},
		{"status <> 'disabled'", []string{"edge-1", "sensor-3", "bare-4"}},
		{"capabilities.iotEdge = true", []string{"edge-1"}},
		{"capabilities.iotEdge", []string{"edge-1"}},
		{"capabilities.iotEdge = false", []string{"sensor-2", "sensor-3"}},
		{"IS_DEFINED(tags.x)", []string{"sensor-3"}}, // defined, as null
		{"is_defined(tags.environment)", []string{"edge-1", "sensor-2", "sensor-3"}},
		{"NOT IS_DEFINED(tags.environment)", []string{"bare-4"}},
		{"IS_NULL(tags.x)", []string{"sensor-3"}},
		{"tags.x = null", []string{"sensor-3"}},
		{"IS_NUMBER(tags.site.floor)", []string{"edge-1", "sensor-2"}},
		{"IS_STRING(tags.site.floor)", []string{"sensor-3"}},
		{"IS_BOOL(capabilities.iotEdge)", []string{"edge-1", "sensor-2", "sensor-3"}},
		{"IS_OBJECT(tags.site)", []string{"edge-1", "sensor-2", "sensor-3"}},
		{"IS_ARRAY(tags.list)", []string{"edge-1"}},
		{"IS_PRIMITIVE(tags.x)", []string{"sensor-3"}},
		{"IS_PRIMITIVE(tags.site)", []string{}},

		// Undefined: a missing property, or a value of another type,
		// satisfies neither = nor != (nor NOT =).
		{"tags.environment != 'prod'", []string{"sensor-2"}},
		{"NOT (tags.environment = 'prod')", []string{"sensor-2"}},
		{"tags.site.floor = 2", []string{}},
		{"tags.site.floor = '2'", []string{"sensor-3"}},
		{"tags.site.floor != 2", []string{"edge-1", "sensor-2"}},
		{"NOT (tags.site.floor = 2)", []string{"edge-1", "sensor-2"}},
		{"tags.environment = 'prod' AND NOT (tags.site.floor < 2)", []string{"edge-1"}},
		{"tags.environment = 'dev' OR tags.nothing = 1", []string{"sensor-2"}},
		{"tags.nothing = 1 OR tags.environment = 'dev'", []string{"sensor-2"}},
		{"NOT (tags.nothing = 1 AND status = 'disabled')", []string{"edge-1", "sensor-3", "bare-4"}},

		{"tags.environment IN ['prod', 'dev']", []string{"edge-1", "sensor-2", "sensor-3"}},
		{"tags.environment in ('dev')", []string{"sensor-2"}},
		{"tags.environment NIN ['prod']", []string{"sensor-2"}},
		{"tags.environment NOT IN ['prod']", []string{"sensor-2"}},
		{"tags.environment IN []", []string{}},
		{"tags.environment NIN []", []string{"edge-1", "sensor-2", "sensor-3"}},
		{"deviceId IN ['edge-1', 'bare-4']", []string{"edge-1", "bare-4"}},
		{"deviceId IN ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'edge-1', 'bare-4']", []string{"edge-1", "bare-4"}},
		{"tags.site.floor IN [1, 3]", []string{"edge-1", "sensor-2"}},
		{"tags.site.floor IN [-1, 3, 'x']", []string{"edge-1"}},
		{"tags.site.floor NIN [1, 3]", []string{}}, // sensor-3's "2" is not comparable with numbers

		{"STARTSWITH(deviceId, 'sensor')", []string{"sensor-2", "sensor-3"}},
		{"starts_with(deviceId, 'SENSOR', true)", []string{"sensor-2", "sensor-3"}},
		{"ENDSWITH(deviceId, '-4')", []string{"bare-4"}},
		{"CONTAINS(tags.site.name, '43')", []string{"edge-1"}},
		{"LOWER(properties.reported.os) = 'linux'", []string{"edge-1", "sensor-3"}},
		{"UPPER(tags.environment) = 'PROD'", []string{"edge-1", "sensor-3"}},
		{"LENGTH(deviceId) = 6", []string{"edge-1", "bare-4"}},
		{"INDEX_OF(deviceId, '-') = 4", []string{"edge-1", "bare-4"}},
		{"SUBSTRING(deviceId, 0, 6) = 'sensor'", []string{"sensor-2", "sensor-3"}},
		{"CONCAT(deviceId, '@', tags.environment) = 'edge-1@prod'", []string{"edge-1"}},
		{"TRIM('  a ') = 'a' AND LTRIM(' a') = 'a' AND RTRIM('a ') = 'a' AND deviceId = 'edge-1'", []string{"edge-1"}},
		{"STARTSWITH(tags.site.floor, '1')", []string{}},
		{"ARRAY_CONTAINS(tags.list, 'b')", []string{"edge-1"}},
		{"ARRAY_CONTAINS(['edge-1', 'sensor-2'], deviceId)", []string{"edge-1", "sensor-2"}},
		{"ARRAY_LENGTH(properties.reported.temps) = 2", []string{"edge-1"}},
		{"ABS(-tags.site.floor) = 3", []string{"edge-1"}},
		{"AS_NUMBER(tags.site.floor) = 2", []string{"sensor-3"}},

		{"tags['my key'] = 'x'", []string{"edge-1"}},
		{"configurations.[[web-v2:1,a=b;c'd]].status = 'Applied'", []string{"edge-1"}},
		{"configurations.[[web-v2:1,a=b;c'd]].status = 'Targeted'", []string{}},
		{"configurations.[[and]].status = 'Targeted'", []string{"sensor-2"}},
		{`tags["site"]['floor'] = 3`, []string{"edge-1"}},
		{"properties.reported.$version > 5", []string{"edge-1"}},
		{"properties.desired.$version >= 1", []string{"edge-1", "sensor-2"}},
		{"properties.reported.temps[1] = 25", []string{"edge-1"}},
		{"properties.reported.temps[2] = 25", []string{}},
		{"tags.list = ['a', 'b']", []string{"edge-1"}},
		{"tags.list != ['a']", []string{"edge-1"}},
		{"tags.site.floor * 2 = 6", []string{"edge-1"}},
		{"tags.site.floor % 2 = 1", []string{"edge-1", "sensor-2"}},
		{"tags.site.floor + 1 > 2 AND 10 / tags.site.floor > 3", []string{"edge-1"}},
		{"1 / (tags.site.floor - 1) = 0.5", []string{"edge-1"}},
		{"version = 5", []string{"edge-1"}},
		{"lastActivityTime > '2024-01-01'", []string{"edge-1"}},
		{"tags.environment < 'q'", []string{"edge-1", "sensor-2", "sensor-3"}},
		{"tags.owner = 'O''Brien'", []string{"sensor-2"}},
		{`tags.owner = 'O\'Brien'`, []string{"sensor-2"}},
		{`tags.owner = "O'Brien"`, []string{"sensor-2"}},
		{"(tags.environment = 'prod' OR tags.environment = 'dev') AND status = 'enabled'", []string{"edge-1", "sensor-3"}},
		{"devices.deviceId = 'edge-1'", []string{"edge-1"}},
		{"devices.tags.environment = 'prod'", []string{"edge-1", "sensor-3"}},
		{"FROM devices WHERE deviceId = 'edge-1'", []string{"edge-1"}},
		{"DeviceId = 'edge-1'", []string{}}, // paths are case-sensitive
		{"true", all},
		{"1 = 1", all},
		{"false", []string{}},
		{"tags.environment", []string{}}, // not a boolean
		{"NOT tags.environment", []string{}},
	} {
		c, err := ParseCondition(tc.cond)
		if err != nil {
			t.Errorf("ParseCondition(%q): %v", tc.cond, err)
			continue
		}
		if got := ids(docs, c.Match); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%q matches %q, want %q", tc.cond, got, tc.want)
		}
		// The query form must agree, and so must the printed form.
		from := "devices"
		if c.explicit {
			from = c.From
		}
		if !c.MatchesAll() {
			q, err := Parse("SELECT * FROM " + from + " WHERE " + c.Where())
			if err != nil {
				t.Errorf("%q as a query: %v", tc.cond, err)
				continue
			}
			if got := ids(docs, q.Match); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("query %q matches %q, want %q", q, got, tc.want)
			}
		}
	}
}

func TestModules(t *testing.T) {
	mods := decode(t, moduleTwins)
	for _, tc := range []struct {
		cond string
		want []string
	}{
		{"FROM devices.modules WHERE moduleId = '$edgeAgent'", []string{"edge-1/$edgeAgent", "edge-5/$edgeAgent", "edge-6/$edgeAgent"}},
		{"from DEVICES.MODULES where devices.modules.moduleId = '$edgeHub'", []string{"edge-1/$edgeHub"}},
		{"FROM devices.modules", []string{"edge-1/$edgeAgent", "edge-1/$edgeHub", "edge-5/$edgeAgent", "edge-6/$edgeAgent"}},
		{"FROM devices.modules WHERE properties.reported.lastDesiredStatus.code != 200", []string{"edge-5/$edgeAgent"}},
	} {
		c, err := ParseCondition(tc.cond)
		if err != nil {
			t.Fatalf("ParseCondition(%q): %v", tc.cond, err)
		}
		if c.From != Modules {
			t.Errorf("%q: From = %q", tc.cond, c.From)
		}
		if got := ids(mods, c.Match); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%q matches %q, want %q", tc.cond, got, tc.want)
		}
	}

	q, err := Parse("SELECT * FROM devices.modules WHERE moduleId = '$edgeAgent' AND deviceId IN ['edge-1', 'edge-5']")
	if err != nil {
		t.Fatal(err)
	}
	if q.From != Modules || q.IsAggregate() {
		t.Fatalf("From %q, aggregate %v", q.From, q.IsAggregate())
	}
	rows, err := q.Run(mods)
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 2 || rows[0]["deviceId"] != "edge-1" || rows[1]["deviceId"] != "edge-5" {
		t.Fatalf("rows %v", rows)
	}

	c, _ := ParseCondition("tags.environment = 'prod'")
	if c.From != Devices || c.MatchesAll() {
		t.Errorf("From %q, MatchesAll %v", c.From, c.MatchesAll())
	}
}

func TestRun(t *testing.T) {
	devs := decode(t, deviceTwins)
	mods := decode(t, moduleTwins)
	for _, tc := range []struct {
		query string
		docs  []map[string]any
		agg   bool
		want  string // JSON
	}{
		{
			query: "SELECT deviceId, tags.environment AS env, properties.reported.lastDesiredStatus FROM devices WHERE status = 'enabled'",
			docs:  devs,
			want: `[{"deviceId": "edge-1", "env": "prod", "lastDesiredStatus": {"code": 200}},
				{"deviceId": "sensor-3", "env": "prod"},
				{"deviceId": "bare-4"}]`,
		},
		{
			query: "select devices.deviceId, tags['my key'], LENGTH(deviceId), properties.reported.temps[0] AS t0, properties.reported.temps[1] + 1 from devices where deviceId = 'edge-1'",
			docs:  devs,
			want:  `[{"deviceId": "edge-1", "my key": "x", "$1": 6, "t0": 20, "$2": 26}]`,
		},
		{
			query: "SELECT TOP 2 deviceId FROM devices",
			docs:  devs,
			want:  `[{"deviceId": "edge-1"}, {"deviceId": "sensor-2"}]`,
		},
		{
			query: "SELECT TOP 0 deviceId FROM devices",
			docs:  devs,
			want:  `[]`,
		},
		{
			query: "SELECT deviceId FROM devices WHERE tags.environment = 'staging'",
			docs:  devs,
			want:  `[]`,
		},
		{
			query: "SELECT COUNT() AS numberOfDevices FROM devices WHERE tags.environment = 'prod'",
			docs:  devs,
			agg:   true,
			want:  `[{"numberOfDevices": 2}]`,
		},
		{
			query: "SELECT COUNT() AS numberOfDevices FROM devices WHERE tags.environment = 'staging'",
			docs:  devs,
			agg:   true,
			want:  `[{"numberOfDevices": 0}]`,
		},
		{
			query: "SELECT COUNT(*), COUNT(tags.environment), SUM(version) FROM devices",
			docs:  devs,
			agg:   true,
			want:  `[{"$1": 4, "$2": 3, "$3": 7}]`,
		},
		{
			query: "SELECT SUM(tags.site.floor) AS s, AVG(tags.site.floor) AS a, MIN(tags.site.floor) AS lo, MAX(tags.site.floor) AS hi, MAX(deviceId) AS last, MIN(tags.nothing) AS none FROM devices WHERE IS_NUMBER(tags.site.floor)",
			docs:  devs,
			agg:   true,
			want:  `[{"s": 4, "a": 2, "lo": 1, "hi": 3, "last": "sensor-2"}]`,
		},
		{
			// SUM of a non-number is undefined; MIN/MAX order across types.
			query: "SELECT SUM(tags.site.floor) AS s, MIN(tags.site.floor) AS lo, MAX(tags.site.floor) AS hi FROM devices",
			docs:  devs,
			agg:   true,
			want:  `[{"lo": 1, "hi": "2"}]`,
		},
		{
			query: "SELECT properties.reported.lastDesiredStatus.code AS status, COUNT() AS n FROM devices.modules WHERE moduleId = '$edgeAgent' GROUP BY properties.reported.lastDesiredStatus.code",
			docs:  mods,
			agg:   true,
			want:  `[{"status": 200, "n": 1}, {"status": 417, "n": 1}, {"n": 1}]`,
		},
		{
			query: "SELECT devices.modules.properties.reported.lastDesiredStatus.code AS status, COUNT() AS n FROM devices.modules GROUP BY properties.reported.lastDesiredStatus.code",
			docs:  mods,
			agg:   true,
			want:  `[{"status": 200, "n": 2}, {"status": 417, "n": 1}, {"n": 1}]`,
		},
		{
			// A deployment's system metric (reportedSuccessfulCount).
			query: "SELECT deviceId FROM devices.modules WHERE moduleId = '$edgeAgent' AND configurations.[[dep-1]].status = 'Applied' AND properties.desired.$version = properties.reported.lastDesiredVersion AND properties.reported.lastDesiredStatus.code = 200",
			docs:  mods,
			want:  `[{"deviceId": "edge-1"}]`,
		},
		{
			query: "SELECT tags.environment, status, COUNT() AS n FROM devices GROUP BY tags.environment, status",
			docs:  devs,
			agg:   true,
			want:  `[{"environment": "prod", "status": "enabled", "n": 2}, {"environment": "dev", "status": "disabled", "n": 1}, {"status": "enabled", "n": 1}]`,
		},
		{
			query: "SELECT tags.environment FROM devices GROUP BY tags.environment",
			docs:  devs,
			agg:   true,
			want:  `[{"environment": "prod"}, {"environment": "dev"}, {}]`,
		},
		{
			query: "SELECT TOP 1 tags.environment AS env, COUNT() AS n FROM devices GROUP BY tags.environment",
			docs:  devs,
			agg:   true,
			want:  `[{"env": "prod", "n": 2}]`,
		},
		{
			query: "SELECT COUNT() AS n FROM devices WHERE status = 'nope' GROUP BY tags.environment",
			docs:  devs,
			agg:   true,
			want:  `[]`,
		},
	} {
		q, err := Parse(tc.query)
		if err != nil {
			t.Errorf("Parse(%q): %v", tc.query, err)
			continue
		}
		if q.IsAggregate() != tc.agg {
			t.Errorf("%q: IsAggregate = %v", tc.query, q.IsAggregate())
		}
		rows, err := q.Run(tc.docs)
		if err != nil {
			t.Errorf("%q: %v", tc.query, err)
			continue
		}
		got, _ := json.Marshal(rows)
		var want []map[string]any
		if err := json.Unmarshal([]byte(tc.want), &want); err != nil {
			t.Fatal(err)
		}
		wantJSON, _ := json.Marshal(want)
		if string(got) != string(wantJSON) {
			t.Errorf("%q\n got %s\nwant %s", tc.query, got, wantJSON)
		}
		// Printing and parsing again changes nothing.
		q2, err := Parse(q.String())
		if err != nil {
			t.Errorf("reparsing %q: %v", q, err)
			continue
		}
		if rows2, _ := q2.Run(tc.docs); !reflect.DeepEqual(rows2, rows) {
			t.Errorf("%q printed as %q runs differently", tc.query, q)
		}
	}
}

func TestSelectStar(t *testing.T) {
	devs := decode(t, deviceTwins)
	q, err := Parse("SELECT * FROM devices WHERE capabilities.iotEdge = true")
	if err != nil {
		t.Fatal(err)
	}
	rows, _ := q.Run(devs)
	if len(rows) != 1 || !reflect.DeepEqual(rows[0], devs[0]) {
		t.Fatalf("rows %v", rows)
	}
	q, _ = Parse("SELECT * FROM devices")
	if rows, _ := q.Run(devs); len(rows) != 4 {
		t.Fatalf("%d rows", len(rows))
	}
	if rows, _ := q.Run(nil); rows == nil || len(rows) != 0 {
		t.Fatalf("no documents: %#v", rows)
	}
}

// Hand-built documents may hold Go integers and json.Number.
func TestGoNumbers(t *testing.T) {
	doc := map[string]any{
		"a": 3, "b": int64(3), "c": json.Number("3"), "d": uint8(3), "e": float32(3),
		"arr": []any{1, 2}, "obj": map[string]any{"x": 1},
	}
	for _, cond := range []string{
		"a = 3", "b = 3", "c = 3", "d = 3", "e = 3", "a = b AND b = c AND c = d",
		"a + 1 = 4", "arr = [1, 2]", "ARRAY_CONTAINS(arr, 2)", "obj.x = 1.0", "a IN [3]",
	} {
		c, err := ParseCondition(cond)
		if err != nil {
			t.Fatal(err)
		}
		if !c.Match(doc) {
			t.Errorf("%q does not match", cond)
		}
	}
	q, _ := Parse("SELECT a, COUNT() AS n FROM devices GROUP BY a")
	rows, _ := q.Run([]map[string]any{{"a": 3}, {"a": 3.0}, {"a": json.Number("3")}})
	if len(rows) != 1 || rows[0]["n"] != 3.0 {
		t.Errorf("rows %v", rows)
	}
}

func TestFunctionsEdgeCases(t *testing.T) {
	doc := map[string]any{"s": "héllo wörld", "n": -2.5, "e": "", "o": []any{map[string]any{"a": 1.0, "b": 2.0}}}
	for _, tc := range []struct {
		expr string
		want any // nil: undefined
	}{
		{"LENGTH(s)", 11.0},
		{"INDEX_OF(s, 'w')", 6.0},
		{"INDEX_OF(s, 'z')", -1.0},
		{"SUBSTRING(s, 6, 100)", "wörld"},
		{"SUBSTRING(s, -3, 2)", "hé"},
		{"SUBSTRING(s, 20, 2)", ""},
		{"SUBSTRING(s, 1, 0)", ""},
		{"UPPER(s)", "HÉLLO WÖRLD"},
		{"CONTAINS(s, 'WÖR', true)", true},
		{"CONTAINS(s, 'WÖR')", false},
		{"CONTAINS(s, 'x', 'yes')", nil},
		{"ENDSWITH(s, 'LD', true)", true},
		{"STARTSWITH(e, '')", true},
		{"LOWER(n)", nil},
		{"ABS(n)", 2.5},
		{"CEILING(n)", -2.0},
		{"FLOOR(n)", -3.0},
		{"ROUND(n)", -3.0},
		{"SIGN(n)", -1.0},
		{"SQRT(n)", nil},
		{"SQRT(16)", 4.0},
		{"SQUARE(n)", 6.25},
		{"POWER(2, 10)", 1024.0},
		{"POWER(10, 400)", nil},
		{"EXP(0)", 1.0},
		{"AS_NUMBER('12.5')", 12.5},
		{"AS_NUMBER('0x10')", nil},
		{"AS_NUMBER('inf')", nil},
		{"n / 0", nil},
		{"n % 0", nil},
		{"1e308 * 10", nil},
		{"-n", 2.5},
		{"- -n", -2.5},
		{"'a' + 1", nil},
		{"ARRAY_CONTAINS(o, {a: 1})", "error"},
		{"ARRAY_CONTAINS(o, 1)", false},
		{"ARRAY_CONTAINS(s, 's')", nil},
		{"ARRAY_LENGTH(o)", 1.0},
		{"IS_DEFINED(missing)", false},
		{"IS_NULL(missing)", false},
		{"null = null", true},
		{"null != null", false},
		{"null < null", false},
		{"null <= null", true},
		{"true > false", true},
		{"[1, 2] = [1, 2]", true},
		{"[1, 2] < [1, 3]", nil},
		{"'b' > 'a'", true},
		{"1 = '1'", nil},
		{"NOT (1 = '1')", nil},
		{"missing = missing", nil},
		{"true AND missing", nil},
		{"false AND missing", false},
		{"true OR missing", true},
		{"false OR missing", nil},
		{"NOT missing", nil},
		{"NOT 'x'", nil},
	} {
		c, err := ParseCondition(tc.expr)
		if tc.want == "error" {
			if err == nil {
				t.Errorf("%q parsed", tc.expr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tc.expr, err)
			continue
		}
		got, ok := c.where.eval(doc)
		if !ok {
			got = nil
		} else if got == nil {
			got = "null"
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s = %#v, want %#v", tc.expr, got, tc.want)
		}
	}
}

func TestErrors(t *testing.T) {
	for _, tc := range []struct {
		query string
		cond  bool // ParseCondition rather than Parse
		want  string
	}{
		{query: "SELECT * FROM devices WHERE tags.x =", want: "query: at column 37: expected a value after '=' but found end of input"},
		{query: "tags.environment = ", cond: true, want: "query: at column 20: expected a value after '=' but found end of input"},
		{query: "SELECT * FROM devices WHERE", want: "query: at column 28: expected a condition after 'WHERE' but found end of input"},
		{query: "SELECT * FROM devices WHERE tags.x = 1 tags.y = 2", want: "query: at column 40: expected AND, OR, GROUP BY or end of query but found 'tags'"},
		{query: "tags.x = 1 tags.y = 2", cond: true, want: "query: at column 12: expected AND, OR or end of input but found 'tags'"},
		{query: "SELECT * FROM jobs", want: "query: at column 15: unsupported collection 'jobs': expected devices or devices.modules"},
		{query: "SELECT * FROM devices.jobs", want: "query: at column 15: unsupported collection 'devices.jobs': expected devices or devices.modules"},
		{query: "SELECT * FROM", want: "query: at column 14: expected devices or devices.modules after 'FROM' but found end of input"},
		{query: "SELECT * FROM devices ORDER BY deviceId", want: "query: at column 23: ORDER BY is not supported"},
		{query: "SELECT * FROM devices devices", want: "query: at column 23: expected WHERE, GROUP BY or end of query but found 'devices'"},
		{query: "SELECT * devices", want: "query: at column 10: expected FROM after '*' but found 'devices'"},
		{query: "SELECT deviceId tags FROM devices", want: "query: at column 17: expected ',' or FROM but found 'tags'"},
		{query: "SELECT deviceId AS FROM devices", want: "query: at column 20: expected a column name after 'AS' but found 'FROM'"},
		{query: "SELECT TOP -1 * FROM devices", want: "query: at column 12: expected a whole number after 'TOP' but found '-'"},
		{query: "devices", want: "query: at column 1: expected SELECT but found 'devices'"},
		{query: "SELECT deviceId, COUNT() FROM devices", want: "query: at column 8: deviceId is neither an aggregate such as COUNT() nor in the GROUP BY clause"},
		{query: "SELECT tags.a, COUNT() FROM devices GROUP BY tags.b", want: "query: at column 8: tags.a is neither an aggregate such as COUNT() nor in the GROUP BY clause"},
		{query: "SELECT * FROM devices GROUP BY tags.x", want: "query: at column 8: SELECT * cannot be used with GROUP BY; select the grouped properties and aggregates"},
		{query: "SELECT deviceId, devices.deviceId FROM devices", want: "query: at column 18: the SELECT list has two columns named 'deviceId'; rename one with AS"},
		{query: "SELECT SUM() FROM devices", want: "query: at column 8: SUM takes 1 argument but was given 0"},
		{query: "SELECT COUNT() + 1 FROM devices", want: "query: at column 16: expected ',' or FROM but found '+'"},
		{query: "SELECT * FROM devices GROUP BY COUNT()", want: "query: at column 32: COUNT() is an aggregate: it can only be a whole item of the SELECT list"},
		{query: "COUNT() > 1", cond: true, want: "query: at column 1: COUNT() is an aggregate: it can only be a whole item of the SELECT list"},
		{query: "", cond: true, want: "query: the condition is empty; use * to match every device"},
		{query: "   ", cond: true, want: "query: the condition is empty; use * to match every device"},
		{query: "* AND true", cond: true, want: "query: at column 1: expected a value but found '*'"},
		{query: "FROM devices.modules moduleId = 'x'", cond: true, want: "query: at column 22: expected WHERE or end of input after 'modules' but found 'moduleId'"},
		{query: "tags.x = 'abc", cond: true, want: "query: at column 10: string is not terminated: expected a closing '"},
		{query: `tags.x = "abc\"`, cond: true, want: `query: at column 10: string is not terminated: expected a closing "`},
		{query: `tags.x = 'a\qb'`, cond: true, want: `query: at column 12: unknown escape sequence '\q' in string (write a backslash as '\\')`},
		{query: `tags.x = '\u12'`, cond: true, want: `query: at column 11: \u must be followed by four hex digits`},
		{query: "tags.x == 1", cond: true, want: "query: at column 8: '==' is not an operator; compare with '='"},
		{query: "tags.x = 1 && true", cond: true, want: "query: at column 12: '&&' is not an operator; use AND"},
		{query: "!tags.x", cond: true, want: "query: at column 1: '!' is not an operator; use NOT, or '!=' for inequality"},
		{query: "tags.x = 1 ; drop", cond: true, want: "query: at column 12: unexpected character ';'"},
		{query: "(tags.x = 1", cond: true, want: "query: at column 12: expected ')' to close the '(' at column 1 but found end of input"},
		{query: "tags.x = 1)", cond: true, want: "query: at column 11: expected AND, OR or end of input but found ')'"},
		{query: "FOO(tags.x)", cond: true, want: "query: at column 1: unknown function 'FOO'"},
		{query: "STARTSWITH(deviceId)", cond: true, want: "query: at column 1: STARTSWITH takes 2 or 3 arguments but was given 1"},
		{query: "is_defined()", cond: true, want: "query: at column 1: IS_DEFINED takes 1 argument but was given 0"},
		{query: "CONCAT('a')", cond: true, want: "query: at column 1: CONCAT takes at least 2 arguments but was given 1"},
		{query: "STARTSWITH(deviceId 'a')", cond: true, want: "query: at column 21: expected ',' or ')' in the arguments of STARTSWITH but found string 'a'"},
		{query: "tags.x = 1 = 2", cond: true, want: "query: at column 12: comparisons cannot be chained: combine them with AND, or parenthesize one"},
		{query: "tags.x IN 'a'", cond: true, want: "query: at column 11: expected a list such as ['a', 'b'] after 'IN' but found string 'a'"},
		{query: "tags.x IN [tags.y]", cond: true, want: "query: at column 12: expected a constant (a string, number, true, false or null) after '[' but found 'tags'"},
		{query: "tags.x IN [(1)]", cond: true, want: "query: at column 12: expected a constant (a string, number, true, false or null) after '[' but found '('"},
		{query: "tags.x IN ['a' 'b']", cond: true, want: "query: at column 16: expected ',' or ']' in the list opened at column 11 but found string 'b'"},
		{query: "tags.'x' = 1", cond: true, want: "query: at column 6: a quoted property name goes in brackets: write ['x'] without the '.'"},
		{query: "tags. = 1", cond: true, want: "query: at column 7: expected a property name after '.' but found '='"},
		{query: "tags[1.5] = 1", cond: true, want: "query: at column 6: array index 1.5 is not a whole number from 0 to 2147483647"},
		{query: "tags['a' = 1", cond: true, want: "query: at column 10: expected ']' to close the '[' at column 5 but found '='"},
		{query: "configurations.[[abc].status = 'Applied'", cond: true, want: "query: at column 16: '[[' is not closed: expected ']]' after the property name"},
		{query: "configurations.[[]].status = 'Applied'", cond: true, want: "query: at column 16: '[[]]' names no property"},
		{query: "tags.x = 1e999", cond: true, want: "query: at column 10: number 1e999 is out of range"},
		{query: "tags.x = 12abc", cond: true, want: `query: at column 10: malformed number starting "12a"`},
		{query: "tags.x = AND", cond: true, want: "query: at column 10: expected a value after '=' but found 'AND'"},
		{query: "select = 1", cond: true, want: "query: at column 1: expected a value but found 'select'"},
		{query: "tags.ñ = 'é' AND", cond: true, want: "query: at column 17: expected a value after 'AND' but found end of input"},
		{query: "SELECT *\nFROM devices\nWHERE tags.x = ", want: "query: at line 3, column 16: expected a value after '=' but found end of input"},
		{query: "SELECT *\r\n  FROM devices\r\n  WHERE tags.x = 'a' AND", want: "query: at line 3, column 25: expected a value after 'AND' but found end of input"},
		{query: "tags.x = 1 AND " + strings.Repeat("x", MaxLength), cond: true, want: "query: query is 8207 bytes long; the limit is 8192"},
		{query: strings.Repeat("(", MaxDepth+1) + "true" + strings.Repeat(")", MaxDepth+1), cond: true, want: "query: at column 65: expression is nested too deeply (the limit is 64 levels)"},
		{query: strings.Repeat("NOT ", MaxDepth+1) + "true", cond: true, want: "query: at column 257: expression is nested too deeply (the limit is 64 levels)"},
		{query: "tags.x = " + strings.Repeat("-", MaxDepth+1) + "1", cond: true, want: "query: at column 74: expression is nested too deeply (the limit is 64 levels)"},
		{query: "tags.x IN " + strings.Repeat("[", MaxDepth+1) + strings.Repeat("]", MaxDepth+1), cond: true, want: "query: at column 75: expression is nested too deeply (the limit is 64 levels)"},
		{query: strings.Repeat("LOWER(", MaxDepth+1) + "'a'" + strings.Repeat(")", MaxDepth+1) + " = 'a'", cond: true, want: "query: at column 385: expression is nested too deeply (the limit is 64 levels)"},
	} {
		var err error
		if tc.cond {
			_, err = ParseCondition(tc.query)
		} else {
			_, err = Parse(tc.query)
		}
		if err == nil {
			t.Errorf("%q parsed", tc.query)
			continue
		}
		if err.Error() != tc.want {
			t.Errorf("%q:\n got %s\nwant %s", tc.query, err, tc.want)
		}
		var qe *Error
		if !errors.As(err, &qe) {
			t.Errorf("%q: %T is not *Error", tc.query, err)
		}
	}
}

func TestLimitsAccepted(t *testing.T) {
	for _, cond := range []string{
		strings.Repeat("(", MaxDepth) + "true" + strings.Repeat(")", MaxDepth),
		strings.Repeat("NOT ", MaxDepth) + "true",
		strings.Repeat("LOWER(", MaxDepth) + "'a'" + strings.Repeat(")", MaxDepth) + " = 'a'",
		// Long flat chains are not nesting.
		"true" + strings.Repeat(" AND true", 900),
		"1" + strings.Repeat(" + 1", 2000) + " = 2001",
	} {
		if len(cond) > MaxLength {
			t.Fatalf("test condition is %d bytes", len(cond))
		}
		c, err := ParseCondition(cond)
		if err != nil {
			t.Fatalf("%.40q...: %v", cond, err)
		}
		if !c.Match(map[string]any{}) {
			t.Errorf("%.40q... does not match", cond)
		}
	}
}

func TestString(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"tags.environment='prod'", "tags.environment = 'prod'"},
		{"*", "*"},
		{"  *  ", "*"},
		{"from devices.modules where moduleId='$edgeAgent'", "FROM devices.modules WHERE moduleId = '$edgeAgent'"},
		{"not (a=1 or b=2) and c in ('x',-1) and d nin [] and e not in [null]", "NOT (a = 1 OR b = 2) AND c IN ['x', -1] AND d NIN [] AND e NIN [null]"},
		{"(a - (b - c)) * -d = - 2", "(a - (b - c)) * -d = -2"},
		{"tags['my key'].$x[3]['é'].ok = \"it's\\n\"", `tags['my key'].$x[3].é.ok = 'it\'s\n'`},
		{"tags.from.and = true", "tags.from.and = true"},
		{"configurations.[[my-config]].status='Applied'", "configurations['my-config'].status = 'Applied'"},
		{"starts_with(deviceId, 'a') = (1 = 1)", "STARTS_WITH(deviceId, 'a') = (1 = 1)"},
		{"x = 1e21 and y = 0.000001 and z = 1000000", "x = 1e+21 AND y = 1e-06 AND z = 1e+06"},
	} {
		c, err := ParseCondition(tc.in)
		if err != nil {
			t.Fatalf("%q: %v", tc.in, err)
		}
		if got := c.String(); got != tc.want {
			t.Errorf("%q prints as %q, want %q", tc.in, got, tc.want)
		}
	}
	q, err := Parse("select top 5 devices.deviceId as id, count(*) as n, max(version) from DEVICES where tags.a = 'b' group by devices.deviceId")
	if err != nil {
		t.Fatal(err)
	}
	const want = "SELECT TOP 5 devices.deviceId AS id, COUNT() AS n, MAX(version) FROM devices WHERE tags.a = 'b' GROUP BY devices.deviceId"
	if q.String() != want {
		t.Errorf("got  %s\nwant %s", q, want)
	}
	if q.Top != 5 || q.From != Devices {
		t.Errorf("Top %d From %q", q.Top, q.From)
	}
	if c := q.Condition(); c.String() != "FROM devices WHERE tags.a = 'b'" || !c.Match(map[string]any{"tags": map[string]any{"a": "b"}}) {
		t.Errorf("Condition() = %s", c)
	}
	for in, want := range map[string]string{"*": "", "FROM devices.modules": "", "FROM devices WHERE a=1 OR b=2": "a = 1 OR b = 2"} {
		c, err := ParseCondition(in)
		if err != nil {
			t.Fatalf("%q: %v", in, err)
		}
		if c.Where() != want {
			t.Errorf("%q's WHERE clause: %q, want %q", in, c.Where(), want)
		}
	}
}

func ExampleParseCondition() {
	c, err := ParseCondition("tags.environment = 'prod' AND properties.reported.os = 'linux'")
	if err != nil {
		panic(err)
	}
	var twin map[string]any
	_ = json.Unmarshal([]byte(`{"deviceId": "d1", "tags": {"environment": "prod"},
		"properties": {"reported": {"os": "linux"}}}`), &twin)
	fmt.Println(c.Match(twin))
	// Output: true
}

func ExampleQuery_Run() {
	q, err := Parse(`SELECT properties.reported.lastDesiredStatus.code AS status, COUNT() AS n
		FROM devices.modules WHERE moduleId = '$edgeAgent'
		GROUP BY properties.reported.lastDesiredStatus.code`)
	if err != nil {
		panic(err)
	}
	var modules []map[string]any
	_ = json.Unmarshal([]byte(moduleTwins), &modules)
	rows, _ := q.Run(modules)
	out, _ := json.Marshal(rows)
	fmt.Println(string(out))
	// Output: [{"n":1,"status":200},{"n":1,"status":417},{"n":1}]
}

// Twins hold numbers as json.Number: a number selected as it is comes out
// with every digit, while conditions, grouping and arithmetic work with
// doubles as before, so integers that round to one double are equal.
func TestBigNumbers(t *testing.T) {
	docs := decode(t, `[{"deviceId": "a", "tags": {"big": 9007199254740993}},
		{"deviceId": "b", "tags": {"big": 12345678901234567890}}, {"deviceId": "c", "tags": {"big": 9007199254740992}}]`)
	for query, want := range map[string]string{
		"SELECT tags.big FROM devices":                                      `[{"big":9007199254740993},{"big":12345678901234567890},{"big":9007199254740992}]`,
		"SELECT MIN(tags.big) AS lo, MAX(tags.big) AS hi FROM devices":      `[{"hi":12345678901234567890,"lo":9007199254740993}]`,
		"SELECT tags.big, COUNT() AS n FROM devices GROUP BY tags.big":      `[{"big":9007199254740993,"n":2},{"big":12345678901234567890,"n":1}]`,
		"SELECT deviceId FROM devices WHERE tags.big = 9007199254740993":    `[{"deviceId":"a"},{"deviceId":"c"}]`,
		"SELECT deviceId FROM devices WHERE tags.big > 9007199254740993":    `[{"deviceId":"b"}]`,
		"SELECT deviceId FROM devices WHERE tags.big IN [9007199254740992]": `[{"deviceId":"a"},{"deviceId":"c"}]`,
		"SELECT tags.big + 0 AS sum FROM devices WHERE IS_NUMBER(tags.big)": `[{"sum":9007199254740992},{"sum":12345678901234567000},{"sum":9007199254740992}]`,
	} {
		q, err := Parse(query)
		if err != nil {
			t.Fatal(err)
		}
		rows, _ := q.Run(docs)
		if got, _ := json.Marshal(rows); string(got) != want {
			t.Errorf("%s\n got %s\nwant %s", query, got, want)
		}
	}
}
