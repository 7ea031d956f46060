// Package query implements the IoT Hub query language over device and
// module twins: the queries of POST /devices/query and the target
// conditions of automatic deployments.
//
//	SELECT [TOP n] * | item [AS alias], ...
//	FROM devices | devices.modules
//	[WHERE condition]
//	[GROUP BY expression, ...]
//
// A SELECT item is a scalar expression or an aggregate: COUNT(), COUNT(x),
// SUM(x), AVG(x), MIN(x), MAX(x).
//
// # Documents
//
// Twins are JSON documents decoded by encoding/json into map[string]any:
// objects are map[string]any, arrays []any, numbers json.Number (the hub
// decodes with UseNumber, so that integers beyond 2^53 keep every digit)
// or float64; Go integer types in hand-built documents are accepted too.
// Numbers are compared, grouped and computed with as float64, so two
// integers beyond 2^53 that round to the same double are equal here; a
// number selected as it is (a path, MIN, MAX, a GROUP BY value) comes out
// exactly as the document holds it. Numbers the package computes (COUNT,
// SUM, arithmetic, LENGTH...) are float64.
//
// # Expressions
//
// Property paths are case-sensitive: tags.location.region,
// properties.reported.$version, tags['key with spaces'], arr[0], and
// configurations.[[config-id]].status as in deployment metrics. A leading
// devices. (FROM devices) or devices.modules. (FROM devices.modules) names
// the collection and is ignored. Keywords and function names are not
// case-sensitive. A path cannot start with a reserved word (SELECT, FROM,
// WHERE, GROUP, ORDER, BY, AS, TOP, AND, OR, NOT, IN, NIN, TRUE, FALSE,
// NULL); use it after a '.' or in brackets instead.
//
// Constants are strings in single or double quotes (a doubled quote stands
// for itself, and JSON's backslash escapes work), numbers, true, false,
// null and lists such as ['a', 'b'].
//
// Operators, loosest first: OR; AND; NOT; comparisons = != <> < <= > >=,
// IN and NIN (also NOT IN) with a list of constants; + -; * / %; unary -.
//
// # Undefined
//
// As in Azure IoT Hub (and Cosmos DB, on which its language is modelled),
// an expression can be undefined: a missing property, a comparison between
// values of different types (tags.x = 1 when tags.x is "1"), an ordering
// comparison of objects or arrays, arithmetic on non-numbers or division by
// zero, a function given arguments of the wrong type. Comparing anything
// with undefined is undefined, so a missing property matches neither
// tags.x = 'a' nor tags.x != 'a'. NOT undefined is undefined; false AND
// undefined is false; true OR undefined is true. A document matches a
// condition when the condition is exactly true. Use IS_DEFINED to test for
// a property.
//
// Strings compare by bytes (Unicode code point order); LENGTH, INDEX_OF and
// SUBSTRING count characters.
//
// # Functions
//
// Type checking: IS_DEFINED, IS_NULL, IS_BOOL, IS_NUMBER, IS_STRING,
// IS_OBJECT, IS_ARRAY, IS_PRIMITIVE. Strings: STARTSWITH (or STARTS_WITH),
// ENDSWITH (ENDS_WITH) and CONTAINS, each with an optional third argument
// true to ignore case; INDEX_OF, LOWER, UPPER, LENGTH, SUBSTRING(s, start,
// length), CONCAT, LTRIM, RTRIM, TRIM. Arrays: ARRAY_CONTAINS(array, value
// [, partial]), ARRAY_LENGTH. Numbers: ABS, CEILING, FLOOR, ROUND, SIGN,
// SQRT, SQUARE, POWER, EXP, AS_NUMBER.
//
// # Limits
//
// Queries longer than MaxLength bytes or nested deeper than MaxDepth are
// refused. Parsed queries and conditions are immutable and safe for
// concurrent use.
package query

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
)

// Query is a parsed query.
type Query struct {
	From string // Devices or Modules
	Top  int    // the TOP limit on rows, or -1 when there is none

	star    bool
	items   []item
	where   node // nil: every document
	groupBy []node
	agg     bool
}

// item is one entry of the SELECT list.
type item struct {
	expr  node   // the value, for a scalar item
	agg   *fnDef // the aggregate, for an aggregate item
	arg   node   // the aggregate's argument; nil for COUNT()
	name  string // the column name
	alias bool   // name was given with AS
	group int    // in an aggregate query, the GROUP BY expression a scalar item is
	pos   int
}

// Condition is a parsed condition: a deployment's target condition, or a
// query's WHERE clause.
type Condition struct {
	From string // Devices, or Modules when written "FROM devices.modules WHERE ..."

	where    node // nil: every document
	explicit bool // written with FROM
}

