package server

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/provisioning"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/store"
	"github.com/hatchery/hatchery/internal/testutil"
)

var ctx = context.Background()

func (e *env) putEnrollment(en *dps.Enrollment) *dps.Enrollment {
	e.t.Helper()
	var out dps.Enrollment
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollments/"+en.RegistrationID, "", en, &out); err != nil {
		e.t.Fatal(err)
	}
	return &out
}

// raw sends a request and decodes the JSON answer.
func (e *env) raw(method, path, auth string, body string) (int, map[string]any) {
	e.t.Helper()
	req, _ := http.NewRequest(method, e.ts.URL+path, strings.NewReader(body))
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := e.ts.Client().Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	var m map[string]any
	_ = json.Unmarshal(data, &m)
	return resp.StatusCode, m
}

func TestSymmetricKeyEnrollmentProvisionsEdgeDevice(t *testing.T) {
	e := newEnv(t)
	en := e.putEnrollment(&dps.Enrollment{RegistrationID: "Edge-01", DeviceID: "edge-device-01",
		Attestation:  dps.Attestation{Type: dps.AttestationSymmetricKey},
		Capabilities: &dps.Capabilities{IoTEdge: true},
		InitialTwin:  &dps.InitialTwin{Tags: json.RawMessage(`{"environment":"prod","site":{"floor":2}}`)}})
	if en.RegistrationID != "edge-01" || en.Attestation.SymmetricKey.PrimaryKey == "" || en.ETag == "" {
		t.Fatalf("enrollment %+v", en)
	}
	key, _ := base64.StdEncoding.DecodeString(en.Attestation.SymmetricKey.PrimaryKey)
	dev := e.device("edge-01")
	dev.Payload = json.RawMessage(`{"model":"gateway"}`)
	res, err := dev.RegisterSymmetricKey(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	// The device's payload is for a custom allocation webhook; it does not
	// come back.
	if res.Status != "assigned" || res.DeviceID != "edge-device-01" || res.AssignedHub != host || res.Payload != nil {
		t.Fatalf("result %+v", res)
	}
	// The hub has the device with the enrollment's keys, edge capability and tags.
	var d hub.Device
	if err := e.hubAPI.Do(ctx, "GET", "/devices/edge-device-01", "", nil, &d); err != nil {
		t.Fatal(err)
	}
	if !d.Capabilities.IoTEdge || d.Authentication.SymmetricKey.PrimaryKey != en.Attestation.SymmetricKey.PrimaryKey {
		t.Fatalf("hub device %+v", d)
	}
	// The result names that device by its generation, as the hosted service does.
	if d.GenerationID == "" || res.GenerationID != d.GenerationID {
		t.Fatalf("registration result generationId %q, the hub device's %q", res.GenerationID, d.GenerationID)
	}
	var tw hub.Twin
	if err := e.hubAPI.Do(ctx, "GET", "/twins/edge-device-01", "", nil, &tw); err != nil {
		t.Fatal(err)
	}
	if string(tw.Tags) != `{"environment":"prod","site":{"floor":2}}` {
		t.Fatalf("twin tags %s", tw.Tags)
	}
	// The enrollment shows "assigned" and the device ID, as the seed documents say.
	var got dps.Enrollment
	if err := e.dpsAPI.Do(ctx, "GET", "/enrollments/edge-01", "", nil, &got); err != nil {
		t.Fatal(err)
	}
	if got.RegistrationState == nil || got.RegistrationState.Status != "assigned" || got.RegistrationState.DeviceID != "edge-device-01" ||
		got.RegistrationState.GenerationID != d.GenerationID {
		t.Fatalf("registration state %+v", got.RegistrationState)
	}
	// The device's own token works against the hub for that device only.
	tok := sas.Build(key, host+"/devices/edge-device-01", "", time.Now().Add(time.Minute))
	if st, body := e.raw("POST", "/devices/edge-device-01/messages/events?api-version=2020-09-30", tok, `{"t":1}`); st != 204 {
		t.Fatalf("telemetry: %d %v", st, body)
	}
	if st, _ := e.raw("POST", "/devices/other/messages/events?api-version=2020-09-30", tok, `{}`); st != 401 {
		t.Fatalf("telemetry as another device: %d", st)
	}
	if evs, _ := e.st.Events(ctx, "edge-device-01", 0, 10); len(evs) != 1 || string(evs[0].Body) != `{"t":1}` {
		t.Fatalf("events %+v", evs)
	}
}

func TestGroupDerivedKey(t *testing.T) {
	e := newEnv(t)
	var g dps.EnrollmentGroup
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/line-3", "", &dps.EnrollmentGroup{
		Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}}, &g); err != nil {
		t.Fatal(err)
	}
	gk, _ := base64.StdEncoding.DecodeString(g.Attestation.SymmetricKey.SecondaryKey)
	res, err := e.device("sensor-17").RegisterSymmetricKey(ctx, sas.DeriveDeviceKey(gk, "sensor-17"))
	if err != nil {
		t.Fatal(err)
	}
	if res.DeviceID != "sensor-17" || res.EnrollmentGroupID != "line-3" {
		t.Fatalf("%+v", res)
	}
	// The hub holds both derived keys: the one the device proved (here the
	// secondary's) signs its hub tokens too.
	hubTok := sas.Build(sas.DeriveDeviceKey(gk, "sensor-17"), host+"/devices/sensor-17", "", time.Now().Add(time.Minute))
	if st, body := e.raw("POST", "/devices/sensor-17/messages/events?api-version=2020-09-30", hubTok, `{"t":1}`); st != 204 {
		t.Fatalf("telemetry signed with the secondary-derived key: %d %v", st, body)
	}
	regs, _, err := e.dps.ListRegistrations(ctx, "line-3", "", 10)
	if err != nil || len(regs) != 1 {
		t.Fatalf("group registrations %v %v", regs, err)
	}
	// Pages of a group's registrations hold at most the page size.
	if _, err := e.dps.PutEnrollment(ctx, "alone", "", &dps.Enrollment{Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"sensor-20", "sensor-21", "sensor-22", "sensor-23"} {
		if _, err := e.device(id).RegisterSymmetricKey(ctx, sas.DeriveDeviceKey(gk, id)); err != nil {
			t.Fatal(err)
		}
	}
	alone, _ := e.dps.GetEnrollment(ctx, "alone")
	lk, _ := base64.StdEncoding.DecodeString(alone.Attestation.SymmetricKey.PrimaryKey)
	if _, err := e.device("alone").RegisterSymmetricKey(ctx, lk); err != nil {
		t.Fatal(err)
	}
	var paged []string
	for after, pages := "", 0; pages < 10; pages++ {
		page, next, err := e.dps.ListRegistrations(ctx, "line-3", after, 2)
		if err != nil || len(page) > 2 {
			t.Fatalf("a page of 2: %d records, %v", len(page), err)
		}
		for _, r := range page {
			paged = append(paged, r.RegistrationID)
		}
		if after = next; after == "" {
			break
		}
	}
	if strings.Join(paged, ",") != "sensor-17,sensor-20,sensor-21,sensor-22,sensor-23" {
		t.Fatalf("the group's registrations in pages of 2: %v", paged)
	}
	// A group that does not exist is not found, as in Azure, rather than empty.
	if err := e.dpsAPI.Do(ctx, "POST", "/registrations/no-such-group/query", "", map[string]string{"query": "*"}, nil); azerr.As(err).Status() != 404 ||
		!strings.Contains(err.Error(), `no enrollment group "no-such-group"`) {
		t.Errorf("the registrations of a group that does not exist: %v", err)
	}
	// A disabled group says which group to enable, and how.
	disabled := g
	disabled.ProvisioningStatus = "disabled"
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/line-3", "*", &disabled, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := e.device("sensor-30").RegisterSymmetricKey(ctx, sas.DeriveDeviceKey(gk, "sensor-30")); err == nil || !strings.Contains(err.Error(), "hatchery enrollment-group update --group-id line-3") {
		t.Fatalf("registering through a disabled group: %v", err)
	}
	g.ETag = ""
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/line-3", "*", &g, nil); err != nil {
		t.Fatal(err)
	}
	// A key derived for another registration ID does not pass.
	if _, err := e.device("sensor-18").RegisterSymmetricKey(ctx, sas.DeriveDeviceKey(gk, "sensor-17")); err == nil {
		t.Fatal("key of sensor-17 registered sensor-18")
	}

	// The group key holder picks registration IDs, but cannot seize hub
	// devices made otherwise: one created in the hub, one an individual
	// enrollment provisioned under another registration ID.
	if _, err := e.hub.PutIdentity(ctx, hub.Ref{Device: "plc-9"}, "", &hub.Device{}); err != nil {
		t.Fatal(err)
	}
	en := e.putEnrollment(&dps.Enrollment{RegistrationID: "sensor-a", DeviceID: "gw-1", Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
	ak, _ := base64.StdEncoding.DecodeString(en.Attestation.SymmetricKey.PrimaryKey)
	if _, err := e.device("sensor-a").RegisterSymmetricKey(ctx, ak); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"plc-9", "gw-1"} {
		before, _ := e.hub.GetIdentity(ctx, hub.Ref{Device: id})
		_, err := e.device(id).RegisterSymmetricKey(ctx, sas.DeriveDeviceKey(gk, id))
		if pe, ok := errors.AsType[*provisioning.Error](err); !ok || pe.Status != 401 || !strings.Contains(pe.Message, "did not provision") {
			t.Fatalf("group registration of hub device %s: %v, want 401 saying the group did not provision it", id, err)
		}
		after, _ := e.hub.GetIdentity(ctx, hub.Ref{Device: id})
		if after.Authentication.SymmetricKey != before.Authentication.SymmetricKey {
			t.Fatalf("hub device %s's keys changed", id)
		}
	}
	// With its registration record deleted, a group device still gets its
	// own hub device back: the credentials there are its own.
	if err := e.dpsAPI.Do(ctx, "DELETE", "/registrations/sensor-17", "", nil, nil); err != nil {
		t.Fatal(err)
	}
	if res, err := e.device("sensor-17").RegisterSymmetricKey(ctx, sas.DeriveDeviceKey(gk, "sensor-17")); err != nil || res.DeviceID != "sensor-17" {
		t.Fatalf("sensor-17 registering again: %+v %v", res, err)
	}
}

