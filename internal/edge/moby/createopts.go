package moby

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// The createOptions keys the runtime reads or sets, as Docker's API spells
// them: at the top level of the create body, and in its HostConfig.
var (
	runtimeKeys     = []string{"Image", "Env", "Labels", "HostConfig"}
	runtimeHostKeys = []string{"Binds", "Privileged", "CapAdd", "RestartPolicy", "NetworkMode"}
)

// DecodeCreateOptions reads a module's createOptions, a Docker create
// body, as the runtime inspects and amends it: numbers kept exact (Memory,
// NanoCpus), and the keys the runtime reads or sets spelled as Docker's API
// spells them. The engine matches keys whatever their case, as Go's JSON
// decoder does: "hostConfig": {"privileged": true} is HostConfig.Privileged
// to it, so it must be to the runtime's checks too. Two spellings of one
// key are refused, as which one the engine took would depend on their
// order. Empty options are an empty object.
func DecodeCreateOptions(b []byte) (map[string]any, error) {
	opts := map[string]any{}
	if len(bytes.TrimSpace(b)) > 0 {
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.UseNumber()
		if err := dec.Decode(&opts); err != nil || opts == nil {
			return nil, fmt.Errorf("createOptions must be a JSON object (a Docker create body): %v", err)
		}
	}
	if err := respell(opts, runtimeKeys, "createOptions"); err != nil {
		return nil, err
	}
	if hc, ok := opts["HostConfig"].(map[string]any); ok {
		if err := respell(hc, runtimeHostKeys, "createOptions.HostConfig"); err != nil {
			return nil, err
		}
	}
	return opts, nil
}

// respell renames the keys of m that are names spelled in another case to
// the names' spelling.
func respell(m map[string]any, names []string, where string) error {
	for _, name := range names {
		var found []string
		for k := range m {
			if strings.EqualFold(k, name) {
				found = append(found, k)
			}
		}
		switch {
		case len(found) > 1:
			slices.Sort(found)
			return fmt.Errorf("%s has %q, which the engine takes for one key: keep one, spelled %q", where, found, name)
		case len(found) == 1 && found[0] != name:
			m[name] = m[found[0]]
			delete(m, found[0])
		}
	}
	return nil
}
