package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/hubclient"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/store"
)

// secondHub is another hub on its own server and database, as another
// `hatchery serve` would be, linked to e's provisioning service.
func (e *env) secondHub(t *testing.T, name string) *azclient.Client {
	t.Helper()
	st, err := store.OpenSQLite(filepath.Join(t.TempDir(), "hub2.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	h, err := hub.Open(ctx, st, name)
	if err != nil {
		t.Fatal(err)
	}
	d, err := dps.Open(ctx, st, &hubclient.Pool{}, name)
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewTLSServer(New(d, h, nil))
	t.Cleanup(ts.Close)
	if err := e.dps.LinkHub(ctx, dps.LinkedHub{HostName: name, ConnectionString: h.OwnerConnectionString(), Endpoint: ts.URL,
		ApplyAllocationPolicy: false}); err != nil {
		t.Fatal(err)
	}
	c, err := azclient.New(h.OwnerConnectionString(), ts.URL, "2021-04-12", e.tls)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// updateLinkedHub changes a linked hub through the API, as `hatchery hub
// link` does: read, edit, write back (the key stays hidden).
func (e *env) updateLinkedHub(t *testing.T, name string, edit func(*dps.LinkedHub)) {
	t.Helper()
	var hubs []*dps.LinkedHub
	if err := e.dpsAPI.Do(ctx, "GET", "/linkedHubs", "", nil, &hubs); err != nil {
		t.Fatal(err)
	}
	for _, h := range hubs {
		if h.HostName == name {
			edit(h)
			if err := e.dpsAPI.Do(ctx, "PUT", "/linkedHubs/"+name, "", h, nil); err != nil {
				t.Fatal(err)
			}
			return
		}
	}
	t.Fatalf("%s is not linked", name)
}

// With reprovisionPolicy "never" (updateHubAssignment false), a device
// registering again stays the identity it was: a deviceId the operator
// changed in the enrollment since does not create a second device beside
// the old one.
func TestNeverReprovisionKeepsTheDeviceID(t *testing.T) {
	e := newEnv(t)
	en := &dps.Enrollment{RegistrationID: "keeper", DeviceID: "keeper-old", ReprovisionPolicy: &dps.ReprovisionPolicy{}}
	register := e.symDevice(t, en)
	if res, err := register(); err != nil || res.DeviceID != "keeper-old" {
		t.Fatalf("first registration: %+v %v", res, err)
	}
	cur, err := e.dps.GetEnrollment(ctx, "keeper")
	if err != nil {
		t.Fatal(err)
	}
	cur.DeviceID, cur.RegistrationState = "keeper-new", nil
	e.putEnrollment(cur)
	before := e.counts()["hub.device"]
	res, err := register()
	if err != nil || res.DeviceID != "keeper-old" || res.AssignedHub != host || res.Substatus != "reprovisionedToInitialAssignment" {
		t.Fatalf("registering again: %+v %v", res, err)
	}
	if err := e.hubAPI.Do(ctx, "GET", "/devices/keeper-new", "", nil, &hub.Device{}); azerr.As(err).Status() != 404 {
		t.Errorf("a second device was created: %v", err)
	}
	if after := e.counts()["hub.device"]; after != before {
		t.Errorf("%d hub devices, then %d", before, after)
	}
	if rec, err := e.dps.GetRegistration(ctx, "keeper"); err != nil || rec.DeviceID != "keeper-old" {
		t.Errorf("registration record %+v %v", rec, err)
	}
}

// symDevice enrolls regID with a symmetric key and returns a function that
// registers it.
func (e *env) symDevice(t *testing.T, en *dps.Enrollment) func() (*dps.RegistrationState, error) {
	t.Helper()
	en.Attestation = dps.Attestation{Type: dps.AttestationSymmetricKey}
	out := e.putEnrollment(en)
	key, _ := base64.StdEncoding.DecodeString(out.Attestation.SymmetricKey.PrimaryKey)
	return func() (*dps.RegistrationState, error) {
		return e.device(en.RegistrationID).RegisterSymmetricKey(ctx, key)
	}
}

func TestStaticAndGeoLatencyAllocation(t *testing.T) {
	e := newEnv(t)
	hub2 := e.secondHub(t, "hub2.test")
	register := e.symDevice(t, &dps.Enrollment{RegistrationID: "static-1", AllocationPolicy: dps.PolicyStatic, IoTHubHostName: "hub2.test"})
	if res, err := register(); err != nil || res.AssignedHub != "hub2.test" {
		t.Fatalf("static: %+v %v", res, err)
	}
	if err := hub2.Do(ctx, "GET", "/devices/static-1", "", nil, nil); err != nil {
		t.Fatalf("device not on hub2: %v", err)
	}

	// The test client is on loopback: hub2 is configured nearer to it.
	e.updateLinkedHub(t, "hub2.test", func(h *dps.LinkedHub) {
		h.ApplyAllocationPolicy, h.LatencyMs = true, map[string]int{"127.0.0.0/8": 5}
	})
	e.updateLinkedHub(t, host, func(h *dps.LinkedHub) { h.LatencyMs = map[string]int{"127.0.0.1/32": 40} })
	var hubs []*dps.LinkedHub
	if err := e.dpsAPI.Do(ctx, "GET", "/linkedHubs", "", nil, &hubs); err != nil || len(hubs) != 2 {
		t.Fatalf("linked hubs %v %v", hubs, err)
	}
	for _, h := range hubs {
		if strings.Contains(h.ConnectionString, "SharedAccessKey=") && !strings.HasSuffix(h.ConnectionString, dps.HiddenKey) {
			t.Fatalf("the API shows a hub's key: %s", h.ConnectionString)
		}
	}
	for _, id := range []string{"geo-1", "geo-2", "geo-3"} {
		res, err := e.symDevice(t, &dps.Enrollment{RegistrationID: id, AllocationPolicy: dps.PolicyGeoLatency})()
		if err != nil || res.AssignedHub != "hub2.test" {
			t.Fatalf("geoLatency %s: %+v %v", id, res, err)
		}
	}
	// Bad settings are refused.
	for what, body := range map[string]*dps.LinkedHub{
		"bad network": {ConnectionString: "HostName=x;SharedAccessKeyName=p;SharedAccessKey=" + dps.HiddenKey, LatencyMs: map[string]int{"10.0.0.0": 3}},
		"bad weight":  {ConnectionString: "HostName=x;SharedAccessKeyName=p;SharedAccessKey=" + dps.HiddenKey, AllocationWeight: -2},
		"no conn str": {},
	} {
		if err := e.dpsAPI.Do(ctx, "PUT", "/linkedHubs/hub2.test", "", body, nil); err == nil {
			t.Errorf("%s accepted", what)
		}
	}
	if err := e.dpsAPI.Do(ctx, "PUT", "/linkedHubs/ghost.test", "", &dps.LinkedHub{
		ConnectionString: "HostName=ghost.test;SharedAccessKeyName=p;SharedAccessKey=" + dps.HiddenKey}, nil); err == nil {
		t.Error("a new hub without its key accepted")
	}
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollments/s2", "", &dps.Enrollment{Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey},
		AllocationPolicy: dps.PolicyStatic}, nil); err == nil || !strings.Contains(err.Error(), "static needs the hub") {
		t.Errorf("static without a hub: %v", err)
	}
}

func TestCustomAllocationWebhook(t *testing.T) {
	e := newEnv(t)
	e.secondHub(t, "hub2.test")
	e.dps.WebhookTimeout = time.Second
	var mu sync.Mutex // the handler may outlive a timed-out call
	var got map[string]any
	answer := `{"iotHubHostName":"hub2.test","initialTwin":{"tags":{"chosenBy":"webhook"}},"payload":{"greeting":"hi"}}`
	setAnswer := func(a string) { mu.Lock(); answer = a; mu.Unlock() }
	request := func() map[string]any { mu.Lock(); defer mu.Unlock(); return got }
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		_ = json.Unmarshal(body, &got)
		answer := answer
		mu.Unlock()
		switch answer {
		case "slow":
			time.Sleep(2 * time.Second)
		case "500":
			http.Error(w, "boom", 500)
		default:
			_, _ = io.WriteString(w, answer)
		}
	}))
	defer hook.Close()

	register := e.symDevice(t, &dps.Enrollment{RegistrationID: "custom-1", AllocationPolicy: dps.PolicyCustom,
		IoTHubs:                    []string{host, "hub2.test"},
		CustomAllocationDefinition: &dps.CustomAllocationDefinition{WebhookURL: hook.URL + "/alloc?code=S3CRET", APIVersion: "2021-10-01"}})
	res, err := register()
	if err != nil || res.AssignedHub != "hub2.test" || string(res.Payload) != `{"greeting":"hi"}` {
		t.Fatalf("custom: %+v %v", res, err)
	}
	req := request()
	rc, _ := req["deviceRuntimeContext"].(map[string]any)
	if rc["registrationId"] != "custom-1" || req["individualEnrollment"] == nil || len(req["linkedHubs"].([]any)) != 2 {
		t.Fatalf("webhook request %v", req)
	}
	// The webhook learns the attestation type, not the device's keys.
	if att := req["individualEnrollment"].(map[string]any)["attestation"]; fmt.Sprint(att) != "map[type:symmetricKey]" {
		t.Fatalf("the webhook was sent the attestation %v", att)
	}
	// On re-registration the webhook learns where the device is.
	for _, tc := range []struct{ answer, want string }{
		{`{"iotHubHostName":"elsewhere.test"}`, "not among the enrollment's linked hubs"},
		{`not json`, "is not JSON"},
		{`{}`, "names no iotHubHostName"},
		{"500", "answered HTTP 500"},
		{"slow", "no answer within 1s"},
	} {
		setAnswer(tc.answer)
		res, err := register()
		if err == nil || res == nil || res.Status != "failed" || !strings.Contains(res.ErrorMessage, tc.want) || res.ErrorCode != 400207 {
			t.Errorf("webhook answering %s: %+v %v", tc.answer, res, err)
		}
		if res != nil && strings.Contains(res.ErrorMessage, "S3CRET") {
			t.Errorf("the device is told the webhook's key: %s", res.ErrorMessage)
		}
	}
	// A desired-properties answer that is not an object is refused before
	// anything is written to the hub.
	setAnswer(`{"iotHubHostName":"hub2.test","initialTwin":{"properties":{"desired":[1]}}}`)
	if res, _ := register(); res == nil || res.ErrorCode != 400207 || !strings.Contains(res.ErrorMessage, "desired must be a JSON object") {
		t.Errorf("webhook answering desired properties that are not an object: %+v", res)
	}
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollments/plain-http", "", &dps.Enrollment{Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey},
		AllocationPolicy: dps.PolicyCustom, CustomAllocationDefinition: &dps.CustomAllocationDefinition{WebhookURL: "http://webhooks.example/alloc"}}, nil); err == nil {
		t.Error("a plain-http webhook on another host was accepted")
	}
}

