package query

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"unicode/utf8"
)

const (
	// MaxLength is the longest query or condition accepted, in bytes.
	MaxLength = 8 << 10
	// MaxDepth is the deepest nesting of parentheses, NOT, unary minus,
	// function calls and array constants accepted.
	MaxDepth = 64
)

// Collections a query can range over.
const (
	Devices = "devices"
	Modules = "devices.modules"
)

// Error is a query that cannot be parsed. Line and Column (1-based,
// counting characters) locate the problem; they are 0 when the problem is
// with the query as a whole.
type Error struct {
	Line, Column int
	Msg          string
}

func (e *Error) Error() string {
	switch {
	case e.Column == 0:
		return "query: " + e.Msg
	case e.Line > 1:
		return fmt.Sprintf("query: at line %d, column %d: %s", e.Line, e.Column, e.Msg)
	}
	return fmt.Sprintf("query: at column %d: %s", e.Column, e.Msg)
}

// errorAt builds an Error for the byte offset pos of src.
func errorAt(src string, pos int, format string, args ...any) *Error {
	pos = min(max(pos, 0), len(src))
	before := src[:pos]
	lineStart := strings.LastIndexByte(before, '\n') + 1
	return &Error{
		Line:   1 + strings.Count(before, "\n"),
		Column: utf8.RuneCountInString(before[lineStart:]) + 1,
		Msg:    fmt.Sprintf(format, args...),
	}
}

type parser struct {
	src   string
	toks  []token
	i     int
	depth int
	paths []*path // every path parsed, for stripping the collection prefix
}

func newParser(src string) (*parser, *Error) {
	if len(src) > MaxLength {
		return nil, &Error{Msg: fmt.Sprintf("query is %d bytes long; the limit is %d", len(src), MaxLength)}
	}
	toks, err := lex(src)
	if err != nil {
		return nil, err
	}
	return &parser{src: src, toks: toks}, nil
}

func (p *parser) peek() token { return p.toks[p.i] }

func (p *parser) next() token {
	t := p.toks[p.i]
	if t.kind != tEOF {
		p.i++
	}
	return t
}

// after names the token before the current one, for "expected X after Y".
func (p *parser) after() string {
	if p.i == 0 {
		return ""
	}
	t := p.toks[p.i-1]
	if t.kind == tIdent && isReserved(t.text) {
		return " after '" + strings.ToUpper(t.text) + "'"
	}
	return " after " + t.describe()
}

func (p *parser) errHere(format string, args ...any) *Error {
	return errorAt(p.src, p.peek().pos, format, args...)
}

// expected reports that what was expected at the current token.
func (p *parser) expected(what string) *Error {
	return p.errHere("expected %s%s but found %s", what, p.after(), p.peek().describe())
}

// expectedCloser reports a missing delimiter or separator.
func (p *parser) expectedCloser(what string) *Error {
	return p.errHere("expected %s but found %s", what, p.peek().describe())
}

// enter starts a nested construct opened by the token at pos.
func (p *parser) enter(pos int) *Error {
	p.depth++
	if p.depth > MaxDepth {
		return errorAt(p.src, pos, "expression is nested too deeply (the limit is %d levels)", MaxDepth)
	}
	return nil
}

func (p *parser) leave() { p.depth-- }

func (p *parser) keyword(kw string) bool {
	if p.peek().is(kw) {
		p.i++
		return true
	}
	return false
}

func (p *parser) op(op string) bool {
	if p.peek().isOp(op) {
		p.i++
		return true
	}
	return false
}

// parseFrom reads the collection after FROM.
func (p *parser) parseFrom() (string, *Error) {
	t := p.peek()
	if !t.is("devices") {
		if t.kind == tIdent && !isReserved(t.text) {
			return "", p.errHere("unsupported collection '%s': expected devices or devices.modules", t.text)
		}
		return "", p.expected("devices or devices.modules")
	}
	p.i++
	if !p.peek().isOp(".") {
		return Devices, nil
	}
	p.i++
	if p.peek().is("modules") {
		p.i++
		return Modules, nil
	}
	if p.peek().kind == tIdent {
		return "", errorAt(p.src, t.pos, "unsupported collection 'devices.%s': expected devices or devices.modules", p.peek().text)
	}
	return "", p.expected("'modules'")
}

