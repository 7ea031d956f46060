package query

import (
	"math"
	"strconv"
	"strings"
)

// node is a scalar expression. eval returns the value of the expression
// for one document, and false when the value is undefined (a missing
// property, a comparison of different types, a function given arguments of
// the wrong type...). A defined nil is JSON null.
//
// Conditions are scalar expressions too: a document matches when its
// condition evaluates to exactly true.
type node interface {
	eval(doc map[string]any) (any, bool)
	prec() int // binding strength, for printing with minimal parentheses
	write(w *writer)
}

// Precedence levels, loosest first.
const (
	precOr = iota + 1
	precAnd
	precNot
	precCmp
	precAdd
	precMul
	precUnary
	precPrimary
)

// lit is a constant: a string, float64, bool, nil or []any of constants.
type lit struct{ v any }

func (n *lit) eval(map[string]any) (any, bool) { return n.v, true }
func (n *lit) prec() int                       { return precPrimary }

// seg is one step of a property path: a key of an object, or an index into
// an array.
type seg struct {
	key   string
	idx   int
	isIdx bool
}

// path is a property path such as properties.reported.$version or
// tags['my key'][0]. The first skip segments are the collection prefix
// (devices. or devices.modules.), kept only for printing.
type path struct {
	segs []seg
	skip int
}

func (n *path) prec() int { return precPrimary }

func (n *path) eval(doc map[string]any) (any, bool) {
	segs := n.segs[n.skip:]
	s := segs[0]
	if s.isIdx {
		return nil, false
	}
	cur, ok := doc[s.key]
	if !ok {
		return nil, false
	}
	for _, s := range segs[1:] {
		switch c := cur.(type) {
		case map[string]any:
			if s.isIdx {
				return nil, false
			}
			if cur, ok = c[s.key]; !ok {
				return nil, false
			}
		case []any:
			if !s.isIdx || s.idx >= len(c) {
				return nil, false
			}
			cur = c[s.idx]
		default:
			return nil, false
		}
	}
	return cur, true
}

// name is the column name a projection of the path gets: its last key.
func (n *path) name() string {
	last := n.segs[len(n.segs)-1]
	if last.isIdx {
		return ""
	}
	return last.key
}

type notNode struct{ x node }

func (n *notNode) prec() int { return precNot }

func (n *notNode) eval(doc map[string]any) (any, bool) {
	v, _ := n.x.eval(doc)
	if b, ok := v.(bool); ok {
		return !b, true
	}
	return nil, false
}

// andNode is a chain a AND b AND ...: false if any operand is false, true
// if all are true, otherwise undefined.
type andNode struct{ xs []node }

func (n *andNode) prec() int { return precAnd }

func (n *andNode) eval(doc map[string]any) (any, bool) {
	undef := false
	for _, x := range n.xs {
		v, _ := x.eval(doc)
		b, ok := v.(bool)
		if !ok {
			undef = true
		} else if !b {
			return false, true
		}
	}
	if undef {
		return nil, false
	}
	return true, true
}

// orNode is a chain a OR b OR ...: true if any operand is true, false if
// all are false, otherwise undefined.
type orNode struct{ xs []node }

func (n *orNode) prec() int { return precOr }

func (n *orNode) eval(doc map[string]any) (any, bool) {
	undef := false
	for _, x := range n.xs {
		v, _ := x.eval(doc)
		b, ok := v.(bool)
		if !ok {
			undef = true
		} else if b {
			return true, true
		}
	}
	if undef {
		return nil, false
	}
	return false, true
}

type cmpNode struct {
	op   cmpOp
	l, r node
}

func (n *cmpNode) prec() int { return precCmp }

func (n *cmpNode) eval(doc map[string]any) (any, bool) {
	a, ok := n.l.eval(doc)
	if !ok {
		return nil, false
	}
	b, ok := n.r.eval(doc)
	if !ok {
		return nil, false
	}
	return compare(n.op, a, b).value()
}

// inNode is x IN [c1, c2, ...], which means x = c1 OR x = c2 OR ..., or
// with neg, x NIN [...] which means NOT (x IN [...]).
type inNode struct {
	x    node
	list []any
	set  map[string]struct{} // when every constant is a string and there are many
	neg  bool
}

func (n *inNode) prec() int { return precCmp }

func (n *inNode) eval(doc map[string]any) (any, bool) {
	v, ok := n.x.eval(doc)
	if !ok {
		return nil, false
	}
	r := n.match(v)
	if n.neg && r != tUndef {
		r = tTrue + tFalse - r
	}
	return r.value()
}

func (n *inNode) match(v any) tri {
	if len(n.list) == 0 {
		return tFalse
	}
	if n.set != nil {
		s, ok := v.(string)
		if !ok {
			return tUndef
		}
		_, found := n.set[s]
		return triOf(found)
	}
	r := tUndef
	for _, c := range n.list {
		switch compare(opEq, v, c) {
		case tTrue:
			return tTrue
		case tFalse:
			r = tFalse
		}
	}
	return r
}

