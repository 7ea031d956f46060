package server

import (
	"encoding/json"
	"maps"
	"strconv"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/hub"
)

func manifest(image string) map[string]any {
	return map[string]any{"modulesContent": map[string]any{
		"$edgeAgent": map[string]any{"properties.desired": map[string]any{
			"schemaVersion": "1.1",
			"runtime":       map[string]any{"type": "docker", "settings": map[string]any{}},
			"systemModules": map[string]any{},
			"modules": map[string]any{"sensor": map[string]any{"type": "docker", "status": "running", "restartPolicy": "always",
				"settings": map[string]any{"image": image}}},
		}},
		"$edgeHub": map[string]any{"properties.desired": map[string]any{"schemaVersion": "1.1", "routes": map[string]any{}}},
		"sensor":   map[string]any{"properties.desired": map[string]any{"interval": 5}},
	}}
}

func (e *env) agentImage(device string) string {
	e.t.Helper()
	var tw hub.Twin
	if err := e.hubAPI.Do(ctx, "GET", "/twins/"+device+"/modules/$edgeAgent", "", nil, &tw); err != nil {
		e.t.Fatal(err)
	}
	var d struct {
		Modules map[string]struct {
			Settings struct{ Image string } `json:"settings"`
		} `json:"modules"`
	}
	_ = json.Unmarshal(tw.Properties.Desired, &d)
	return d.Modules["sensor"].Settings.Image
}

