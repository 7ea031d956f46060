package server

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/store"
)

func TestBulkEnrollments(t *testing.T) { testBulkEnrollments(t, newEnv(t)) }

func testBulkEnrollments(t *testing.T, e *env) {
	sym := func(id string) *dps.Enrollment {
		return &dps.Enrollment{RegistrationID: id, Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}}
	}
	bulk := func(mode string, es ...*dps.Enrollment) *dps.BulkResult {
		t.Helper()
		var res dps.BulkResult
		if err := e.dpsAPI.Do(ctx, "POST", "/enrollments", "", &dps.BulkOperation{Mode: mode, Enrollments: es}, &res); err != nil {
			t.Fatal(err)
		}
		return &res
	}
	failed := func(res *dps.BulkResult) string {
		var out []string
		for _, f := range res.Errors {
			out = append(out, fmt.Sprintf("%s:%d", f.RegistrationID, f.ErrorCode))
		}
		return strings.Join(out, " ")
	}

	bad := sym("bad/id")
	res := bulk("create", sym("b-1"), sym("b-2"), bad)
	if res.IsSuccessful || failed(res) != "bad/id:400208" {
		t.Fatalf("create: %+v", res)
	}
	if n, _ := e.st.Count(ctx, "dps.enrollment"); n != 2 {
		t.Fatalf("%d enrollments after create", n)
	}
	if res := bulk("create", sym("b-1"), sym("b-3")); failed(res) != "b-1:409203" {
		t.Fatalf("create over an existing one: %s", failed(res))
	}
	stored, _ := e.dps.GetEnrollment(ctx, "b-2")
	edge := sym("b-2")
	edge.Capabilities = &dps.Capabilities{IoTEdge: true}
	if res := bulk("update", edge); !res.IsSuccessful {
		t.Fatalf("update: %s", failed(res))
	}
	stale := sym("b-2")
	stale.ETag = stored.ETag
	if res := bulk("updateIfMatchETag", stale); !strings.HasPrefix(failed(res), "b-2:412") {
		t.Fatalf("updateIfMatchETag with a stale etag: %s", failed(res))
	}
	if got, _ := e.dps.GetEnrollment(ctx, "b-2"); !got.Capabilities.IoTEdge {
		t.Fatal("a refused update changed the enrollment")
	}
	if res := bulk("delete", sym("b-1"), sym("b-3"), sym("ghost")); failed(res) != "ghost:404201" {
		t.Fatalf("delete: %s", failed(res))
	}
	if n, _ := e.st.Count(ctx, "dps.enrollment"); n != 1 {
		t.Fatalf("%d enrollments after delete", n)
	}
	for what, body := range map[string]string{
		"unknown mode": `{"mode":"merge","enrollments":[{"registrationId":"x"}]}`,
		"no rows":      `{"mode":"create","enrollments":[]}`,
		"not JSON":     `{"mode":`,
	} {
		if st, _ := e.raw("POST", "/enrollments?api-version=2021-10-01", e.serviceToken(), body); st != 400 {
			t.Errorf("%s: HTTP %d", what, st)
		}
	}
}

// Enrollment groups take the same bulk operation, with per-group errors
// named by enrollmentGroupId, under the policy of single group writes.
func TestBulkEnrollmentGroups(t *testing.T) { testBulkEnrollmentGroups(t, newEnv(t)) }