// arithNode is + - * / % on numbers; anything else, division by zero and
// results JSON cannot hold are undefined.
type arithNode struct {
	op   byte
	l, r node
}

func (n *arithNode) prec() int {
	if n.op == '+' || n.op == '-' {
		return precAdd
	}
	return precMul
}

func (n *arithNode) eval(doc map[string]any) (any, bool) {
	a, ok := n.l.eval(doc)
	if !ok {
		return nil, false
	}
	b, ok := n.r.eval(doc)
	if !ok {
		return nil, false
	}
	x, ok := toNumber(a)
	if !ok {
		return nil, false
	}
	y, ok := toNumber(b)
	if !ok {
		return nil, false
	}
	switch n.op {
	case '+':
		return finite(x + y)
	case '-':
		return finite(x - y)
	case '*':
		return finite(x * y)
	case '/':
		if y == 0 {
			return nil, false
		}
		return finite(x / y)
	default:
		if y == 0 {
			return nil, false
		}
		return finite(math.Mod(x, y))
	}
}

// negNode is unary minus of a non-constant.
type negNode struct{ x node }

func (n *negNode) prec() int { return precUnary }

func (n *negNode) eval(doc map[string]any) (any, bool) {
	v, ok := n.x.eval(doc)
	if !ok {
		return nil, false
	}
	if f, ok := toNumber(v); ok {
		return -f, true
	}
	return nil, false
}

// writer prints expressions back as query text. With canonical set,
// paths are printed without their collection prefix, so that two spellings
// of one property print alike.
type writer struct {
	strings.Builder
	canonical bool
}

// sub writes x, parenthesized if it binds more loosely than min.
func (w *writer) sub(x node, min int) {
	if x.prec() < min {
		w.WriteByte('(')
		x.write(w)
		w.WriteByte(')')
		return
	}
	x.write(w)
}

func (n *lit) write(w *writer) { writeConst(w, n.v) }

func writeConst(w *writer, v any) {
	switch v := v.(type) {
	case nil:
		w.WriteString("null")
	case bool:
		w.WriteString(strconv.FormatBool(v))
	case float64:
		w.WriteString(strconv.FormatFloat(v, 'g', -1, 64))
	case string:
		writeQuoted(&w.Builder, v)
	case []any:
		w.WriteByte('[')
		for i, e := range v {
			if i > 0 {
				w.WriteString(", ")
			}
			writeConst(w, e)
		}
		w.WriteByte(']')
	}
}

func (n *path) write(w *writer) {
	segs := n.segs
	if w.canonical {
		segs = segs[n.skip:]
	}
	for i, s := range segs {
		switch {
		case s.isIdx:
			w.WriteByte('[')
			w.WriteString(strconv.Itoa(s.idx))
			w.WriteByte(']')
		case i == 0 && !isReserved(s.key) && isIdent(s.key):
			w.WriteString(s.key)
		case i > 0 && isIdent(s.key):
			w.WriteByte('.')
			w.WriteString(s.key)
		default:
			// Only reachable with canonical printing of an odd prefixed
			// path such as devices['my key']; the text is then a key, not
			// a query.
			w.WriteByte('[')
			writeQuoted(&w.Builder, s.key)
			w.WriteByte(']')
		}
	}
}

func (n *notNode) write(w *writer) {
	w.WriteString("NOT ")
	w.sub(n.x, precNot)
}

func (n *andNode) write(w *writer) {
	for i, x := range n.xs {
		if i > 0 {
			w.WriteString(" AND ")
		}
		w.sub(x, precNot)
	}
}

func (n *orNode) write(w *writer) {
	for i, x := range n.xs {
		if i > 0 {
			w.WriteString(" OR ")
		}
		w.sub(x, precAnd)
	}
}

func (n *cmpNode) write(w *writer) {
	w.sub(n.l, precAdd)
	w.WriteByte(' ')
	w.WriteString(cmpOpText[n.op])
	w.WriteByte(' ')
	w.sub(n.r, precAdd)
}

func (n *inNode) write(w *writer) {
	w.sub(n.x, precAdd)
	if n.neg {
		w.WriteString(" NIN ")
	} else {
		w.WriteString(" IN ")
	}
	writeConst(w, n.list)
}

func (n *arithNode) write(w *writer) {
	p := n.prec()
	w.sub(n.l, p)
	w.WriteByte(' ')
	w.WriteByte(n.op)
	w.WriteByte(' ')
	w.sub(n.r, p+1)
}

func (n *negNode) write(w *writer) {
	w.WriteByte('-')
	w.sub(n.x, precUnary)
}

func exprString(x node, canonical bool) string {
	w := &writer{canonical: canonical}
	x.write(w)
	return w.String()
}