func TestDeploymentsTargetTags(t *testing.T) {
	e := newEnv(t)
	for id, env := range map[string]string{"edge-a": "prod", "edge-b": "prod", "edge-c": "test"} {
		if err := e.hubAPI.Do(ctx, "PUT", "/devices/"+id, "", map[string]any{"capabilities": map[string]any{"iotEdge": true}}, nil); err != nil {
			t.Fatal(err)
		}
		if err := e.hubAPI.Do(ctx, "PATCH", "/twins/"+id, "", map[string]any{"tags": map[string]any{"environment": env}}, nil); err != nil {
			t.Fatal(err)
		}
	}
	// A plain device is never targeted.
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/plain", "", map[string]any{}, nil); err != nil {
		t.Fatal(err)
	}
	dep := map[string]any{"content": manifest("sensor:1"), "targetCondition": "tags.environment='prod'", "priority": 10}
	var c hub.Configuration
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/prod-sensor", "", dep, &c); err != nil {
		t.Fatal(err)
	}
	if c.SystemMetrics.Results["targetedCount"] != 2 || c.SystemMetrics.Results["appliedCount"] != 2 {
		t.Fatalf("metrics %+v", c.SystemMetrics.Results)
	}
	// No custom metrics are empty objects, not null: the SDKs iterate them.
	var raw map[string]json.RawMessage
	if err := e.hubAPI.Do(ctx, "GET", "/configurations/prod-sensor", "", nil, &raw); err != nil || string(raw["metrics"]) != `{"queries":{},"results":{}}` {
		t.Fatalf("metrics of a deployment without custom ones: %v %s", err, raw["metrics"])
	}
	if e.agentImage("edge-a") != "sensor:1" || e.agentImage("edge-b") != "sensor:1" || e.agentImage("edge-c") != "" {
		t.Fatalf("images a=%q b=%q c=%q", e.agentImage("edge-a"), e.agentImage("edge-b"), e.agentImage("edge-c"))
	}
	var mt hub.Twin
	if err := e.hubAPI.Do(ctx, "GET", "/twins/edge-a/modules/sensor", "", nil, &mt); err != nil || !strings.Contains(string(mt.Properties.Desired), `"interval":5`) {
		t.Fatalf("custom module twin: %v %s", err, mt.Properties.Desired)
	}

	// A higher-priority deployment wins; a layered one adds to the base.
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/prod-sensor-2", "", map[string]any{"content": manifest("sensor:2"),
		"targetCondition": "tags.environment='prod'", "priority": 20}, nil); err != nil {
		t.Fatal(err)
	}
	layer := map[string]any{"modulesContent": map[string]any{"$edgeAgent": map[string]any{
		"properties.desired.modules.extra": map[string]any{"type": "docker", "status": "running", "restartPolicy": "always", "settings": map[string]any{"image": "extra:1"}}}}}
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/extra-layer", "", map[string]any{"content": layer, "targetCondition": "tags.environment='prod'", "priority": 1}, nil); err != nil {
		t.Fatal(err)
	}
	if e.agentImage("edge-a") != "sensor:2" {
		t.Fatalf("priority: %q", e.agentImage("edge-a"))
	}
	var tw hub.Twin
	_ = e.hubAPI.Do(ctx, "GET", "/twins/edge-a/modules/$edgeAgent", "", nil, &tw)
	if !strings.Contains(string(tw.Properties.Desired), `"extra:1"`) || !strings.Contains(string(tw.Properties.Desired), `"sensor:2"`) {
		t.Fatalf("layered: %s", tw.Properties.Desired)
	}

	// A deployment's target condition may change, its content not.
	var cur hub.Configuration
	if err := e.hubAPI.Do(ctx, "GET", "/configurations/prod-sensor", "", nil, &cur); err != nil {
		t.Fatal(err)
	}
	cur.TargetCondition = "tags.environment='test'"
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/prod-sensor", cur.ETag, &cur, &c); err != nil || c.SystemMetrics.Results["targetedCount"] != 1 {
		t.Fatalf("retargeted: %v %+v", err, c.SystemMetrics.Results)
	}
	if e.agentImage("edge-c") != "sensor:1" {
		t.Fatalf("edge-c after the deployment was retargeted to it: %q", e.agentImage("edge-c"))
	}
	changed := map[string]any{"content": manifest("sensor:9"), "targetCondition": "tags.environment='test'", "priority": 10}
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/prod-sensor", c.ETag, changed, nil); azerr.As(err).Status() != 400 || !strings.Contains(err.Error(), "content cannot change") {
		t.Fatalf("content changed: %v", err)
	}
	cur.ETag, cur.TargetCondition = c.ETag, "tags.environment='prod'"
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/prod-sensor", cur.ETag, &cur, nil); err != nil {
		t.Fatal(err)
	}

	// Changing tags moves a device between deployments.
	if err := e.hubAPI.Do(ctx, "PATCH", "/twins/edge-c", "", map[string]any{"tags": map[string]any{"environment": "prod"}}, nil); err != nil {
		t.Fatal(err)
	}
	if err := e.hubAPI.Do(ctx, "PATCH", "/twins/edge-a", "", map[string]any{"tags": map[string]any{"environment": "test"}}, nil); err != nil {
		t.Fatal(err)
	}
	if e.agentImage("edge-c") != "sensor:2" {
		t.Fatalf("edge-c after joining prod: %q", e.agentImage("edge-c"))
	}
	if err := e.hubAPI.Do(ctx, "GET", "/configurations/prod-sensor-2", "", nil, &c); err != nil || c.SystemMetrics.Results["appliedCount"] != 2 {
		t.Fatalf("metrics after moves: %v %+v", err, c.SystemMetrics.Results)
	}
	// The edge agent's report counts as success.
	if _, err := e.hub.UpdateReported(ctx, hub.Ref{Device: "edge-b", Module: "$edgeAgent"}, map[string]any{
		"lastDesiredVersion": float64(mustTwin(t, e, "edge-b", "$edgeAgent").Properties.DesiredVersion()), "lastDesiredStatus": map[string]any{"code": 200}}); err != nil {
		t.Fatal(err)
	}
	_ = e.hubAPI.Do(ctx, "GET", "/configurations/prod-sensor-2", "", nil, &c)
	if c.SystemMetrics.Results["reportedSuccessfulCount"] != 1 {
		t.Fatalf("reported successful: %+v", c.SystemMetrics.Results)
	}

	// The query API sees the same twins.
	var rows []map[string]any
	if err := e.hubAPI.Do(ctx, "POST", "/devices/query", "", map[string]string{"query": "SELECT deviceId FROM devices WHERE tags.environment = 'prod'"}, &rows); err != nil {
		t.Fatal(err)
	}
	if len(rows) != 2 {
		t.Fatalf("query rows %v", rows)
	}
	// A row is the whole twin, as GET /twins shows it, and conditions
	// reach every field of it.
	var twin map[string]any
	if err := e.hubAPI.Do(ctx, "GET", "/twins/edge-a", "", nil, &twin); err != nil {
		t.Fatal(err)
	}
	rows = nil
	q := "SELECT * FROM devices WHERE deviceId = 'edge-a' AND authenticationType = 'sas' AND statusUpdateTime > '2000-01-01' AND cloudToDeviceMessageCount = 0"
	if err := e.hubAPI.Do(ctx, "POST", "/devices/query", "", map[string]string{"query": q}, &rows); err != nil || len(rows) != 1 {
		t.Fatalf("%s: %v %v", q, err, rows)
	}
	for k, v := range twin {
		if got, _ := json.Marshal(rows[0][k]); string(got) != mustJSON(v) {
			t.Errorf("query row's %s: %s, GET /twins: %s", k, got, mustJSON(v))
		}
	}

	// Bad deployments are refused with what to fix, and change nothing.
	emptyModule := manifest("x")
	emptyModule["modulesContent"].(map[string]any)["sensor"] = map[string]any{}
	for _, tc := range []struct {
		body map[string]any
		want string
	}{
		{map[string]any{"content": manifest("x"), "targetCondition": "tags.environment = "}, "targetCondition"},
		{map[string]any{"content": map[string]any{"moduleContent": map[string]any{"properties.desired.fw": 1}}, "targetCondition": "*"}, "FROM devices.modules WHERE"},
		{map[string]any{"content": map[string]any{"deviceContent": map[string]any{"properties.desired.fw": 1}}, "targetCondition": "FROM devices.modules WHERE moduleId = 'm'"}, "targets devices, not modules"},
		{map[string]any{"content": map[string]any{"deviceContent": map[string]any{"fw": 1}}, "targetCondition": "*"}, `must start with "properties.desired."`},
		{map[string]any{"content": map[string]any{"deviceContent": map[string]any{"properties.desired.a.b.c.d.e.f.g.h.i.j.k": 1}}, "targetCondition": "*"}, "deep"},
		{map[string]any{"content": map[string]any{"deviceContent": map[string]any{"properties.desired.fw": 1}, "modulesContent": manifest("x")["modulesContent"]}, "targetCondition": "*"}, "one of"},
		{map[string]any{"content": manifest("x")}, "targetCondition is required"},
		{map[string]any{"content": manifest("x"), "targetCondition": "*", "priority": -1}, "priority is 0 or more"},
		{map[string]any{"content": map[string]any{"modulesContent": map[string]any{"$edgeAgent": map[string]any{"properties.desired": map[string]any{}}}}, "targetCondition": "*"}, "$edgeHub"},
		{map[string]any{"content": map[string]any{"modulesContent": map[string]any{"$edgeAgent": map[string]any{"desired": map[string]any{}}}}, "targetCondition": "*"}, "must be"},
		{map[string]any{"content": emptyModule, "targetCondition": "*"}, "modulesContent.sensor is empty"},
		{map[string]any{"content": map[string]any{"modulesContent": map[string]any{"sensor": map[string]any{"properties.desired..x": 1}}}, "targetCondition": "*"}, `property name "" is empty`},
		{map[string]any{"content": map[string]any{"modulesContent": map[string]any{"sensor": map[string]any{"properties.desired.a$b": 1}}}, "targetCondition": "*"}, `property name "a$b" contains`},
	} {
		err := e.hubAPI.Do(ctx, "PUT", "/configurations/bad", "", tc.body, nil)
		if ae := azerr.As(err); ae.Status() != 400 || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("bad deployment: %v, want 400 with %q", err, tc.want)
		}
	}
	if err := e.hubAPI.Do(ctx, "GET", "/configurations/bad", "", nil, nil); azerr.As(err).Status() != 404 {
		t.Fatalf("bad deployment stored: %v", err)
	}
	if err := e.hubAPI.Do(ctx, "POST", "/devices/query", "", map[string]string{"query": "SELECT * FROM devices WHERE ("}, nil); azerr.As(err).Status() != 400 {
		t.Fatalf("malformed query: %v", err)
	}
}

