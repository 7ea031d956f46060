package hub

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/big"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/hub/query"
	"github.com/hatchery/hatchery/internal/hubid"
	"github.com/hatchery/hatchery/internal/store"
	"github.com/hatchery/hatchery/internal/twindoc"
)

const kindConfiguration = "hub.configuration"

// Configuration is an automatic deployment, in the IoT Hub configurations
// API's JSON shape.
type Configuration struct {
	ID                 string            `json:"id"`
	SchemaVersion      string            `json:"schemaVersion,omitempty"`
	Labels             map[string]string `json:"labels,omitempty"`
	Content            ConfigContent     `json:"content"`
	TargetCondition    string            `json:"targetCondition"`
	CreatedTimeUtc     time.Time         `json:"createdTimeUtc"`
	LastUpdatedTimeUtc time.Time         `json:"lastUpdatedTimeUtc"`
	Priority           int               `json:"priority"`
	SystemMetrics      Metrics           `json:"systemMetrics"`
	Metrics            Metrics           `json:"metrics"`
	ETag               string            `json:"etag"`
}

// ConfigContent is what a configuration sets. An IoT Edge deployment's
// modulesContent maps a module ID to {"properties.desired": {...}} (a base
// deployment) or to {"properties.desired.<path>": value, ...} (a layered
// one); a device (module) configuration's deviceContent (moduleContent)
// maps "properties.desired.<path>" to a value in the twins of the devices
// (modules) it targets.
type ConfigContent struct {
	ModulesContent map[string]map[string]json.RawMessage `json:"modulesContent,omitempty"`
	DeviceContent  map[string]json.RawMessage            `json:"deviceContent,omitempty"`
	ModuleContent  map[string]json.RawMessage            `json:"moduleContent,omitempty"`
}

// Metrics are named queries and their counts.
type Metrics struct {
	Queries map[string]string `json:"queries"`
	Results map[string]int64  `json:"results"`
}

// ConfigStatus is a deployment's state on one device, kept in its twin.
type ConfigStatus struct {
	Status string `json:"status"` // Targeted or Applied
}

var configIDPattern = regexp.MustCompile(`^[a-z0-9\-:+%_#*?!(),=@;$']{1,128}$`)

// forDevices and forModules report whether c configures device or module
// twins (automatic device and module management) rather than deploying
// edge modules.
func (c *Configuration) forDevices() bool { return len(c.Content.DeviceContent) > 0 }

func (c *Configuration) forModules() bool { return len(c.Content.ModuleContent) > 0 }

func (c *Configuration) forEdge() bool { return !c.forDevices() && !c.forModules() }

// layered reports whether a deployment is layered: it sets paths below
// properties.desired rather than whole documents.
func (c *Configuration) layered() bool {
	for _, m := range c.Content.ModulesContent {
		for k := range m {
			if k != "properties.desired" {
				return true
			}
		}
	}
	return false
}

// checkContent validates a deployment's content: each module's entries are
// "properties.desired" or "properties.desired.<path>", never both kinds in
// one deployment, and a base deployment carries $edgeAgent and $edgeHub.
func checkContent(c *ConfigContent, layered bool) error {
	kinds := 0
	for _, n := range []int{len(c.DeviceContent), len(c.ModuleContent), len(c.ModulesContent)} {
		if n > 0 {
			kinds++
		}
	}
	switch {
	case kinds > 1:
		return azerr.BadRequest("a configuration has one of content.deviceContent, content.moduleContent and content.modulesContent")
	case len(c.DeviceContent) > 0:
		return checkTwinContent("content.deviceContent", c.DeviceContent)
	case len(c.ModuleContent) > 0:
		return checkTwinContent("content.moduleContent", c.ModuleContent)
	}
	if len(c.ModulesContent) == 0 {
		return azerr.BadRequest("content.modulesContent is empty: a deployment sets at least $edgeAgent's desired properties")
	}
	for mod, entries := range c.ModulesContent {
		if err := checkModuleID("content.modulesContent", mod); err != nil {
			return err
		}
		for k, v := range entries {
			if k != "properties.desired" && !strings.HasPrefix(k, "properties.desired.") {
				return azerr.BadRequest("content.modulesContent.%s: key %q must be \"properties.desired\" or start with \"properties.desired.\"", mod, k)
			}
			if err := checkEntry("content.modulesContent."+mod, k, v); err != nil {
				return err
			}
		}
		if len(entries) == 0 {
			return azerr.BadRequest("content.modulesContent.%s is empty: give it \"properties.desired\" (or \"properties.desired.<path>\" entries in a layered deployment), or leave the module out", mod)
		}
	}
	if err := checkManifestModules(c.ModulesContent["$edgeAgent"]); err != nil {
		return err
	}
	if !layered {
		for _, m := range []string{"$edgeAgent", "$edgeHub"} {
			if _, ok := c.ModulesContent[m]["properties.desired"]; !ok {
				return azerr.BadRequest("content.modulesContent.%s.properties.desired is required in a base deployment (or make every entry a \"properties.desired.<path>\" for a layered one)", m)
			}
		}
	}
	return nil
}