// Parse parses a query.
func Parse(q string) (*Query, error) {
	p, err := newParser(q)
	if err != nil {
		return nil, err
	}
	query, err := p.parseQuery()
	if err != nil {
		return nil, err
	}
	return query, nil
}

// ParseCondition parses a condition such as
// "tags.environment = 'prod' AND properties.reported.os = 'linux'". "*"
// matches every device. A condition for module twins is written
// "FROM devices.modules WHERE ...", as deployments of modules do; its From
// is then Modules.
func ParseCondition(s string) (*Condition, error) {
	p, err := newParser(s)
	if err != nil {
		return nil, err
	}
	c, err := p.parseBareCondition()
	if err != nil {
		return nil, err
	}
	return c, nil
}

func (p *parser) parseBareCondition() (*Condition, *Error) {
	c := &Condition{From: Devices}
	if p.peek().isOp("*") && p.toks[p.i+1].kind == tEOF {
		return c, nil
	}
	if p.peek().kind == tEOF {
		return nil, &Error{Msg: "the condition is empty; use * to match every device"}
	}
	if p.keyword("FROM") {
		from, err := p.parseFrom()
		if err != nil {
			return nil, err
		}
		c.From, c.explicit = from, true
		if p.peek().kind == tEOF {
			return c, nil
		}
		if !p.keyword("WHERE") {
			return nil, p.expected("WHERE or end of input")
		}
	}
	x, err := p.parseCondition()
	if err != nil {
		return nil, err
	}
	if t := p.peek(); t.kind != tEOF {
		return nil, p.errHere("expected AND, OR or end of input but found %s", t.describe())
	}
	p.resolve(c.From)
	c.where = x
	return c, nil
}

func (p *parser) parseQuery() (*Query, *Error) {
	q := &Query{Top: -1}
	if !p.keyword("SELECT") {
		return nil, p.expected("SELECT")
	}
	if p.keyword("TOP") {
		t := p.peek()
		if t.kind != tNumber || t.num != math.Trunc(t.num) || t.num > math.MaxInt32 {
			return nil, p.expected("a whole number")
		}
		p.i++
		q.Top = int(t.num)
	}
	starPos := p.peek().pos
	if p.op("*") {
		q.star = true
	} else {
		for {
			it, err := p.parseItem()
			if err != nil {
				return nil, err
			}
			q.items = append(q.items, it)
			if !p.op(",") {
				break
			}
		}
	}
	if !p.keyword("FROM") {
		if q.star {
			return nil, p.expected("FROM")
		}
		return nil, p.errHere("expected ',' or FROM but found %s", p.peek().describe())
	}
	from, err := p.parseFrom()
	if err != nil {
		return nil, err
	}
	q.From = from
	if p.keyword("WHERE") {
		if q.where, err = p.parseCondition(); err != nil {
			return nil, err
		}
	}
	if p.keyword("GROUP") {
		if !p.keyword("BY") {
			return nil, p.expected("BY")
		}
		for {
			x, err := p.parseOr()
			if err != nil {
				return nil, err
			}
			q.groupBy = append(q.groupBy, x)
			if !p.op(",") {
				break
			}
		}
	}
	if t := p.peek(); t.kind != tEOF {
		var want string
		switch {
		case t.is("ORDER"):
			return nil, p.errHere("ORDER BY is not supported")
		case q.groupBy != nil:
			want = "',' or end of query"
		case q.where != nil:
			want = "AND, OR, GROUP BY or end of query"
		default:
			want = "WHERE, GROUP BY or end of query"
		}
		return nil, p.errHere("expected %s but found %s", want, t.describe())
	}
	p.resolve(from)
	if err := q.check(p.src, starPos); err != nil {
		return nil, err
	}
	return q, nil
}

func (p *parser) parseItem() (item, *Error) {
	t := p.peek()
	it := item{pos: t.pos, group: -1}
	if fn := lookupFunction(t.text); t.kind == tIdent && fn != nil && fn.aggregate() && p.toks[p.i+1].isOp("(") {
		p.i += 2
		if err := p.enter(t.pos); err != nil {
			return it, err
		}
		it.agg = fn
		switch {
		case fn.id == fnCount && p.op(")"):
		case fn.id == fnCount && p.peek().isOp("*") && p.toks[p.i+1].isOp(")"):
			p.i += 2
		case p.peek().isOp(")"):
			return it, checkArity(p.src, t, fn, 0)
		default:
			x, err := p.parseOr()
			if err != nil {
				return it, err
			}
			if !p.op(")") {
				return it, p.expectedCloser(fmt.Sprintf("')' to close %s(", fn.name))
			}
			it.arg = x
		}
		p.leave()
	} else {
		x, err := p.parseOr()
		if err != nil {
			return it, err
		}
		it.expr = x
	}
	if p.keyword("AS") {
		a := p.peek()
		if a.kind != tIdent || isReserved(a.text) {
			return it, p.expected("a column name")
		}
		p.i++
		it.name, it.alias = a.text, true
	}
	return it, nil
}