func mustTwin(t *testing.T, e *env, device, module string) *hub.Twin {
	tw, err := e.hub.GetTwin(ctx, hub.Ref{Device: device, Module: module})
	if err != nil {
		t.Fatal(err)
	}
	return tw
}

// Layers that merge past a module twin's 32 KiB on one device stay off that
// device; the deployment itself is stored and reaches the others.
func TestLayerTooLargeForOneDevice(t *testing.T) {
	e := newEnv(t)
	for id, tag := range map[string]string{"edge-a": "big", "edge-b": "small"} {
		e.newDevice(id, true)
		if err := e.hubAPI.Do(ctx, "PATCH", "/twins/"+id, "", map[string]any{"tags": map[string]any{"size": tag}}, nil); err != nil {
			t.Fatal(err)
		}
	}
	strs := func(prefix string) map[string]any {
		m := map[string]any{}
		for i := range 5 {
			m[prefix+strconv.Itoa(i)] = strings.Repeat("x", 4000)
		}
		return m
	}
	base := manifest("sensor:1")
	base["modulesContent"].(map[string]any)["sensor"] = map[string]any{"properties.desired": strs("base")}
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/base", "", map[string]any{"content": base, "targetCondition": "*"}, nil); err != nil {
		t.Fatal(err)
	}
	layer := map[string]any{"modulesContent": map[string]any{"sensor": map[string]any{"properties.desired.more": strs("more")}}}
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/layer", "", map[string]any{"content": layer, "targetCondition": "tags.size='big'"}, nil); err != nil {
		t.Fatalf("a layer too large for one device: %v", err)
	}
	if got := mustTwin(t, e, "edge-a", "sensor"); strings.Contains(string(got.Properties.Desired), "more0") || !strings.Contains(string(got.Properties.Desired), "base0") {
		t.Fatalf("edge-a's module twin took the oversized merge: %.80s", got.Properties.Desired)
	}
	if err := e.hubAPI.Do(ctx, "GET", "/configurations/layer", "", nil, nil); err != nil {
		t.Fatalf("the layer was not stored: %v", err)
	}
	// Statuses say what is in place: the layer is not, on edge-a.
	if got := mustTwin(t, e, "edge-a", "").Configurations["layer"].Status; got != "Targeted" {
		t.Errorf("edge-a's status of the layer it could not take: %q, want Targeted", got)
	}
	if got := mustTwin(t, e, "edge-b", "").Configurations["base"].Status; got != "Applied" {
		t.Errorf("edge-b's status of the base: %q, want Applied", got)
	}
}

