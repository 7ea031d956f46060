package query

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

type tokKind uint8

const (
	tEOF    tokKind = iota
	tIdent          // identifier or keyword as written, or the name in .[[name]]
	tString         // quoted string; text is the decoded value
	tNumber         // unsigned number; num is its value, text its source
	tOp             // operator or punctuation
)

type token struct {
	kind tokKind
	text string
	num  float64
	pos  int // byte offset in the source
}

// is reports whether t is the keyword kw (upper case), ignoring case.
func (t token) is(kw string) bool {
	return t.kind == tIdent && len(t.text) == len(kw) && strings.EqualFold(t.text, kw)
}

func (t token) isOp(op string) bool { return t.kind == tOp && t.text == op }

// describe names a token for an error message.
func (t token) describe() string {
	switch t.kind {
	case tEOF:
		return "end of input"
	case tString:
		s := t.text
		if utf8.RuneCountInString(s) > 24 {
			s = string([]rune(s)[:24]) + "..."
		}
		return "string " + quote(s)
	case tNumber:
		return "number " + t.text
	}
	return "'" + t.text + "'"
}

// reserved words cannot start a property path; after a '.' they are
// ordinary property names (tags.from is fine).
var reserved = map[string]bool{
	"SELECT": true, "FROM": true, "WHERE": true, "GROUP": true, "ORDER": true,
	"BY": true, "AS": true, "TOP": true, "AND": true, "OR": true, "NOT": true,
	"IN": true, "NIN": true, "TRUE": true, "FALSE": true, "NULL": true,
}

func isReserved(s string) bool {
	if len(s) > 6 {
		return false
	}
	return reserved[strings.ToUpper(s)]
}

func isIdentStart(r rune) bool {
	return r == '_' || r == '$' || 'a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' ||
		r >= utf8.RuneSelf && unicode.IsLetter(r)
}

func isIdentPart(r rune) bool {
	return isIdentStart(r) || '0' <= r && r <= '9' || r >= utf8.RuneSelf && unicode.IsDigit(r)
}

// isIdent reports whether s lexes as a single identifier.
func isIdent(s string) bool {
	if s == "" {
		return false
	}
	for i, r := range s {
		if r == utf8.RuneError || i == 0 && !isIdentStart(r) || !isIdentPart(r) {
			return false
		}
	}
	return true
}