// A webhook on https is not followed to plain http by a redirect, which
// would send its URL's key in clear.
func TestWebhookRedirectKeepsHTTPS(t *testing.T) {
	e := newEnv(t)
	var leaked atomic.Bool
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		leaked.Store(true)
		_, _ = io.WriteString(w, `{"iotHubHostName":"`+host+`"}`)
	}))
	defer plain.Close()
	secure := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, plain.URL+r.URL.RequestURI(), http.StatusFound)
	}))
	defer secure.Close()
	e.dps.Webhooks = secure.Client()
	register := e.symDevice(t, &dps.Enrollment{RegistrationID: "redirected", AllocationPolicy: dps.PolicyCustom,
		CustomAllocationDefinition: &dps.CustomAllocationDefinition{WebhookURL: secure.URL + "/alloc?code=S3CRET", APIVersion: "2021-10-01"}})
	res, err := register()
	if err == nil || res == nil || res.Status != "failed" || !strings.Contains(res.ErrorMessage, "not https") || leaked.Load() {
		t.Fatalf("a webhook redirecting to plain http: %+v %v; followed: %v", res, err, leaked.Load())
	}
}

// A device registering again follows the reprovision policy.
func TestReprovisionPolicies(t *testing.T) {
	e := newEnv(t)
	hub2 := e.secondHub(t, "hub2.test")
	initial := &dps.InitialTwin{Tags: json.RawMessage(`{"stage":"initial"}`)}
	en := &dps.Enrollment{RegistrationID: "mover", AllocationPolicy: dps.PolicyStatic, IoTHubHostName: host, InitialTwin: initial}
	register := e.symDevice(t, en)
	if res, err := register(); err != nil || res.Substatus != "initialAssignment" || res.AssignedHub != host {
		t.Fatalf("first registration: %+v %v", res, err)
	}
	setTags := func(c *azclient.Client, tags string) {
		t.Helper()
		if err := c.Do(ctx, "PATCH", "/twins/mover", "", map[string]any{"tags": json.RawMessage(tags)}, nil); err != nil {
			t.Fatal(err)
		}
	}
	tagsOn := func(c *azclient.Client) string {
		t.Helper()
		var tw hub.Twin
		if err := c.Do(ctx, "GET", "/twins/mover", "", nil, &tw); err != nil {
			t.Fatal(err)
		}
		return string(tw.Tags)
	}
	setTags(e.hubAPI, `{"stage":"field","site":"b7"}`)
	// Again to the same hub: nothing moves, as the hosted service says.
	if res, err := register(); err != nil || res.Substatus != "reprovisionedToInitialAssignment" || tagsOn(e.hubAPI) != `{"site":"b7","stage":"field"}` {
		t.Fatalf("registering again to the same hub: %+v %v", res, err)
	}

	move := func(to string, policy *dps.ReprovisionPolicy) *dps.RegistrationState {
		t.Helper()
		cur, err := e.dps.GetEnrollment(ctx, "mover")
		if err != nil {
			t.Fatal(err)
		}
		cur.IoTHubHostName, cur.ReprovisionPolicy, cur.RegistrationState = to, policy, nil
		e.putEnrollment(cur)
		res, err := register()
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	// Migrate: to hub2 with the twin as it was on the first hub.
	res := move("hub2.test", &dps.ReprovisionPolicy{UpdateHubAssignment: true, MigrateDeviceData: true})
	if res.AssignedHub != "hub2.test" || res.Substatus != "deviceDataMigrated" {
		t.Fatalf("migrate: %+v", res)
	}
	if got := tagsOn(hub2); got != `{"site":"b7","stage":"field"}` {
		t.Fatalf("migrated tags %s", got)
	}
	// It left the first hub, where its key would otherwise still admit it.
	gone := func(c *azclient.Client) {
		t.Helper()
		if err := c.Do(ctx, "GET", "/devices/mover", "", nil, &hub.Device{}); azerr.As(err).Status() != 404 {
			t.Fatalf("the former hub still has the device: %v", err)
		}
	}
	gone(e.hubAPI)
	// Never: stays on hub2 whatever the allocation says now.
	if res := move(host, &dps.ReprovisionPolicy{}); res.AssignedHub != "hub2.test" || res.Substatus != "reprovisionedToInitialAssignment" {
		t.Fatalf("never: %+v", res)
	}
	// Reset: back to the first hub, with the initial twin, not what it had on hub2.
	setTags(hub2, `{"stage":"changed on hub2"}`)
	res = move(host, &dps.ReprovisionPolicy{UpdateHubAssignment: true})
	if res.AssignedHub != host || res.Substatus != "deviceDataReset" {
		t.Fatalf("reset: %+v", res)
	}
	if got := tagsOn(e.hubAPI); got != `{"stage":"initial"}` {
		t.Fatalf("reset tags %s", got)
	}
	gone(hub2)
	// A former identity whose credentials changed since (someone else's
	// now) stays where it is.
	move("hub2.test", &dps.ReprovisionPolicy{UpdateHubAssignment: true})
	var d hub.Device
	if err := hub2.Do(ctx, "GET", "/devices/mover", "", nil, &d); err != nil {
		t.Fatal(err)
	}
	d.Authentication.SymmetricKey.PrimaryKey = base64.StdEncoding.EncodeToString(make([]byte, 32))
	if err := hub2.Do(ctx, "PUT", "/devices/mover", "*", &d, nil); err != nil {
		t.Fatal(err)
	}
	move(host, &dps.ReprovisionPolicy{UpdateHubAssignment: true})
	if err := hub2.Do(ctx, "GET", "/devices/mover", "", nil, &hub.Device{}); err != nil {
		t.Fatalf("the identity with other credentials was deleted: %v", err)
	}
}

// mover registers a device as old-id and gives it a tag, then has its
// enrollment name it new-id, allocated by a webhook that answers with the
// HTTP status status() returns (with this hub, on 200). It returns the
// function that registers the device.
func (e *env) mover(t *testing.T, status func() int) func() (*dps.RegistrationState, error) {
	t.Helper()
	register := e.symDevice(t, &dps.Enrollment{RegistrationID: "mover", DeviceID: "old-id"})
	if _, err := register(); err != nil {
		t.Fatal(err)
	}
	if err := e.hubAPI.Do(ctx, "PATCH", "/twins/old-id", "", map[string]any{"tags": map[string]any{"site": "b7"}}, nil); err != nil {
		t.Fatal(err)
	}
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if st := status(); st != http.StatusOK {
			http.Error(w, "busy", st)
			return
		}
		_, _ = io.WriteString(w, `{"iotHubHostName":"`+host+`"}`)
	}))
	t.Cleanup(hook.Close)
	cur, err := e.dps.GetEnrollment(ctx, "mover")
	if err != nil {
		t.Fatal(err)
	}
	cur.DeviceID, cur.AllocationPolicy, cur.RegistrationState = "new-id", dps.PolicyCustom, nil
	cur.CustomAllocationDefinition = &dps.CustomAllocationDefinition{WebhookURL: hook.URL, APIVersion: "2021-10-01"}
	e.putEnrollment(cur)
	return register
}