// Device configurations (automatic device management) set desired
// properties in the twins of the devices they target: the highest
// priority wins on each device, devices join as their tags change or
// when they are created, and the metrics count them.
func TestDeviceConfigurations(t *testing.T) {
	e := newEnv(t)
	tag := func(id, env string) {
		t.Helper()
		if err := e.hubAPI.Do(ctx, "PATCH", "/twins/"+id, "", map[string]any{"tags": map[string]any{"environment": env}}, nil); err != nil {
			t.Fatal(err)
		}
	}
	for id, env := range map[string]string{"s-a": "prod", "s-b": "prod", "s-c": "test"} {
		if err := e.hubAPI.Do(ctx, "PUT", "/devices/"+id, "", map[string]any{}, nil); err != nil {
			t.Fatal(err)
		}
		tag(id, env)
	}
	desired := func(id string) map[string]any {
		t.Helper()
		var tw hub.Twin
		if err := e.hubAPI.Do(ctx, "GET", "/twins/"+id, "", nil, &tw); err != nil {
			t.Fatal(err)
		}
		var d map[string]any
		_ = json.Unmarshal(tw.Properties.Desired, &d)
		return d
	}
	firmware := func(id string) any {
		fw, _ := desired(id)["firmware"].(map[string]any)
		return fw["version"]
	}
	var c hub.Configuration
	cfg := map[string]any{"content": map[string]any{"deviceContent": map[string]any{
		"properties.desired.firmware.version": "1.2", "properties.desired.telemetry": map[string]any{"interval": 30}}},
		"targetCondition": "tags.environment='prod'", "priority": 10}
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/fw-12", "", cfg, &c); err != nil {
		t.Fatal(err)
	}
	if r := c.SystemMetrics.Results; r["targetedCount"] != 2 || r["appliedCount"] != 2 {
		t.Fatalf("metrics %+v", r)
	}
	if firmware("s-a") != "1.2" || firmware("s-b") != "1.2" || firmware("s-c") != nil {
		t.Fatalf("firmware a=%v b=%v c=%v", firmware("s-a"), firmware("s-b"), firmware("s-c"))
	}
	if tel, _ := desired("s-a")["telemetry"].(map[string]any); tel["interval"] != float64(30) {
		t.Fatalf("telemetry %v", desired("s-a"))
	}

	// A higher priority wins where both target.
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/fw-13", "", map[string]any{"content": map[string]any{"deviceContent": map[string]any{
		"properties.desired.firmware.version": "1.3"}}, "targetCondition": "deviceId='s-b'", "priority": 20}, nil); err != nil {
		t.Fatal(err)
	}
	if firmware("s-b") != "1.3" || firmware("s-a") != "1.2" {
		t.Fatalf("priority: a=%v b=%v", firmware("s-a"), firmware("s-b"))
	}
	if err := e.hubAPI.Do(ctx, "GET", "/configurations/fw-12", "", nil, &c); err != nil || c.SystemMetrics.Results["targetedCount"] != 2 || c.SystemMetrics.Results["appliedCount"] != 1 {
		t.Fatalf("fw-12 metrics with fw-13 on s-b: %v %+v", err, c.SystemMetrics.Results)
	}

	// Devices join as their tags change, or as they are created with them.
	tag("s-c", "prod")
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/s-d", "", map[string]any{}, nil); err != nil {
		t.Fatal(err)
	}
	tag("s-d", "prod")
	if firmware("s-c") != "1.2" || firmware("s-d") != "1.2" {
		t.Fatalf("joined: c=%v d=%v", firmware("s-c"), firmware("s-d"))
	}
	var rows []map[string]any
	if err := e.hubAPI.Do(ctx, "POST", "/devices/query", "", map[string]string{"query": "SELECT deviceId FROM devices WHERE configurations.[[fw-12]].status = 'Applied'"}, &rows); err != nil || len(rows) != 3 {
		t.Fatalf("applied query: %v %v", err, rows)
	}
	// One for every device reaches a device created after it, untagged.
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/all", "", map[string]any{"content": map[string]any{"deviceContent": map[string]any{
		"properties.desired.region": "eu"}}, "targetCondition": "*", "priority": 1}, nil); err != nil {
		t.Fatal(err)
	}
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/s-e", "", map[string]any{}, nil); err != nil {
		t.Fatal(err)
	}
	if desired("s-e")["region"] != "eu" {
		t.Fatalf("a new device: %v", desired("s-e"))
	}
}