// keptChanging is a store in which a registration record has changed
// whenever a conditional delete comes.
type keptChanging struct{ store.Store }

func (k keptChanging) Delete(ctx context.Context, kind, id, ifMatch string) error {
	if kind == "dps.registration" && ifMatch != "" {
		return store.ErrPrecondition
	}
	return k.Store.Delete(ctx, kind, id, ifMatch)
}

// A DELETE of a registration record that changes at every try, sent
// without If-Match, is told to try again, not that its etag is stale.
func TestDeleteRegistrationKeptChanging(t *testing.T) {
	e := newEnv(t)
	if _, err := e.symDevice(t, &dps.Enrollment{RegistrationID: "busy-1"})(); err != nil {
		t.Fatal(err)
	}
	replica := e.replica(t, keptChanging{e.st}, e.pool())
	if err := replica.DeleteRegistration(ctx, "busy-1", ""); azerr.As(err).Status() != 409 || !strings.Contains(err.Error(), "try again") {
		t.Fatalf("a DELETE without If-Match of a record that kept changing: %v", err)
	}
}

// wantError checks an Azure-shaped error answer.
func wantError(t *testing.T, status int, body map[string]any, wantStatus int, wantMsg string) {
	t.Helper()
	code, _ := body["errorCode"].(float64)
	msg, _ := body["message"].(string)
	if status != wantStatus || int(code)/1000 != wantStatus || !strings.Contains(msg, wantMsg) || body["trackingId"] == nil {
		t.Fatalf("got %d %v; want %d with message containing %q", status, body, wantStatus, wantMsg)
	}
}