// Two registrations of a device that moves, read from the same record: the
// later to reach the hub finds the former identity gone with its twin
// migrated, and leaves that twin as it is.
func TestConcurrentMoveKeepsMigratedTwin(t *testing.T) {
	e := newEnv(t)
	// The first call of the webhook waits until the second registration is done.
	var calls atomic.Int32
	waiting, release := make(chan struct{}), make(chan struct{})
	register := e.mover(t, func() int {
		if calls.Add(1) == 1 {
			close(waiting)
			<-release
		}
		return http.StatusOK
	})
	first := make(chan *dps.RegistrationState)
	go func() {
		res, err := register()
		if err != nil {
			t.Error(err)
		}
		first <- res
	}()
	<-waiting
	if res, err := register(); err != nil || res.DeviceID != "new-id" || res.Substatus != "deviceDataMigrated" {
		t.Fatalf("second registration: %+v %v", res, err)
	}
	close(release)
	if res := <-first; res == nil || res.DeviceID != "new-id" || res.Substatus != "deviceDataMigrated" {
		t.Fatalf("first registration: %+v", res)
	}
	if tags := string(mustTwin(t, e, "new-id", "").Tags); tags != `{"site":"b7"}` {
		t.Fatalf("the migrated twin became %s", tags)
	}
}

