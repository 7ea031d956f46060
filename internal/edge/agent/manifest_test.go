package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
)

func loadDeployment(t testing.TB) map[string]any {
	t.Helper()
	b, err := os.ReadFile("testdata/deployment.json")
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	return doc
}

// edit sets (or, with value nil, deletes) the dotted path in doc.
func edit(doc map[string]any, path string, value any) {
	keys := strings.Split(path, ".")
	for _, k := range keys[:len(keys)-1] {
		next, ok := doc[k].(map[string]any)
		if !ok {
			next = map[string]any{}
			doc[k] = next
		}
		doc = next
	}
	if value == nil {
		delete(doc, keys[len(keys)-1])
	} else {
		doc[keys[len(keys)-1]] = value
	}
}

func TestParseManifest(t *testing.T) {
	b, _ := os.ReadFile("testdata/deployment.json")
	m, err := ParseManifest(b)
	if err != nil {
		t.Fatal(err)
	}
	if m.SchemaVersion != "1.1" || m.Version != 7 || m.Runtime.Type != "docker" || m.Runtime.MinDockerVersion != "v1.25" {
		t.Errorf("manifest: %+v", m)
	}
	if c := m.Runtime.RegistryCredentials["myacr"]; c != (RegistryCredential{"acr-user", "acr-pass", "myacr.azurecr.io"}) {
		t.Errorf("credentials: %+v", m.Runtime.RegistryCredentials)
	}
	if a, h := m.SystemModules["edgeAgent"], m.SystemModules["edgeHub"]; a == nil || a.CreateOptions != nil || h == nil || h.Status != "running" ||
		string(h.CreateOptions) != `{"HostConfig":{"PortBindings":{"443/tcp":[{"HostPort":"443"}],"5671/tcp":[{"HostPort":"5671"}],"8883/tcp":[{"HostPort":"8883"}]}}}` {
		t.Errorf("system modules: %+v %+v", a, h)
	}
	s := m.Modules["SimulatedTemperatureSensor"]
	if s == nil || s.Status != "running" || s.RestartPolicy != "always" || s.ImagePullPolicy != "on-create" || s.StartupOrder != 2 || s.Version != "1.0" ||
		s.Image != "mcr.microsoft.com/azureiotedge-simulated-temperature-sensor:1.0" ||
		string(s.CreateOptions) != `{"Env":["A=1"],"HostConfig":{"Binds":["/data:/data"]}}` {
		t.Errorf("sensor: %+v (createOptions %s)", s, s.CreateOptions)
	}
	if s.Env["SendInterval"] != "5" || s.Env["Verbose"] != "true" || s.Env["Name"] != "sensor" {
		t.Errorf("env: %v", s.Env)
	}
	f := m.Modules["filter"]
	if f == nil || f.Status != "stopped" || f.ImagePullPolicy != "never" || f.StartupOrder != DefaultStartupOrder || f.CreateOptions != nil {
		t.Errorf("filter: %+v", f)
	}
	if got := m.Ordered(); len(got) != 2 || got[0].Name != "SimulatedTemperatureSensor" || got[1].Name != "filter" {
		t.Errorf("Ordered: %v", got)
	}
}

