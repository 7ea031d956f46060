package server

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/store"
	"github.com/hatchery/hatchery/internal/testutil"
)

// An answer that says only "internal server error" leaves its cause in the
// log under the tracking ID the client saw; API errors and hang-ups say
// everything already. A full database answers 503 with Retry-After, and
// is logged once however many requests fail on it.
func TestFailureLogsInternalErrors(t *testing.T) {
	log := captureLog(t)
	r := httptest.NewRequest("PUT", "/configurations/x", nil)

	id, _ := failure(r, fmt.Errorf("deployment x: %w", errors.New("unexpected end of JSON input")))
	if !strings.Contains(log.String(), "trackingId="+id) || !strings.Contains(log.String(), "unexpected end of JSON input") {
		t.Fatalf("internal error not logged under %s:\n%s", id, log.String())
	}
	log.Reset()
	failure(r, azerr.BadRequest("targetCondition is required"))
	failure(r, fmt.Errorf("reading: %w", context.Canceled))
	if log.String() != "" {
		t.Fatalf("logged an API error or a hang-up:\n%s", log.String())
	}

	for range 3 {
		_, err := failure(r, fmt.Errorf("writing: %w: disk I/O", store.ErrFull))
		if e := azerr.As(err); e.Status() != 503 || e.RetryAfter <= 0 {
			t.Fatalf("a full database answered %+v", e)
		}
	}
	if n := strings.Count(log.String(), "level=ERROR"); n != 1 {
		t.Fatalf("a full database logged %d times:\n%s", n, log.String())
	}

	// A standby refuses every write, as the driver reports it.
	log.Reset()
	for range 3 {
		_, err := failure(r, fmt.Errorf("writing: %w", &pgconn.PgError{Severity: "ERROR", Code: "25006", Message: "cannot execute INSERT in a read-only transaction"}))
		if e := azerr.As(err); e.Status() != 503 || e.RetryAfter <= 0 {
			t.Fatalf("a read-only database answered %+v", e)
		}
	}
	if n := strings.Count(log.String(), "level=ERROR"); n != 1 || !strings.Contains(log.String(), "read-only") {
		t.Fatalf("a read-only database logged %d times:\n%s", n, log.String())
	}
}

// A bulk operation stopped by the database says where it stopped whatever
// the answer: a 503 to retry (a serialization failure among them) or a 500,
// whose cause is still logged.
func TestFailureSaysWhereBulkStopped(t *testing.T) {
	log := captureLog(t)
	r := httptest.NewRequest("POST", "/enrollments", nil)
	for _, tc := range []struct {
		cause  error
		status int
	}{
		{&pgconn.PgError{Severity: "ERROR", Code: "40001", Message: "could not serialize access"}, 503},
		{errors.New("stored enrollment b is corrupt"), 500},
	} {
		_, err := failure(r, &azerr.BulkStoppedError{Index: 1, Applied: 1, What: "enrollment", ID: "b", Err: tc.cause})
		if e := azerr.As(err); e.Status() != tc.status || !strings.Contains(e.Message, `stopped at item 1 (enrollment "b")`) {
			t.Errorf("%v: answered %d %q, want %d saying where it stopped", tc.cause, e.Status(), e.Message, tc.status)
		}
	}
	if !strings.Contains(log.String(), "stored enrollment b is corrupt") {
		t.Errorf("the cause of the 500 not logged:\n%s", log.String())
	}
	// A conflict is no outage: it is neither logged nor told as one.
	if strings.Contains(log.String(), "cannot be reached") {
		t.Errorf("a serialization failure was logged as the database out of reach:\n%s", log.String())
	}
	_, err := failure(r, &pgconn.PgError{Severity: "ERROR", Code: "40P01", Message: "deadlock detected"})
	if e := azerr.As(err); e.Status() != 503 || e.RetryAfter <= 0 || strings.Contains(e.Message, "cannot reach") {
		t.Errorf("a deadlock answered %d %q (Retry-After %v)", e.Status(), e.Message, e.RetryAfter)
	}
}