// Two registrations of one device whose webhook sends them to different
// hubs, the slower one's answer recorded second: the device ends on one hub,
// the one recorded first, with its twin, and both are told that hub.
func TestRacingPlacementsLeaveOneIdentity(t *testing.T) {
	for _, tc := range []struct{ name, fast, slow string }{
		{"the faster moves", "hub2.test", host},
		{"the faster stays", host, "hub2.test"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			hub2 := e.secondHub(t, "hub2.test")
			var calls atomic.Int32
			waiting, release := make(chan struct{}), make(chan struct{})
			hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				to := tc.fast
				switch calls.Add(1) {
				case 1:
					to = host
				case 2: // the slow registration, which waits for the fast one
					close(waiting)
					<-release
					to = tc.slow
				}
				_, _ = io.WriteString(w, `{"iotHubHostName":"`+to+`"}`)
			}))
			defer hook.Close()
			register := e.symDevice(t, &dps.Enrollment{RegistrationID: "racer", AllocationPolicy: dps.PolicyCustom,
				IoTHubs: []string{host, "hub2.test"}, CustomAllocationDefinition: &dps.CustomAllocationDefinition{WebhookURL: hook.URL}})
			if res, err := register(); err != nil || res.AssignedHub != host {
				t.Fatalf("first registration: %+v %v", res, err)
			}
			if err := e.hubAPI.Do(ctx, "PATCH", "/twins/racer", "", map[string]any{"tags": map[string]any{"site": "b7"}}, nil); err != nil {
				t.Fatal(err)
			}
			slow := make(chan *dps.RegistrationState)
			go func() {
				res, err := register()
				if err != nil {
					t.Error(err)
				}
				slow <- res
			}()
			<-waiting
			fast, err := register()
			if err != nil || fast.AssignedHub != tc.fast {
				t.Fatalf("the faster registration: %+v %v", fast, err)
			}
			close(release)
			if res := <-slow; res == nil || res.AssignedHub != tc.fast || res.Status != "assigned" {
				t.Fatalf("the slower registration was answered %+v; the faster one's hub is %s", res, tc.fast)
			}
			if rec, err := e.dps.GetRegistration(ctx, "racer"); err != nil || rec.AssignedHub != tc.fast {
				t.Fatalf("record %+v %v", rec, err)
			}
			on := map[string]*azclient.Client{host: e.hubAPI, "hub2.test": hub2}
			for name, c := range on {
				err := c.Do(ctx, "GET", "/devices/racer", "", nil, &hub.Device{})
				if name == tc.fast && err != nil {
					t.Errorf("the device is not on %s, where it was assigned: %v", name, err)
				}
				if name != tc.fast && azerr.As(err).Status() != 404 {
					t.Errorf("the device is on %s too, with keys that work: %v", name, err)
				}
			}
			var tw hub.Twin
			if err := on[tc.fast].Do(ctx, "GET", "/twins/racer", "", nil, &tw); err != nil || string(tw.Tags) != `{"site":"b7"}` {
				t.Errorf("twin on %s: %s %v", tc.fast, tw.Tags, err)
			}
		})
	}
}

