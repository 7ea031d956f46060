// Package agent is the edge agent's reconciler: it reads the deployment
// manifest (the $edgeAgent module twin's desired properties), plans the
// container changes that bring the engine to it, restarts modules by their
// restartPolicy, and reports the $edgeAgent reported properties.
package agent

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Values of a module's status, restartPolicy and imagePullPolicy.
const (
	StatusRunning = "running"
	StatusStopped = "stopped"

	Never       = "never"
	OnFailure   = "on-failure"
	OnUnhealthy = "on-unhealthy"
	Always      = "always"

	PullOnCreate = "on-create"
	PullNever    = "never"
)

// DefaultStartupOrder is a module's startupOrder when the manifest has none:
// it starts after every module that has one.
const DefaultStartupOrder = 4294967295

// Manifest is a parsed deployment manifest.
type Manifest struct {
	SchemaVersion string
	// Version is the desired document's $version; the agent reports it
	// back as lastDesiredVersion.
	Version       int64
	Runtime       Runtime
	SystemModules map[string]*Module // edgeAgent, edgeHub
	Modules       map[string]*Module
}

// Runtime is runtime.settings, with runtime.type (always "docker").
type Runtime struct {
	Type                string
	MinDockerVersion    string
	LoggingOptions      string
	RegistryCredentials map[string]RegistryCredential
}

// RegistryCredential is one of runtime.settings.registryCredentials.
type RegistryCredential struct {
	Username, Password, Address string
}

// Module is one entry of modules (or systemModules).
type Module struct {
	Name            string
	Version         string
	Type            string
	Status          string // "" for systemModules.edgeAgent
	RestartPolicy   string // "" for systemModules.edgeAgent
	ImagePullPolicy string
	StartupOrder    uint32
	Env             map[string]string
	Image           string
	// CreateOptions is the createOptions chunks joined, as canonical JSON
	// (sorted keys, no spaces); nil when the module has none.
	CreateOptions json.RawMessage
}

// ConfigHash identifies what the container is made from: a module whose
// hash changes is recreated. Version is not in it but in a label of its
// own, so that containers labelled before versions were recorded keep
// their hash (and are not all recreated by an upgrade).
func (m *Module) ConfigHash() string {
	b, _ := json.Marshal(struct {
		Image         string
		CreateOptions json.RawMessage
		Env           map[string]string // marshalled with sorted keys
	}{m.Image, m.CreateOptions, m.Env})
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:16])
}

// Ordered returns the modules in start order: by startupOrder, then name.
func (m *Manifest) Ordered() []*Module {
	mods := slices.Collect(maps.Values(m.Modules))
	slices.SortFunc(mods, func(a, b *Module) int {
		if a.StartupOrder != b.StartupOrder {
			return cmpUint(a.StartupOrder, b.StartupOrder)
		}
		return strings.Compare(a.Name, b.Name)
	})
	return mods
}

func cmpUint(a, b uint32) int {
	if a < b {
		return -1
	}
	return 1
}

// Error is a manifest the agent rejects. Code is the lastDesiredStatus code
// Azure's edgeAgent reports for it: 400 (invalid), 412 (schemaVersion not
// supported) or 417 (empty configuration).
type Error struct {
	Code    int
	Version int64  // $version of the rejected document
	Path    string // e.g. "modules.sensor.restartPolicy"; "" for the whole document
	Msg     string
}

func (e *Error) Error() string {
	if e.Path == "" {
		return e.Msg
	}
	return e.Path + ": " + e.Msg
}

// The raw shapes of the desired document. Unknown keys are ignored, as
// twins carry $metadata and tools add their own.
type (
	rawDoc struct {
		Version       int64       `json:"$version"`
		SchemaVersion *string     `json:"schemaVersion"`
		Runtime       *rawRuntime `json:"runtime"`
		// Maps of raw values: each is decoded alone so that an error can
		// name its key (encoding/json's paths leave map keys out).
		SystemModules map[string]json.RawMessage `json:"systemModules"`
		Modules       map[string]json.RawMessage `json:"modules"`
	}
	rawRuntime struct {
		Type     string `json:"type"`
		Settings struct {
			MinDockerVersion    string                     `json:"minDockerVersion"`
			LoggingOptions      string                     `json:"loggingOptions"`
			RegistryCredentials map[string]json.RawMessage `json:"registryCredentials"`
		} `json:"settings"`
	}
	rawModule struct {
		Version         string                     `json:"version"`
		Type            string                     `json:"type"`
		Status          string                     `json:"status"`
		RestartPolicy   string                     `json:"restartPolicy"`
		ImagePullPolicy string                     `json:"imagePullPolicy"`
		StartupOrder    *wholeUint32               `json:"startupOrder"`
		Env             map[string]*rawEnv         `json:"env"`
		Settings        map[string]json.RawMessage `json:"settings"`
	}
	rawEnv struct {
		Value json.RawMessage `json:"value"`
	}
)