func TestBadInputChangesNothing(t *testing.T) {
	e := newEnv(t)
	en := e.putEnrollment(&dps.Enrollment{RegistrationID: "dev-1", Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
	e.putEnrollment(&dps.Enrollment{RegistrationID: "dev-off", ProvisioningStatus: "disabled", Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey,
		SymmetricKey: &dps.SymmetricKeyAttestation{PrimaryKey: en.Attestation.SymmetricKey.PrimaryKey}}})
	key, _ := base64.StdEncoding.DecodeString(en.Attestation.SymmetricKey.PrimaryKey)
	scope := e.dps.IDScope()
	reg := func(id string) string {
		return "/" + scope + "/registrations/" + id + "/register?api-version=2019-03-31"
	}
	tok := func(id string, k []byte, exp time.Duration) string {
		return sas.Build(k, scope+"/registrations/"+id, "registration", time.Now().Add(exp))
	}
	owner := func() string {
		p := e.dps.OwnerConnectionString()
		cs, _ := sas.ParseConnectionString(p)
		return sas.Build(cs.Key, host, cs.KeyName, time.Now().Add(time.Minute))
	}()
	hubKey := base64.StdEncoding.EncodeToString(make([]byte, 32))
	before := e.counts()

	cases := []struct {
		name, method, path, auth, body string
		status                         int
		msg                            string
	}{
		{"unknown registration", "PUT", reg("nobody"), tok("nobody", key, time.Minute), `{"registrationId":"nobody"}`, 401, "not authorized"},
		{"disabled enrollment", "PUT", reg("dev-off"), tok("dev-off", key, time.Minute), `{"registrationId":"dev-off"}`, 401, "disabled"},
		{"wrong key", "PUT", reg("dev-1"), tok("dev-1", []byte("0123456789abcdef0123456789abcdef"), time.Minute), `{}`, 401, "check its credentials"},
		{"expired token", "PUT", reg("dev-1"), tok("dev-1", key, -time.Minute), `{}`, 401, "expired"},
		{"token for another registration", "PUT", reg("dev-1"), tok("dev-off", key, time.Minute), `{}`, 401, "is for"},
		{"malformed token", "PUT", reg("dev-1"), "SharedAccessSignature sr=x&se=1", `{}`, 401, "no sig"},
		{"no token, no TPM", "PUT", reg("dev-1"), "", `{}`, 401, "no SharedAccessSignature"},
		{"truncated JSON", "PUT", reg("dev-1"), tok("dev-1", key, time.Minute), `{"registrationId":"dev-`, 400, "not valid JSON"},
		{"tpm of the wrong type", "PUT", reg("dev-1"), "", `{"registrationId":"dev-1","tpm":"AAAA"}`, 400, `field "tpm" has the wrong type: it must be an object, not a string`},
		{"bad registration ID", "PUT", reg("UPPER%20space"), tok("x", key, time.Minute), `{}`, 400, "not valid"},
		{"no api-version", "PUT", "/" + scope + "/registrations/dev-1/register", tok("dev-1", key, time.Minute), `{}`, 400, "api-version"},
		{"wrong scope", "PUT", "/0neFFFFFFFF/registrations/dev-1/register?api-version=2019-03-31", tok("dev-1", key, time.Minute), `{}`, 404, "no API"},
		{"TPM group", "PUT", "/enrollmentGroups/g1?api-version=2021-10-01", owner, `{"attestation":{"type":"tpm","tpm":{"endorsementKey":"AAAA"}}}`, 400, "needs attestation.tpm.ekCertificateAuthorities"},
		{"malformed EK", "PUT", "/enrollments/tpm-1?api-version=2021-10-01", owner, `{"attestation":{"type":"tpm","tpm":{"endorsementKey":"AAEC"}}}`, 400, "endorsementKey is not a TPM2B_PUBLIC"},
		{"EK without its size", "PUT", "/enrollments/tpm-1?api-version=2021-10-01", owner, `{"attestation":{"type":"tpm","tpm":{"endorsementKey":"` + base64.StdEncoding.EncodeToString(testEKRaw(t)[2:]) + `"}}}`, 400, "TPMT_PUBLIC without the 2-byte size"},
		{"EK not base64", "PUT", "/enrollments/tpm-1?api-version=2021-10-01", owner, `{"attestation":{"type":"tpm","tpm":{"endorsementKey":"!!"}}}`, 400, "not base64"},
		{"malformed SRK", "PUT", "/enrollments/tpm-1?api-version=2021-10-01", owner, `{"attestation":{"type":"tpm","tpm":{"endorsementKey":"` + testEK(t) + `","storageRootKey":"AAAA"}}}`, 400, "storageRootKey"},
		{"wrong field type", "PUT", "/enrollments/x1?api-version=2021-10-01", owner, `{"attestation":{"type":5}}`, 400, `field "attestation.type" has the wrong type: it must be a string, not a number`},
		{"body of the wrong type", "PUT", "/enrollments/x1?api-version=2021-10-01", owner, `[]`, 400, "the request body must be an object, not an array"},
		{"device information not an object", "PUT", "/enrollments/x1?api-version=2021-10-01", owner, `{"attestation":{"type":"symmetricKey"},"optionalDeviceInformation":"x1"}`, 400, "optionalDeviceInformation must be a JSON object"},
		{"bulk list of the wrong type", "POST", "/enrollments?api-version=2021-10-01", owner, `{"mode":"create","enrollments":{}}`, 400, `field "enrollments" has the wrong type: it must be an array, not an object`},
		{"hub not linked", "PUT", "/enrollments/x1?api-version=2021-10-01", owner, `{"attestation":{"type":"symmetricKey"},"allocationPolicy":"static","iotHubHostName":"nohub.example"}`, 400, "hub nohub.example is not linked"},
		{"no attestation", "PUT", "/enrollments/x1?api-version=2021-10-01", owner, `{}`, 400, "attestation.type is required"},
		{"short key", "PUT", "/enrollments/x1?api-version=2021-10-01", owner, `{"attestation":{"type":"symmetricKey","symmetricKey":{"primaryKey":"AAAA"}}}`, 400, "16 to 64 bytes"},
		{"device ID not valid in a hub", "PUT", "/enrollments/x1?api-version=2021-10-01", owner, `{"attestation":{"type":"symmetricKey"},"deviceId":"bad device/id"}`, 400, "deviceId \"bad device/id\" is not valid"},
		{"initial twin property name with a dot", "PUT", "/enrollments/x1?api-version=2021-10-01", owner, `{"attestation":{"type":"symmetricKey"},"initialTwin":{"properties":{"desired":{"a.b":1}}}}`, 400, `initialTwin.properties.desired: property name "a.b"`},
		{"tags not an object", "PUT", "/enrollments/x1?api-version=2021-10-01", owner, `{"attestation":{"type":"symmetricKey"},"initialTwin":{"tags":[1]}}`, 400, "JSON object"},
		{"initial twin number too long for the hub", "PUT", "/enrollments/x1?api-version=2021-10-01", owner, `{"attestation":{"type":"symmetricKey"},"initialTwin":{"tags":{"n":1` + strings.Repeat("0", 64) + `}}}`, 400, "initialTwin.tags.n is a number written in 65 characters"},
		{"linked hub not a DNS name", "PUT", "/linkedHubs/bad%20host!?api-version=2021-10-01", owner, `{"connectionString":"HostName=bad host!;SharedAccessKeyName=iothubowner;SharedAccessKey=` + hubKey + `"}`, 400, "must be a DNS name"},
		{"linked hub with another hub's connection string", "PUT", "/linkedHubs/other.example?api-version=2021-10-01", owner, `{"connectionString":"HostName=evil.example;SharedAccessKeyName=iothubowner;SharedAccessKey=` + hubKey + `"}`, 400, "is for HostName=evil.example"},
		{"linked hub with a device's connection string", "PUT", "/linkedHubs/other.example?api-version=2021-10-01", owner, `{"connectionString":"HostName=other.example;DeviceId=d1;SharedAccessKey=` + hubKey + `"}`, 400, "registry policy's"},
		{"linked hub with a short key", "PUT", "/linkedHubs/other.example?api-version=2021-10-01", owner, `{"connectionString":"HostName=other.example;SharedAccessKeyName=iothubowner;SharedAccessKey=AAAA"}`, 400, "16 to 64 bytes"},
		{"linked hub over plain HTTP", "PUT", "/linkedHubs/other.example?api-version=2021-10-01", owner, `{"connectionString":"HostName=other.example;SharedAccessKeyName=iothubowner;SharedAccessKey=` + hubKey + `","endpoint":"http://other.example:8080"}`, 400, "must be an https URL"},
		{"linked hub's policy renamed without its key", "PUT", "/linkedHubs/" + host + "?api-version=2021-10-01", owner, `{"connectionString":"HostName=` + host + `;SharedAccessKeyName=service;SharedAccessKey=<hidden>"}`, 400, "to change the connection string"},
		{"linked hub's endpoint moved without its key", "PUT", "/linkedHubs/" + host + "?api-version=2021-10-01", owner, `{"connectionString":"HostName=` + host + `;SharedAccessKeyName=iothubowner;SharedAccessKey=<hidden>","endpoint":"https://elsewhere.example"}`, 400, "to change its endpoint"},
		{"no service token", "GET", "/enrollments/dev-1?api-version=2021-10-01", "", ``, 401, "no Authorization"},
		{"device token on service API", "GET", "/enrollments/dev-1?api-version=2021-10-01", tok("dev-1", key, time.Minute), ``, 401, "is for another resource"},
		{"unknown enrollment", "GET", "/enrollments/ghost?api-version=2021-10-01", owner, ``, 404, "no enrollment"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			st, body := e.raw(c.method, c.path, c.auth, c.body)
			if c.name == "wrong scope" { // the catch-all has no trackingId requirement differences
				if st != 404 {
					t.Fatalf("got %d %v", st, body)
				}
				return
			}
			wantError(t, st, body, c.status, c.msg)
		})
	}
	if after := e.counts(); !maps.Equal(before, after) {
		t.Fatalf("bad input changed the store: %v -> %v", before, after)
	}
}

