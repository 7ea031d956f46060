package query

import (
	"cmp"
	"encoding/json"
	"math"
	"slices"
	"strconv"
	"strings"
)

// kind is the JSON type of a value.
type kind uint8

const (
	kOther kind = iota // not a JSON value: never equal to anything
	kNull
	kBool
	kNumber
	kString
	kArray
	kObject
)

func kindOf(v any) kind {
	switch v := v.(type) {
	case nil:
		return kNull
	case bool:
		return kBool
	case string:
		return kString
	case float64, float32, int, int8, int16, int32, int64, uint, uint8, uint16, uint32, uint64:
		return kNumber
	case json.Number:
		if _, ok := toNumber(v); ok {
			return kNumber
		}
	case map[string]any:
		return kObject
	case []any:
		return kArray
	}
	return kOther
}

// toNumber converts any Go number (and json.Number) to float64. Twins hold
// json.Number or float64; the others are accepted so that hand-built
// documents behave too.
func toNumber(v any) (float64, bool) {
	switch n := v.(type) {
	case float64:
		return n, true
	case int:
		return float64(n), true
	case int64:
		return float64(n), true
	case float32:
		return float64(n), true
	case int8:
		return float64(n), true
	case int16:
		return float64(n), true
	case int32:
		return float64(n), true
	case uint:
		return float64(n), true
	case uint8:
		return float64(n), true
	case uint16:
		return float64(n), true
	case uint32:
		return float64(n), true
	case uint64:
		return float64(n), true
	case json.Number:
		f, err := strconv.ParseFloat(string(n), 64)
		return f, err == nil && !math.IsInf(f, 0) && !math.IsNaN(f)
	}
	return 0, false
}

// tri is a three-valued truth value: a comparison that involves an
// undefined value, or values of different types, is neither true nor false.
type tri uint8

const (
	tUndef tri = iota
	tFalse
	tTrue
)

func triOf(b bool) tri {
	if b {
		return tTrue
	}
	return tFalse
}

func (t tri) value() (any, bool) {
	switch t {
	case tTrue:
		return true, true
	case tFalse:
		return false, true
	}
	return nil, false
}

type cmpOp uint8

const (
	opEq cmpOp = iota
	opNe
	opLt
	opLe
	opGt
	opGe
)

var cmpOpText = [...]string{opEq: "=", opNe: "!=", opLt: "<", opLe: "<=", opGt: ">", opGe: ">="}

func ordered(op cmpOp, c int) tri {
	switch op {
	case opEq:
		return triOf(c == 0)
	case opNe:
		return triOf(c != 0)
	case opLt:
		return triOf(c < 0)
	case opLe:
		return triOf(c <= 0)
	case opGt:
		return triOf(c > 0)
	default:
		return triOf(c >= 0)
	}
}

// compare applies op to two defined values. Values of different JSON types
// are incomparable (tUndef), as are objects and arrays under ordering
// operators; = and != compare them deeply.
func compare(op cmpOp, a, b any) tri {
	switch x := a.(type) {
	case string:
		if y, ok := b.(string); ok {
			return ordered(op, strings.Compare(x, y))
		}
	case float64:
		if y, ok := b.(float64); ok {
			return ordered(op, cmp.Compare(x, y))
		}
	case json.Number: // a twin's number, compared with a constant
		if y, ok := b.(float64); ok {
			if x, ok := toNumber(x); ok {
				return ordered(op, cmp.Compare(x, y))
			}
		}
	}
	ka := kindOf(a)
	if ka != kindOf(b) {
		return tUndef
	}
	switch ka {
	case kNull:
		return ordered(op, 0)
	case kBool:
		return ordered(op, cmpBool(a.(bool), b.(bool)))
	case kNumber:
		x, _ := toNumber(a)
		y, _ := toNumber(b)
		return ordered(op, cmp.Compare(x, y))
	case kString:
		return ordered(op, strings.Compare(a.(string), b.(string)))
	case kArray, kObject:
		switch op {
		case opEq:
			return triOf(deepEqual(a, b))
		case opNe:
			return triOf(!deepEqual(a, b))
		}
	}
	return tUndef
}

func cmpBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	}
	return -1
}

// deepEqual is JSON equality: same type and same value, recursively.
func deepEqual(a, b any) bool {
	ka := kindOf(a)
	if ka != kindOf(b) {
		return false
	}
	switch ka {
	case kNull:
		return true
	case kBool:
		return a.(bool) == b.(bool)
	case kNumber:
		x, _ := toNumber(a)
		y, _ := toNumber(b)
		return x == y
	case kString:
		return a.(string) == b.(string)
	case kArray:
		x, y := a.([]any), b.([]any)
		if len(x) != len(y) {
			return false
		}
		for i := range x {
			if !deepEqual(x[i], y[i]) {
				return false
			}
		}
		return true
	case kObject:
		x, y := a.(map[string]any), b.(map[string]any)
		if len(x) != len(y) {
			return false
		}
		for k, xv := range x {
			yv, ok := y[k]
			if !ok || !deepEqual(xv, yv) {
				return false
			}
		}
		return true
	}
	return false
}

// appendKey appends an encoding of v that is equal for two values exactly
// when deepEqual holds; GROUP BY uses it as a map key.
func appendKey(b []byte, v any) []byte {
	switch k := kindOf(v); k {
	case kNull:
		return append(b, 'n')
	case kBool:
		if v.(bool) {
			return append(b, 't')
		}
		return append(b, 'f')
	case kNumber:
		f, _ := toNumber(v)
		if f == 0 {
			f = 0 // -0 groups with 0
		}
		b = append(b, 'd')
		b = strconv.AppendFloat(b, f, 'g', -1, 64)
		return append(b, ';')
	case kString:
		s := v.(string)
		b = append(b, 's')
		b = strconv.AppendInt(b, int64(len(s)), 10)
		b = append(b, ':')
		return append(b, s...)
	case kArray:
		b = append(b, '[')
		for _, e := range v.([]any) {
			b = appendKey(b, e)
		}
		return append(b, ']')
	case kObject:
		m := v.(map[string]any)
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		b = append(b, '{')
		for _, k := range keys {
			b = appendKey(b, k)
			b = appendKey(b, m[k])
		}
		return append(b, '}')
	}
	// Not a JSON value (documents decoded by encoding/json hold none):
	// they share one group.
	return append(b, 'x')
}

// typeRank orders values of different types for MIN and MAX:
// null < booleans < numbers < strings.
func typeRank(k kind) int {
	switch k {
	case kNull:
		return 0
	case kBool:
		return 1
	case kNumber:
		return 2
	case kString:
		return 3
	}
	return -1
}

// finite boxes f, or reports undefined for NaN and infinities, which JSON
// cannot carry.
func finite(f float64) (any, bool) {
	if math.IsInf(f, 0) || math.IsNaN(f) {
		return nil, false
	}
	return f, true
}