// checkManifestModules checks the names of the modules $edgeAgent's
// entries run: each becomes a module identity (ensureModules), so each
// follows the rule for module IDs, stricter than that for property names.
func checkManifestModules(entries map[string]json.RawMessage) error {
	for _, k := range slices.Sorted(maps.Keys(entries)) {
		var v any
		_ = json.Unmarshal(entries[k], &v) // checkEntry has read it
		manifest := map[string]any{}
		setPath(manifest, desiredPath(k), v)
		mods, _ := manifest["modules"].(map[string]any)
		for _, m := range slices.Sorted(maps.Keys(mods)) {
			if err := checkModuleID("content.modulesContent.$edgeAgent."+k, m); err != nil {
				return err
			}
		}
	}
	return nil
}

// checkModuleID refuses a module name that cannot name a module identity.
func checkModuleID(where, name string) error {
	if !hubid.Valid(name) {
		return azerr.BadRequest("%s: module name %q is not a valid module ID: use %s", where, name, hubid.Rule)
	}
	return nil
}

// desiredPath is the path below properties.desired that a content key
// ("properties.desired" or "properties.desired.<path>") sets; [""] for the
// whole document.
func desiredPath(key string) []string {
	return strings.Split(strings.TrimPrefix(strings.TrimPrefix(key, "properties.desired"), "."), ".")
}

// checkTwinContent checks a device or module configuration's content:
// "properties.desired.<path>" keys whose paths and values together fit a
// twin (depth, size).
func checkTwinContent(where string, content map[string]json.RawMessage) error {
	for k, v := range content {
		if !strings.HasPrefix(k, "properties.desired.") {
			return azerr.BadRequest("%s: key %q must start with \"properties.desired.\"", where, k)
		}
		if err := checkEntry(where, k, v); err != nil {
			return err
		}
	}
	patch, err := contentPatch(content)
	if err == nil {
		err = twindoc.CheckDocument(where, patch, twindoc.PropertiesLimit)
	}
	if err != nil {
		return azerr.BadRequest("%v", err)
	}
	return nil
}

// checkEntry checks one entry of a module's content against the twin
// rules: "properties.desired" an object the module twin can hold, or
// "properties.desired.<path>" a path of valid property names.
func checkEntry(in, key string, value json.RawMessage) error {
	where := in + "." + key
	for _, name := range strings.Split(key, ".")[2:] {
		if err := twindoc.CheckName(name); err != nil {
			return azerr.BadRequest("%s: in key %q, property name %q %v", in, key, name, err)
		}
	}
	var v any
	if err := twindoc.Unmarshal(value, &v); err != nil {
		return azerr.BadRequest("%s: %v", where, err)
	}
	doc, isObject := v.(map[string]any)
	if key == "properties.desired" && !isObject {
		return azerr.BadRequest("%s must be a JSON object", where)
	}
	var err error
	if isObject {
		err = twindoc.CheckDocument(where, doc, twindoc.PropertiesLimit)
	} else {
		err = twindoc.CheckValue(where, v)
	}
	if err != nil {
		return azerr.BadRequest("%v", err)
	}
	return nil
}