func TestIfMatch(t *testing.T) {
	e := newEnv(t)
	en := e.putEnrollment(&dps.Enrollment{RegistrationID: "dev-1", Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
	if k, _ := base64.StdEncoding.DecodeString(en.Attestation.SymmetricKey.PrimaryKey); len(k) != 64 {
		t.Errorf("a generated enrollment key of %d bytes, want 64 as the hosted service makes them", len(k))
	}
	// Reads and queries leave the keys out; the attestation mechanism has
	// them; what a read shows, written back, keeps them.
	var read dps.Enrollment
	var mech dps.Attestation
	var listed []dps.Enrollment
	if err := e.dpsAPI.Do(ctx, "GET", "/enrollments/dev-1", "", nil, &read); err != nil || read.Attestation.SymmetricKey == nil || *read.Attestation.SymmetricKey != (dps.SymmetricKeyAttestation{}) {
		t.Fatalf("a read shows keys: %v %+v", err, read.Attestation.SymmetricKey)
	}
	if err := e.dpsAPI.Do(ctx, "POST", "/enrollments/query", "", map[string]string{"query": "*"}, &listed); err != nil || len(listed) != 1 || listed[0].Attestation.SymmetricKey.PrimaryKey != "" {
		t.Fatalf("a query shows keys: %v %+v", err, listed)
	}
	if err := e.dpsAPI.Do(ctx, "POST", "/enrollments/dev-1/attestationmechanism", "", nil, &mech); err != nil || *mech.SymmetricKey != *en.Attestation.SymmetricKey {
		t.Fatalf("attestation mechanism: %v %+v", err, mech.SymmetricKey)
	}
	var rewritten dps.Enrollment
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollments/dev-1", "", &read, &rewritten); err != nil || *rewritten.Attestation.SymmetricKey != *en.Attestation.SymmetricKey {
		t.Fatalf("a read written back: %v %+v, want the keys kept", err, rewritten.Attestation.SymmetricKey)
	}
	en = &rewritten
	stale := en.ETag
	en.DeviceID = "renamed"
	var upd dps.Enrollment
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollments/dev-1", en.ETag, en, &upd); err != nil {
		t.Fatal(err)
	}
	en.DeviceID = "again"
	err := e.dpsAPI.Do(ctx, "PUT", "/enrollments/dev-1", stale, en, nil)
	var ae *azerr.Error
	if !errors.As(err, &ae) || ae.Status() != 412 {
		t.Fatalf("stale etag: %v", err)
	}
	if err := e.dpsAPI.Do(ctx, "DELETE", "/enrollments/dev-1", stale, nil, nil); !errors.As(err, &ae) || ae.Status() != 412 {
		t.Fatalf("stale delete: %v", err)
	}
	// Without If-Match (or an etag in the body) a PUT only creates, as in
	// the hosted service: nobody replaces an enrollment or group, and
	// with it the keys its devices use, by mistake.
	en.ETag = ""
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollments/dev-1", "", en, nil); azerr.As(err).Status() != 409 {
		t.Fatalf("PUT of an existing enrollment without If-Match: %v", err)
	}
	got, _ := e.dps.GetEnrollment(ctx, "dev-1")
	if got.DeviceID != "renamed" || got.Attestation.SymmetricKey.PrimaryKey != upd.Attestation.SymmetricKey.PrimaryKey {
		t.Fatalf("a refused write landed: %+v", got)
	}
	var g dps.EnrollmentGroup
	group := &dps.EnrollmentGroup{Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}}
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/g1", "", group, &g); err != nil {
		t.Fatal(err)
	}
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/g1", "", group, nil); azerr.As(err).Status() != 409 {
		t.Fatalf("PUT of an existing group without If-Match: %v", err)
	}
	var g2 dps.EnrollmentGroup
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/g1", "*", &g, &g2); err != nil || g2.Attestation.SymmetricKey.PrimaryKey != g.Attestation.SymmetricKey.PrimaryKey {
		t.Fatalf("PUT of a group with If-Match *: %v %+v", err, g2.Attestation.SymmetricKey)
	}
	// Bulk mode update replaces whatever version is there; only
	// updateIfMatchETag checks the etag.
	got.ETag, got.DeviceID = stale, "bulk"
	var res dps.BulkResult
	if err := e.dpsAPI.Do(ctx, "POST", "/enrollments", "", &dps.BulkOperation{Mode: "update", Enrollments: []*dps.Enrollment{got}}, &res); err != nil || !res.IsSuccessful {
		t.Fatalf("bulk update with a stale etag in the body: %v %+v", err, res)
	}
	if err := e.dpsAPI.Do(ctx, "POST", "/enrollments", "", &dps.BulkOperation{Mode: "updateIfMatchETag", Enrollments: []*dps.Enrollment{got}}, &res); err != nil || res.IsSuccessful {
		t.Fatalf("bulk updateIfMatchETag with a stale etag: %v %+v", err, res)
	}
	got, _ = e.dps.GetEnrollment(ctx, "dev-1")
	upd.ETag = got.ETag
	if err := e.dpsAPI.Do(ctx, "DELETE", "/enrollments/dev-1", upd.ETag, nil, nil); err != nil {
		t.Fatal(err)
	}
}

