package server

import (
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/testutil"
)

// Integers beyond 2^53, which a double cannot hold, as the SDKs write them.
const (
	big   = "9007199254740993"
	big64 = "12345678901234567890"
)

// twinJSON reads a twin over the service API: its tags, desired and
// reported documents as the hub wrote them.
func (e *env) twinJSON(path string) (tags, desired, reported string) {
	e.t.Helper()
	var tw hub.Twin
	if err := e.hubAPI.Do(ctx, "GET", "/twins/"+path, "", nil, &tw); err != nil {
		e.t.Fatal(err)
	}
	return string(tw.Tags), string(tw.Properties.Desired), string(tw.Properties.Reported)
}

// mustHold fails unless doc (JSON) holds every one of want.
func mustHold(t *testing.T, what, doc string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(doc, w) {
			t.Errorf("%s lacks %s: %s", what, w, doc)
		}
	}
}

// Twin numbers keep every digit on every way in (service PATCH and PUT,
// bulk updates, a device's reported properties) and out (GET, the
// device's twin read and desired notifications, query projections), and
// conditions compare them as before.
func TestTwinNumbersKeepEveryDigit(t *testing.T) {
	e := newEnv(t)
	_, _, c := e.mqttDevice("d2")
	desired := make(chan []byte, 1)
	if err := c.OnDesired(ctx, func(p []byte) { desired <- p }); err != nil {
		t.Fatal(err)
	}
	var tw hub.Twin
	if err := e.hubAPI.Do(ctx, "PATCH", "/twins/d2", "", json.RawMessage(`{"tags":{"id":`+big64+`},
		"properties":{"desired":{"big":`+big+`,"id":`+big64+`}}}`), &tw); err != nil {
		t.Fatal(err)
	}
	mustHold(t, "PATCH answer", string(tw.Tags)+string(tw.Properties.Desired), `"id":`+big64, `"big":`+big)
	mustHold(t, "desired notification", string(testutil.Within(t, desired, "desired patch")), `"big":`+big, `"id":`+big64)
	tags, des, _ := e.twinJSON("d2")
	mustHold(t, "tags", tags, `"id":`+big64)
	mustHold(t, "desired", des, `"big":`+big, `"id":`+big64)

	if _, err := c.PatchReported(ctx, json.RawMessage(`{"big":`+big+`,"at":{"min":-9223372036854775807}}`)); err != nil {
		t.Fatal(err)
	}
	dt, err := c.GetTwin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	mustHold(t, "the device's twin", string(dt.Desired)+string(dt.Reported), `"big":`+big, `"id":`+big64, `"min":-9223372036854775807`)
	_, _, rep := e.twinJSON("d2")
	mustHold(t, "reported", rep, `"big":`+big, `"min":-9223372036854775807`)

	query := func(q string) string {
		t.Helper()
		var rows json.RawMessage
		if err := e.hubAPI.Do(ctx, "POST", "/devices/query", "", map[string]string{"query": q}, &rows); err != nil {
			t.Fatal(err)
		}
		return string(rows)
	}
	if rows := query("SELECT properties.reported.big FROM devices"); rows != `[{"big":`+big+`}]` {
		t.Errorf("projection: %s", rows)
	}
	// The constant is a double, as it always was: 2^53+1 rounds to 2^53.
	for _, cond := range []string{"properties.reported.big = " + big, "properties.reported.big = 9007199254740992",
		"properties.reported.big > 9007199254740991", "tags.id > 12345678901234560000"} {
		if rows := query("SELECT deviceId FROM devices WHERE " + cond); rows != `[{"deviceId":"d2"}]` {
			t.Errorf("WHERE %s: %s", cond, rows)
		}
	}

	// PUT replaces, and bulk updates merge, with the same exactness.
	if err := e.hubAPI.Do(ctx, "PUT", "/twins/d2", "", json.RawMessage(`{"tags":{"put":`+big+`}}`), nil); err != nil {
		t.Fatal(err)
	}
	var res hub.BulkResult
	if err := e.hubAPI.Do(ctx, "POST", "/devices", "", json.RawMessage(`[{"id":"d2","importMode":"updateTwin",
		"tags":{"bulk":`+big64+`},"properties":{"desired":{"bulk":`+big+`}}}]`), &res); err != nil || !res.IsSuccessful {
		t.Fatalf("bulk: %v %+v", err, res)
	}
	tags, des, _ = e.twinJSON("d2")
	mustHold(t, "tags", tags, `"put":`+big, `"bulk":`+big64)
	mustHold(t, "desired", des, `"bulk":`+big)

	// Numbers a double cannot hold at all are refused, as before.
	if err := e.hubAPI.Do(ctx, "PATCH", "/twins/d2", "", json.RawMessage(`{"tags":{"huge":1e400}}`), nil); azerr.As(err).Status() != 400 {
		t.Errorf("tags 1e400: %v", err)
	}
	if _, err := c.PatchReported(ctx, json.RawMessage(`{"huge":-1e400}`)); err == nil || !strings.Contains(err.Error(), "status 400") {
		t.Errorf("reported -1e400: %v", err)
	}
	layer := json.RawMessage(`{"content":{"modulesContent":{"sensor":{"properties.desired.huge":1e400}}},"targetCondition":"*"}`)
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/huge", "", layer, nil); azerr.As(err).Status() != 400 || !strings.Contains(err.Error(), "1e400") {
		t.Errorf("a layered deployment setting 1e400: %v", err)
	}
}