// check names the columns and validates an aggregate query.
func (q *Query) check(src string, starPos int) *Error {
	unnamed := 0
	seen := map[string]bool{}
	for i := range q.items {
		it := &q.items[i]
		if it.name == "" {
			if x, ok := it.expr.(*path); ok {
				it.name = x.name()
			}
		}
		if it.name == "" {
			unnamed++
			it.name = "$" + strconv.Itoa(unnamed)
		}
		if seen[it.name] {
			return errorAt(src, it.pos, "the SELECT list has two columns named '%s'; rename one with AS", it.name)
		}
		seen[it.name] = true
		if it.agg != nil {
			q.agg = true
		}
	}
	if q.groupBy != nil {
		q.agg = true
	}
	if !q.agg {
		return nil
	}
	if q.star {
		return errorAt(src, starPos, "SELECT * cannot be used with GROUP BY; select the grouped properties and aggregates")
	}
	keys := make([]string, len(q.groupBy))
	for i, g := range q.groupBy {
		keys[i] = exprString(g, true)
	}
	for i := range q.items {
		it := &q.items[i]
		if it.agg != nil {
			continue
		}
		s := exprString(it.expr, true)
		for j, k := range keys {
			if s == k {
				it.group = j
				break
			}
		}
		if it.group < 0 {
			return errorAt(src, it.pos, "%s is neither an aggregate such as COUNT() nor in the GROUP BY clause", exprString(it.expr, false))
		}
	}
	return nil
}

// Match reports whether doc satisfies the query's WHERE clause (the FROM
// collection is the caller's business).
func (q *Query) Match(doc map[string]any) bool { return matches(q.where, doc) }

// IsAggregate reports whether the query aggregates (COUNT() and the like,
// or GROUP BY): its rows are groups, not documents.
func (q *Query) IsAggregate() bool { return q.agg }

// Condition returns the query's FROM and WHERE clauses as a Condition.
func (q *Query) Condition() *Condition {
	return &Condition{From: q.From, where: q.where, explicit: true}
}

// Match reports whether doc satisfies the condition.
func (c *Condition) Match(doc map[string]any) bool { return matches(c.where, doc) }

// MatchesAll reports whether the condition has no WHERE clause ("*").
func (c *Condition) MatchesAll() bool { return c.where == nil }

func matches(x node, doc map[string]any) bool {
	if x == nil {
		return true
	}
	v, _ := x.eval(doc)
	b, _ := v.(bool)
	return b
}

// String returns the condition as text that ParseCondition reads back.
func (c *Condition) String() string {
	switch {
	case c.explicit && c.where != nil:
		return "FROM " + c.From + " WHERE " + c.Where()
	case c.explicit:
		return "FROM " + c.From
	case c.where == nil:
		return "*"
	}
	return c.Where()
}

// Where returns the condition without its FROM, as text for a query's
// WHERE clause, or "" when it matches every document.
func (c *Condition) Where() string {
	if c.where == nil {
		return ""
	}
	return exprString(c.where, false)
}

// String returns the query as text that Parse reads back.
func (q *Query) String() string {
	w := &writer{}
	w.WriteString("SELECT ")
	if q.Top >= 0 {
		fmt.Fprintf(w, "TOP %d ", q.Top)
	}
	if q.star {
		w.WriteByte('*')
	}
	for i, it := range q.items {
		if i > 0 {
			w.WriteString(", ")
		}
		if it.agg != nil {
			w.WriteString(it.agg.name)
			w.WriteByte('(')
			if it.arg != nil {
				it.arg.write(w)
			}
			w.WriteByte(')')
		} else {
			it.expr.write(w)
		}
		if it.alias {
			w.WriteString(" AS ")
			w.WriteString(it.name)
		}
	}
	w.WriteString(" FROM ")
	w.WriteString(q.From)
	if q.where != nil {
		w.WriteString(" WHERE ")
		q.where.write(w)
	}
	for i, g := range q.groupBy {
		if i == 0 {
			w.WriteString(" GROUP BY ")
		} else {
			w.WriteString(", ")
		}
		g.write(w)
	}
	return w.String()
}

