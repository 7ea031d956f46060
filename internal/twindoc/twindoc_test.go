package twindoc

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

func doc(t *testing.T, s string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestCheck(t *testing.T) {
	deep := strings.Repeat(`{"a":`, 10) + "1" + strings.Repeat("}", 10)
	for body, want := range map[string]string{
		`{"environment":"prod","site":{"floor":2,"wing":null},"list":[1,"x",{"k":true}]}`: "",
		deep: "",
		strings.Repeat(`{"a":`, 11) + "1" + strings.Repeat("}", 11): "deeper than 10",
		`{"a.b":1}`:         `property name "a.b" contains '.'`,
		`{"$x":1}`:          `property name "$x" contains '.', '$'`,
		`{"a":{" sp":1}}`:   `tags.a: property name " sp"`,
		`{"":1}`:            "is empty",
		`{"a\u0001":1}`:     "control character",
		`{"a\u0085":1}`:     "control character",
		`{"l":[{"b.c":1}]}`: `tags.l[0]: property name "b.c"`,
		`{"s":"` + strings.Repeat("x", 4097) + `"}`: "tags.s is a string of 4097 bytes",
		`{"` + strings.Repeat("k", 1025) + `":1}`:   "longer than 1024 bytes",
	} {
		err := Check("tags", doc(t, body))
		if want == "" && err != nil || want != "" && (err == nil || !strings.Contains(err.Error(), want)) {
			t.Errorf("Check(%.60s) = %v, want %q", body, err, want)
		}
	}
}

func TestSize(t *testing.T) {
	// names and string values by their bytes, numbers 8, booleans 4.
	if n := Size(doc(t, `{"ab":"xyz","n":1.5,"b":true,"o":{"c":[1,"de"]},"z":null}`)); n != 2+3+1+8+1+4+1+1+8+2+1 {
		t.Fatalf("Size = %d", n)
	}
	big := map[string]any{"k": strings.Repeat("x", TagsLimit)}
	if err := CheckSize("tags", big, TagsLimit); err == nil || !strings.Contains(err.Error(), "8 KiB") {
		t.Fatalf("CheckSize of %d bytes: %v", Size(big), err)
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
		if json.Unmarshal(data, &doc) != nil {
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