// A registration that placed a device while another moved it elsewhere and
// a third then failed (its record keeping where the second put it) does not
// write over that failure: the device ends where the second put it, on one
// hub, and is told of the failure, so that it registers again.
func TestRacingPlacementAfterAFailureLeavesOneIdentity(t *testing.T) {
	e := newEnv(t)
	hubs := map[string]*azclient.Client{host: e.hubAPI, "hub2.test": e.secondHub(t, "hub2.test"), "hub3.test": e.secondHub(t, "hub3.test")}
	var calls atomic.Int32
	waiting, release := make(chan struct{}), make(chan struct{})
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		to := host
		switch calls.Add(1) {
		case 2: // the slow registration, to hub2
			close(waiting)
			<-release
			to = "hub2.test"
		case 3: // moves the device to hub3 meanwhile
			to = "hub3.test"
		case 4: // fails
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, `{"iotHubHostName":"`+to+`"}`)
	}))
	defer hook.Close()
	register := e.symDevice(t, &dps.Enrollment{RegistrationID: "racer", AllocationPolicy: dps.PolicyCustom,
		IoTHubs: []string{host, "hub2.test", "hub3.test"}, CustomAllocationDefinition: &dps.CustomAllocationDefinition{WebhookURL: hook.URL}})
	if res, err := register(); err != nil || res.AssignedHub != host {
		t.Fatalf("first registration: %+v %v", res, err)
	}
	slow := make(chan *dps.RegistrationState)
	go func() {
		res, _ := register()
		slow <- res
	}()
	<-waiting
	if res, err := register(); err != nil || res.AssignedHub != "hub3.test" {
		t.Fatalf("the move to hub3: %+v %v", res, err)
	}
	if res, _ := register(); res == nil || res.Status != "failed" {
		t.Fatalf("the failing registration: %+v", res)
	}
	close(release)
	if res := <-slow; res == nil || res.Status != "failed" {
		t.Errorf("the slow registration was answered %+v, want the failure recorded before it", res)
	}
	for name, c := range hubs {
		err := c.Do(ctx, "GET", "/devices/racer", "", nil, &hub.Device{})
		if name == "hub3.test" && err != nil {
			t.Errorf("the device is not on hub3, where the record keeps it: %v", err)
		}
		if name != "hub3.test" && azerr.As(err).Status() != 404 {
			t.Errorf("the device is on %s too, with keys that work: %v", name, err)
		}
	}
	if res, err := register(); err != nil || res.AssignedHub == "" {
		t.Errorf("registering again: %+v %v", res, err)
	}
}