func testBulkEnrollmentGroups(t *testing.T, e *env) {
	sym := func(id string) *dps.EnrollmentGroup {
		return &dps.EnrollmentGroup{EnrollmentGroupID: id, Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}}
	}
	bulk := func(mode string, gs ...*dps.EnrollmentGroup) string {
		t.Helper()
		var res dps.BulkGroupResult
		if err := e.dpsAPI.Do(ctx, "POST", "/enrollmentGroups", "", &dps.BulkGroupOperation{Mode: mode, EnrollmentGroups: gs}, &res); err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, f := range res.Errors {
			out = append(out, fmt.Sprintf("%s:%d", f.EnrollmentGroupID, f.ErrorCode))
		}
		if res.IsSuccessful != (len(out) == 0) || res.Errors == nil {
			t.Errorf("isSuccessful %v with errors %v", res.IsSuccessful, res.Errors)
		}
		return strings.Join(out, " ")
	}
	if failed := bulk("create", sym("g-1"), sym("g-2"), sym("bad/id")); failed != "bad/id:400208" {
		t.Fatalf("create: %s", failed)
	}
	if n, _ := e.st.Count(ctx, "dps.enrollmentGroup"); n != 2 {
		t.Fatalf("%d groups after create", n)
	}
	if failed := bulk("create", sym("g-1"), sym("g-3")); failed != "g-1:409203" {
		t.Fatalf("create over an existing one: %s", failed)
	}
	stored, _ := e.dps.GetGroup(ctx, "g-2")
	edge := sym("g-2")
	edge.Capabilities = &dps.Capabilities{IoTEdge: true}
	if failed := bulk("update", edge, sym("g-4")); failed != "" {
		t.Fatalf("update: %s", failed)
	}
	if got, _ := e.dps.GetGroup(ctx, "g-2"); !got.Capabilities.IoTEdge || got.Attestation.SymmetricKey.PrimaryKey != stored.Attestation.SymmetricKey.PrimaryKey {
		t.Fatalf("updated group %+v", got)
	}
	stale, noETag := sym("g-2"), sym("g-3")
	stale.ETag = stored.ETag
	if failed := bulk("updateIfMatchETag", stale, noETag); !strings.HasPrefix(failed, "g-2:412") || !strings.Contains(failed, " g-3:400") {
		t.Fatalf("updateIfMatchETag with a stale etag and none: %s", failed)
	}
	current, _ := e.dps.GetGroup(ctx, "g-2")
	fresh := sym("g-2")
	fresh.ETag = current.ETag
	if failed := bulk("updateIfMatchETag", fresh); failed != "" {
		t.Fatalf("updateIfMatchETag with the current etag: %s", failed)
	}
	if got, _ := e.dps.GetGroup(ctx, "g-2"); got.Capabilities != nil && got.Capabilities.IoTEdge {
		t.Fatal("updateIfMatchETag did not replace the group")
	}
	if failed := bulk("delete", sym("g-1"), sym("g-3"), sym("ghost")); failed != "ghost:404201" {
		t.Fatalf("delete: %s", failed)
	}
	if n, _ := e.st.Count(ctx, "dps.enrollmentGroup"); n != 2 {
		t.Fatalf("%d groups after delete", n)
	}
	for what, body := range map[string]string{
		"unknown mode": `{"mode":"merge","enrollmentGroups":[{"enrollmentGroupId":"x"}]}`,
		"no rows":      `{"mode":"create","enrollmentGroups":[]}`,
		"not JSON":     `{"mode":`,
	} {
		if st, _ := e.raw("POST", "/enrollmentGroups?api-version=2021-10-01", e.serviceToken(), body); st != 400 {
			t.Errorf("%s: HTTP %d", what, st)
		}
	}
	// As for single group writes, a token is needed.
	if st, _ := e.raw("POST", "/enrollmentGroups?api-version=2021-10-01", "", `{"mode":"delete","enrollmentGroups":[{"enrollmentGroupId":"g-2"}]}`); st != 401 {
		t.Errorf("without a token: HTTP %d", st)
	}
	if n, _ := e.st.Count(ctx, "dps.enrollmentGroup"); n != 2 {
		t.Fatalf("%d groups after an unauthorized delete", n)
	}
}

// A bulk operation stopped by a failure of the service's own (here a
// corrupt stored enrollment) says which item stopped it and how many before
// it were applied, which stay so, for the client to resume from it.
func TestBulkStopped(t *testing.T) { testBulkStopped(t, newEnv(t)) }

func testBulkStopped(t *testing.T, e *env) {
	sym := func(id string) *dps.Enrollment {
		return &dps.Enrollment{RegistrationID: id, Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}}
	}
	for _, id := range []string{"s-1", "s-2", "s-3"} {
		e.putEnrollment(sym(id))
	}
	if _, err := e.st.Put(ctx, store.Doc{Kind: "dps.enrollment", ID: "s-2", Body: []byte(`{"corrupt`)}, ""); err != nil {
		t.Fatal(err)
	}
	edge := func(id string) *dps.Enrollment {
		en := sym(id)
		en.Capabilities = &dps.Capabilities{IoTEdge: true}
		return en
	}
	err := e.dpsAPI.Do(ctx, "POST", "/enrollments", "", &dps.BulkOperation{Mode: "update",
		Enrollments: []*dps.Enrollment{edge("s-1"), edge("bad/id"), edge("s-2"), edge("s-3")}}, nil)
	if want := `stopped at item 2 (enrollment "s-2"), which was not done, nor those after it (items before it: 2, applied 1, refused 1)`; azerr.As(err).Status() != 500 || !strings.Contains(err.Error(), want) {
		t.Fatalf("bulk update over a corrupt enrollment: %v, want a 500 that says %q", err, want)
	}
	if got, _ := e.dps.GetEnrollment(ctx, "s-1"); got == nil || got.Capabilities == nil || !got.Capabilities.IoTEdge {
		t.Error("the item before the failure was not applied")
	}
	if got, _ := e.dps.GetEnrollment(ctx, "s-3"); got == nil || got.Capabilities != nil && got.Capabilities.IoTEdge {
		t.Error("the item after the failure was applied")
	}
}