// Run evaluates the query over docs, which the caller has already limited
// to the FROM collection. It returns one row per matching document, in
// input order, or for an aggregate query one row per group, in the order
// each group was first seen (a single row when there is no GROUP BY, even
// over no documents). Columns whose value is undefined are left out of the
// row. SELECT * rows are the documents themselves, and the values in
// other rows are shared with the documents: copy before modifying them.
// The error is always nil for now; it leaves room for limits on the work a
// query may do.
func (q *Query) Run(docs []map[string]any) ([]map[string]any, error) {
	rows := []map[string]any{}
	if q.Top == 0 {
		return rows, nil
	}
	if q.agg {
		return q.aggregate(docs), nil
	}
	for _, d := range docs {
		if !matches(q.where, d) {
			continue
		}
		rows = append(rows, q.project(d))
		if len(rows) == q.Top {
			break
		}
	}
	return rows, nil
}

func (q *Query) project(d map[string]any) map[string]any {
	if q.star {
		return d
	}
	row := make(map[string]any, len(q.items))
	for _, it := range q.items {
		if v, ok := it.expr.eval(d); ok {
			row[it.name] = v
		}
	}
	return row
}

// group is one GROUP BY group being accumulated.
type group struct {
	keys []any // the values of the GROUP BY expressions
	defs []bool
	accs []acc // one per SELECT item
}

// acc accumulates one aggregate.
type acc struct {
	n    int
	sum  float64
	bad  bool // SUM or AVG saw a non-number; MIN or MAX an object or array
	best any  // MIN or MAX so far, when n > 0
}

func (q *Query) aggregate(docs []map[string]any) []map[string]any {
	var order []*group
	byKey := map[string]*group{}
	var key []byte
	for _, d := range docs {
		if !matches(q.where, d) {
			continue
		}
		key = key[:0]
		for _, g := range q.groupBy {
			if v, ok := g.eval(d); ok {
				key = appendKey(append(key, 'v'), v)
			} else {
				key = append(key, 'u')
			}
		}
		g := byKey[string(key)]
		if g == nil {
			g = &group{accs: make([]acc, len(q.items))}
			for _, x := range q.groupBy {
				v, ok := x.eval(d)
				g.keys, g.defs = append(g.keys, v), append(g.defs, ok)
			}
			byKey[string(key)] = g
			order = append(order, g)
		}
		for i, it := range q.items {
			if it.agg != nil {
				g.accs[i].add(it, d)
			}
		}
	}
	if len(order) == 0 && q.groupBy == nil {
		order = append(order, &group{accs: make([]acc, len(q.items))})
	}
	if q.Top >= 0 && len(order) > q.Top {
		order = order[:q.Top]
	}
	rows := make([]map[string]any, 0, len(order))
	for _, g := range order {
		row := make(map[string]any, len(q.items))
		for i, it := range q.items {
			if it.agg == nil {
				if g.defs[it.group] {
					row[it.name] = g.keys[it.group]
				}
			} else if v, ok := g.accs[i].result(it.agg.id); ok {
				row[it.name] = v
			}
		}
		rows = append(rows, row)
	}
	return rows
}

func (a *acc) add(it item, d map[string]any) {
	if it.arg == nil { // COUNT()
		a.n++
		return
	}
	v, ok := it.arg.eval(d)
	if !ok {
		return
	}
	switch it.agg.id {
	case fnCount:
		a.n++
	case fnSum, fnAvg:
		f, ok := toNumber(v)
		if !ok {
			a.bad = true
			return
		}
		a.n++
		a.sum += f
	case fnMin, fnMax:
		k := kindOf(v)
		if typeRank(k) < 0 {
			a.bad = true
			return
		}
		if a.n == 0 {
			a.best = v
		} else {
			kb := kindOf(a.best)
			c := typeRank(k) - typeRank(kb)
			if c == 0 {
				switch compare(opLt, v, a.best) {
				case tTrue:
					c = -1
				case tFalse:
					c = 1
				}
			}
			if it.agg.id == fnMin && c < 0 || it.agg.id == fnMax && c > 0 {
				a.best = v
			}
		}
		a.n++
	}
}

func (a *acc) result(id fnID) (any, bool) {
	switch id {
	case fnCount:
		return float64(a.n), true
	case fnSum:
		if a.bad {
			return nil, false
		}
		return finite(a.sum)
	case fnAvg:
		if a.bad || a.n == 0 {
			return nil, false
		}
		return finite(a.sum / float64(a.n))
	default: // MIN, MAX
		if a.bad || a.n == 0 {
			return nil, false
		}
		if _, exact := a.best.(json.Number); !exact {
			if f, ok := toNumber(a.best); ok {
				return f, true
			}
		}
		return a.best, true
	}
}