// GET /events?follow=true streams: an event stored after the request
// arrives while the answer stays open (hatchery hub tail -f).
func TestEventsFollowStreams(t *testing.T) {
	e := newEnv(t)
	e.newDevice("d1", false)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	lines := make(chan string, 1)
	go func() {
		body, err := e.hubAPI.Stream(ctx, "/events?device=d1&follow=true")
		if err != nil {
			t.Error(err)
			return
		}
		defer body.Close()
		sc := bufio.NewScanner(body)
		if sc.Scan() {
			lines <- sc.Text()
		}
	}()
	time.Sleep(300 * time.Millisecond) // the request is in, and has found nothing yet
	if _, err := e.hub.SendEvent(ctx, hub.Ref{Device: "d1"}, nil, []byte(`{"n":1}`)); err != nil {
		t.Fatal(err)
	}
	select {
	case line := <-lines:
		if !strings.Contains(line, `"body":{"n":1}`) {
			t.Fatalf("streamed event: %s", line)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the event was not streamed while the answer stayed open")
	}
}

// A batch from an HTTPS device transport (sendEventBatch) becomes one event
// per message, each with its own properties; a malformed batch stores
// nothing.
func TestDeviceEventBatch(t *testing.T) {
	e := newEnv(t)
	d := e.newDevice("d1", false)
	key, _ := base64.StdEncoding.DecodeString(d.Authentication.SymmetricKey.PrimaryKey)
	tok := sas.Build(key, host+"/devices/d1", "", time.Now().Add(time.Minute))
	post := func(body string) int {
		req, _ := http.NewRequest("POST", e.ts.URL+"/devices/d1/messages/events?api-version=2020-09-30", strings.NewReader(body))
		req.Header.Set("Authorization", tok)
		req.Header.Set("Content-Type", "application/vnd.microsoft.iothub.json")
		resp, err := e.ts.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if st := post(`[{"body":"YQ==","properties":{"iothub-app-k":"1"}},{"body":"Yg=="}]`); st != 204 {
		t.Fatalf("batch: HTTP %d", st)
	}
	for _, bad := range []string{`{"body":"YQ=="}`, `[{"body":"not base64!"}]`, `[{"body":"YQ==","properties":{"k":1}}]`} {
		if st := post(bad); st != 400 {
			t.Errorf("%s: HTTP %d", bad, st)
		}
	}
	// A batch is admitted whole or not at all, empty messages not free.
	empties := "[" + strings.Repeat(`{"body":""},`, 5000) + `{"body":""}]`
	big := base64.StdEncoding.EncodeToString(make([]byte, 200<<10))
	for what, body := range map[string]string{"5,001 empty messages": empties, "two of 200 KiB": `[{"body":"` + big + `"},{"body":"` + big + `"}]`} {
		if st := post(body); st != 413 {
			t.Errorf("%s: HTTP %d", what, st)
		}
	}
	if st := post(`[{"body":"Yw==","properties":{"iothub-messageid":"m-3","iothub-app-k":"3","IoTHub-App-MyKey":"kept"}}]`); st != 204 {
		t.Fatalf("batch with a message ID: HTTP %d", st)
	}
	evs, err := e.st.Events(ctx, "d1", 0, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) != 3 || string(evs[0].Body) != "a" || evs[0].Properties["k"] != "1" || string(evs[1].Body) != "b" ||
		evs[2].Properties["$.mid"] != "m-3" || evs[2].Properties["k"] != "3" || evs[2].Properties["MyKey"] != "kept" {
		t.Fatalf("events %+v", evs)
	}
}

// A Plug and Play component's telemetry says its component, and an
// interface ID its interface, in the same system properties whichever
// transport carried it, as the event stream (hatchery events tail) shows:
// over MQTT in the topic ($.sub, $.ifid), over HTTPS in headers the Node
// SDK sends without the iothub-app- prefix (dt-subject) or with the hub's
// own (iothub-interface-id), alone or in a batch.
func TestTelemetrySubject(t *testing.T) {
	e := newEnv(t)
	_, d, c := e.mqttDevice("d1")
	key, _ := base64.StdEncoding.DecodeString(d.Authentication.SymmetricKey.PrimaryKey)
	tok := sas.Build(key, host+"/devices/d1", "", time.Now().Add(time.Minute))
	post := func(body string, header http.Header) {
		t.Helper()
		req, _ := http.NewRequest("POST", e.ts.URL+"/devices/d1/messages/events?api-version=2020-09-30", strings.NewReader(body))
		req.Header = header
		req.Header.Set("Authorization", tok)
		resp, err := e.ts.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 204 {
			t.Fatalf("%s: HTTP %d", body, resp.StatusCode)
		}
	}
	post(`{"https":1}`, http.Header{"Dt-Subject": {"thermostat1"}, "Iothub-Interface-Id": {"urn:i"}, "Iothub-App-K": {"v"}})
	post(`[{"body":"e30=","properties":{"dt-subject":"thermostat1","iothub-interface-id":"urn:i","iothub-app-k":"v"}}]`,
		http.Header{"Content-Type": {"application/vnd.microsoft.iothub.json"}})
	if err := c.Publish("devices/d1/messages/events/%24.ifid=urn%3Ai&k=v&%24.sub=thermostat1", []byte(`{"mqtt":1}`)); err != nil {
		t.Fatal(err)
	}
	var events []map[string]any
	for deadline := time.Now().Add(10 * time.Second); len(events) < 3; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d events in the stream, want 3", len(events))
		}
		body, err := e.hubAPI.Stream(ctx, "/events?device=d1")
		if err != nil {
			t.Fatal(err)
		}
		events = nil
		for sc := bufio.NewScanner(body); sc.Scan(); {
			var ev map[string]any
			if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
				t.Fatalf("event %s: %v", sc.Text(), err)
			}
			events = append(events, ev)
		}
		body.Close()
	}
	want := map[string]any{"$.sub": "thermostat1", "$.ifid": "urn:i", "k": "v"}
	for _, ev := range events {
		props, _ := ev["properties"].(map[string]any)
		for k, v := range want {
			if props[k] != v {
				t.Errorf("event %v: property %s is %v, want %v", ev["body"], k, props[k], v)
			}
		}
		if _, ok := props["dt-subject"]; ok {
			t.Errorf("event %v: dt-subject kept as an application property", ev["body"])
		}
	}
}

