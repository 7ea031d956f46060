package twindoc

import (
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

func doc(t *testing.T, s string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := Unmarshal([]byte(s), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestCheck(t *testing.T) {
	deep := strings.Repeat(`{"a":`, 10) + "1" + strings.Repeat("}", 10)
	for body, want := range map[string]string{
		`{"environment":"prod","site":{"floor":2,"wing":null},"list":[1,"x",{"k":true}]}`: "",
		deep: "",
		strings.Repeat(`{"a":`, 11) + "1" + strings.Repeat("}", 11):             "deeper than 10",
		`{"a":` + strings.Repeat("[", 9) + strings.Repeat("]", 9) + `}`:         "",
		`{"a":` + strings.Repeat("[", 10) + strings.Repeat("]", 10) + `}`:       "nests objects and arrays deeper than 10",
		`{"a":[{"b":` + strings.Repeat("[", 8) + strings.Repeat("]", 8) + `}]}`: "deeper than 10",
		`{"a.b":1}`:         `property name "a.b" contains '.'`,
		`{"$x":1}`:          `property name "$x" contains '.', '$'`,
		`{"a":{" sp":1}}`:   `tags.a: property name " sp"`,
		`{"":1}`:            "is empty",
		`{"a\u0001":1}`:     "control character",
		`{"a\u0085":1}`:     "control character",
		`{"l":[{"b.c":1}]}`: `tags.l[0]: property name "b.c"`,
		`{"s":"` + strings.Repeat("x", 4097) + `"}`:              "tags.s is a string of 4097 bytes",
		`{"` + strings.Repeat("k", 1025) + `":1}`:                "longer than 1024 bytes",
		`{"n":-1.7976931348623157e308,"i":18446744073709551615}`: "",
		`{"n":{"m":1e309}}`:                                      "tags.n.m is 1e309, beyond the numbers",
		`{"n":` + strings.Repeat("9", 65) + `}`:                  "tags.n is a number written in 65 characters",
	} {
		err := Check("tags", doc(t, body))
		if want == "" && err != nil || want != "" && (err == nil || !strings.Contains(err.Error(), want)) {
			t.Errorf("Check(%.60s) = %v, want %q", body, err, want)
		}
	}
}

func TestSize(t *testing.T) {
	// names and string values by their bytes, numbers 8, booleans 4; a
	// null, and an array element, at least 1.
	if n := size(doc(t, `{"ab":"xyz","n":1.5,"b":true,"o":{"c":[1,"de"]},"z":null}`)); n != 2+3+1+8+1+4+1+1+8+2+1+1 {
		t.Fatalf("size = %d", n)
	}
	// Empty arrays count, so that they cannot grow a twin without bound.
	if n := size(doc(t, `{"e":[[],[],{},null]}`)); n != 1+4 {
		t.Fatalf("size of empty arrays = %d, want 5", n)
	}
	big := map[string]any{"k": strings.Repeat("x", TagsLimit)}
	if err := CheckSize("tags", big, TagsLimit); err == nil || !strings.Contains(err.Error(), "8 KiB") {
		t.Fatalf("CheckSize of %d bytes: %v", size(big), err)
	}
	if err := CheckSize("tags", doc(t, `{"a":1}`), TagsLimit); err != nil {
		t.Fatal(err)
	}
}

// Reported properties come straight from devices: whatever a patch holds,
// the checks answer without panicking, and a patch they pass has only
// names IoT Hub accepts and nests no deeper than it allows.
func FuzzCheck(f *testing.F) {
	for _, s := range []string{`{"a":{"b":[1,"x",{"c":null}]}}`, `{"a.b":1}`, `{"$x":1}`, `{"":1}`,
		`{"a":{"a":{"a":{"a":{"a":{"a":{"a":{"a":{"a":{"a":{"a":1}}}}}}}}}}}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var doc map[string]any
		if Unmarshal(data, &doc) != nil {
			return
		}
		if Check("properties.reported", doc) != nil {
			return
		}
		var walk func(m map[string]any, depth int)
		walk = func(m map[string]any, depth int) {
			if depth > maxDepth {
				t.Fatalf("%s passed nesting %d levels", data, depth)
			}
			for k, v := range m {
				if CheckName(k) != nil {
					t.Fatalf("%s passed with the name %q", data, k)
				}
				if sub, ok := v.(map[string]any); ok {
					walk(sub, depth+1)
				}
			}
		}
		walk(doc, 1)
		_ = CheckSize("properties.reported", doc, PropertiesLimit)
	})
}

// A replace patch merged over the old document leaves the new one, at any
// depth: an edge agent's report after a failure clears the failure's
// description and a module that is gone, and keeps the rest.
func TestReplacePatchMergesToTheNewDocument(t *testing.T) {
	old := `{"lastDesiredStatus": {"code": 500, "description": "pulling image: no such host"},
		"modules": {"sensor": {"runtimeStatus": "failed", "exitCode": 1}, "gone": {"runtimeStatus": "running"}},
		"runtime": {"type": "docker"}}`
	new := `{"lastDesiredStatus": {"code": 200},
		"modules": {"sensor": {"runtimeStatus": "running"}, "added": {"settings": {"image": "a:1"}}},
		"runtime": "replaced by a string"}`
	twin := doc(t, old)
	Merge(twin, ReplacePatch(doc(t, old), doc(t, new)))
	if want := doc(t, new); !reflect.DeepEqual(twin, want) {
		t.Errorf("merged:\n%v\nwant:\n%v", twin, want)
	}
}

// Numbers come out as they went in, however many digits; everything else
// decodes, and fails, as json.Unmarshal has it.
func TestUnmarshal(t *testing.T) {
	const body = `{"tags":{"big":9007199254740993,"id":12345678901234567890,"f":1.50,"neg":-9223372036854775808}}`
	var v struct{ Tags map[string]any }
	if err := Unmarshal([]byte(body), &v); err != nil {
		t.Fatal(err)
	}
	if b, _ := json.Marshal(v.Tags); string(b) != `{"big":9007199254740993,"f":1.50,"id":12345678901234567890,"neg":-9223372036854775808}` {
		t.Fatalf("re-encoded: %s", b)
	}
	for _, in := range []string{``, ` `, `{`, `{"tags":{}} x`, `{"tags":{}}}`, `{"tags":[]}`, `{"tags":1}`, `[]`, `{"tags":{"a":01}}`} {
		var got, want struct{ Tags map[string]any }
		errGot, errWant := Unmarshal([]byte(in), &got), json.Unmarshal([]byte(in), &want)
		if fmt.Sprint(errGot) != fmt.Sprint(errWant) || errWant == nil {
			t.Errorf("Unmarshal(%q) = %v, json.Unmarshal says %v", in, errGot, errWant)
		}
	}
	var m map[string]any
	if err := Unmarshal([]byte(" {\"a\":1}\n\t "), &m); err != nil || m["a"] != json.Number("1") {
		t.Fatalf("with spaces around: %v %#v", err, m)
	}
}

// Unmarshal reads what json.Unmarshal reads, as the same values, and more
// only where a number is beyond a double, which CheckValue then refuses.
func FuzzUnmarshal(f *testing.F) {
	for _, s := range []string{`{"a":9007199254740993}`, `[1e400]`, `{"a":-0.0e-2}`, `{"a" 1}`, `1 2`, ` {} `, `"\u00e9"`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var exact, float any
		errExact, errFloat := Unmarshal(data, &exact), json.Unmarshal(data, &float)
		switch {
		case errFloat == nil && errExact != nil:
			t.Fatalf("%q: %v, where json.Unmarshal reads it", data, errExact)
		case errExact == nil && errFloat != nil && CheckValue("v", exact) == nil:
			t.Fatalf("%q passes, where json.Unmarshal says %v", data, errFloat)
		case errExact == nil && errFloat == nil:
			b, _ := json.Marshal(exact)
			var again any
			if err := json.Unmarshal(b, &again); err != nil || !reflect.DeepEqual(again, float) {
				t.Fatalf("%q read as %s: %v", data, b, err)
			}
		}
	})
}