// lex splits src into tokens, ending with a tEOF token at len(src).
func lex(src string) ([]token, *Error) {
	toks := make([]token, 0, len(src)/4+2)
	i := 0
	for i < len(src) {
		c := src[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v':
			i++
		case c >= utf8.RuneSelf:
			r, size := utf8.DecodeRuneInString(src[i:])
			switch {
			case unicode.IsSpace(r):
				i += size
			case r != utf8.RuneError && isIdentStart(r):
				toks, i = lexIdent(src, i, toks)
			default:
				return nil, errorAt(src, i, "unexpected character %q", r)
			}
		case isIdentStart(rune(c)):
			toks, i = lexIdent(src, i, toks)
		case '0' <= c && c <= '9':
			start := i
			for i < len(src) && isDigit(src[i]) {
				i++
			}
			if i+1 < len(src) && src[i] == '.' && isDigit(src[i+1]) {
				i++
				for i < len(src) && isDigit(src[i]) {
					i++
				}
			}
			if i < len(src) && (src[i] == 'e' || src[i] == 'E') {
				j := i + 1
				if j < len(src) && (src[j] == '+' || src[j] == '-') {
					j++
				}
				if j < len(src) && isDigit(src[j]) {
					i = j
					for i < len(src) && isDigit(src[i]) {
						i++
					}
				}
			}
			if i < len(src) {
				if r, _ := utf8.DecodeRuneInString(src[i:]); isIdentPart(r) || r == '.' && i+1 < len(src) && isDigit(src[i+1]) {
					return nil, errorAt(src, start, "malformed number starting %q", src[start:min(i+1, len(src))])
				}
			}
			text := src[start:i]
			f, err := strconv.ParseFloat(text, 64)
			if err != nil && (math.IsInf(f, 0) || math.IsNaN(f)) {
				return nil, errorAt(src, start, "number %s is out of range", text)
			}
			toks = append(toks, token{kind: tNumber, text: text, num: f, pos: start})
		case c == '\'' || c == '"':
			s, next, err := lexString(src, i)
			if err != nil {
				return nil, err
			}
			toks = append(toks, token{kind: tString, text: s, pos: i})
			i = next
		case c == '.' && strings.HasPrefix(src[i+1:], "[["):
			// .[[name]] quotes a property name with any characters but
			// "]]", as metric queries do with configuration IDs:
			// configurations.[[my-config]].status.
			end := strings.Index(src[i+3:], "]]")
			if end < 0 {
				return nil, errorAt(src, i+1, "'[[' is not closed: expected ']]' after the property name")
			}
			if end == 0 {
				return nil, errorAt(src, i+1, "'[[]]' names no property")
			}
			toks = append(toks, token{kind: tOp, text: ".", pos: i},
				token{kind: tIdent, text: src[i+3 : i+3+end], pos: i + 1})
			i += 3 + end + 2
		default:
			op := ""
			if i+1 < len(src) {
				switch two := src[i : i+2]; two {
				case "!=", "<>", "<=", ">=":
					op = two
				case "==":
					return nil, errorAt(src, i, "'==' is not an operator; compare with '='")
				case "&&":
					return nil, errorAt(src, i, "'&&' is not an operator; use AND")
				case "||":
					return nil, errorAt(src, i, "'||' is not an operator; use OR")
				}
			}
			if op == "" {
				switch c {
				case '(', ')', '[', ']', ',', '.', '*', '=', '<', '>', '+', '-', '/', '%':
					op = src[i : i+1]
				case '!':
					return nil, errorAt(src, i, "'!' is not an operator; use NOT, or '!=' for inequality")
				default:
					return nil, errorAt(src, i, "unexpected character %q", rune(c))
				}
			}
			toks = append(toks, token{kind: tOp, text: op, pos: i})
			i += len(op)
		}
	}
	return append(toks, token{kind: tEOF, pos: len(src)}), nil
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

func lexIdent(src string, i int, toks []token) ([]token, int) {
	start := i
	for i < len(src) {
		r, size := utf8.DecodeRuneInString(src[i:])
		if r == utf8.RuneError || !isIdentPart(r) {
			break
		}
		i += size
	}
	return append(toks, token{kind: tIdent, text: src[start:i], pos: start}), i
}

// lexString reads the string literal quoted by src[start]. A doubled quote
// character stands for itself ('it”s'); backslash escapes are those of
// JSON plus \' (\" \\ \/ \b \f \n \r \t \uXXXX).
func lexString(src string, start int) (string, int, *Error) {
	q := src[start]
	i := start + 1
	// Fast path: no escapes.
	for j := i; j < len(src); j++ {
		if src[j] == '\\' {
			break
		}
		if src[j] == q {
			if j+1 < len(src) && src[j+1] == q {
				break
			}
			return src[i:j], j + 1, nil
		}
	}
	var b strings.Builder
	for {
		if i >= len(src) {
			return "", 0, errorAt(src, start, "string is not terminated: expected a closing %c", q)
		}
		c := src[i]
		switch {
		case c == q:
			if i+1 < len(src) && src[i+1] == q {
				b.WriteByte(q)
				i += 2
				continue
			}
			return b.String(), i + 1, nil
		case c == '\\':
			if i+1 >= len(src) {
				return "", 0, errorAt(src, start, "string is not terminated: expected a closing %c", q)
			}
			e := src[i+1]
			switch e {
			case '\'', '"', '\\', '/':
				b.WriteByte(e)
			case 'b':
				b.WriteByte('\b')
			case 'f':
				b.WriteByte('\f')
			case 'n':
				b.WriteByte('\n')
			case 'r':
				b.WriteByte('\r')
			case 't':
				b.WriteByte('\t')
			case 'u':
				r, ok := hex4(src, i+2)
				if !ok {
					return "", 0, errorAt(src, i, `\u must be followed by four hex digits`)
				}
				n := 6
				if utf16IsHigh(r) {
					if r2, ok := hex4(src, i+8); ok && i+7 < len(src) && src[i+6] == '\\' && src[i+7] == 'u' && utf16IsLow(r2) {
						r = (r-0xD800)<<10 + (r2 - 0xDC00) + 0x10000
						n = 12
					}
				}
				b.WriteRune(r) // a lone surrogate becomes U+FFFD
				i += n
				continue
			default:
				r, _ := utf8.DecodeRuneInString(src[i+1:])
				return "", 0, errorAt(src, i, `unknown escape sequence '\%c' in string (write a backslash as '\\')`, r)
			}
			i += 2
		default:
			b.WriteByte(c)
			i++
		}
	}
}

func hex4(src string, i int) (rune, bool) {
	if i+4 > len(src) {
		return 0, false
	}
	var r rune
	for _, c := range []byte(src[i : i+4]) {
		switch {
		case '0' <= c && c <= '9':
			r = r<<4 | rune(c-'0')
		case 'a' <= c && c <= 'f':
			r = r<<4 | rune(c-'a'+10)
		case 'A' <= c && c <= 'F':
			r = r<<4 | rune(c-'A'+10)
		default:
			return 0, false
		}
	}
	return r, true
}

func utf16IsHigh(r rune) bool { return 0xD800 <= r && r < 0xDC00 }
func utf16IsLow(r rune) bool  { return 0xDC00 <= r && r < 0xE000 }

// quote writes s as a single-quoted literal that lex reads back as s.
func quote(s string) string {
	var b strings.Builder
	writeQuoted(&b, s)
	return b.String()
}

func writeQuoted(b *strings.Builder, s string) {
	b.WriteByte('\'')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '\'':
			b.WriteString(`\'`)
		case '\\':
			b.WriteString(`\\`)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		case '\t':
			b.WriteString(`\t`)
		default:
			if c < 0x20 {
				fmt.Fprintf(b, `\u%04x`, c)
			} else {
				b.WriteByte(c)
			}
		}
	}
	b.WriteByte('\'')
}