// A device never reprovisioned still has its custom webhook asked, with
// only its hub to choose, and gets the payload the webhook gives it.
func TestNeverReprovisionedAsksWebhookForPayload(t *testing.T) {
	e := newEnv(t)
	e.secondHub(t, "hub2.test")
	var mu sync.Mutex
	var hubs []any
	var calls int
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req map[string]any
		_ = json.NewDecoder(r.Body).Decode(&req)
		mu.Lock()
		hubs, _ = req["linkedHubs"].([]any)
		calls++
		n := calls
		mu.Unlock()
		_, _ = fmt.Fprintf(w, `{"iotHubHostName":%q,"payload":{"call":%d}}`, host, n)
	}))
	defer hook.Close()
	register := e.symDevice(t, &dps.Enrollment{RegistrationID: "kept", AllocationPolicy: dps.PolicyCustom, ReprovisionPolicy: &dps.ReprovisionPolicy{},
		IoTHubs: []string{host, "hub2.test"}, CustomAllocationDefinition: &dps.CustomAllocationDefinition{WebhookURL: hook.URL}})
	if res, err := register(); err != nil || string(res.Payload) != `{"call":1}` {
		t.Fatalf("first registration: %+v %v", res, err)
	}
	res, err := register()
	if err != nil || string(res.Payload) != `{"call":2}` || res.Substatus != "reprovisionedToInitialAssignment" {
		t.Fatalf("registering again: %+v %v", res, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(hubs) != "["+host+"]" {
		t.Errorf("the webhook was offered %v, not only the device's hub", hubs)
	}
}

// storeHook runs f once, at the first write (op "put": a Put or a Create)
// or delete (op "delete") of a document of kind: before it, or with after,
// once it succeeded.
type storeHook struct {
	store.Store
	kind, op string
	after    bool
	once     sync.Once
	f        func()
}

func (h *storeHook) at(op, kind string, after bool, err error) {
	if op == h.op && kind == h.kind && after == h.after && err == nil {
		h.once.Do(h.f)
	}
}

func (h *storeHook) Put(ctx context.Context, d store.Doc, ifMatch string) (store.Doc, error) {
	h.at("put", d.Kind, false, nil)
	out, err := h.Store.Put(ctx, d, ifMatch)
	h.at("put", d.Kind, true, err)
	return out, err
}

func (h *storeHook) Create(ctx context.Context, d store.Doc) (store.Doc, error) {
	h.at("put", d.Kind, false, nil)
	out, err := h.Store.Create(ctx, d)
	h.at("put", d.Kind, true, err)
	return out, err
}

func (h *storeHook) Delete(ctx context.Context, kind, id, ifMatch string) error {
	h.at("delete", kind, false, nil)
	err := h.Store.Delete(ctx, kind, id, ifMatch)
	h.at("delete", kind, true, err)
	return err
}

// A registration of a moving device that reaches the hub before another
// has recorded the move finds the former identity, with its twin, still
// there: the identity goes only once the record names where the device
// went, so that one missing is never taken for a move not yet recorded.
func TestMoveRecordedBeforeFormerIdentityGoes(t *testing.T) {
	e := newEnv(t)
	register := e.mover(t, func() int { return http.StatusOK })
	// Another replica moves the device; this one registers it again just
	// before that replica records the move.
	replica := e.replica(t, &storeHook{Store: e.st, kind: "dps.registration", op: "put", f: func() {
		if res, err := register(); err != nil || res.DeviceID != "new-id" {
			t.Errorf("the registration while another recorded the move: %+v %v", res, err)
		}
	}}, e.pool())
	if err := registerOn(ctx, replica, e.moverKey(t)); err != nil {
		t.Fatal(err)
	}
	if tags := string(mustTwin(t, e, "new-id", "").Tags); tags != `{"site":"b7"}` {
		t.Fatalf("the migrated twin became %s", tags)
	}
	if err := e.hubAPI.Do(ctx, "GET", "/devices/old-id", "", nil, &hub.Device{}); azerr.As(err).Status() != 404 {
		t.Fatalf("the former identity stays, with its keys: %v", err)
	}
}

// moverKey is the symmetric key mover's enrollment was given.
func (e *env) moverKey(t *testing.T) []byte {
	t.Helper()
	d, err := e.st.Get(ctx, "dps.enrollment", "mover")
	if err != nil {
		t.Fatal(err)
	}
	var en dps.Enrollment
	if err := json.Unmarshal(d.Body, &en); err != nil {
		t.Fatal(err)
	}
	key, _ := base64.StdEncoding.DecodeString(en.Attestation.SymmetricKey.PrimaryKey)
	return key
}

// registerOn registers mover through replica, under ctx.
func registerOn(ctx context.Context, replica *dps.Service, key []byte) error {
	scope := replica.IDScope()
	_, _, err := replica.Register(ctx, dps.RegisterRequest{IDScope: scope, RegistrationID: "mover",
		Credentials: dps.Credentials{Authorization: sas.Build(key, scope+"/registrations/mover", "registration", time.Now().Add(time.Minute))}})
	return err
}

// A moved device leaves its former identity, which holds its key, even when
// it stops waiting for the answer once the move is recorded.
func TestMovedDeviceLeavesWhenItStopsWaiting(t *testing.T) {
	e := newEnv(t)
	e.mover(t, func() int { return http.StatusOK })
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The device gives up once the record is written.
	replica := e.replica(t, &storeHook{Store: e.st, kind: "dps.registration", op: "put", after: true, f: cancel}, e.pool())
	registerOn(rctx, replica, e.moverKey(t)) // the device went away: its answer does not matter
	if r, err := e.dps.GetRegistration(ctx, "mover"); err != nil || r.DeviceID != "new-id" {
		t.Fatalf("record %+v %v", r, err)
	}
	if err := e.hubAPI.Do(ctx, "GET", "/devices/old-id", "", nil, &hub.Device{}); azerr.As(err).Status() != 404 {
		t.Fatalf("the former identity stays, with the device's key: %v", err)
	}
}

// deleteFails is a registry whose deletes fail, as when a hub is down.
type deleteFails struct{ dps.Registry }

func (deleteFails) DeleteDevice(context.Context, dps.LinkedHub, string, string) error {
	return errors.New("the hub is unreachable")
}

// A moved device's former identity that could not be deleted when the move
// was recorded (its hub down, or the process gone before it got there) is
// deleted later, from the note made before the record.
func TestFormerIdentityDeletedLater(t *testing.T) {
	e := newEnv(t)
	e.mover(t, func() int { return http.StatusOK })
	if err := registerOn(ctx, e.replica(t, e.st, deleteFails{e.pool()}), e.moverKey(t)); err != nil {
		t.Fatal(err)
	}
	if r, err := e.dps.GetRegistration(ctx, "mover"); err != nil || r.DeviceID != "new-id" {
		t.Fatalf("record %+v %v", r, err)
	}
	stays := func() bool { return e.hubAPI.Do(ctx, "GET", "/devices/old-id", "", nil, &hub.Device{}) == nil }
	if !stays() {
		t.Fatal("the former identity went although its hub could not be reached")
	}
	// Registrations in flight finish their own notes.
	if n, err := e.dps.FinishLeaving(ctx, time.Minute); n != 0 || err != nil || !stays() {
		t.Fatalf("a note of a moment ago was finished: %d %v", n, err)
	}
	if n, err := e.dps.FinishLeaving(ctx, 0); n != 1 || err != nil || stays() {
		t.Fatalf("finishing the notes: %d %v; the former identity stays: %v", n, err, stays())
	}
	if n, err := e.dps.FinishLeaving(ctx, 0); n != 0 || err != nil {
		t.Fatalf("a finished note was kept: %d %v", n, err)
	}
	if r, err := e.dps.GetRegistration(ctx, "mover"); err != nil || r.DeviceID != "new-id" {
		t.Fatalf("record after: %+v %v", r, err)
	}
}

// hookedRegistry runs f before the first DeleteDevice (or, with onUpsert,
// UpsertDevice) call.
type hookedRegistry struct {
	dps.Registry
	onUpsert bool
	once     sync.Once
	f        func()
}

func (h *hookedRegistry) UpsertDevice(ctx context.Context, lh dps.LinkedHub, d dps.HubDevice) (string, error) {
	if h.onUpsert {
		h.once.Do(h.f)
	}
	return h.Registry.UpsertDevice(ctx, lh, d)
}

func (h *hookedRegistry) DeleteDevice(ctx context.Context, lh dps.LinkedHub, id, cred string) error {
	if !h.onUpsert {
		h.once.Do(h.f)
	}
	return h.Registry.DeleteDevice(ctx, lh, id, cred)
}

// A registration that moved a device leaves the former identity only if
// the device has not moved back to it since the move was recorded.
func TestLeaveSparesAnIdentityMovedBackTo(t *testing.T) {
	e := newEnv(t)
	register := e.mover(t, func() int { return http.StatusOK })
	replica := e.replica(t, &storeHook{Store: e.st, kind: "dps.registration", op: "put", after: true, f: func() {
		cur, err := e.dps.GetEnrollment(ctx, "mover")
		if err != nil {
			t.Error(err)
			return
		}
		cur.DeviceID, cur.RegistrationState = "old-id", nil
		e.putEnrollment(cur)
		if res, err := register(); err != nil || res.DeviceID != "old-id" {
			t.Errorf("moving back: %+v %v", res, err)
		}
	}}, e.pool())
	if err := registerOn(ctx, replica, e.moverKey(t)); err != nil {
		t.Fatal(err)
	}
	r, err := e.dps.GetRegistration(ctx, "mover")
	if err != nil || r.DeviceID != "old-id" {
		t.Fatalf("record %+v %v", r, err)
	}
	if err := e.hubAPI.Do(ctx, "GET", "/devices/old-id", "", nil, &hub.Device{}); err != nil {
		t.Fatalf("the record names old-id, which the earlier registration deleted: %v", err)
	}
}

// A moving device whose former identity the operator deleted has no data
// to migrate: the identity it moves to, which may exist already, starts
// from the initial twin, and the device is told its data was reset.
func TestMoveFromDeletedIdentityResetsTwin(t *testing.T) {
	e := newEnv(t)
	register := e.mover(t, func() int { return http.StatusOK })
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/new-id", "", map[string]any{}, nil); err != nil {
		t.Fatal(err)
	}
	if err := e.hubAPI.Do(ctx, "PATCH", "/twins/new-id", "", map[string]any{"tags": map[string]any{"site": "stale"}}, nil); err != nil {
		t.Fatal(err)
	}
	if err := e.hubAPI.Do(ctx, "DELETE", "/devices/old-id", "", nil, nil); err != nil {
		t.Fatal(err)
	}
	res, err := register()
	if err != nil || res.DeviceID != "new-id" || res.Substatus != "deviceDataReset" {
		t.Fatalf("registration after the former identity was deleted: %+v %v", res, err)
	}
	if tags := string(mustTwin(t, e, "new-id", "").Tags); strings.Contains(tags, "stale") {
		t.Fatalf("the identity moved to kept its twin: %s", tags)
	}
}

