package config

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strings"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"
)

// ignored are the Azure IoT Edge settings that Hatchery accepts, so that an
// Azure config.toml keeps working, but does not act on: a warning says so.
var ignored = []string{
	"prefer_module_identity_cache",
	"cloud_timeout_sec", "cloud_retries", "manifest_trust_bundle_cert",
	"imported_master_encryption_key", "additional_info",
	"aziot_keys", "preloaded_keys", "cert_issuance", "preloaded_certs",
	"edge_ca", "watchdog", "image_garbage_collection",
	"tpm.hierarchy_authorization", "moby_runtime.content_trust",
}

// renamed are keys of older versions, with what replaces them.
var renamed = map[string]string{
	"scope_id": `scope_id is the IoT Edge 1.1 name: in config.toml write id_scope = "<ID scope>" under [provisioning]`,
	"device_connection_string": `device_connection_string is the IoT Edge 1.1 name: in config.toml write ` +
		`connection_string = "HostName=...;DeviceId=...;SharedAccessKey=..." under [provisioning]`,
	"always_reprovision_on_startup": `always_reprovision_on_startup is not valid in IoT Edge 1.4 and later: remove it and ` +
		`write auto_reprovisioning_mode = "AlwaysOnStartup" at the top of the file, before any [table]`,
	"dynamic_reprovisioning": `dynamic_reprovisioning is not valid in IoT Edge 1.4 and later: remove it and ` +
		`write auto_reprovisioning_mode = "Dynamic" at the top of the file, before any [table]`,
}

var (
	configType      = reflect.TypeFor[Config]()
	keyIndexType    = reflect.TypeFor[KeyIndex]()
	mobyNetworkType = reflect.TypeFor[MobyNetwork]()
)

// Parse parses and validates a config.toml. path only names the file in
// messages. Warnings are returned even when err is not nil.
func Parse(path string, data []byte) (*Config, []Warning, error) {
	c := Default()
	c.Provisioning.Source = "" // to tell a missing source from source = "none"
	ck := newChecker(path)
	// Unknown keys are found by walkTOML rather than by go-toml's strict
	// mode, whose cost grows with the file's size times their number.
	if err := toml.Unmarshal(data, c); err != nil {
		var de *toml.DecodeError
		if errors.As(err, &de) {
			return nil, nil, ck.decodeError(data, de)
		}
		return nil, nil, &Error{Pos{File: path}, err.Error()}
	}
	ck.walkTOML(c, data)
	ck.validate(c)
	return ck.result(c)
}

// positions maps dotted key paths to where they are written, so that errors
// found after decoding can still point at a line.
type positions struct {
	file string
	at   map[string]Pos
	// yaml marks a 1.1 config.yaml; names then holds its names for the keys
	// that config.toml renamed.
	yaml  bool
	names map[string]string
}

// pos returns where path, or else its closest enclosing table, is written.
func (p *positions) pos(path string) Pos {
	for {
		if at, ok := p.at[path]; ok {
			return at
		}
		i := strings.LastIndexByte(path, '.')
		if i < 0 {
			return Pos{File: p.file}
		}
		path = path[:i]
	}
}

func (p *positions) has(path string) bool { _, ok := p.at[path]; return ok }

func (p *positions) set(path string, line int) {
	if _, dup := p.at[path]; !dup {
		p.at[path] = Pos{File: p.file, Line: line}
	}
}

// name is the key at path as the file writes it.
func (p *positions) name(path string) string {
	if n, ok := p.names[path]; ok {
		return n
	}
	return path[strings.LastIndexByte(path, '.')+1:]
}

// assign shows how to set the key at path in this file's syntax.
func (p *positions) assign(path, value string) string {
	if p.yaml {
		return p.name(path) + ": " + value
	}
	return p.name(path) + " = " + value
}

// table names a table in messages.
func (p *positions) table(path string) string {
	if p.yaml {
		return "the " + path + " section"
	}
	return "[" + path + "]"
}