// An enrollment's initial twin and a configuration's content reach the
// twins they give with every digit.
func TestInitialTwinAndContentNumbersKeepEveryDigit(t *testing.T) {
	e := newEnv(t)
	en := e.putEnrollment(&dps.Enrollment{RegistrationID: "big-1", Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey},
		Capabilities: &dps.Capabilities{IoTEdge: true},
		InitialTwin: &dps.InitialTwin{Tags: json.RawMessage(`{"id":` + big64 + `}`),
			Properties: &dps.InitialTwinDesired{Desired: json.RawMessage(`{"big":` + big + `}`)}}})
	key, _ := base64.StdEncoding.DecodeString(en.Attestation.SymmetricKey.PrimaryKey)
	if _, err := e.device("big-1").RegisterSymmetricKey(ctx, key); err != nil {
		t.Fatal(err)
	}
	tags, des, _ := e.twinJSON("big-1")
	mustHold(t, "initial tags", tags, `"id":`+big64)
	mustHold(t, "initial desired", des, `"big":`+big)

	cfg := map[string]any{"content": map[string]any{"deviceContent": map[string]any{"properties.desired.cfg": json.Number(big64)}},
		"targetCondition": "*", "priority": 1}
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/big-device", "", cfg, nil); err != nil {
		t.Fatal(err)
	}
	dep := manifest("sensor:1")
	dep["modulesContent"].(map[string]any)["sensor"] = map[string]any{"properties.desired": map[string]any{"interval": json.Number(big)}}
	if err := e.hubAPI.Do(ctx, "PUT", "/configurations/big-edge", "", map[string]any{"content": dep, "targetCondition": "*", "priority": 1}, nil); err != nil {
		t.Fatal(err)
	}
	_, des, _ = e.twinJSON("big-1")
	mustHold(t, "configured desired", des, `"cfg":`+big64)
	_, des, _ = e.twinJSON("big-1/modules/sensor")
	mustHold(t, "deployed module desired", des, `"interval":`+big)
}

// A device's reported patch of arrays nested past the depth limit, or of
// empty arrays that would count as nothing, is refused: stored, the first
// could not be read back (taking down every list and query), the second
// would grow the twin without bound.
func TestReportedNestingAndEmptyArraysBounded(t *testing.T) {
	e := newEnv(t)
	_, _, c := e.mqttDevice("deep")
	deep := `{"a":` + strings.Repeat("[", 9999) + strings.Repeat("]", 9999) + `}`
	if _, err := c.PatchReported(ctx, json.RawMessage(deep)); err == nil || !strings.Contains(err.Error(), "status 400") {
		t.Fatalf("reported arrays 9999 deep: %v, want 400", err)
	}
	empties := `{"e":[` + strings.Repeat("[],", 40000) + `[]]}`
	if _, err := c.PatchReported(ctx, json.RawMessage(empties)); err == nil || !strings.Contains(err.Error(), "status 400") {
		t.Fatalf("reported 40,001 empty arrays: %v, want 400 (past 32 KiB)", err)
	}
	if _, _, rep := e.twinJSON("deep"); strings.Contains(rep, "[[") || strings.Contains(rep, `"e"`) {
		t.Fatalf("refused patches were stored: %.200s", rep)
	}
	if err := e.hubAPI.Do(ctx, "POST", "/devices/query", "", map[string]string{"query": "SELECT * FROM devices"}, &[]json.RawMessage{}); err != nil {
		t.Fatalf("querying the hub after the refused patches: %v", err)
	}
}