func TestQueryPaging(t *testing.T) { testQueryPaging(t, newEnv(t)) }

func testQueryPaging(t *testing.T, e *env) {
	for _, id := range []string{"a", "b", "c", "d", "e"} {
		e.putEnrollment(&dps.Enrollment{RegistrationID: id, Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
	}
	var ids []string
	cont := ""
	for pages := 0; ; pages++ {
		var page []dps.Enrollment
		h := map[string]string{"x-ms-max-item-count": "2", "x-ms-continuation": cont}
		hdr, err := e.dpsAPI.DoHeaders(ctx, "POST", "/enrollments/query", "", h, map[string]string{"query": "*"}, &page)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range page {
			ids = append(ids, p.RegistrationID)
		}
		if cont = hdr.Get("x-ms-continuation"); cont == "" || pages > 5 {
			break
		}
	}
	if strings.Join(ids, ",") != "a,b,c,d,e" {
		t.Fatalf("paged ids %v", ids)
	}
	// The SDK samples' query, and the Azure CLI's ("SELECT *"), work on
	// every collection; a garbled continuation token is refused rather
	// than starting over.
	for _, path := range []string{"/enrollments/query", "/enrollmentGroups/query"} {
		for _, q := range []string{"SELECT * FROM enrollmentGroups", "SELECT *", "select *"} {
			var page []json.RawMessage
			if _, err := e.dpsAPI.DoHeaders(ctx, "POST", path, "", nil, map[string]string{"query": q}, &page); err != nil {
				t.Fatalf("%s %q: %v", path, q, err)
			}
		}
	}
	h := map[string]string{"x-ms-continuation": "%%%garbage"}
	if _, err := e.dpsAPI.DoHeaders(ctx, "POST", "/enrollments/query", "", h, map[string]string{"query": "*"}, nil); azerr.As(err).Status() != 400 || !strings.Contains(err.Error(), "previous page") {
		t.Fatalf("garbled continuation token: %v", err)
	}
	if _, err := e.dpsAPI.DoHeaders(ctx, "POST", "/enrollments/query", "", nil, map[string]string{"query": "SELECT * FROM enrollments WHERE x = 1"}, nil); azerr.As(err).Status() != 400 {
		t.Fatalf("query with a condition: %v", err)
	}
}

// A continuation token continues only the collection it came from, a
// group's registrations those of that group; one forged to name an ID no
// store holds (not UTF-8, with NUL, too long) is refused as clearly on
// every store (PostgreSQL would fail it as a 500).
func TestContinuationTokens(t *testing.T) { testContinuationTokens(t, newEnv(t)) }

func testContinuationTokens(t *testing.T, e *env) {
	for _, id := range []string{"a", "b"} {
		e.putEnrollment(&dps.Enrollment{RegistrationID: id, Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
	}
	for _, g := range []string{"ga", "gb"} {
		if _, err := e.dps.PutGroup(ctx, g, "", &dps.EnrollmentGroup{Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}}); err != nil {
			t.Fatal(err)
		}
		for _, r := range []string{g + "-1", g + "-2"} {
			if _, err := e.st.Create(ctx, store.Doc{Kind: "dps.registration", ID: r, Body: []byte(`{"registrationId":"` + r + `","enrollmentGroupId":"` + g + `"}`)}); err != nil {
				t.Fatal(err)
			}
		}
	}
	page := func(path, token string) (string, error) {
		t.Helper()
		h := map[string]string{"x-ms-max-item-count": "1", "x-ms-continuation": token}
		hdr, err := e.dpsAPI.DoHeaders(ctx, "POST", path, "", h, map[string]string{"query": "*"}, nil)
		return hdr.Get("x-ms-continuation"), err
	}
	tokens := map[string]string{}
	for _, path := range []string{"/enrollments/query", "/enrollmentGroups/query", "/registrations/ga/query", "/registrations/gb/query"} {
		token, err := page(path, "")
		if err != nil || token == "" {
			t.Fatalf("%s: first page: %v, continuation %q", path, err, token)
		}
		if _, err := page(path, token); err != nil {
			t.Fatalf("%s: its own token: %v", path, err)
		}
		tokens[path] = token
	}
	if _, err := page("/registrations/GA/query", tokens["/registrations/ga/query"]); err != nil {
		t.Fatalf("a group's token, the group named in capitals: %v", err)
	}
	for _, c := range []struct{ from, to string }{
		{"/registrations/ga/query", "/enrollments/query"},
		{"/registrations/ga/query", "/registrations/gb/query"},
		{"/enrollments/query", "/enrollmentGroups/query"},
	} {
		if _, err := page(c.to, tokens[c.from]); azerr.As(err).Status() != 400 || !strings.Contains(err.Error(), "previous page") {
			t.Errorf("%s with a token of %s: %v, want 400", c.to, c.from, err)
		}
	}
	forge := func(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }
	for _, token := range []string{
		forge("\x00"), forge("\xff"), forge("a\x00b"), forge("é"), // raw IDs, as tokens were
		forge("/enrollments/query\x00\xff"),
		forge("/enrollments/query\x00a\x00b"),
		forge("/enrollments/query\x00"),
		forge("/enrollments/query\x00" + strings.Repeat("a", 2000)),
	} {
		if _, err := page("/enrollments/query", token); azerr.As(err).Status() != 400 || !strings.Contains(err.Error(), "previous page") {
			t.Errorf("forged token %.40q: %v, want 400", token, err)
		}
	}
}

// The hub's registry refuses what the hosted one refuses.
func TestHubRegistry(t *testing.T) {
	e := newEnv(t)
	var d hub.Device
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/d1", "", map[string]any{"deviceId": "d1"}, &d); err != nil {
		t.Fatal(err)
	}
	if d.Authentication.Type != "sas" || d.Authentication.SymmetricKey.PrimaryKey == "" || d.Status != "enabled" {
		t.Fatalf("%+v", d)
	}
	err := e.hubAPI.Do(ctx, "PUT", "/devices/d1", "", map[string]any{"deviceId": "d1"}, nil)
	if ae := azerr.As(err); ae.Status() != 409 {
		t.Fatalf("duplicate create: %v", err)
	}
	// Each policy reaches what its rights name: "service" the twins and
	// messages, "registryReadWrite" the identities; both, twin queries.
	for policy, allowed := range map[string][2]bool{"service": {false, true}, "registryReadWrite": {true, false}} {
		cs, _ := e.hub.PolicyConnectionString(policy)
		c, err := azclient.New(cs, e.ts.URL, "2021-04-12", e.tls)
		if err != nil {
			t.Fatal(err)
		}
		for i, path := range []string{"/devices/d1", "/twins/d1"} {
			err := c.Do(ctx, "GET", path, "", nil, nil)
			if allowed[i] && err != nil || !allowed[i] && (azerr.As(err).Status() != 401 || !strings.Contains(err.Error(), "this request needs")) {
				t.Errorf("GET %s with policy %s: %v (allowed: %v)", path, policy, err, allowed[i])
			}
		}
		// Either may query twins, as in Azure.
		if err := c.Do(ctx, "POST", "/devices/query", "", map[string]any{"query": "SELECT * FROM devices"}, nil); err != nil {
			t.Errorf("twin query with policy %s: %v", policy, err)
		}
		// With a token for HOST/devices too, but not with one scoped to a
		// device, though one named "query" has the query's path.
		pcs, _ := sas.ParseConnectionString(cs)
		for sr, want := range map[string]int{"/devices": 200, "/devices/query": 401} {
			tok := sas.Build(pcs.Key, pcs.HostName+sr, pcs.KeyName, time.Now().Add(time.Hour))
			if st, m := e.raw("POST", "/devices/query?api-version=2021-04-12", tok, `{"query":"SELECT * FROM devices"}`); st != want {
				t.Errorf("twin query with a token for %s of policy %s: HTTP %d %v, want %d", sr, policy, st, m, want)
			}
		}
		// The CAs that devices and enrollment groups are trusted by are
		// the owner's to change.
		cert := testutil.NewCert(t, "Some CA", true, nil)
		ca := map[string]any{"properties": map[string]any{"certificate": string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Leaf.Raw})), "isVerified": true}}
		if err := c.Do(ctx, "PUT", "/certificates/ca1", "", ca, nil); azerr.As(err).Status() != 401 {
			t.Errorf("PUT /certificates with policy %s: %v", policy, err)
		}
	}
	var tw hub.Twin
	if err := e.hubAPI.Do(ctx, "PATCH", "/twins/d1", "", map[string]any{"tags": map[string]any{"a": 1, "b": map[string]any{"c": 2}}}, &tw); err != nil {
		t.Fatal(err)
	}
	if err := e.hubAPI.Do(ctx, "PATCH", "/twins/d1", tw.ETag, map[string]any{"tags": map[string]any{"a": nil, "b": map[string]any{"d": 3}}}, &tw); err != nil {
		t.Fatal(err)
	}
	if string(tw.Tags) != `{"b":{"c":2,"d":3}}` {
		t.Fatalf("merged tags %s", tw.Tags)
	}
	if err := e.hubAPI.Do(ctx, "PATCH", "/twins/d1", "stale", map[string]any{"tags": map[string]any{"x": 1}}, nil); azerr.As(err).Status() != 412 {
		t.Fatalf("stale twin patch: %v", err)
	}
	// Twin documents follow IoT Hub's rules, checked before anything changes.
	for _, c := range []struct {
		patch map[string]any
		want  string
	}{
		{map[string]any{"properties": map[string]any{"desired": map[string]any{"a.b": 1}}}, `property name "a.b" contains '.'`},
		{map[string]any{"tags": map[string]any{"site": map[string]any{"$x": 1}}}, `tags.site: property name "$x"`},
		{map[string]any{"tags": map[string]any{"big": strings.Repeat("x", 4000), "big2": strings.Repeat("x", 4000), "big3": strings.Repeat("x", 4000)}}, "at most 8192 (8 KiB)"},
	} {
		if err := e.hubAPI.Do(ctx, "PATCH", "/twins/d1", "", c.patch, nil); azerr.As(err).Status() != 400 || !strings.Contains(err.Error(), c.want) {
			t.Errorf("twin patch %v: %v, want 400 with %q", c.patch, err, c.want)
		}
	}
	if _, err := e.hub.UpdateReported(ctx, hub.Ref{Device: "d1"}, map[string]any{"bad name": 1}); azerr.As(err).Status() != 400 {
		t.Errorf("reported property with a space: %v", err)
	}
	if after, _ := e.hub.GetTwin(ctx, hub.Ref{Device: "d1"}); after.ETag != tw.ETag {
		t.Fatalf("refused twin patches changed the twin: %s -> %s", tw.ETag, after.ETag)
	}
	// An edge device gets its $edgeAgent and $edgeHub modules; module twins work like device twins.
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/edge1", "", map[string]any{"capabilities": map[string]any{"iotEdge": true}}, nil); err != nil {
		t.Fatal(err)
	}
	var mods []hub.Device
	if err := e.hubAPI.Do(ctx, "GET", "/devices/edge1/modules", "", nil, &mods); err != nil {
		t.Fatal(err)
	}
	if len(mods) != 2 || mods[0].ModuleID != "$edgeAgent" || mods[1].ModuleID != "$edgeHub" || mods[0].ManagedBy != "iotEdge" {
		t.Fatalf("edge modules %+v", mods)
	}
	if err := e.hubAPI.Do(ctx, "PATCH", "/twins/edge1/modules/$edgeAgent", "", map[string]any{"properties": map[string]any{"desired": map[string]any{"schemaVersion": "1.1"}}}, &tw); err != nil {
		t.Fatal(err)
	}
	if tw.ModuleID != "$edgeAgent" || !strings.Contains(string(tw.Properties.Desired), `"schemaVersion":"1.1"`) {
		t.Fatalf("module twin %+v %s", tw, tw.Properties.Desired)
	}
	if err := e.hubAPI.Do(ctx, "GET", "/twins/edge1/modules/nope", "", nil, nil); azerr.As(err).Status() != 404 {
		t.Fatalf("missing module twin: %v", err)
	}
	if err := e.hubAPI.Do(ctx, "DELETE", "/devices/edge1", "*", nil, nil); err != nil {
		t.Fatal(err)
	}
	if n, _ := e.st.Count(ctx, "hub.module"); n != 0 {
		t.Fatalf("%d modules left after deleting their device", n)
	}
	// A method to a device that is not connected fails as in the hosted hub.
	if err := e.hubAPI.Do(ctx, "POST", "/twins/d1/methods", "", map[string]any{"methodName": "reboot"}, nil); azerr.As(err).Status() != 404 || !strings.Contains(err.Error(), "not connected") {
		t.Fatalf("method to offline device: %v", err)
	}
	for _, id := range []string{"bad/id", strings.Repeat("x", 129)} {
		st, _ := e.raw("GET", "/devices/"+id+"?api-version=2021-04-12", "", "")
		if st < 400 {
			t.Fatalf("%q: %d", id, st)
		}
	}
}