// walkTOML records the line of every table header and key of a document
// that decoded without error, and reports the keys Config has no place for.
func (ck *checker) walkTOML(c *Config, data []byte) {
	var newlines []int
	for i, b := range data {
		if b == '\n' {
			newlines = append(newlines, i)
		}
	}
	w := tomlWalker{ck: ck, c: c, newlines: newlines}
	w.p.Reset(data)
	var table []string
	for w.p.NextExpression() {
		e := w.p.Expression()
		switch e.Kind {
		case unstable.Table, unstable.ArrayTable:
			var line int
			table, line = w.keyOf(nil, e)
			w.key(table, line, nil)
		case unstable.KeyValue:
			w.keyValue(table, e)
		}
	}
}

type tomlWalker struct {
	ck       *checker
	c        *Config
	p        unstable.Parser
	newlines []int // offsets, to turn offsets into lines
}

func (w *tomlWalker) keyValue(table []string, kv *unstable.Node) {
	key, line := w.keyOf(table, kv)
	v := kv.Value()
	// MobyNetwork's text form takes any scalar go-toml hands it as text.
	if strings.Join(key, ".") == "moby_runtime.network" && v.Kind != unstable.String && v.Kind != unstable.InlineTable {
		w.ck.errorAt(Pos{File: w.ck.pos.file, Line: line}, "moby_runtime.network = %s is not a network name: write the name as a string, "+
			`network = "azure-iot-edge", or a table of name, ipv6 and ipam`, v.Data)
	}
	if w.key(key, line, v) && v.Kind == unstable.InlineTable {
		for it := v.Children(); it.Next(); {
			w.keyValue(key, it.Node())
		}
	}
}

// keyOf returns the key of a table header or key-value appended to prefix,
// and the line it starts on.
func (w *tomlWalker) keyOf(prefix []string, n *unstable.Node) (key []string, line int) {
	key = slices.Clip(prefix)
	for it := n.Key(); it.Next(); {
		if line == 0 {
			line = sort.SearchInts(w.newlines, int(it.Node().Raw.Offset)) + 1
		}
		key = append(key, string(it.Node().Data))
	}
	return key, line
}

// key records where key is written and reports whether Config has a place
// for it; if not, it explains why, once per unknown table or key.
func (w *tomlWalker) key(key []string, line int, value *unstable.Node) bool {
	ck := w.ck
	ck.pos.set(strings.Join(key, "."), line)
	n := knownPrefix(configType, key, "toml")
	if n == len(key) {
		return true
	}
	unknown := key[:n+1]
	path := strings.Join(unknown, ".")
	if ck.seen[path] {
		return false
	}
	ck.seen[path] = true
	at := Pos{File: ck.pos.file, Line: line}
	isTable := value == nil || len(unknown) < len(key)
	name := unknown[n]
	switch {
	case slices.Contains(ignored, path):
		if isTable {
			path = ck.pos.table(path)
		}
		ck.warnAt(at, "%s is an Azure IoT Edge setting that Hatchery does not use; it is ignored", path)
	case name == "auto_reprovisioning_mode" && !isTable:
		ck.misplacedMode(w.c, unknown, value, at)
	case len(unknown) > 1 && !isTable && topLevel(name):
		ck.errorAt(at, "%s is a top-level key, not one of %s: move it above the first [table] "+
			"(TOML puts every key after a [table] header into that table)", name, ck.pos.table(strings.Join(unknown[:n], ".")))
	case renamed[name] != "":
		ck.errorAt(at, "%s", renamed[name])
	default:
		ck.unknown(at, unknown, isTable, configType, "toml")
	}
	return false
}

func topLevel(name string) bool {
	f, ok := fieldByName(configType, name, "toml")
	return ok && f.Type.Kind() != reflect.Struct
}

// knownPrefix returns how many leading parts of key the type root, decoded
// with the given tag, has a place for.
func knownPrefix(root reflect.Type, key []string, tag string) int {
	for i := range key {
		if _, ok := typeAt(root, key[:i+1], tag); !ok {
			return i
		}
	}
	return len(key)
}