// Module configurations (automatic module management) set desired
// properties in the module twins their condition selects, not in the edge
// runtime's own modules; modules join as they are created or tagged.
func TestModuleConfigurations(t *testing.T) {
	e := newEnv(t)
	for _, id := range []string{"md-1", "md-2"} {
		if err := e.hubAPI.Do(ctx, "PUT", "/devices/"+id, "", map[string]any{}, nil); err != nil {
			t.Fatal(err)
		}
		if err := e.hubAPI.Do(ctx, "PUT", "/devices/"+id+"/modules/sensor", "", map[string]any{}, nil); err != nil {
			t.Fatal(err)
		}
	}
	desired := func(device, module string) map[string]any {
		t.Helper()
		var tw hub.Twin
		if err := e.hubAPI.Do(ctx, "GET", "/twins/"+device+"/modules/"+module, "", nil, &tw); err != nil {
			t.Fatal(err)
		}
		var d map[string]any
		_ = json.Unmarshal(tw.Properties.Desired, &d)
		return d
	}
	var c hub.Configuration
	cfg := map[string]any{"content": map[string]any{"moduleContent": map[string]any{"properties.desired.sampleRate": 10}},
		"targetCondition": "FROM devices.modules WHERE moduleId = 'sensor'", "priority": 5}
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/sensors", "", cfg, &c); err != nil {
		t.Fatal(err)
	}
	if r := c.SystemMetrics.Results; r["targetedCount"] != 2 || r["appliedCount"] != 2 {
		t.Fatalf("metrics %+v", r)
	}
	for _, d := range []string{"md-1", "md-2"} {
		if desired(d, "sensor")["sampleRate"] != float64(10) {
			t.Fatalf("%s/sensor: %v", d, desired(d, "sensor"))
		}
	}
	// A module created afterwards is configured; another module is not.
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/md-1/modules/other", "", map[string]any{}, nil); err != nil {
		t.Fatal(err)
	}
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/md-3", "", map[string]any{}, nil); err != nil {
		t.Fatal(err)
	}
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/md-3/modules/sensor", "", map[string]any{}, nil); err != nil {
		t.Fatal(err)
	}
	if desired("md-3", "sensor")["sampleRate"] != float64(10) || desired("md-1", "other")["sampleRate"] != nil {
		t.Fatalf("later modules: md-3/sensor %v, md-1/other %v", desired("md-3", "sensor"), desired("md-1", "other"))
	}
	// Module tags move a module in and out of a condition on them.
	tagged := map[string]any{"content": map[string]any{"moduleContent": map[string]any{"properties.desired.mode": "eco"}},
		"targetCondition": "FROM devices.modules WHERE tags.power = 'low'", "priority": 9}
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/eco", "", tagged, nil); err != nil {
		t.Fatal(err)
	}
	if err := e.hubAPI.Do(ctx, "PATCH", "/twins/md-1/modules/other", "", map[string]any{"tags": map[string]any{"power": "low"}}, nil); err != nil {
		t.Fatal(err)
	}
	if desired("md-1", "other")["mode"] != "eco" {
		t.Fatalf("a module tagged into a configuration: %v", desired("md-1", "other"))
	}
}