// resolve strips the collection prefix (devices. or devices.modules.) from
// every path, now that the collection is known.
func (p *parser) resolve(from string) {
	for _, x := range p.paths {
		if len(x.segs) < 2 || x.segs[0].isIdx || !strings.EqualFold(x.segs[0].key, "devices") {
			continue
		}
		if from == Devices {
			x.skip = 1
		} else if len(x.segs) > 2 && !x.segs[1].isIdx && strings.EqualFold(x.segs[1].key, "modules") {
			x.skip = 2
		}
	}
}

// parseCondition reads a whole condition, which must be followed by what
// the caller allows next; that is checked by the caller.
func (p *parser) parseCondition() (node, *Error) {
	if p.peek().kind == tEOF {
		return nil, p.expected("a condition")
	}
	return p.parseOr()
}

func (p *parser) parseOr() (node, *Error) {
	x, err := p.parseAnd()
	if err != nil || !p.peek().is("OR") {
		return x, err
	}
	xs := []node{x}
	for p.keyword("OR") {
		y, err := p.parseAnd()
		if err != nil {
			return nil, err
		}
		xs = append(xs, y)
	}
	return &orNode{xs}, nil
}

func (p *parser) parseAnd() (node, *Error) {
	x, err := p.parseNot()
	if err != nil || !p.peek().is("AND") {
		return x, err
	}
	xs := []node{x}
	for p.keyword("AND") {
		y, err := p.parseNot()
		if err != nil {
			return nil, err
		}
		xs = append(xs, y)
	}
	return &andNode{xs}, nil
}

func (p *parser) parseNot() (node, *Error) {
	if !p.peek().is("NOT") {
		return p.parseComparison()
	}
	if err := p.enter(p.next().pos); err != nil {
		return nil, err
	}
	x, err := p.parseNot()
	if err != nil {
		return nil, err
	}
	p.leave()
	return &notNode{x}, nil
}

var cmpOps = map[string]cmpOp{"=": opEq, "!=": opNe, "<>": opNe, "<": opLt, "<=": opLe, ">": opGt, ">=": opGe}

func (p *parser) parseComparison() (node, *Error) {
	l, err := p.parseAdditive()
	if err != nil {
		return nil, err
	}
	t := p.peek()
	var x node
	switch op, isCmp := cmpOps[t.text]; {
	case t.kind == tOp && isCmp:
		p.i++
		r, err := p.parseAdditive()
		if err != nil {
			return nil, err
		}
		x = &cmpNode{op: op, l: l, r: r}
	case t.is("IN"), t.is("NIN"), t.is("NOT") && p.toks[p.i+1].is("IN"):
		neg := t.is("NIN") || t.is("NOT")
		if t.is("NOT") {
			p.i++
		}
		p.i++
		list, err := p.parseList()
		if err != nil {
			return nil, err
		}
		in := &inNode{x: l, list: list, neg: neg}
		in.index()
		x = in
	default:
		return l, nil
	}
	if _, isCmp := cmpOps[p.peek().text]; p.peek().kind == tOp && isCmp || p.peek().is("IN") || p.peek().is("NIN") {
		return nil, p.errHere("comparisons cannot be chained: combine them with AND, or parenthesize one")
	}
	return x, nil
}

// index builds a set for long lists of strings.
func (n *inNode) index() {
	if len(n.list) < 8 {
		return
	}
	set := make(map[string]struct{}, len(n.list))
	for _, c := range n.list {
		s, ok := c.(string)
		if !ok {
			return
		}
		set[s] = struct{}{}
	}
	n.set = set
}