// misplacedMode honours an auto_reprovisioning_mode written inside a table,
// such as [provisioning.attestation] where the seed's commented block
// invites it: the intent is clear, so it is a warning.
func (ck *checker) misplacedMode(c *Config, key []string, value *unstable.Node, at Pos) {
	table := ck.pos.table(strings.Join(key[:len(key)-1], "."))
	if ck.pos.has("auto_reprovisioning_mode") {
		ck.warnAt(at, "auto_reprovisioning_mode in %s is ignored: the one at the top of the file applies; remove this one", table)
		return
	}
	if value.Kind != unstable.String {
		ck.errorAt(at, `the value of auto_reprovisioning_mode must be a quoted string such as "Dynamic"`)
		return
	}
	v := string(value.Data)
	if !ck.enumAt(at, "auto_reprovisioning_mode", v, enums["auto_reprovisioning_mode"]) {
		return
	}
	c.AutoReprovisioningMode = ReprovisioningMode(v)
	ck.warnAt(at, "auto_reprovisioning_mode belongs at the top level, not in %s: move it above the first [table] "+
		"(TOML puts every key after a [table] header into that table); its value %q is used anyway", table, v)
}

// unknown reports a key (or table) that the struct type root, decoded with
// the given tag, has no field for, suggesting the closest known name.
func (ck *checker) unknown(at Pos, key []string, isTable bool, root reflect.Type, tag string) {
	if ck.full() { // spare the search for a suggestion
		ck.truncated = true
		return
	}
	parent, name := key[:len(key)-1], key[len(key)-1]
	t, _ := typeAt(root, parent, tag)
	candidates := fieldNames(t, tag)
	if len(parent) == 0 && tag == "toml" {
		candidates = append(candidates, ignored...)
	}
	var msg string
	if isTable {
		msg = "unknown table " + ck.pos.table(strings.Join(key, "."))
	} else {
		msg = fmt.Sprintf("unknown key %q", name)
		if len(parent) > 0 {
			msg += " in " + ck.pos.table(strings.Join(parent, "."))
		}
	}
	switch s := suggest(name, candidates); {
	case s != "" && isTable:
		msg += fmt.Sprintf("; did you mean %s?", ck.pos.table(strings.Join(append(slices.Clip(parent), s), ".")))
	case s != "":
		msg += fmt.Sprintf("; did you mean %q?", s)
	case len(candidates) > 0:
		msg += "; the keys allowed here are " + strings.Join(candidates, ", ")
	}
	ck.errorAt(at, "%s", msg)
}

// typeAt returns the Go type decoded at key below root.
func typeAt(root reflect.Type, key []string, tag string) (reflect.Type, bool) {
	t := root
	for _, k := range key {
		switch t.Kind() {
		case reflect.Struct:
			f, ok := fieldByName(t, k, tag)
			if !ok {
				return nil, false
			}
			t = f.Type
		case reflect.Map:
			t = t.Elem()
		case reflect.Interface: // free-form, as in createOptions
			return t, true
		default:
			return nil, false
		}
	}
	return t, true
}

func tagName(f reflect.StructField, tag string) string {
	name, _, _ := strings.Cut(f.Tag.Get(tag), ",")
	return name
}

