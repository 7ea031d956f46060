package hub

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/hatchery/hatchery/internal/azerr"
)

// TestConfigurationContentReserialized updates a configuration's labels and
// priority with its content sent back as another JSON library writes it:
// the same content, so accepted; a content really changed is still refused.
func TestConfigurationContentReserialized(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	content := func(fw string) ConfigContent {
		return ConfigContent{DeviceContent: map[string]json.RawMessage{"properties.desired.fw": json.RawMessage(fw)}}
	}
	const goStyle = `{"big":9007199254740993,"name":"café","v":1.0,"list":[1.50,{"b":true,"a":null}]}`
	if _, err := s.PutConfiguration(ctx, "fw", "", &Configuration{TargetCondition: "*", Content: content(goStyle)}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, fw string
		same     bool
	}{
		// json.dumps: ASCII escapes, spaces after separators, 1.0 kept.
		{"Python", `{"v": 1.0, "name": "caf\u00e9", "list": [1.5, {"a": null, "b": true}], "big": 9007199254740993}`, true},
		// JSON.stringify: 1.0 is 1, 1.50 is 1.5, keys in its own order.
		{"JavaScript", `{"list":[1.5,{"a":null,"b":true}],"v":1,"big":9007199254740993,"name":"café"}`, true},
		{"an exponent", `{"big":9.007199254740993e15,"name":"café","v":10e-1,"list":[15E-1,{"b":true,"a":null}]}`, true},
		{"a changed number", `{"big":9007199254740993,"name":"café","v":2,"list":[1.5,{"b":true,"a":null}]}`, false},
		{"a changed integer beyond 2^53", `{"big":9007199254740992,"name":"café","v":1,"list":[1.5,{"b":true,"a":null}]}`, false},
		{"a changed string", `{"big":9007199254740993,"name":"cafe","v":1,"list":[1.5,{"b":true,"a":null}]}`, false},
		{"a number for a string", `{"big":"9007199254740993","name":"café","v":1,"list":[1.5,{"b":true,"a":null}]}`, false},
		{"a key more", `{"big":9007199254740993,"name":"café","v":1,"list":[1.5,{"b":true,"a":null,"c":1}]}`, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cur, err := s.GetConfiguration(ctx, "fw")
			if err != nil {
				t.Fatal(err)
			}
			upd := &Configuration{TargetCondition: "*", Priority: cur.Priority + 1, Labels: map[string]string{"by": tc.name}, Content: content(tc.fw)}
			_, err = s.PutConfiguration(ctx, "fw", cur.ETag, upd)
			switch {
			case tc.same && err != nil:
				t.Fatalf("the same content, written differently, was refused: %v", err)
			case !tc.same && !azerr.HasStatus(err, 400):
				t.Fatalf("a changed content: got %v, want 400 (content cannot change)", err)
			}
		})
	}
}