// PutConfiguration creates or replaces a deployment and applies it.
func (s *Service) PutConfiguration(ctx context.Context, id, ifMatch string, c *Configuration) (*Configuration, error) {
	if !configIDPattern.MatchString(id) {
		return nil, azerr.BadRequest("configuration ID %q is not valid: use 1 to 128 lowercase letters, digits or -:+%%_#*?!(),=@;$'", id)
	}
	if c.ID != "" && c.ID != id {
		return nil, azerr.BadRequest("id %q in the body differs from %q in the URL", c.ID, id)
	}
	c.ID = id
	if c.Priority < 0 {
		return nil, azerr.BadRequest("priority %d: a configuration's priority is 0 or more", c.Priority)
	}
	if c.TargetCondition == "" {
		return nil, azerr.BadRequest("targetCondition is required, e.g. \"tags.environment='prod'\" (or \"*\" for every device)")
	}
	cond, err := query.ParseCondition(c.TargetCondition)
	if err != nil {
		return nil, azerr.BadRequest("targetCondition: %v", err)
	}
	switch {
	case c.forModules() && cond.From != query.Modules:
		return nil, azerr.BadRequest("targetCondition: a module configuration targets modules: write it as \"FROM devices.modules WHERE ...\"")
	case !c.forModules() && cond.From != query.Devices:
		return nil, azerr.BadRequest("targetCondition: this configuration targets devices, not modules (only moduleContent targets modules)")
	}
	if err := checkContent(&c.Content, c.layered()); err != nil {
		return nil, err
	}
	for name, q := range c.Metrics.Queries {
		if _, err := query.Parse(q); err != nil {
			return nil, azerr.BadRequest("metrics.queries.%s: %v", name, err)
		}
	}
	if err := s.storeConfiguration(ctx, id, ifMatch, c); err != nil {
		return nil, err
	}
	// Stored, it is applied: what cannot be written now the periodic
	// evaluation (EvaluateConfigurations) writes later, as the hosted hub
	// applies configurations in the background. An error here would have
	// the client retry a change made, refused then as one that exists.
	if err := s.applyAll(ctx); err != nil {
		slog.Warn("applying a configuration: the identities left behind follow at the next periodic evaluation", "configuration", id, "error", err)
	}
	if err := s.countMetrics(ctx, []*Configuration{c}); err != nil {
		slog.Warn("counting a configuration's metrics", "configuration", id, "error", err)
	}
	return c, nil
}

// storeConfiguration creates or updates configuration id as c. A write that
// loses to a concurrent one reads again, so that the answer is what Azure
// gives (409, 412, 400) rather than a store error.
func (s *Service) storeConfiguration(ctx context.Context, id, ifMatch string, c *Configuration) error {
	for range 16 {
		now := s.Now().UTC()
		old, etag, err := s.loadConfiguration(ctx, id)
		switch {
		case err == nil:
			if ifMatch == "" {
				return azerr.Conflict("ConfigurationAlreadyExists", "configuration %q already exists: update it with If-Match", id)
			}
			if !matches(ifMatch, old.ETag) {
				return azerr.PreconditionFailed("configuration %q was changed since etag %s: read it again", id, ifMatch)
			}
			// Azure keeps the ID and the content; the target condition,
			// priority, labels and metrics may change.
			if !jsonEqual(old.Content, c.Content) {
				return azerr.BadRequest("a configuration's content cannot change: create a new one with a higher priority")
			}
			c.CreatedTimeUtc = old.CreatedTimeUtc
		case azerr.As(err).Status() == 404 && strings.Trim(ifMatch, `"`) != "" && strings.Trim(ifMatch, `"`) != "*":
			return err // an update of a version that is gone (deleted meanwhile), not a create
		case azerr.As(err).Status() == 404:
			c.CreatedTimeUtc, etag = now, ""
		default:
			return err
		}
		c.LastUpdatedTimeUtc, c.ETag = now, newETag()
		c.SystemMetrics, c.Metrics.Results = Metrics{}, nil
		body, _ := json.Marshal(c)
		doc := store.Doc{Kind: kindConfiguration, ID: id, Body: body}
		if etag == "" {
			_, err = s.store.Create(ctx, doc)
		} else {
			_, err = s.store.Put(ctx, doc, etag)
		}
		if !store.Raced(err) {
			return err
		}
	}
	return azerr.PreconditionFailed("configuration %q is being changed concurrently: retry", id)
}