// parseList reads the constant list after IN: [c, ...] or (c, ...).
func (p *parser) parseList() ([]any, *Error) {
	t := p.peek()
	if !t.isOp("[") && !t.isOp("(") {
		return nil, p.expected("a list such as ['a', 'b']")
	}
	v, err := p.parseConst(true)
	if err != nil {
		return nil, err
	}
	return v.([]any), nil
}

// parseConst reads a constant: a string, a number (possibly negative),
// true, false, null, or a list of constants in brackets (or, with parens,
// in parentheses).
func (p *parser) parseConst(parens bool) (any, *Error) {
	t := p.peek()
	switch {
	case t.kind == tString:
		p.i++
		return t.text, nil
	case t.kind == tNumber:
		p.i++
		return t.num, nil
	case t.isOp("-") && p.toks[p.i+1].kind == tNumber:
		p.i += 2
		return -p.toks[p.i-1].num, nil
	case t.is("TRUE"):
		p.i++
		return true, nil
	case t.is("FALSE"):
		p.i++
		return false, nil
	case t.is("NULL"):
		p.i++
		return nil, nil
	case t.isOp("[") || parens && t.isOp("("):
		closer := "]"
		if t.text == "(" {
			closer = ")"
		}
		p.i++
		if err := p.enter(t.pos); err != nil {
			return nil, err
		}
		list := []any{}
		if !p.op(closer) {
			for {
				v, err := p.parseConst(false)
				if err != nil {
					return nil, err
				}
				list = append(list, v)
				if p.op(closer) {
					break
				}
				if !p.op(",") {
					return nil, p.expectedCloser(fmt.Sprintf("',' or '%s' in the list opened at column %d", closer, p.column(t.pos)))
				}
			}
		}
		p.leave()
		return list, nil
	}
	return nil, p.expected("a constant (a string, number, true, false or null)")
}

func (p *parser) column(pos int) int { return errorAt(p.src, pos, "").Column }

func (p *parser) parseAdditive() (node, *Error) {
	x, err := p.parseMultiplicative()
	if err != nil {
		return nil, err
	}
	for p.peek().isOp("+") || p.peek().isOp("-") {
		op := p.next().text[0]
		y, err := p.parseMultiplicative()
		if err != nil {
			return nil, err
		}
		x = &arithNode{op: op, l: x, r: y}
	}
	return x, nil
}

func (p *parser) parseMultiplicative() (node, *Error) {
	x, err := p.parseUnary()
	if err != nil {
		return nil, err
	}
	for p.peek().isOp("*") || p.peek().isOp("/") || p.peek().isOp("%") {
		op := p.next().text[0]
		y, err := p.parseUnary()
		if err != nil {
			return nil, err
		}
		x = &arithNode{op: op, l: x, r: y}
	}
	return x, nil
}

func (p *parser) parseUnary() (node, *Error) {
	if !p.peek().isOp("-") {
		return p.parsePrimary()
	}
	if err := p.enter(p.next().pos); err != nil {
		return nil, err
	}
	x, err := p.parseUnary()
	if err != nil {
		return nil, err
	}
	p.leave()
	if l, ok := x.(*lit); ok {
		if f, ok := l.v.(float64); ok {
			return &lit{-f}, nil
		}
	}
	return &negNode{x}, nil
}

func (p *parser) parsePrimary() (node, *Error) {
	t := p.peek()
	switch t.kind {
	case tString:
		p.i++
		return &lit{t.text}, nil
	case tNumber:
		p.i++
		return &lit{t.num}, nil
	case tIdent:
		switch {
		case t.is("TRUE"):
			p.i++
			return &lit{true}, nil
		case t.is("FALSE"):
			p.i++
			return &lit{false}, nil
		case t.is("NULL"):
			p.i++
			return &lit{nil}, nil
		case isReserved(t.text):
			return nil, p.expected("a value")
		case p.toks[p.i+1].isOp("("):
			return p.parseCall()
		}
		return p.parsePath()
	case tOp:
		switch t.text {
		case "(":
			p.i++
			if err := p.enter(t.pos); err != nil {
				return nil, err
			}
			x, err := p.parseOr()
			if err != nil {
				return nil, err
			}
			if !p.op(")") {
				return nil, p.expectedCloser(fmt.Sprintf("')' to close the '(' at column %d", p.column(t.pos)))
			}
			p.leave()
			return x, nil
		case "[":
			v, err := p.parseConst(false)
			if err != nil {
				return nil, err
			}
			return &lit{v}, nil
		}
	}
	return nil, p.expected("a value")
}