// Applying content to an edge device, or a deployment to it, sets its
// module twins' desired properties only: their tags stay, for the module
// configurations that target modules by them.
func TestEdgeContentKeepsModuleTags(t *testing.T) {
	e := newEnv(t)
	e.newDevice("edge2", true)
	if err := e.hubAPI.Do(ctx, "POST", "/devices/edge2/applyConfigurationContent", "", manifest("sensor:1"), nil); err != nil {
		t.Fatal(err)
	}
	modules := []string{"$edgeAgent", "$edgeHub", "sensor"}
	tag := func() {
		t.Helper()
		for _, m := range modules {
			if err := e.hubAPI.Do(ctx, "PATCH", "/twins/edge2/modules/"+m, "", map[string]any{"tags": map[string]any{"owner": "team-a"}}, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	tagsKept := func(after string) {
		t.Helper()
		for _, m := range modules {
			if tw := mustTwin(t, e, "edge2", m); string(tw.Tags) != `{"owner":"team-a"}` {
				t.Errorf("%s: %s's tags %s", after, m, tw.Tags)
			}
		}
	}
	tag()
	content := manifest("sensor:2")
	content["modulesContent"].(map[string]any)["sensor"] = map[string]any{"properties.desired": map[string]any{"interval": 7}}
	if err := e.hubAPI.Do(ctx, "POST", "/devices/edge2/applyConfigurationContent", "", content, nil); err != nil {
		t.Fatal(err)
	}
	if e.agentImage("edge2") != "sensor:2" {
		t.Fatalf("content applied again: image %q", e.agentImage("edge2"))
	}
	tagsKept("content applied again")
	tag()
	content = manifest("sensor:3")
	content["modulesContent"].(map[string]any)["$edgeHub"] = map[string]any{"properties.desired": map[string]any{"schemaVersion": "1.2", "routes": map[string]any{}}}
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/dep1", "", map[string]any{"content": content, "targetCondition": "*"}, nil); err != nil {
		t.Fatal(err)
	}
	if e.agentImage("edge2") != "sensor:3" {
		t.Fatalf("deployed: image %q", e.agentImage("edge2"))
	}
	tagsKept("deployed")
}

// A module the $edgeAgent manifest runs gets a module identity, so its name
// follows the rule for module IDs: content naming one that cannot be is
// refused whole, before any module is created or any status recorded.
func TestManifestModuleNamesAreModuleIDs(t *testing.T) {
	e := newEnv(t)
	e.newDevice("edge2", true)
	module := map[string]any{"type": "docker", "status": "running", "restartPolicy": "always", "settings": map[string]any{"image": "m:1"}}
	base := manifest("sensor:1")
	agent := base["modulesContent"].(map[string]any)["$edgeAgent"].(map[string]any)["properties.desired"].(map[string]any)
	agent["modules"] = map[string]any{"good1": module, "good2": module, "m&1": module, "zz": module}
	layer := func(key string, v any) map[string]any {
		return map[string]any{"modulesContent": map[string]any{"$edgeAgent": map[string]any{key: v}}}
	}
	for name, content := range map[string]map[string]any{
		"base":           base,
		"layer, module":  layer("properties.desired.modules.m&1", module),
		"layer, setting": layer("properties.desired.modules.m&1.settings.image", "m:2"),
		"layer, modules": layer("properties.desired.modules", map[string]any{"good1": module, "m&1": module}),
	} {
		err := e.hubAPI.Do(ctx, "PUT", "/configurations/dep3", "", map[string]any{"content": content, "targetCondition": "*"}, nil)
		if azerr.As(err).Status() != 400 || !strings.Contains(err.Error(), `"m&1" is not a valid module ID`) {
			t.Errorf("%s: PUT /configurations: %v, want 400 naming m&1", name, err)
		}
	}
	err := e.hubAPI.Do(ctx, "POST", "/devices/edge2/applyConfigurationContent", "", base, nil)
	if azerr.As(err).Status() != 400 || !strings.Contains(err.Error(), `"m&1" is not a valid module ID`) {
		t.Errorf("applyConfigurationContent: %v, want 400 naming m&1", err)
	}
	if err := e.hubAPI.Do(ctx, "GET", "/configurations/dep3", "", nil, nil); azerr.As(err).Status() != 404 {
		t.Errorf("the refused deployment was stored: %v", err)
	}
	var mods []hub.Device
	if err := e.hubAPI.Do(ctx, "GET", "/devices/edge2/modules", "", nil, &mods); err != nil || len(mods) != 2 {
		var ids []string
		for _, m := range mods {
			ids = append(ids, m.ModuleID)
		}
		t.Errorf("modules after refused content: %v %v, want only $edgeAgent and $edgeHub", err, ids)
	}
	if tw := mustTwin(t, e, "edge2", ""); len(tw.Configurations) != 0 || e.agentImage("edge2") != "" {
		t.Errorf("refused content reached the device: configurations %v, image %q", tw.Configurations, e.agentImage("edge2"))
	}
}

// An edge deployment's status on a device is on its $edgeAgent twin, as in
// the hosted hub, where the deployment's metric queries find it.
func TestDeploymentStatusOnEdgeAgent(t *testing.T) {
	e := newEnv(t)
	e.newDevice("edge2", true)
	statuses := func(module string) map[string]string {
		t.Helper()
		out := map[string]string{}
		for id, st := range mustTwin(t, e, "edge2", module).Configurations {
			out[id] = st.Status
		}
		return out
	}
	deploy := func(id string, priority int) {
		t.Helper()
		if err := e.hubAPI.Do(ctx, "PUT", "/configurations/"+id, "", map[string]any{"content": manifest(id), "targetCondition": "*", "priority": priority}, nil); err != nil {
			t.Fatal(err)
		}
	}
	deploy("dep1", 1)
	if got := statuses("$edgeAgent"); !maps.Equal(got, map[string]string{"dep1": "Applied"}) {
		t.Fatalf("$edgeAgent's configurations %v", got)
	}
	var c hub.Configuration
	if err := e.hubAPI.Do(ctx, "GET", "/configurations/dep1", "", nil, &c); err != nil {
		t.Fatal(err)
	}
	var rows []map[string]any
	if err := e.hubAPI.Do(ctx, "POST", "/devices/query", "", map[string]string{"query": c.SystemMetrics.Queries["appliedCount"]}, &rows); err != nil || len(rows) != 1 || c.SystemMetrics.Results["appliedCount"] != 1 {
		t.Fatalf("appliedCount %d, its query %q: %v %v", c.SystemMetrics.Results["appliedCount"], c.SystemMetrics.Queries["appliedCount"], err, rows)
	}

	// A device configuration's status is the device twin's only; the
	// device twin keeps the deployments' too.
	deploy("dep2", 2)
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/fw", "", map[string]any{"content": map[string]any{"deviceContent": map[string]any{
		"properties.desired.fw": "1.0"}}, "targetCondition": "*"}, nil); err != nil {
		t.Fatal(err)
	}
	if got := statuses("$edgeAgent"); !maps.Equal(got, map[string]string{"dep1": "Targeted", "dep2": "Applied"}) {
		t.Fatalf("$edgeAgent's configurations under two deployments %v", got)
	}
	if got := statuses(""); !maps.Equal(got, map[string]string{"dep1": "Targeted", "dep2": "Applied", "fw": "Applied"}) {
		t.Fatalf("the device twin's configurations %v", got)
	}

	// A device no longer an edge device is no deployment's.
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/edge2", "*", map[string]any{"capabilities": map[string]any{"iotEdge": false}}, nil); err != nil {
		t.Fatal(err)
	}
	if got := statuses("$edgeAgent"); len(got) != 0 {
		t.Fatalf("$edgeAgent's configurations once the device is not an edge device: %v", got)
	}
	if got := statuses(""); !maps.Equal(got, map[string]string{"fw": "Applied"}) {
		t.Fatalf("the device twin's configurations once it is not an edge device: %v", got)
	}
}