// createOptions longer than 512 characters arrive split; joined they are
// the same object, so the module's hash does not change.
func TestCreateOptionsChunks(t *testing.T) {
	var binds []string
	for i := range 60 {
		binds = append(binds, "/var/lib/module/volume-"+strings.Repeat("x", i%7)+":/mnt/v"+string(rune('a'+i%26)))
	}
	whole, _ := json.Marshal(map[string]any{"HostConfig": map[string]any{"Binds": binds}, "Cmd": []string{"-v"}})
	if len(whole) < 2000 {
		t.Fatalf("test createOptions only %d characters", len(whole))
	}
	chunked := loadDeployment(t)
	unsplit := loadDeployment(t)
	s := string(whole)
	for i := 0; len(s) > 0; i++ {
		n := min(512, len(s))
		key := "createOptions"
		if i > 0 {
			key += fmt.Sprintf("%02d", i)
		}
		edit(chunked, "modules.filter.settings."+key, s[:n])
		s = s[n:]
	}
	edit(unsplit, "modules.filter.settings.createOptions", string(whole))
	var mods [2]*Module
	for i, doc := range []map[string]any{chunked, unsplit} {
		b, _ := json.Marshal(doc)
		m, err := ParseManifest(b)
		if err != nil {
			t.Fatal(err)
		}
		mods[i] = m.Modules["filter"]
	}
	if string(mods[0].CreateOptions) != string(mods[1].CreateOptions) || mods[0].ConfigHash() != mods[1].ConfigHash() {
		t.Errorf("chunked createOptions differ:\n%s\n%s", mods[0].CreateOptions, mods[1].CreateOptions)
	}
	var back map[string]any
	if json.Unmarshal(mods[0].CreateOptions, &back) != nil || len(back["HostConfig"].(map[string]any)["Binds"].([]any)) != 60 {
		t.Errorf("joined createOptions: %s", mods[0].CreateOptions)
	}
}

func TestParseManifestErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		edits map[string]any // path → value; nil deletes
		raw   string         // instead of edits
		code  int
		want  []string // substrings of the error
	}{
		{name: "empty", raw: `{}`, code: 417, want: []string{"empty"}},
		{name: "empty twin", raw: `{"$version": 4}`, code: 417},
		{name: "not json", raw: `{"schemaVersion": `, code: 400, want: []string{"not a JSON object"}},
		{name: "array", raw: `[]`, code: 400},
		{name: "schema 1.2", edits: map[string]any{"schemaVersion": "1.2"}, code: 412, want: []string{"schemaVersion", "1.2", "supports 1.0 and 1.1"}},
		{name: "schema 2.0", edits: map[string]any{"schemaVersion": "2.0"}, code: 412, want: []string{"supports 1.0 and 1.1"}},
		{name: "schema huge", edits: map[string]any{"schemaVersion": "1.99999999999999999999"}, code: 400},
		{name: "schema text", edits: map[string]any{"schemaVersion": "latest"}, code: 400, want: []string{"use 1.0 or 1.1"}},
		{name: "schema missing", edits: map[string]any{"schemaVersion": nil}, code: 400, want: []string{"schemaVersion: required"}},
		{name: "schema number", edits: map[string]any{"schemaVersion": 1.1}, code: 400, want: []string{"schemaVersion", "want a string"}},
		{name: "runtime missing", edits: map[string]any{"runtime": nil}, code: 400, want: []string{"runtime: required"}},
		{name: "runtime type", edits: map[string]any{"runtime.type": "rkt"}, code: 400, want: []string{"runtime.type", "use docker"}},
		{name: "credential address", edits: map[string]any{"runtime.settings.registryCredentials.myacr.address": ""}, code: 400,
			want: []string{"runtime.settings.registryCredentials.myacr.address: required"}},
		{name: "system module unknown", edits: map[string]any{"systemModules.edgeFoo": map[string]any{}}, code: 400, want: []string{"systemModules.edgeFoo", "edgeAgent and edgeHub"}},
		{name: "edgeHub policy", edits: map[string]any{"systemModules.edgeHub.restartPolicy": nil}, code: 400, want: []string{"systemModules.edgeHub.restartPolicy: missing"}},
		{name: "modules not object", edits: map[string]any{"modules": "x"}, code: 400, want: []string{"modules", "want a JSON object"}},
		{name: "restartPolicy", edits: map[string]any{"modules.filter.restartPolicy": "sometimes"}, code: 400,
			want: []string{`modules.filter.restartPolicy: "sometimes" is not valid`, "never, on-failure, on-unhealthy or always"}},
		{name: "restartPolicy case", edits: map[string]any{"modules.filter.restartPolicy": "Always"}, code: 400, want: []string{"modules.filter.restartPolicy"}},
		{name: "status", edits: map[string]any{"modules.filter.status": nil}, code: 400, want: []string{"modules.filter.status: missing", "running or stopped"}},
		{name: "type", edits: map[string]any{"modules.filter.type": "rkt"}, code: 400, want: []string{"modules.filter.type", "use docker"}},
		{name: "pull policy", edits: map[string]any{"modules.filter.imagePullPolicy": "always"}, code: 400, want: []string{"modules.filter.imagePullPolicy", "on-create or never"}},
		{name: "startupOrder negative", edits: map[string]any{"modules.filter.startupOrder": -1}, code: 400, want: []string{"modules.filter.startupOrder", "0 to 4294967295"}},
		{name: "startupOrder fraction", edits: map[string]any{"modules.filter.startupOrder": 1.5}, code: 400, want: []string{"modules.filter.startupOrder"}},
		{name: "startupOrder big", edits: map[string]any{"modules.filter.startupOrder": 4294967296}, code: 400, want: []string{"modules.filter.startupOrder"}},
		{name: "startupOrder string", edits: map[string]any{"modules.filter.startupOrder": "1"}, code: 400, want: []string{"modules.filter.startupOrder", "a JSON string is not valid here"}},
		{name: "image missing", edits: map[string]any{"modules.filter.settings.image": nil}, code: 400, want: []string{"modules.filter.settings.image: required"}},
		{name: "image spaces", edits: map[string]any{"modules.filter.settings.image": "a b"}, code: 400, want: []string{"modules.filter.settings.image"}},
		{name: "settings missing", edits: map[string]any{"modules.filter.settings": nil}, code: 400, want: []string{"modules.filter.settings.image"}},
		{name: "env object", edits: map[string]any{"modules.filter.env.X.value": map[string]any{}}, code: 400, want: []string{"modules.filter.env.X.value"}},
		{name: "env name", edits: map[string]any{"modules.filter.env.A=B.value": "x"}, code: 400, want: []string{"modules.filter.env", "A=B"}},
		{name: "module name", edits: map[string]any{"modules.-bad": map[string]any{}}, code: 400, want: []string{"modules.-bad", "module name"}},
		{name: "module name short", edits: map[string]any{"modules.a": map[string]any{}}, code: 400, want: []string{"modules.a:"}},
		{name: "system module as module", edits: map[string]any{"modules.edgeHub": map[string]any{}}, code: 400, want: []string{"modules.edgeHub", "systemModules"}},
		{name: "invalid createOptions", edits: map[string]any{"modules.filter.settings.createOptions": `{"Env": [`}, code: 400,
			want: []string{"modules.filter.settings.createOptions", "not a JSON object"}},
		{name: "createOptions array", edits: map[string]any{"modules.filter.settings.createOptions": `[1]`}, code: 400, want: []string{"modules.filter.settings.createOptions"}},
		{name: "createOptions trailing", edits: map[string]any{"modules.filter.settings.createOptions": `{} {}`}, code: 400, want: []string{"modules.filter.settings.createOptions", "after the object"}},
		{name: "createOptions number", edits: map[string]any{"modules.filter.settings.createOptions": 5}, code: 400, want: []string{"modules.filter.settings.createOptions", "want a string"}},
		{name: "chunk gap", edits: map[string]any{"modules.filter.settings.createOptions": `{"Env":`, "modules.filter.settings.createOptions02": `[]}`}, code: 400,
			want: []string{"modules.filter.settings.createOptions01: missing", "without gaps"}},
		{name: "chunk without first", edits: map[string]any{"modules.filter.settings.createOptions01": `{}`}, code: 400,
			want: []string{"modules.filter.settings.createOptions01", "createOptions, which is missing"}},
		{name: "chunk name", edits: map[string]any{"modules.filter.settings.createOptions": `{}`, "modules.filter.settings.createOptions1": `{}`}, code: 400,
			want: []string{"modules.filter.settings.createOptions1", "createOptions01"}},
		{name: "chunk 00", edits: map[string]any{"modules.filter.settings.createOptions": `{}`, "modules.filter.settings.createOptions00": `{}`}, code: 400,
			want: []string{"modules.filter.settings.createOptions00"}},
		{name: "chunk not string", edits: map[string]any{"modules.filter.settings.createOptions": `{`, "modules.filter.settings.createOptions01": 1}, code: 400,
			want: []string{"modules.filter.settings.createOptions01", "want a string"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw := []byte(tc.raw)
			if tc.raw == "" {
				doc := loadDeployment(t)
				for path, v := range tc.edits {
					edit(doc, path, v)
				}
				raw, _ = json.Marshal(doc)
			}
			m, err := ParseManifest(raw)
			var me *Error
			if !errors.As(err, &me) {
				t.Fatalf("ParseManifest = %+v, %v; want an *Error", m, err)
			}
			t.Log(err)
			if me.Code != tc.code {
				t.Errorf("code %d, want %d (%v)", me.Code, tc.code, err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if tc.raw == "" && me.Version != 7 {
				t.Errorf("error carries $version %d, want 7", me.Version)
			}
		})
	}
	if _, err := ParseManifest([]byte(`{"$version": 4}`)); err.(*Error).Version != 4 {
		t.Errorf("empty twin: version %d", err.(*Error).Version)
	}
}

// What Azure tools also write, and twin patches leave, must parse.
func TestParseManifestAccepts(t *testing.T) {
	for name, edits := range map[string]map[string]any{
		"schema 1.0":          {"schemaVersion": "1.0"},
		"schema 1.1.0":        {"schemaVersion": "1.1.0"},
		"null module":         {"modules.gone": "NULL"},
		"null env":            {"modules.filter.env.GONE": "NULL"},
		"object createOpts":   {"modules.filter.settings.createOptions": map[string]any{"Cmd": []string{"x"}}},
		"empty createOptions": {"modules.filter.settings.createOptions": ""},
		"no systemModules":    {"systemModules": nil},
		"startupOrder max":    {"modules.filter.startupOrder": 4294967295},
		"startupOrder 2.0":    {"modules.filter.startupOrder": json.Number("2.0")}, // numbers stay as written
		"unknown keys":        {"modules.filter.x-custom": 1, "runtime.settings.other": "y"},
	} {
		doc := loadDeployment(t)
		for path, v := range edits {
			if v == "NULL" {
				edit(doc, path, json.RawMessage("null"))
			} else {
				edit(doc, path, v)
			}
		}
		raw, _ := json.Marshal(doc)
		if _, err := ParseManifest(raw); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func FuzzParseManifest(f *testing.F) {
	b, err := os.ReadFile("testdata/deployment.json")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"schemaVersion":"1.0","runtime":{"type":"docker"},"modules":{"m1":{"type":"docker","status":"running","restartPolicy":"never",` +
		`"settings":{"image":"i","createOptions":"{\"Cmd\":","createOptions01":"[\"a\"]}"}}}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := ParseManifest(data)
		if err != nil {
			var me *Error
			if !errors.As(err, &me) || (me.Code != 400 && me.Code != 412 && me.Code != 417) {
				t.Fatalf("error %v is not an *Error with a known code", err)
			}
			return
		}
		again, err := ParseManifest(data)
		if err != nil {
			t.Fatalf("second parse: %v", err)
		}
		for name, mod := range m.Modules {
			if mod.Name != name || mod.Image == "" || !namePattern.MatchString(name) {
				t.Fatalf("module %q: %+v", name, mod)
			}
			if mod.CreateOptions != nil && !json.Valid(mod.CreateOptions) {
				t.Fatalf("module %s: createOptions %q", name, mod.CreateOptions)
			}
			if mod.ConfigHash() != again.Modules[name].ConfigHash() {
				t.Fatalf("module %s: hash differs between parses", name)
			}
		}
	})
}