// A registration that fails leaves the device where it was: the next one
// moves it from there, with its twin, and removes the former identity.
func TestFailedRegistrationKeepsAssignment(t *testing.T) {
	e := newEnv(t)
	var calls atomic.Int32
	register := e.mover(t, func() int {
		if calls.Add(1) == 1 {
			return http.StatusServiceUnavailable
		}
		return http.StatusOK
	})
	if res, _ := register(); res == nil || res.Status != "failed" || res.AssignedHub != "" {
		t.Fatalf("registration while the webhook fails: %+v", res)
	}
	res, err := register()
	if err != nil || res.DeviceID != "new-id" || res.Substatus != "deviceDataMigrated" {
		t.Fatalf("registration after a failed one: %+v %v", res, err)
	}
	if tags := string(mustTwin(t, e, "new-id", "").Tags); tags != `{"site":"b7"}` {
		t.Fatalf("the twin became %s", tags)
	}
	if err := e.hubAPI.Do(ctx, "GET", "/devices/old-id", "", nil, &hub.Device{}); azerr.As(err).Status() != 404 {
		t.Fatalf("the former identity stays, with its keys: %v", err)
	}
}

// iotHubHostName alone pins the device, as it always has.
func TestIoTHubHostNamePins(t *testing.T) {
	e := newEnv(t)
	e.secondHub(t, "hub2.test")
	res, err := e.symDevice(t, &dps.Enrollment{RegistrationID: "pinned-1", IoTHubHostName: "hub2.test"})()
	if err != nil || res.AssignedHub != "hub2.test" {
		t.Fatalf("%+v %v", res, err)
	}
}

// A linked hub whose TLS certificate the system does not trust (another
// hatchery serve, with its own CA) is reached by trusting its CA for that
// hub alone.
func TestLinkedHubOwnCA(t *testing.T) {
	e := newEnv(t)
	e.secondHub(t, "hub2.test")
	hubs, err := e.dps.LinkedHubs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var h2 dps.LinkedHub
	for _, h := range hubs {
		if h.HostName == "hub2.test" {
			h2 = *h
		}
	}
	// The test servers' certificate, the "CA" here, as a PEM.
	ts := httptest.NewTLSServer(nil)
	ts.Close()
	caPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ts.Certificate().Raw}))
	pool := &hubclient.Pool{TLS: &tls.Config{RootCAs: x509.NewCertPool()}} // trusts nothing of its own
	dev := dps.HubDevice{DeviceID: "d1", PrimaryKey: base64.StdEncoding.EncodeToString(make([]byte, 32))}
	if _, err := pool.UpsertDevice(ctx, h2, dev); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("an untrusted hub: %v", err)
	}
	h2.CACertificate = caPEM
	if _, err := pool.UpsertDevice(ctx, h2, dev); err != nil {
		t.Fatalf("the hub's CA trusted for it: %v", err)
	}
	// The API keeps the key's destination with the key: a CA change needs it.
	h2.ConnectionString = "HostName=hub2.test;SharedAccessKeyName=iothubowner;SharedAccessKey=" + dps.HiddenKey
	if err := e.dpsAPI.Do(ctx, "PUT", "/linkedHubs/hub2.test", "", h2, nil); azerr.As(err).Status() != 400 || !strings.Contains(err.Error(), "CA certificate") {
		t.Fatalf("CA changed without the key: %v", err)
	}
	h2.CACertificate = "not a certificate"
	if err := e.dps.LinkHub(ctx, h2); azerr.As(err).Status() != 400 {
		t.Fatalf("a CA that is no PEM: %v", err)
	}
}