// At debug level each request has a line, and an error's carries the
// tracking ID its answer shows the client; below it there is none.
func TestAccessLog(t *testing.T) {
	b := &testutil.SyncBuffer{}
	old := slog.Default()
	t.Cleanup(func() { slog.SetDefault(old) })
	slog.SetDefault(slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug})))
	e := newEnv(t)

	st, body := e.raw("GET", "/nowhere", "", "")
	id, _ := body["trackingId"].(string)
	if st != 404 || id == "" {
		t.Fatalf("GET /nowhere: HTTP %d %v", st, body)
	}
	if want := `path=/nowhere status=404`; !strings.Contains(b.String(), want) || !strings.Contains(b.String(), "trackingId="+id) {
		t.Errorf("the access log lacks %q with trackingId=%s:\n%s", want, id, b.String())
	}
	b.Reset()
	if st, _ := e.raw("GET", "/healthz", "", ""); st != 200 {
		t.Fatalf("GET /healthz: HTTP %d", st)
	}
	if line := b.String(); !strings.Contains(line, "path=/healthz status=200") || strings.Contains(line, "trackingId") {
		t.Errorf("a success's access line: %q", line)
	}

	slog.SetDefault(slog.New(slog.NewTextHandler(b, nil)))
	b.Reset()
	e.raw("GET", "/nowhere", "", "")
	if strings.Contains(b.String(), "msg=http") {
		t.Errorf("an access line at info level: %s", b.String())
	}
}