// Every metric a configuration reports is its query's row count: the query
// text, run through /devices/query, gives the number reported, whatever
// form the target condition takes.
func TestMetricQueriesGiveTheirCounts(t *testing.T) {
	e := newEnv(t)
	for id, env := range map[string]string{"e1": "edge", "e2": "lab", "e3": "prod", "d1": "lab", "d2": ""} {
		e.newDevice(id, id[0] == 'e')
		if env != "" {
			if err := e.hubAPI.Do(ctx, "PATCH", "/twins/"+id, "", map[string]any{"tags": map[string]any{"env": env}}, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/d1/modules/sensor", "", map[string]any{}, nil); err != nil {
		t.Fatal(err)
	}
	edgeOrLab := "tags.env = 'edge' OR tags.env = 'lab'"
	layer := map[string]any{"modulesContent": map[string]any{"sensor": map[string]any{"properties.desired.lab": true}}}
	fw := map[string]any{"deviceContent": map[string]any{"properties.desired.fw": "1.0"}}
	for id, cfg := range map[string]map[string]any{
		"all-edge":    {"content": manifest("sensor:1"), "targetCondition": "*", "priority": 1},
		"edge-or-lab": {"content": manifest("sensor:2"), "targetCondition": edgeOrLab, "priority": 2},
		"lab-layer":   {"content": layer, "targetCondition": "FROM devices WHERE tags.env = 'lab'"},
		"fw-all":      {"content": fw, "targetCondition": "*", "priority": 1},
		"fw-some":     {"content": fw, "targetCondition": edgeOrLab, "priority": 2},
		"sensors": {"content": map[string]any{"moduleContent": map[string]any{"properties.desired.rate": 1}},
			"targetCondition": "FROM devices.modules WHERE moduleId = 'sensor'"},
	} {
		if id == "edge-or-lab" {
			cfg["metrics"] = map[string]any{"queries": map[string]string{
				"codes": "SELECT properties.reported.lastDesiredStatus.code AS code, COUNT() AS n FROM devices.modules WHERE moduleId = '$edgeAgent' GROUP BY properties.reported.lastDesiredStatus.code",
				"ok":    "SELECT deviceId FROM devices.modules WHERE moduleId = '$edgeAgent' AND configurations.[[edge-or-lab]].status = 'Applied' AND properties.reported.lastDesiredStatus.code = 200",
			}}
		}
		if err := e.hubAPI.Do(ctx, "PUT", "/configurations/"+id, "", cfg, nil); err != nil {
			t.Fatalf("%s: %v", id, err)
		}
	}
	// e1's edge agent took its deployment; e2's failed to.
	for id, code := range map[string]float64{"e1": 200, "e2": 500} {
		if _, err := e.hub.UpdateReported(ctx, hub.Ref{Device: id, Module: "$edgeAgent"}, map[string]any{
			"lastDesiredVersion": float64(mustTwin(t, e, id, "$edgeAgent").Properties.DesiredVersion()), "lastDesiredStatus": map[string]any{"code": code}}); err != nil {
			t.Fatal(err)
		}
	}

	var cs []hub.Configuration
	if err := e.hubAPI.Do(ctx, "GET", "/configurations", "", nil, &cs); err != nil || len(cs) != 6 {
		t.Fatalf("configurations: %v %d", err, len(cs))
	}
	got := map[string]int64{}
	for _, c := range cs {
		for _, m := range []hub.Metrics{c.SystemMetrics, c.Metrics} {
			for name, q := range m.Queries {
				var rows []map[string]any
				if err := e.hubAPI.Do(ctx, "POST", "/devices/query", "", map[string]string{"query": q}, &rows); err != nil {
					t.Errorf("%s's %s query %q: %v", c.ID, name, q, err)
					continue
				}
				if int64(len(rows)) != m.Results[name] {
					t.Errorf("%s's %s is %d, its query %q gives %d rows", c.ID, name, m.Results[name], q, len(rows))
				}
				got[c.ID+" "+name] = m.Results[name]
			}
		}
	}
	for metric, want := range map[string]int64{
		"all-edge targetedCount": 3, "all-edge appliedCount": 1,
		"edge-or-lab targetedCount": 2, "edge-or-lab appliedCount": 2,
		"edge-or-lab reportedSuccessfulCount": 1, "edge-or-lab reportedFailedCount": 1,
		"edge-or-lab ok": 1, "edge-or-lab codes": 3,
		"lab-layer targetedCount": 1, "lab-layer appliedCount": 1,
		"fw-all targetedCount": 5, "fw-all appliedCount": 2,
		"fw-some targetedCount": 3, "fw-some appliedCount": 3,
		// The condition also matches the edge devices' sensor modules,
		// which only their deployments configure.
		"sensors targetedCount": 4, "sensors appliedCount": 1,
	} {
		if got[metric] != want {
			t.Errorf("%s: %d, want %d", metric, got[metric], want)
		}
	}
}
