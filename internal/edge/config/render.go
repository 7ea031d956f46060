package config

import (
	"bytes"
	"encoding"
	"fmt"
	"maps"
	"reflect"
	"regexp"
	"slices"
	"strings"

	"github.com/pelletier/go-toml/v2"
)

// TOML renders c as a config.toml that Parse reads back to an equal Config:
// keys in a fixed order, settings equal to their defaults left out, and a
// comment above each table.
func (c *Config) TOML() []byte {
	var b bytes.Buffer
	b.WriteString("# Edge runtime configuration. Apply changes with: sudo iotedge config apply\n")
	renderTable(&b, "", "", reflect.ValueOf(*c), reflect.ValueOf(*Default()))
	return b.Bytes()
}

// TPMDConfig renders what aziot-tpmd reads of c, as a config.toml of its
// own: the [tpm] table, and whether provisioning uses the TPM at all.
// Nothing in it is secret, so that aziot-tpmd need not read config.toml,
// which may hold the device's keys. source names the file it comes from.
func (c *Config) TPMDConfig(source string) []byte {
	var cut Config
	cut.Provisioning.Source = c.Provisioning.Source
	cut.Provisioning.Attestation.Method = c.Provisioning.Attestation.Method
	cut.TPM = c.TPM
	var b bytes.Buffer
	fmt.Fprintf(&b, "# aziot-tpmd's settings, from %s: change them there, then run sudo iotedge config apply\n", source)
	// Against an empty configuration, so that defaults are written too.
	renderTable(&b, "", "", reflect.ValueOf(cut), reflect.ValueOf(Config{}))
	return b.Bytes()
}

// Used is c without the settings Hatchery does not use (unused), which a
// 1.1 config.yaml had to have: written into config.toml, they would be
// warned of at every apply.
func (c *Config) Used() *Config {
	used, def := *c, Default()
	used.Hostname, used.Homedir, used.Agent, used.Connect, used.Listen = def.Hostname, def.Homedir, def.Agent, def.Connect, def.Listen
	return &used
}

// renderTable writes the keys of the struct v that differ from def, then its
// sub-tables. A table with no keys of its own gets no header.
func renderTable(b *bytes.Buffer, path, comment string, v, def reflect.Value) {
	var keys bytes.Buffer
	var tables []func()
	for f, fv := range v.Fields() {
		name, opts, _ := strings.Cut(f.Tag.Get("toml"), ",")
		dv, sub, subComment := def.FieldByIndex(f.Index), join(path, name), f.Tag.Get("comment")
		switch {
		case reflect.DeepEqual(fv.Interface(), dv.Interface()):
		case f.Type.Kind() == reflect.Struct && opts != "inline":
			tables = append(tables, func() { renderTable(b, sub, subComment, fv, dv) })
		case f.Type.Kind() == reflect.Map && f.Type.Elem().Kind() == reflect.String:
			tables = append(tables, func() { renderStrings(b, sub, fv.Interface().(map[string]string)) })
		default:
			if subComment != "" {
				fmt.Fprintf(&keys, "# %s\n", subComment)
			}
			fmt.Fprintf(&keys, "%s = %s\n", key(name), value(fv))
		}
	}
	if keys.Len() > 0 {
		header(b, path, comment)
		b.Write(keys.Bytes())
	}
	for _, t := range tables {
		t()
	}
}

// renderStrings writes a table of strings, such as [agent.env].
func renderStrings(b *bytes.Buffer, path string, m map[string]string) {
	header(b, path, "")
	for _, k := range slices.Sorted(maps.Keys(m)) {
		fmt.Fprintf(b, "%s = %s\n", key(k), quote(m[k]))
	}
}

func header(b *bytes.Buffer, path, comment string) {
	if path == "" {
		return
	}
	b.WriteString("\n")
	if comment != "" {
		fmt.Fprintf(b, "# %s\n", comment)
	}
	fmt.Fprintf(b, "[%s]\n", path)
}

func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

var bareKey = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

func key(k string) string {
	if bareKey.MatchString(k) {
		return k
	}
	return quote(k)
}

// value renders a TOML value: strings as basic strings, like Azure's
// template, inline structs field by field, and anything else (the free-form
// createOptions) by go-toml as an inline value.
func value(v reflect.Value) string {
	switch {
	case v.Type() == reflect.TypeFor[KeyIndex]():
		return fmt.Sprintf("0x%X", v.Uint())
	case v.Type().Implements(reflect.TypeFor[encoding.TextMarshaler]()):
		b, _ := v.Interface().(encoding.TextMarshaler).MarshalText()
		return quote(string(b))
	case v.Kind() == reflect.String:
		return quote(v.String())
	case v.Kind() == reflect.Struct:
		var parts []string
		for f, fv := range v.Fields() {
			if !fv.IsZero() {
				parts = append(parts, tagName(f, "toml")+" = "+value(fv))
			}
		}
		return "{ " + strings.Join(parts, ", ") + " }"
	}
	out, err := toml.Marshal(struct {
		V any `toml:"v,inline"`
	}{v.Interface()})
	if err != nil { // Parse only yields values go-toml can write
		panic(fmt.Sprintf("config: rendering %v: %v", v, err))
	}
	return strings.TrimSuffix(strings.TrimPrefix(string(out), "v = "), "\n")
}

// quote writes s as a TOML basic string.
func quote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\t':
			b.WriteString(`\t`)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, `\u%04X`, r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}