// A restarted server (a new process on the same database) continues a
// device's flow: the operation it started is still there.
func TestRestartKeepsOperations(t *testing.T) {
	db := t.TempDir() + "/h.db"
	e1 := newEnvAt(t, db)
	en := e1.putEnrollment(&dps.Enrollment{RegistrationID: "dev-1", Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
	key, _ := base64.StdEncoding.DecodeString(en.Attestation.SymmetricKey.PrimaryKey)
	tok := sas.Build(key, e1.dps.IDScope()+"/registrations/dev-1", "registration", time.Now().Add(time.Minute))
	st, body := e1.raw("PUT", "/"+e1.dps.IDScope()+"/registrations/dev-1/register?api-version=2019-03-31", tok, `{"registrationId":"dev-1"}`)
	if st != 202 || body["status"] != "assigning" {
		t.Fatalf("register: %d %v", st, body)
	}
	opID := body["operationId"].(string)
	e1.ts.Close()
	e2 := newEnvAt(t, db)
	st, body = e2.raw("GET", "/"+e2.dps.IDScope()+"/registrations/dev-1/operations/"+opID+"?api-version=2019-03-31", tok, "")
	if st != 200 || body["status"] != "assigned" {
		t.Fatalf("poll after restart: %d %v", st, body)
	}
}

// testEK is a real EK TPM2B_PUBLIC read from a TPM once.
func testEK(t *testing.T) string { return base64.StdEncoding.EncodeToString(testEKRaw(t)) }

// testEKRaw is an EK's TPM2B_PUBLIC, as tpm2_readpublic writes it.
func testEKRaw(t *testing.T) []byte { return testPublic(t, "ek.pub") }

// otherEK is another key of the same kind (an SRK).
func otherEK(t *testing.T) []byte { return testPublic(t, "srk.pub") }

func testPublic(t *testing.T, name string) []byte {
	b, err := os.ReadFile("../attest/testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Credentials that do not match get one answer whether the registration
// or device exists or not, so that nobody can probe which do; the operator
// finds what did not match in the log, under the answer's tracking ID.
// What the request alone shows (an expired token) is still said.
func TestRefusalsDoNotRevealWhoExists(t *testing.T) {
	log := captureLog(t)
	e := newEnv(t)
	e.putEnrollment(&dps.Enrollment{RegistrationID: "dev-1", Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
	e.newDevice("d1", false)
	scope := e.dps.IDScope()
	wrong := []byte("0123456789abcdef0123456789abcdef")

	type answer struct {
		status int
		msg    string
		id     string
	}
	ask := func(method, path, audience string, exp time.Duration) answer {
		t.Helper()
		st, body := e.raw(method, path, sas.Build(wrong, audience, "", time.Now().Add(exp)), `{}`)
		msg, _ := body["message"].(string)
		id, _ := body["trackingId"].(string)
		if id == "" { // the hub's shape
			id, _, _ = strings.Cut(strings.TrimPrefix(body["ExceptionMessage"].(string), "Tracking ID:"), "-TimeStamp")
		}
		return answer{st, msg, id}
	}
	register := func(id string, exp time.Duration) answer {
		return ask("PUT", "/"+scope+"/registrations/"+id+"/register?api-version=2019-03-31", scope+"/registrations/"+id, exp)
	}
	telemetry := func(id string, exp time.Duration) answer {
		return ask("POST", "/devices/"+id+"/messages/events?api-version=2020-09-30", host+"/devices/"+id, exp)
	}
	for _, c := range []struct {
		what           string
		known, unknown func() answer
		reason         string
	}{
		{"registration", func() answer { return register("dev-1", time.Minute) }, func() answer { return register("dev-9", time.Minute) }, "signature does not match"},
		{"hub device", func() answer { return telemetry("d1", time.Minute) }, func() answer { return telemetry("d9", time.Minute) }, "signature does not match"},
	} {
		log.Reset()
		known, unknown := c.known(), c.unknown()
		if known.status != 401 || unknown.status != 401 ||
			strings.ReplaceAll(known.msg, "1", "9") != unknown.msg || !strings.Contains(known.msg, "check its credentials") {
			t.Errorf("%s: a wrong key answered %d %q, an unknown ID %d %q", c.what, known.status, known.msg, unknown.status, unknown.msg)
		}
		if !strings.Contains(log.String(), "trackingId="+known.id) || !strings.Contains(log.String(), c.reason) {
			t.Errorf("%s: the log does not say why %s was refused:\n%s", c.what, known.id, log.String())
		}
	}
	// A TPM's request for a challenge, with an EK certificate for a TPM
	// group: the enrolled ID (whose EK is another) and an unknown one alike.
	challenge := func(id string) string {
		_, body := e.raw("PUT", "/"+scope+"/registrations/"+id+"/register?api-version=2021-06-01", "",
			`{"tpm":{"endorsementKey":"`+testEK(t)+`","storageRootKey":"`+testEK(t)+`","endorsementKeyCertificate":"x"}}`)
		msg, _ := body["message"].(string)
		return msg
	}
	e.putEnrollment(&dps.Enrollment{RegistrationID: "tpm-1", Attestation: dps.Attestation{Type: dps.AttestationTPM,
		TPM: &dps.TPMAttestation{EndorsementKey: base64.StdEncoding.EncodeToString(otherEK(t))}}})
	if known, unknown := challenge("tpm-1"), challenge("tpm-9"); strings.ReplaceAll(known, "1", "9") != unknown || !strings.Contains(known, "check its credentials") {
		t.Errorf("TPM challenges: the enrolled ID got %q, an unknown one %q", known, unknown)
	}
	if a := register("dev-9", -time.Minute); a.status != 401 || !strings.Contains(a.msg, "expired") {
		t.Errorf("an expired token answered %d %q", a.status, a.msg)
	}
	if a := telemetry("d9", -time.Minute); a.status != 401 || !strings.Contains(a.msg, "expired") {
		t.Errorf("an expired token answered %d %q", a.status, a.msg)
	}
}

// A replace that keeps the stored keys (If-Match "*", or a bulk update) keeps
// those of the version it replaces: a key rotated between its read and its
// write stays rotated, for enrollments and groups alike.
func TestReplaceKeepsKeysRotatedMeanwhile(t *testing.T) {
	e := newEnv(t)
	rotated := base64.StdEncoding.EncodeToString([]byte("a key rotated meanwhile, 32 byte"))
	sym := dps.Attestation{Type: dps.AttestationSymmetricKey}
	e.putEnrollment(&dps.Enrollment{RegistrationID: "rot", Attestation: sym})
	if _, err := e.dps.PutGroup(ctx, "rotg", "", &dps.EnrollmentGroup{Attestation: sym}); err != nil {
		t.Fatal(err)
	}
	// rotate writes the new primary key through another replica, just before
	// the replace under test writes.
	rotate := func(kind string) func() {
		return func() {
			var err error
			if kind == "dps.enrollment" {
				cur, _ := e.dps.GetEnrollment(ctx, "rot")
				cur.Attestation.SymmetricKey.PrimaryKey, cur.RegistrationState = rotated, nil
				_, err = e.dps.PutEnrollment(ctx, "rot", cur.ETag, cur)
			} else {
				cur, _ := e.dps.GetGroup(ctx, "rotg")
				cur.Attestation.SymmetricKey.PrimaryKey = rotated
				_, err = e.dps.PutGroup(ctx, "rotg", cur.ETag, cur)
			}
			if err != nil {
				t.Error(err)
			}
		}
	}
	keyOf := func(kind string) string {
		if kind == "dps.enrollment" {
			en, _ := e.dps.GetEnrollment(ctx, "rot")
			return en.Attestation.SymmetricKey.PrimaryKey + " " + en.ProvisioningStatus
		}
		g, _ := e.dps.GetGroup(ctx, "rotg")
		return g.Attestation.SymmetricKey.PrimaryKey + " " + g.ProvisioningStatus
	}
	for _, tc := range []struct {
		name, kind string
		replace    func(*dps.Service) error
	}{
		{"enrollment, If-Match *", "dps.enrollment", func(r *dps.Service) error {
			_, err := r.PutEnrollment(ctx, "rot", "*", &dps.Enrollment{Attestation: sym, ProvisioningStatus: "disabled"})
			return err
		}},
		{"bulk update", "dps.enrollment", func(r *dps.Service) error {
			res, err := r.Bulk(ctx, &dps.BulkOperation{Mode: dps.BulkUpdate, Enrollments: []*dps.Enrollment{{RegistrationID: "rot", Attestation: sym, ProvisioningStatus: "enabled"}}})
			if err == nil && len(res.Errors) > 0 {
				err = fmt.Errorf("%+v", res.Errors)
			}
			return err
		}},
		{"group, If-Match *", "dps.enrollmentGroup", func(r *dps.Service) error {
			_, err := r.PutGroup(ctx, "rotg", "*", &dps.EnrollmentGroup{Attestation: sym, ProvisioningStatus: "disabled"})
			return err
		}},
	} {
		replica := e.replica(t, &storeHook{Store: e.st, kind: tc.kind, op: "put", f: rotate(tc.kind)}, e.pool())
		if err := tc.replace(replica); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := keyOf(tc.kind); !strings.HasPrefix(got, rotated+" ") || strings.HasSuffix(got, " ") {
			t.Errorf("%s: primary key and status after the replace: %s; want the rotated key kept and the status written", tc.name, got)
		}
		rotated = base64.StdEncoding.EncodeToString([]byte("another rotation, of 32 bytes..." + tc.name)[:32])
	}

	// A linked hub sent back as the API shows it, its key hidden, keeps the
	// key stored when it is written.
	const lh = "hub9.test"
	withKey := func(key string) string {
		return "HostName=" + lh + ";SharedAccessKeyName=iothubowner;SharedAccessKey=" + key
	}
	if err := e.dps.LinkHub(ctx, dps.LinkedHub{HostName: lh, ConnectionString: withKey(rotated)}); err != nil {
		t.Fatal(err)
	}
	hubRotated := base64.StdEncoding.EncodeToString([]byte("the hub's key rotated meanwhile."))
	replica := e.replica(t, &storeHook{Store: e.st, kind: "dps.linkedHub", op: "put", f: func() {
		if err := e.dps.LinkHub(ctx, dps.LinkedHub{HostName: lh, ConnectionString: withKey(hubRotated)}); err != nil {
			t.Error(err)
		}
	}}, e.pool())
	shown := dps.LinkedHub{ConnectionString: withKey(rotated)}.Redacted().ConnectionString
	if _, err := replica.PutLinkedHub(ctx, lh, &dps.LinkedHub{ConnectionString: shown, AllocationWeight: 7}); err != nil {
		t.Fatal(err)
	}
	hubs, _ := e.dps.LinkedHubs(ctx)
	for _, h := range hubs {
		if h.HostName == lh && (h.ConnectionString != withKey(hubRotated) || h.AllocationWeight != 7) {
			t.Errorf("linked hub after a write with its key hidden: %s weight %d; want the rotated key kept", h.ConnectionString, h.AllocationWeight)
		}
	}
}