// parseCall reads name(args); aggregates are refused here: parseItem
// handles them where they are allowed.
func (p *parser) parseCall() (node, *Error) {
	t := p.next()
	fn := lookupFunction(t.text)
	if fn == nil {
		return nil, errorAt(p.src, t.pos, "unknown function '%s'", t.text)
	}
	if fn.aggregate() {
		return nil, errorAt(p.src, t.pos, "%s() is an aggregate: it can only be a whole item of the SELECT list", fn.name)
	}
	p.i++ // (
	if err := p.enter(t.pos); err != nil {
		return nil, err
	}
	var args []node
	if !p.op(")") {
		for {
			a, err := p.parseOr()
			if err != nil {
				return nil, err
			}
			args = append(args, a)
			if p.op(")") {
				break
			}
			if !p.op(",") {
				return nil, p.expectedCloser(fmt.Sprintf("',' or ')' in the arguments of %s", fn.name))
			}
		}
	}
	p.leave()
	if err := checkArity(p.src, t, fn, len(args)); err != nil {
		return nil, err
	}
	return &callNode{fn: fn, args: args}, nil
}

func checkArity(src string, t token, fn *fnDef, n int) *Error {
	if n >= fn.min && (fn.max < 0 || n <= fn.max) {
		return nil
	}
	var want string
	switch {
	case fn.max < 0:
		want = fmt.Sprintf("at least %d", fn.min)
	case fn.min == fn.max:
		want = strconv.Itoa(fn.min)
	case fn.max == fn.min+1:
		want = fmt.Sprintf("%d or %d", fn.min, fn.max)
	default:
		want = fmt.Sprintf("%d to %d", fn.min, fn.max)
	}
	unit := "arguments"
	if want == "1" {
		unit = "argument"
	}
	return errorAt(src, t.pos, "%s takes %s %s but was given %d", fn.name, want, unit, n)
}

// parsePath reads ident ( '.' ident | '[' string ']' | '[' index ']' )*.
func (p *parser) parsePath() (node, *Error) {
	x := &path{segs: []seg{{key: p.next().text}}}
	for {
		switch t := p.peek(); {
		case t.isOp("."):
			p.i++
			n := p.peek()
			if n.kind != tIdent {
				if n.kind == tString {
					return nil, p.errHere("a quoted property name goes in brackets: write ['%s'] without the '.'", n.text)
				}
				return nil, p.expected("a property name")
			}
			p.i++
			x.segs = append(x.segs, seg{key: n.text})
		case t.isOp("["):
			p.i++
			n := p.peek()
			switch {
			case n.kind == tString:
				x.segs = append(x.segs, seg{key: n.text})
			case n.kind == tNumber:
				if n.num != math.Trunc(n.num) || n.num > math.MaxInt32 {
					return nil, p.errHere("array index %s is not a whole number from 0 to %d", n.text, math.MaxInt32)
				}
				x.segs = append(x.segs, seg{idx: int(n.num), isIdx: true})
			default:
				return nil, p.expected("a quoted property name or an array index")
			}
			p.i++
			if !p.op("]") {
				return nil, p.expectedCloser(fmt.Sprintf("']' to close the '[' at column %d", p.column(t.pos)))
			}
		default:
			p.paths = append(p.paths, x)
			return x, nil
		}
	}
}