// The hub's bulk registry request, stopped likewise by a corrupt stored
// device, says where it stopped and what it applied before.
func TestHubBulkStopped(t *testing.T) {
	e := newEnv(t)
	for _, id := range []string{"d0", "d1", "d2", "d3"} {
		e.newDevice(id, false)
	}
	if _, err := e.st.Put(ctx, store.Doc{Kind: "hub.device", ID: "d2", Body: []byte(`{"corrupt`)}, ""); err != nil {
		t.Fatal(err)
	}
	disable := func(id, mode string) map[string]any {
		return map[string]any{"id": id, "importMode": mode, "status": "disabled"}
	}
	err := e.hubAPI.Do(ctx, "POST", "/devices", "", []any{disable("d1", "update"), disable("d0", "create"), disable("d2", "update"), disable("d3", "update")}, nil)
	if want := `stopped at item 2 (device "d2"), which was not done, nor those after it (items before it: 2, applied 1, refused 1)`; azerr.As(err).Status() != 500 || !strings.Contains(err.Error(), want) {
		t.Fatalf("bulk update over a corrupt device: %v, want a 500 that says %q", err, want)
	}
	for id, want := range map[string]string{"d1": "disabled", "d3": "enabled"} {
		if d, err := e.hub.GetIdentity(ctx, hub.Ref{Device: id}); err != nil || d.Status != want {
			t.Errorf("%s after the stopped bulk request: %+v, %v; want it %s", id, d, err, want)
		}
	}
}

// serviceToken is a provisioningserviceowner token for raw requests.
func (e *env) serviceToken() string {
	cs, err := sas.ParseConnectionString(e.dps.OwnerConnectionString())
	if err != nil {
		e.t.Fatal(err)
	}
	return sas.Build(cs.Key, cs.HostName, cs.KeyName, time.Now().Add(time.Hour))
}

// Bulk twin updates, as RegistryManager.UpdateTwins2Async of the C# SDK
// sends them, merge tags and desired properties as a twin PATCH does; the
// IfMatchETag mode refuses a stale twin etag, device by device.
func TestBulkTwinUpdates(t *testing.T) {
	e := newEnv(t)
	for _, id := range []string{"d4", "d5", "d6"} {
		if err := e.hubAPI.Do(ctx, "PUT", "/devices/"+id, "", map[string]any{"deviceId": id}, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.hubAPI.Do(ctx, "PATCH", "/twins/d4", "", map[string]any{"tags": map[string]any{"keep": 1}}, nil); err != nil {
		t.Fatal(err)
	}
	var d6 hub.Twin
	if err := e.hubAPI.Do(ctx, "GET", "/twins/d6", "", nil, &d6); err != nil {
		t.Fatal(err)
	}
	bulk := func(body string) string {
		t.Helper()
		var res hub.BulkResult
		if err := e.hubAPI.Do(ctx, "POST", "/devices", "", json.RawMessage(body), &res); err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, f := range res.Errors {
			out = append(out, f.DeviceID+":"+f.ErrorCode)
		}
		if res.IsSuccessful != (len(out) == 0) {
			t.Errorf("isSuccessful %v with errors %v", res.IsSuccessful, out)
		}
		return strings.Join(out, " ")
	}
	if failed := bulk(`[{"id":"d4","importMode":"UpdateTwin","tags":{"bulk":1},"properties":{"desired":{"x":2},"reported":{"r":1}}},
		{"id":"d5","importMode":"UpdateTwinIfMatchETag","twinETag":"*","tags":{"bulk":1}},
		{"id":"d6","importMode":"updateTwinIfMatchETag","twinETag":"stale","tags":{"bulk":1}},
		{"id":"ghost","importMode":"updateTwin","tags":{"bulk":1}},
		{"id":"new","importMode":"create","tags":{"bulk":1}}]`); failed != "d6:PreconditionFailed ghost:DeviceNotFound new:ArgumentInvalid" {
		t.Fatalf("errors %q", failed)
	}
	twin := func(id string) (tags, desired string) {
		t.Helper()
		tags, desired, _ = e.twinJSON(id)
		var d map[string]any
		_ = json.Unmarshal([]byte(desired), &d)
		return tags, fmt.Sprint(d["x"])
	}
	for id, want := range map[string][2]string{"d4": {`{"bulk":1,"keep":1}`, "2"}, "d5": {`{"bulk":1}`, "<nil>"}, "d6": {`{}`, "<nil>"}} {
		if tags, x := twin(id); tags != want[0] || x != want[1] {
			t.Errorf("%s: tags %s, desired x %s; want %s, %s", id, tags, x, want[0], want[1])
		}
	}
	if err := e.hubAPI.Do(ctx, "GET", "/devices/new", "", nil, nil); azerr.As(err).Status() != 404 {
		t.Errorf("a create refused for its twin fields created the device: %v", err)
	}
	if failed := bulk(`[{"id":"d6","importMode":"updateTwinIfMatchETag","twinETag":"` + d6.ETag + `","tags":{"bulk":2}}]`); failed != "" {
		t.Fatalf("updateTwinIfMatchETag with the twin's etag: %s", failed)
	}
	if tags, _ := twin("d6"); tags != `{"bulk":2}` {
		t.Errorf("d6 tags %s", tags)
	}
}