var (
	schemaPattern = regexp.MustCompile(`^(\d{1,4})\.(\d{1,4})(\.\d{1,4})?$`)
	// The engine's rule for container names, which modules' names become.
	namePattern  = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]+$`)
	chunkPattern = regexp.MustCompile(`^createOptions(\d\d)$`)
)

// ParseManifest parses and checks the $edgeAgent desired properties. Its
// errors are *Error.
func ParseManifest(desired json.RawMessage) (*Manifest, error) {
	var doc rawDoc
	if err := decode("", desired, &doc); err != nil {
		err.Version = versionOf(desired)
		return nil, err
	}
	fail := func(code int, path, format string, args ...any) error {
		return &Error{Code: code, Version: doc.Version, Path: path, Msg: fmt.Sprintf(format, args...)}
	}
	if doc.SchemaVersion == nil && doc.Runtime == nil && doc.SystemModules == nil && doc.Modules == nil {
		return nil, fail(417, "", "the deployment is empty: the device has no deployment manifest yet")
	}
	if doc.SchemaVersion == nil {
		return nil, fail(400, "schemaVersion", "required: use 1.0 or 1.1")
	}
	sv := *doc.SchemaVersion
	match := schemaPattern.FindStringSubmatch(sv)
	if match == nil {
		return nil, fail(400, "schemaVersion", "%q is not a version: use 1.0 or 1.1", sv)
	}
	if atoi(match[1]) != 1 || atoi(match[2]) > 1 {
		return nil, fail(412, "schemaVersion", "%s is not supported: this agent supports 1.0 and 1.1", sv)
	}
	m := &Manifest{SchemaVersion: sv, Version: doc.Version, SystemModules: map[string]*Module{}, Modules: map[string]*Module{}}

	if doc.Runtime == nil {
		return nil, fail(400, "runtime", `required: {"type": "docker", "settings": {...}}`)
	}
	if doc.Runtime.Type != "docker" {
		return nil, fail(400, "runtime.type", "%q is not supported: use docker", doc.Runtime.Type)
	}
	rs := doc.Runtime.Settings
	m.Runtime = Runtime{Type: "docker", MinDockerVersion: rs.MinDockerVersion, LoggingOptions: rs.LoggingOptions,
		RegistryCredentials: map[string]RegistryCredential{}}
	for _, name := range slices.Sorted(maps.Keys(rs.RegistryCredentials)) {
		path := "runtime.settings.registryCredentials." + name
		var c *RegistryCredential
		if err := decode(path, rs.RegistryCredentials[name], &c); err != nil {
			err.Version = doc.Version
			return nil, err
		}
		if c == nil {
			continue // null: deleted by a twin patch
		}
		switch {
		case c.Address == "":
			return nil, fail(400, path+".address", "required: the registry's host, e.g. myregistry.azurecr.io")
		case c.Username == "":
			return nil, fail(400, path+".username", "required")
		case c.Password == "":
			return nil, fail(400, path+".password", "required")
		}
		m.Runtime.RegistryCredentials[name] = *c
	}

	for _, name := range slices.Sorted(maps.Keys(doc.SystemModules)) {
		path := "systemModules." + name
		if name != "edgeAgent" && name != "edgeHub" {
			return nil, fail(400, path, "unknown system module: the system modules are edgeAgent and edgeHub")
		}
		// edgeAgent is this agent: it has no status or restartPolicy.
		mod, err := parseModule(path, name, doc.SystemModules[name], name == "edgeHub")
		if err != nil {
			err.Version = doc.Version
			return nil, err
		}
		if mod != nil {
			m.SystemModules[name] = mod
		}
	}
	for _, name := range slices.Sorted(maps.Keys(doc.Modules)) {
		path := "modules." + name
		switch {
		case name == "edgeAgent" || name == "edgeHub":
			return nil, fail(400, path, "%s is a system module: put it under systemModules", name)
		case !namePattern.MatchString(name):
			return nil, fail(400, path, "a module name is two or more of a-z, A-Z, 0-9, _, . and -, starting with a letter or digit (it names the container)")
		}
		mod, err := parseModule(path, name, doc.Modules[name], true)
		if err != nil {
			err.Version = doc.Version
			return nil, err
		}
		if mod != nil {
			m.Modules[name] = mod
		}
	}
	return m, nil
}

// parseModule checks one module; withPolicy requires status and
// restartPolicy (every module but edgeAgent). A null module (deleted by a
// twin patch) is nil.
func parseModule(path, name string, b json.RawMessage, withPolicy bool) (*Module, *Error) {
	var raw *rawModule
	if err := decode(path, b, &raw); err != nil || raw == nil {
		return nil, err
	}
	fail := func(field, format string, args ...any) *Error {
		return &Error{Code: 400, Path: path + "." + field, Msg: fmt.Sprintf(format, args...)}
	}
	m := &Module{Name: name, Version: raw.Version, Type: raw.Type, Status: raw.Status, RestartPolicy: raw.RestartPolicy,
		ImagePullPolicy: raw.ImagePullPolicy, StartupOrder: DefaultStartupOrder, Env: map[string]string{}}
	if raw.Type != "docker" {
		return nil, fail("type", "%s: use docker", describe(raw.Type))
	}
	if withPolicy {
		if !slices.Contains([]string{StatusRunning, StatusStopped}, raw.Status) {
			return nil, fail("status", "%s: use running or stopped", describe(raw.Status))
		}
		if !slices.Contains([]string{Never, OnFailure, OnUnhealthy, Always}, raw.RestartPolicy) {
			return nil, fail("restartPolicy", "%s: use never, on-failure, on-unhealthy or always", describe(raw.RestartPolicy))
		}
	}
	switch raw.ImagePullPolicy {
	case "":
		m.ImagePullPolicy = PullOnCreate
	case PullOnCreate, PullNever:
	default:
		return nil, fail("imagePullPolicy", "%q is not valid: use on-create or never", raw.ImagePullPolicy)
	}
	if raw.StartupOrder != nil {
		m.StartupOrder = uint32(*raw.StartupOrder)
	}

	for _, k := range slices.Sorted(maps.Keys(raw.Env)) {
		v := raw.Env[k]
		if v == nil || len(v.Value) == 0 || string(v.Value) == "null" {
			continue // deleted by a twin patch
		}
		if k == "" || strings.ContainsAny(k, "=\x00") {
			return nil, fail("env", "%q is not a variable name", k)
		}
		var s string
		switch v.Value[0] {
		case '"':
			json.Unmarshal(v.Value, &s)
		case '{', '[':
			return nil, fail("env."+k+".value", "want a string, number or boolean")
		default: // numbers and booleans, as Azure's agent stringifies them
			s = string(v.Value)
		}
		m.Env[k] = s
	}

	var image string
	if b, ok := raw.Settings["image"]; !ok || json.Unmarshal(b, &image) != nil || strings.TrimSpace(image) == "" {
		return nil, fail("settings.image", "required: the module's image, e.g. mcr.microsoft.com/azureiotedge-simulated-temperature-sensor:1.0")
	}
	if strings.ContainsAny(image, " \t\r\n") {
		return nil, fail("settings.image", "%q is not an image reference", image)
	}
	m.Image = image
	opts, err := createOptions(raw.Settings)
	if err != nil {
		err.Path = path + "." + err.Path
		return nil, err
	}
	m.CreateOptions = opts
	return m, nil
}

// createOptions joins settings.createOptions, createOptions01, 02, ... (a
// stringified JSON object split in 512-character chunks) and returns the
// object as canonical JSON.
func createOptions(settings map[string]json.RawMessage) (json.RawMessage, *Error) {
	fail := func(field, format string, args ...any) *Error {
		return &Error{Code: 400, Path: "settings." + field, Msg: fmt.Sprintf(format, args...)}
	}
	first, ok := settings["createOptions"]
	if !ok || string(first) == "null" {
		for k := range settings {
			if strings.HasPrefix(k, "createOptions") {
				return nil, fail(k, "a continuation of createOptions, which is missing")
			}
		}
		return nil, nil
	}
	// One unsplit object is accepted as well as its string.
	if len(first) > 0 && first[0] == '{' {
		return canonical(first, fail)
	}
	chunks := map[int]string{}
	for k, v := range settings {
		if !strings.HasPrefix(k, "createOptions") {
			continue
		}
		n := 0
		if k != "createOptions" {
			match := chunkPattern.FindStringSubmatch(k)
			if match == nil || atoi(match[1]) == 0 {
				return nil, fail(k, "not a createOptions chunk: chunks are createOptions, createOptions01, createOptions02, ...")
			}
			n = atoi(match[1])
		}
		var s string
		if err := json.Unmarshal(v, &s); err != nil {
			return nil, fail(k, "want a string: createOptions is stringified JSON")
		}
		chunks[n] = s
	}
	var joined strings.Builder
	for i := range len(chunks) {
		s, ok := chunks[i]
		if !ok {
			return nil, fail(fmt.Sprintf("createOptions%02d", i), "missing: the chunks go createOptions, createOptions01, createOptions02, ... without gaps")
		}
		joined.WriteString(s)
	}
	if strings.TrimSpace(joined.String()) == "" {
		return nil, nil
	}
	return canonical([]byte(joined.String()), fail)
}

// canonical checks that b is one JSON object and re-encodes it with sorted
// keys, so that formatting alone never recreates a module.
func canonical(b []byte, fail func(string, string, ...any) *Error) (json.RawMessage, *Error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, fail("createOptions", "not a JSON object (a Docker create body): %v", err)
	}
	obj, ok := v.(map[string]any)
	if !ok {
		return nil, fail("createOptions", "not a JSON object (a Docker create body) but %s", jsonKind(v))
	}
	if _, err := dec.Token(); err == nil {
		return nil, fail("createOptions", "not a JSON object (a Docker create body): text after the object")
	}
	out, err := json.Marshal(obj)
	if err != nil {
		return nil, fail("createOptions", "%v", err)
	}
	return out, nil
}

func jsonKind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case []any:
		return "an array"
	case string:
		return "a string"
	case bool:
		return "a boolean"
	}
	return "a number"
}

// wholeUint32 is a whole number from 0 to 4294967295, written with or
// without a zero fraction (1 or 1.0): the hub keeps numbers as written.
type wholeUint32 uint32

func (w *wholeUint32) UnmarshalJSON(b []byte) error {
	f, err := strconv.ParseFloat(string(b), 64)
	if err != nil || f != math.Trunc(f) || f < 0 || f > math.MaxUint32 {
		what := "number " + string(b)
		if err != nil { // named as encoding/json names them
			what = map[byte]string{'"': "string", '{': "object", '[': "array", 't': "bool", 'f': "bool"}[b[0]]
		}
		return &json.UnmarshalTypeError{Value: what, Type: reflect.TypeFor[uint32]()}
	}
	*w = wholeUint32(f)
	return nil
}

// decode unmarshals b into v; a failure becomes an Error naming the field
// under path.
func decode(path string, b json.RawMessage, v any) *Error {
	err := json.Unmarshal(b, v)
	if err == nil {
		return nil
	}
	var te *json.UnmarshalTypeError
	if !errors.As(err, &te) {
		return &Error{Code: 400, Msg: "the deployment is not a JSON object: " + err.Error()}
	}
	want := map[string]string{"string": "a string", "uint32": "a whole number from 0 to 4294967295", "int64": "a whole number"}[te.Type.String()]
	if want == "" {
		want = "a JSON object"
	}
	field := path
	if te.Field != "" {
		field = strings.TrimPrefix(path+"."+te.Field, ".")
	}
	return &Error{Code: 400, Path: field, Msg: fmt.Sprintf("a JSON %s is not valid here: want %s", te.Value, want)}
}

// versionOf digs $version out of a document that failed to decode, so
// that the rejection is reported against it.
func versionOf(doc []byte) int64 {
	var v struct {
		Version json.RawMessage `json:"$version"`
	}
	json.Unmarshal(doc, &v) // other fields' errors don't matter here
	n, _ := strconv.ParseInt(string(v.Version), 10, 64)
	return n
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

// describe quotes a value for an error, saying "missing" for "".
func describe(s string) string {
	if s == "" {
		return "missing"
	}
	return strconv.Quote(s) + " is not valid"
}