// jsonEqual reports whether a and b are the same JSON value, however
// written: clients' JSON libraries order keys, escape strings and spell
// numbers (1.0, 1, 1e0) each their own way when they send back what they read.
func jsonEqual(a, b any) bool {
	var va, vb any
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	if twindoc.Unmarshal(ja, &va) != nil || twindoc.Unmarshal(jb, &vb) != nil {
		return bytes.Equal(ja, jb)
	}
	return sameValue(va, vb)
}

// sameValue compares decoded JSON, numbers (json.Number) by value.
func sameValue(a, b any) bool {
	switch x := a.(type) {
	case map[string]any:
		y, ok := b.(map[string]any)
		if !ok || len(x) != len(y) {
			return false
		}
		for k, v := range x {
			if w, ok := y[k]; !ok || !sameValue(v, w) {
				return false
			}
		}
		return true
	case []any:
		y, ok := b.([]any)
		return ok && slices.EqualFunc(x, y, sameValue)
	case json.Number:
		y, ok := b.(json.Number)
		if !ok || x == y {
			return ok
		}
		// At 256 bits, numbers of up to 64 digits (twindoc's longest) that
		// differ stay apart; Float, unlike Rat, parses 1e999999999 cheaply.
		fx, _, errx := big.ParseFloat(string(x), 10, 256, big.ToNearestEven)
		fy, _, erry := big.ParseFloat(string(y), 10, 256, big.ToNearestEven)
		return errx == nil && erry == nil && fx.Cmp(fy) == 0
	}
	return a == b
}

func (s *Service) loadConfiguration(ctx context.Context, id string) (*Configuration, string, error) {
	d, err := s.store.Get(ctx, kindConfiguration, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, "", azerr.New(404001, "ConfigurationNotFound", "no configuration %q", id)
	}
	if err != nil {
		return nil, "", err
	}
	c := &Configuration{}
	if err := json.Unmarshal(d.Body, c); err != nil {
		return nil, "", fmt.Errorf("stored configuration %q is corrupt: %w", id, err)
	}
	return c, d.ETag, nil
}

// GetConfiguration returns a deployment with its metrics counted now.
func (s *Service) GetConfiguration(ctx context.Context, id string) (*Configuration, error) {
	c, _, err := s.loadConfiguration(ctx, id)
	if err != nil {
		return nil, err
	}
	return c, s.countMetrics(ctx, []*Configuration{c})
}

// ListConfigurations returns every deployment with its metrics.
func (s *Service) ListConfigurations(ctx context.Context) ([]*Configuration, error) {
	cs, err := s.configurations(ctx)
	if err != nil {
		return nil, err
	}
	return cs, s.countMetrics(ctx, cs)
}

// DeleteConfiguration removes a deployment; devices fall back to what else targets them.
// A delete that loses to a concurrent write reads again: deleted meanwhile,
// it is 404 ConfigurationNotFound, not a store error.
func (s *Service) DeleteConfiguration(ctx context.Context, id, ifMatch string) error {
	for range 16 {
		c, etag, err := s.loadConfiguration(ctx, id)
		if err != nil {
			return err
		}
		if !matches(ifMatch, c.ETag) {
			return azerr.PreconditionFailed("configuration %q was changed since etag %s: read it again", id, ifMatch)
		}
		err = s.store.Delete(ctx, kindConfiguration, id, etag)
		if store.Raced(err) {
			continue
		}
		if err != nil {
			return err
		}
		if err := s.applyAll(ctx); err != nil { // as in PutConfiguration
			slog.Warn("withdrawing a configuration: the identities left behind follow at the next periodic evaluation", "configuration", id, "error", err)
		}
		return nil
	}
	return azerr.PreconditionFailed("configuration %q kept changing while being deleted: retry", id)
}

// configurations loads every stored configuration, page by page.
func (s *Service) configurations(ctx context.Context) ([]*Configuration, error) {
	var out []*Configuration
	err := s.eachDoc(ctx, kindConfiguration, func(d store.Doc) error {
		c := &Configuration{}
		if err := json.Unmarshal(d.Body, c); err != nil {
			return fmt.Errorf("stored configuration %q is corrupt: %w", d.ID, err)
		}
		out = append(out, c)
		return nil
	})
	return out, err
}
