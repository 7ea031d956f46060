// Package jsonbody reads the JSON bodies clients send, and says what is
// wrong with one in the API's terms (which field, what it must be) rather
// than Go's.
package jsonbody

import (
	"encoding"
	"encoding/json"
	"errors"
	"reflect"
	"strings"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/twindoc"
)

// Decode decodes a request body into v, saying what is wrong in the API's
// terms rather than Go's.
func Decode(body []byte, v any) error { return explain(json.Unmarshal(body, v)) }

// DecodeTwin is Decode for bodies that carry twin documents: numbers in
// values of type any are json.Number (twindoc.Unmarshal), so that they keep
// every digit. It costs more than Decode, which bodies without them take.
func DecodeTwin(body []byte, v any) error { return explain(twindoc.Unmarshal(body, v)) }

func explain(err error) error {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &syn):
		return azerr.BadRequest("request body is not valid JSON at byte %d: %v", syn.Offset, err)
	case errors.As(err, &typ) && typ.Field == "":
		return azerr.BadRequest("the request body must be %s, not %s", jsonKind(typ.Type), article(typ.Value))
	case errors.As(err, &typ):
		return azerr.BadRequest("request body field %q has the wrong type: it must be %s, not %s", typ.Field, jsonKind(typ.Type), article(typ.Value))
	}
	return azerr.BadRequest("request body is not valid JSON: %v", err)
}

var textUnmarshaler = reflect.TypeFor[encoding.TextUnmarshaler]()

// jsonKind names the JSON that a value of Go type t is read from.
func jsonKind(t reflect.Type) string {
	if t.Kind() == reflect.Pointer {
		return jsonKind(t.Elem())
	}
	if reflect.PointerTo(t).Implements(textUnmarshaler) {
		return "a string"
	}
	switch t.Kind() {
	case reflect.Bool:
		return "true or false"
	case reflect.String:
		return "a string"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "a whole number"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Slice:
		if t.Elem().Kind() == reflect.Uint8 {
			return "a base64 string"
		}
		return "an array"
	case reflect.Array:
		return "an array"
	case reflect.Map, reflect.Struct:
		return "an object"
	}
	return "a JSON value"
}

// article puts "a" or "an" before one of encoding/json's JSON type names
// (string, number, object, array, bool).
func article(jsonType string) string {
	if strings.IndexByte("aeiou", jsonType[0]) >= 0 {
		return "an " + jsonType
	}
	return "a " + jsonType
}