// A device that hangs up while a slow custom allocation webhook runs
// leaves its registration record as it was: nothing waits for that
// failure, and a device assigned before does not show as failed.
func TestCustomAllocationDeviceHangsUp(t *testing.T) {
	e := newEnv(t)
	var calls atomic.Int32
	reached, release := make(chan struct{}), make(chan struct{})
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) > 1 {
			close(reached)
			<-release // slow: until the test is done with it

		}
		_, _ = io.WriteString(w, `{"iotHubHostName":"`+host+`"}`)
	}))
	t.Cleanup(hook.Close)
	t.Cleanup(func() { close(release) })
	out := e.putEnrollment(&dps.Enrollment{RegistrationID: "hangs-up", AllocationPolicy: dps.PolicyCustom,
		CustomAllocationDefinition: &dps.CustomAllocationDefinition{WebhookURL: hook.URL, APIVersion: "2021-10-01"},
		Attestation:                dps.Attestation{Type: dps.AttestationSymmetricKey}})
	key, _ := base64.StdEncoding.DecodeString(out.Attestation.SymmetricKey.PrimaryKey)
	if res, err := e.device("hangs-up").RegisterSymmetricKey(ctx, key); err != nil || res.Status != "assigned" {
		t.Fatalf("first registration: %+v %v", res, err)
	}
	before, err := e.dps.GetRegistration(ctx, "hangs-up")
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() { <-reached; cancel() }()
	scope := e.dps.IDScope()
	_, _, err = e.dps.Register(rctx, dps.RegisterRequest{IDScope: scope, RegistrationID: "hangs-up",
		Credentials: dps.Credentials{Authorization: sas.Build(key, scope+"/registrations/hangs-up", "registration", time.Now().Add(time.Minute))}})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("the registration the device hung up on: %v", err)
	}
	after, err := e.dps.GetRegistration(ctx, "hangs-up")
	if err != nil || after.Status != "assigned" || after.ETag != before.ETag {
		t.Fatalf("the record became %+v (%v); it was %+v", after, err, before)
	}
}

// Enum values are taken in any case, as attestation types are, and kept
// in the spelling the rest of the service compares against.
func TestEnumsInAnyCase(t *testing.T) {
	e := newEnv(t)
	for policy, want := range map[string]string{"geolatency": dps.PolicyGeoLatency, "Hashed": dps.PolicyHashed, "STATIC": dps.PolicyStatic} {
		in := &dps.Enrollment{Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}, AllocationPolicy: policy, ProvisioningStatus: "Disabled"}
		if policy == "STATIC" {
			in.IoTHubHostName = host
		}
		var out dps.Enrollment
		if err := e.dpsAPI.Do(ctx, "PUT", "/enrollments/case-"+want, "", in, &out); err != nil {
			t.Fatalf("allocationPolicy %q: %v", policy, err)
		}
		if out.AllocationPolicy != want || out.ProvisioningStatus != "disabled" {
			t.Errorf("allocationPolicy %q stored as %q, provisioningStatus as %q", policy, out.AllocationPolicy, out.ProvisioningStatus)
		}
	}
	var g dps.EnrollmentGroup
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/case-g", "", &dps.EnrollmentGroup{
		Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}, AllocationPolicy: "GeoLatency"}, &g); err != nil || g.AllocationPolicy != dps.PolicyGeoLatency {
		t.Errorf("a group's allocationPolicy \"GeoLatency\": %q %v", g.AllocationPolicy, err)
	}
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollments/case-bad", "", &dps.Enrollment{Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey},
		AllocationPolicy: "nearest"}, nil); err == nil || !strings.Contains(err.Error(), `allocationPolicy "nearest" is not valid`) {
		t.Errorf("an unknown allocationPolicy: %v", err)
	}
}

// A registration request that times out while the webhook runs is the
// webhook's failure, recorded as such; only a cancelled request (the
// device hung up) leaves the record alone.
func TestCustomAllocationRequestDeadline(t *testing.T) {
	e := newEnv(t)
	e.dps.WebhookTimeout = 5 * time.Second
	hook := slowWebhook(t, 2*time.Second)
	out := e.putEnrollment(&dps.Enrollment{RegistrationID: "deadline", AllocationPolicy: dps.PolicyCustom,
		CustomAllocationDefinition: &dps.CustomAllocationDefinition{WebhookURL: hook.URL, APIVersion: "2021-10-01"},
		Attestation:                dps.Attestation{Type: dps.AttestationSymmetricKey}})
	key, _ := base64.StdEncoding.DecodeString(out.Attestation.SymmetricKey.PrimaryKey)
	rctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	scope := e.dps.IDScope()
	_, _, _ = e.dps.Register(rctx, dps.RegisterRequest{IDScope: scope, RegistrationID: "deadline",
		Credentials: dps.Credentials{Authorization: sas.Build(key, scope+"/registrations/deadline", "registration", time.Now().Add(time.Minute))}})
	st, err := e.dps.GetRegistration(ctx, "deadline")
	if err != nil || st.Status != "failed" || st.ErrorCode != 400207 || !strings.Contains(st.ErrorMessage, "timed out") {
		t.Fatalf("the registration whose request timed out: %+v %v", st, err)
	}
}

// slowWebhook is a custom allocation webhook that answers the test hub
// after delay, unless its caller gives up first.
func slowWebhook(t *testing.T, delay time.Duration) *httptest.Server {
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			return
		}
		_, _ = io.WriteString(w, `{"iotHubHostName":"`+host+`"}`)
	}))
	t.Cleanup(hook.Close)
	return hook
}