// A request no route serves is answered in the shape its service's SDKs
// parse (the hub's {"Message":"ErrorCode:…"}, the provisioning service's
// {"errorCode":…}), and a known path asked with a method it does not serve
// is 405 with the methods it does.
func TestUnservedRequestsAnswerInTheirServicesShape(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct {
		method, path string
		status       int
		allow        string
		hub          bool
	}{
		{"DELETE", "/twins/d1", 405, "GET, PUT, PATCH", true},
		{"GET", "/twins/d1/methods", 405, "POST", true},
		{"GET", "/twins/d1/modules/m/methods", 405, "POST", true},
		{"PATCH", "/configurations/c1", 405, "GET, PUT, DELETE", true},
		{"GET", "/devices/d1/nothing", 404, "", true},
		{"GET", "/jobs/v1/j", 404, "", true},
		{"DELETE", "/enrollments", 405, "POST", false},
		{"PUT", "/enrollments/e1/attestationmechanism", 405, "POST", false},
		{"GET", "/nothing/here", 404, "", false},
	} {
		rec := httptest.NewRecorder()
		e.ts.Config.Handler.ServeHTTP(rec, httptest.NewRequest(tc.method, tc.path+"?api-version=2021-04-12", nil))
		var body struct {
			HubMessage string `json:"Message"`
			ErrorCode  int    `json:"errorCode"`
			Message    string `json:"message"`
		}
		_ = json.Unmarshal(rec.Body.Bytes(), &body)
		name := map[int]string{404: "NotFound", 405: "MethodNotAllowed"}[tc.status]
		switch {
		case rec.Code != tc.status || rec.Header().Get("Allow") != tc.allow:
			t.Errorf("%s %s: %d, Allow %q; want %d, Allow %q", tc.method, tc.path, rec.Code, rec.Header().Get("Allow"), tc.status, tc.allow)
		case body.ErrorCode != tc.status*1000+1 || !strings.Contains(body.Message, tc.path):
			t.Errorf("%s %s: %s, want errorCode %d and a message naming the path", tc.method, tc.path, rec.Body, tc.status*1000+1)
		case tc.hub != strings.HasPrefix(body.HubMessage, "ErrorCode:"+name+";"):
			t.Errorf("%s %s: %s, want it in the %s shape", tc.method, tc.path, rec.Body, map[bool]string{true: "hub's", false: "provisioning service's"}[tc.hub])
		}
	}
}

// Devices may spell the ID scope in any case over HTTPS, as over MQTT;
// other paths are routed as before.
func TestIDScopeInAnyCase(t *testing.T) {
	e := newEnv(t)
	en := e.putEnrollment(&dps.Enrollment{RegistrationID: "scope-case", Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
	scope := e.dps.IDScope()
	tok := sas.Build(mustBase64(t, en.Attestation.SymmetricKey.PrimaryKey), scope+"/registrations/scope-case", "registration", time.Now().Add(time.Minute))
	for _, s := range []string{strings.ToUpper(scope), strings.ToLower(scope), scope} {
		if st, body := e.raw("PUT", "/"+s+"/registrations/scope-case/register?api-version=2021-06-01", tok, `{"registrationId":"scope-case"}`); st != 202 {
			t.Errorf("register under ID scope %s: HTTP %d %v", s, st, body)
		}
	}
	rec := httptest.NewRecorder()
	e.ts.Config.Handler.ServeHTTP(rec, httptest.NewRequest("DELETE", "/"+strings.ToUpper(scope)+"/registrations/scope-case/register?api-version=2021-06-01", nil))
	if rec.Code != 405 || rec.Header().Get("Allow") != "PUT" {
		t.Errorf("DELETE under the upper-case ID scope: %d, Allow %q; want 405, Allow PUT", rec.Code, rec.Header().Get("Allow"))
	}
	if st, _ := e.raw("GET", "/0NE00000000/registrations/scope-case/register?api-version=2021-06-01", tok, ""); st != 404 {
		t.Errorf("another ID scope: HTTP %d, want 404", st)
	}
}
