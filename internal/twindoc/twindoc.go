// Package twindoc holds IoT Hub's rules for the documents of a twin — tags,
// desired and reported properties: which property names it accepts, how
// deep objects nest, how long strings are, how large each document may
// grow, how patches merge into them, and how they are decoded so that
// numbers keep every digit (Unmarshal). The hub enforces them on every
// write from a client, the provisioning service on an enrollment's initial
// twin.
package twindoc

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Size limits of the hosted hub, counted as size counts.
const (
	TagsLimit       = 8 << 10
	PropertiesLimit = 32 << 10
)

const (
	maxDepth  = 10
	maxName   = 1 << 10
	maxString = 4 << 10
	// maxNumber bounds a number's text, kept as written though size
	// counts it as 8 bytes, so that what is stored stays near what is
	// counted; it is far more than any double or 64-bit integer needs.
	maxNumber = 64
)

// Unmarshal is json.Unmarshal, except that numbers in values of type any —
// a twin's tags and properties — are json.Number: kept as written, where
// float64 would change integers beyond 2^53.
func Unmarshal(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	err := dec.Decode(v)
	if err == nil && len(bytes.TrimLeft(data[dec.InputOffset():], " \t\r\n")) == 0 {
		return nil
	}
	if !json.Valid(data) {
		return json.Unmarshal(data, v) // its syntax error, and it leaves v alone
	}
	return err
}

// Check validates a document or a patch of one that a client wrote; where
// names it in errors ("tags", "properties.desired").
func Check(where string, doc map[string]any) error { return check(where, doc, 1) }

// CheckValue validates one value of a document, at where, as Check does
// those of a whole one.
func CheckValue(where string, v any) error { return checkValue(where, v, 1) }

func check(where string, m map[string]any, depth int) error {
	if depth > maxDepth {
		return deepErr(where)
	}
	for _, k := range slices.Sorted(maps.Keys(m)) {
		if err := CheckName(k); err != nil {
			return fmt.Errorf("%s: property name %q %v", where, k, err)
		}
		if err := checkValue(where+"."+k, m[k], depth); err != nil {
			return err
		}
	}
	return nil
}

func checkValue(where string, v any, depth int) error {
	switch v := v.(type) {
	case map[string]any:
		return check(where, v, depth+1)
	case []any:
		// An array is a level too: arrays in arrays would otherwise nest
		// without bound, past what the store can decode again.
		if depth+1 > maxDepth {
			return deepErr(where)
		}
		for i, e := range v {
			if err := checkValue(fmt.Sprintf("%s[%d]", where, i), e, depth+1); err != nil {
				return err
			}
		}
	case string:
		if len(v) > maxString {
			return fmt.Errorf("%s is a string of %d bytes: twin strings hold at most %d", where, len(v), maxString)
		}
	case json.Number:
		if len(v) > maxNumber {
			return fmt.Errorf("%s is a number written in %d characters: twin numbers take at most %d", where, len(v), maxNumber)
		}
		// Queries compare numbers as doubles: one beyond them is refused.
		if _, err := strconv.ParseFloat(string(v), 64); err != nil {
			return fmt.Errorf("%s is %s, beyond the numbers twins hold (about ±1.8e308)", where, v)
		}
	}
	return nil
}

func deepErr(where string) error {
	return fmt.Errorf("%s nests objects and arrays deeper than %d levels", where, maxDepth)
}

// CheckName is nil when IoT Hub accepts name as a property name, else says
// why not.
func CheckName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("is empty")
	case len(name) > maxName:
		return fmt.Errorf("is longer than %d bytes", maxName)
	case !utf8.ValidString(name):
		return fmt.Errorf("is not UTF-8")
	case strings.ContainsAny(name, ". $"):
		return fmt.Errorf("contains '.', '$' or a space, which twin property names cannot")
	case strings.ContainsFunc(name, isControl):
		return fmt.Errorf("contains a control character")
	}
	return nil
}

// isControl is a Unicode control character of the C0 or C1 set.
func isControl(r rune) bool { return r < 0x20 || r >= 0x7f && r <= 0x9f }

// size counts a document as the hosted hub does against its limits: each
// property's name and value, strings by their UTF-8 bytes, numbers as 8
// bytes and booleans as 4, objects and arrays by what they hold. Each
// array element and null counts at least one byte, so that a document of
// empty arrays cannot grow without bound while counting nothing.
func size(doc map[string]any) int {
	n := 0
	for k, v := range doc {
		n += len(k) + valueSize(v)
	}
	return n
}

func valueSize(v any) int {
	switch v := v.(type) {
	case map[string]any:
		return size(v)
	case []any:
		n := 0
		for _, e := range v {
			n += max(valueSize(e), 1)
		}
		return n
	case string:
		return len(v)
	case bool:
		return 4
	case nil:
		return 1
	}
	return 8 // a number
}

// CheckDocument is Check and CheckSize of a whole document written at once,
// such as an initial twin or a deployment's module content.
func CheckDocument(where string, doc map[string]any, limit int) error {
	if err := Check(where, doc); err != nil {
		return err
	}
	return CheckSize(where, doc, limit)
}

// CheckSize is nil when doc, the whole document where names, fits limit.
func CheckSize(where string, doc map[string]any, limit int) error {
	if n := size(doc); n > limit {
		return fmt.Errorf("%s would be %d bytes, and IoT Hub holds at most %d (%d KiB)", where, n, limit, limit>>10)
	}
	return nil
}

// WithoutMeta is a property document without the read-only $version and
// $metadata that a twin read carries and a client may echo back.
func WithoutMeta(m map[string]any) map[string]any {
	out := maps.Clone(m)
	delete(out, "$version")
	delete(out, "$metadata")
	return out
}

// ReplacePatch is the merge patch that turns old into new: new's values,
// and null for whatever old has that new does not, at any depth — devices
// merge the patches they hear, so a replaced document must say what went.
func ReplacePatch(old, new map[string]any) map[string]any {
	p := maps.Clone(new)
	if p == nil {
		p = map[string]any{}
	}
	for k, ov := range old {
		nv, ok := new[k]
		if !ok {
			p[k] = nil
			continue
		}
		om, oldIsObject := ov.(map[string]any)
		nm, newIsObject := nv.(map[string]any)
		if oldIsObject && newIsObject {
			p[k] = ReplacePatch(om, nm)
		}
	}
	return p
}

// Merge applies a JSON merge patch (RFC 7386) to dst: null removes a key.
func Merge(dst, patch map[string]any) {
	for k, v := range patch {
		switch pv := v.(type) {
		case nil:
			delete(dst, k)
		case map[string]any:
			sub, ok := dst[k].(map[string]any)
			if !ok {
				sub = map[string]any{}
			}
			Merge(sub, pv)
			dst[k] = sub
		default:
			dst[k] = v
		}
	}
}
