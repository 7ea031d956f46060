package query

import (
	"math"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

type fnID uint8

const (
	fnIsDefined fnID = iota
	fnIsNull
	fnIsBool
	fnIsNumber
	fnIsString
	fnIsObject
	fnIsArray
	fnIsPrimitive
	fnStartsWith
	fnEndsWith
	fnContains
	fnIndexOf
	fnLower
	fnUpper
	fnLength
	fnSubstring
	fnConcat
	fnLtrim
	fnRtrim
	fnTrim
	fnArrayContains
	fnArrayLength
	fnAbs
	fnCeiling
	fnFloor
	fnRound
	fnSign
	fnSqrt
	fnSquare
	fnPower
	fnExp
	fnAsNumber

	// Aggregates: only whole SELECT items.
	fnCount
	fnSum
	fnAvg
	fnMin
	fnMax
)

type fnDef struct {
	name     string
	id       fnID
	min, max int // number of arguments; max < 0 means any number
}

func (f *fnDef) aggregate() bool { return f.id >= fnCount }

// maxFixedArgs is the most arguments a function other than CONCAT takes.
const maxFixedArgs = 3

var functions = map[string]*fnDef{}

func init() {
	for _, f := range []fnDef{
		{"IS_DEFINED", fnIsDefined, 1, 1},
		{"IS_NULL", fnIsNull, 1, 1},
		{"IS_BOOL", fnIsBool, 1, 1},
		{"IS_NUMBER", fnIsNumber, 1, 1},
		{"IS_STRING", fnIsString, 1, 1},
		{"IS_OBJECT", fnIsObject, 1, 1},
		{"IS_ARRAY", fnIsArray, 1, 1},
		{"IS_PRIMITIVE", fnIsPrimitive, 1, 1},
		{"STARTSWITH", fnStartsWith, 2, 3},
		{"STARTS_WITH", fnStartsWith, 2, 3},
		{"ENDSWITH", fnEndsWith, 2, 3},
		{"ENDS_WITH", fnEndsWith, 2, 3},
		{"CONTAINS", fnContains, 2, 3},
		{"INDEX_OF", fnIndexOf, 2, 2},
		{"LOWER", fnLower, 1, 1},
		{"UPPER", fnUpper, 1, 1},
		{"LENGTH", fnLength, 1, 1},
		{"SUBSTRING", fnSubstring, 3, 3},
		{"CONCAT", fnConcat, 2, -1},
		{"LTRIM", fnLtrim, 1, 1},
		{"RTRIM", fnRtrim, 1, 1},
		{"TRIM", fnTrim, 1, 1},
		{"ARRAY_CONTAINS", fnArrayContains, 2, 3},
		{"ARRAY_LENGTH", fnArrayLength, 1, 1},
		{"ABS", fnAbs, 1, 1},
		{"CEILING", fnCeiling, 1, 1},
		{"FLOOR", fnFloor, 1, 1},
		{"ROUND", fnRound, 1, 1},
		{"SIGN", fnSign, 1, 1},
		{"SQRT", fnSqrt, 1, 1},
		{"SQUARE", fnSquare, 1, 1},
		{"POWER", fnPower, 2, 2},
		{"EXP", fnExp, 1, 1},
		{"AS_NUMBER", fnAsNumber, 1, 1},
		{"COUNT", fnCount, 0, 1},
		{"SUM", fnSum, 1, 1},
		{"AVG", fnAvg, 1, 1},
		{"MIN", fnMin, 1, 1},
		{"MAX", fnMax, 1, 1},
	} {
		functions[f.name] = &f
	}
}

func lookupFunction(name string) *fnDef {
	if len(name) > len("ARRAY_CONTAINS") {
		return nil
	}
	return functions[strings.ToUpper(name)]
}

// callNode is a call of a scalar function. Functions given arguments of
// the wrong type are undefined; the IS_ functions are always true or false.
type callNode struct {
	fn   *fnDef
	args []node
}

func (n *callNode) prec() int { return precPrimary }

func (n *callNode) write(w *writer) {
	w.WriteString(n.fn.name)
	w.WriteByte('(')
	for i, a := range n.args {
		if i > 0 {
			w.WriteString(", ")
		}
		w.sub(a, precOr)
	}
	w.WriteByte(')')
}

func (n *callNode) eval(doc map[string]any) (any, bool) {
	if n.fn.id == fnConcat {
		var b strings.Builder
		for _, x := range n.args {
			v, _ := x.eval(doc)
			s, ok := v.(string)
			if !ok {
				return nil, false
			}
			b.WriteString(s)
		}
		return b.String(), true
	}
	var a [maxFixedArgs]any
	var def [maxFixedArgs]bool
	for i, x := range n.args {
		a[i], def[i] = x.eval(doc)
	}
	switch n.fn.id {
	case fnIsDefined:
		return def[0], true
	case fnIsNull:
		return def[0] && a[0] == nil, true
	case fnIsBool:
		return def[0] && kindOf(a[0]) == kBool, true
	case fnIsNumber:
		return def[0] && kindOf(a[0]) == kNumber, true
	case fnIsString:
		return def[0] && kindOf(a[0]) == kString, true
	case fnIsObject:
		return def[0] && kindOf(a[0]) == kObject, true
	case fnIsArray:
		return def[0] && kindOf(a[0]) == kArray, true
	case fnIsPrimitive:
		k := kindOf(a[0])
		return def[0] && (k == kNull || k == kBool || k == kNumber || k == kString), true

	case fnStartsWith, fnEndsWith, fnContains:
		s, ok1 := a[0].(string)
		sub, ok2 := a[1].(string)
		if !ok1 || !ok2 {
			return nil, false
		}
		if len(n.args) == 3 {
			fold, ok := a[2].(bool)
			if !ok {
				return nil, false
			}
			if fold {
				s, sub = strings.ToLower(s), strings.ToLower(sub)
			}
		}
		switch n.fn.id {
		case fnStartsWith:
			return strings.HasPrefix(s, sub), true
		case fnEndsWith:
			return strings.HasSuffix(s, sub), true
		}
		return strings.Contains(s, sub), true
	case fnIndexOf:
		s, ok1 := a[0].(string)
		sub, ok2 := a[1].(string)
		if !ok1 || !ok2 {
			return nil, false
		}
		i := strings.Index(s, sub)
		if i < 0 {
			return float64(-1), true
		}
		return float64(utf8.RuneCountInString(s[:i])), true
	case fnLower, fnUpper, fnLength, fnLtrim, fnRtrim, fnTrim:
		s, ok := a[0].(string)
		if !ok {
			return nil, false
		}
		switch n.fn.id {
		case fnLower:
			return strings.ToLower(s), true
		case fnUpper:
			return strings.ToUpper(s), true
		case fnLength:
			return float64(utf8.RuneCountInString(s)), true
		case fnLtrim:
			return strings.TrimLeftFunc(s, unicode.IsSpace), true
		case fnRtrim:
			return strings.TrimRightFunc(s, unicode.IsSpace), true
		}
		return strings.TrimSpace(s), true
	case fnSubstring:
		s, ok := a[0].(string)
		start, ok1 := toNumber(a[1])
		length, ok2 := toNumber(a[2])
		if !ok || !ok1 || !ok2 {
			return nil, false
		}
		return substring(s, start, length), true

	case fnArrayContains:
		arr, ok := a[0].([]any)
		if !ok || !def[1] {
			return nil, false
		}
		partial := false
		if len(n.args) == 3 {
			if partial, ok = a[2].(bool); !ok {
				return nil, false
			}
		}
		for _, e := range arr {
			if deepEqual(e, a[1]) || partial && partialMatch(e, a[1]) {
				return true, true
			}
		}
		return false, true
	case fnArrayLength:
		arr, ok := a[0].([]any)
		if !ok {
			return nil, false
		}
		return float64(len(arr)), true

	case fnAsNumber:
		if s, ok := a[0].(string); ok {
			s = strings.TrimSpace(s)
			if !isJSONNumber(s) {
				return nil, false
			}
			f, err := strconv.ParseFloat(s, 64)
			if err != nil {
				return nil, false
			}
			return finite(f)
		}
	}

	// Numeric functions.
	x, ok := toNumber(a[0])
	if !ok {
		return nil, false
	}
	switch n.fn.id {
	case fnAbs:
		return math.Abs(x), true
	case fnCeiling:
		return math.Ceil(x), true
	case fnFloor:
		return math.Floor(x), true
	case fnRound:
		return math.Round(x), true
	case fnSign:
		switch {
		case x > 0:
			return float64(1), true
		case x < 0:
			return float64(-1), true
		}
		return float64(0), true
	case fnSqrt:
		return finite(math.Sqrt(x))
	case fnSquare:
		return finite(x * x)
	case fnExp:
		return finite(math.Exp(x))
	case fnPower:
		y, ok := toNumber(a[1])
		if !ok {
			return nil, false
		}
		return finite(math.Pow(x, y))
	case fnAsNumber:
		return x, true
	}
	return nil, false
}

// substring is SUBSTRING(s, start, length), counting characters from 0.
func substring(s string, start, length float64) string {
	n := float64(utf8.RuneCountInString(s))
	start = math.Trunc(start)
	length = math.Trunc(length)
	if start < 0 {
		start = 0
	}
	if start >= n || length <= 0 {
		return ""
	}
	end := min(start+length, n)
	from, to := int(start), int(end)
	i, bs, be := 0, len(s), len(s)
	for off := range s {
		if i == from {
			bs = off
		}
		if i == to {
			be = off
			break
		}
		i++
	}
	return s[bs:be]
}

// partialMatch reports whether element e contains every field of the
// object v (ARRAY_CONTAINS with partial matching).
func partialMatch(e, v any) bool {
	em, ok1 := e.(map[string]any)
	vm, ok2 := v.(map[string]any)
	if !ok1 || !ok2 {
		return false
	}
	for k, vv := range vm {
		ev, ok := em[k]
		if !ok || !deepEqual(ev, vv) {
			return false
		}
	}
	return true
}

// isJSONNumber reports whether s is a number in JSON syntax.
func isJSONNumber(s string) bool {
	i := 0
	if i < len(s) && s[i] == '-' {
		i++
	}
	digits := func() bool {
		j := i
		for i < len(s) && isDigit(s[i]) {
			i++
		}
		return i > j
	}
	if !digits() {
		return false
	}
	if i < len(s) && s[i] == '.' {
		i++
		if !digits() {
			return false
		}
	}
	if i < len(s) && (s[i] == 'e' || s[i] == 'E') {
		i++
		if i < len(s) && (s[i] == '+' || s[i] == '-') {
			i++
		}
		if !digits() {
			return false
		}
	}
	return i == len(s)
}