func fieldByName(t reflect.Type, name, tag string) (reflect.StructField, bool) {
	for f := range t.Fields() {
		if tagName(f, tag) == name {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

func fieldNames(t reflect.Type, tag string) []string {
	var names []string
	if t != nil && t.Kind() == reflect.Struct {
		for f := range t.Fields() {
			if n := tagName(f, tag); n != "" && n != "-" {
				names = append(names, n)
			}
		}
	}
	return names
}

// bareAssignment matches key = value with an unquoted word as the value.
var bareAssignment = regexp.MustCompile(`^\s*([A-Za-z0-9_\-."]+)\s*=\s*([A-Za-z0-9/][^\s"'#\[\]{},=]*)\s*(?:#.*)?$`)

// rawAssignment matches any single-line key = value.
var rawAssignment = regexp.MustCompile(`^\s*[A-Za-z0-9_\-."]+\s*=\s*([^#{\[]*?)\s*(?:#.*)?$`)

// SecretKeys name the config.toml values no message or support bundle may
// carry: keys (symmetric_key = "…" or { value = … }), connection strings
// and registry passwords, wherever they are written. (A bundle leaves out
// any string with a SharedAccessKey in it too, whatever its key is named.)
var SecretKeys = []string{"value", "symmetric_key", "connection_string", "device_connection_string", "password"}

// decodeError translates a TOML syntax or type error.
func (ck *checker) decodeError(data []byte, de *toml.DecodeError) error {
	line, col := de.Position()
	at := Pos{File: ck.pos.file, Line: line}
	msg := strings.TrimPrefix(de.Error(), "toml: ")
	text := lineAt(data, line)
	key := []string(de.Key())
	if len(key) == 0 { // a syntax error
		if m := bareAssignment.FindStringSubmatch(text); m != nil {
			k := strings.Trim(m[1], `"`)
			k = k[strings.LastIndexByte(k, '.')+1:]
			v := quote(canonical(k, m[2]))
			if slices.Contains(SecretKeys, k) {
				v = `"..."` // the key itself stays out of messages, which support bundles carry
			}
			return &Error{at, fmt.Sprintf("the value of %s must be quoted: %s = %s", k, m[1], v)}
		}
		at.Column = col
		return &Error{at, "invalid TOML: " + msg}
	}
	name := key[len(key)-1]
	t, ok := typeAt(configType, key, "toml")
	switch {
	case strings.Contains(msg, "already"): // go-toml: "key x is already defined", "... already exists"
		return &Error{at, fmt.Sprintf("%s is written twice: TOML allows each key and [table] once; remove or merge the second", name)}
	case !ok || !strings.Contains(msg, "cannot decode") && t != keyIndexType:
		return &Error{at, fmt.Sprintf("%s: %s", name, msg)}
	}
	want := describe(t)
	if m := rawAssignment.FindStringSubmatch(text); m != nil && t.Kind() == reflect.String {
		v := quote(strings.Trim(m[1], `'"`))
		if slices.Contains(SecretKeys, name) {
			v = `"..."` // as for a syntax error: a secret stays out of messages
		}
		want += fmt.Sprintf(": %s = %s", name, v)
	}
	return &Error{at, fmt.Sprintf("the value of %s must be %s", name, want)}
}

// describe says in words what TOML value decodes into t.
func describe(t reflect.Type) string {
	switch {
	case t == keyIndexType:
		return "an integer from 0 to 0x7F_FF_FF, such as 0x100"
	case t == mobyNetworkType: // a struct that also takes a string
		return `a network name (string) or a table with its name, such as [moby_runtime.network] name = "azure-iot-edge"`
	case t.Kind() == reflect.String:
		return "a quoted string"
	case t.Kind() == reflect.Bool:
		return "true or false, unquoted"
	case t.Kind() == reflect.Map && t.Elem().Kind() == reflect.String:
		return `a table of quoted strings, such as { NAME = "value" }`
	case t.Kind() == reflect.Struct:
		return "a table with the keys " + strings.Join(fieldNames(t, "toml"), ", ")
	}
	return "a table"
}

func lineAt(data []byte, line int) string {
	for i := 1; i < line; i++ {
		j := bytes.IndexByte(data, '\n')
		if j < 0 {
			return ""
		}
		data = data[j+1:]
	}
	if j := bytes.IndexByte(data, '\n'); j >= 0 {
		data = data[:j]
	}
	return string(bytes.TrimSuffix(data, []byte("\r")))
}

// canonical returns v as the accepted value it differs from only in case,
// for the keys that take one of a set of values.
func canonical(key, v string) string {
	for _, s := range enums[key] {
		if strings.EqualFold(s, v) {
			return s
		}
	}
	return v
}
