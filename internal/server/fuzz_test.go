package server

import (
	"bytes"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/sas"
)

// Whatever a device sends to the registration endpoint, the server answers
// with a 4xx, a TPM challenge or an operation — never a 5xx — and stores
// nothing unless it answered with a challenge or an operation.
func FuzzRegistrationRequest(f *testing.F) {
	e := newEnv(f)
	_, tpmID, tpmBody := e.enrollSoftTPM()
	sym := e.putEnrollment(&dps.Enrollment{RegistrationID: "sym-1", Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
	symTok := sas.Build(sas.Keys(sym.Attestation.SymmetricKey.PrimaryKey)[0], e.dps.IDScope()+"/registrations/sym-1", "registration", time.Now().Add(time.Hour))
	for _, seed := range []struct{ regID, auth, body string }{
		{tpmID, "", tpmBody},
		{"sym-1", symTok, `{"registrationId":"sym-1","payload":{"a":1}}`},
		{"sym-1", symTok, `{"registrationId":"other"}`},
		{"sym-1", "SharedAccessSignature sr=x&sig=y&se=1&skn=registration", ""},
		{tpmID, "", `{"tpm":{"endorsementKey":"AAAA","storageRootKey":"AAAA"}}`},
		{tpmID, "", `{"tpm":{"endorsementKey":"not base64"}}`},
		{"nobody", "", `{"registrationId":123}`},
		{"Upper.Case", "", `{`},
		{"sym-1", symTok, `{"payload":` + `[[[[[[[[[[[[[[[[[[[[` + `]]]]]]]]]]]]]]]]]]]]}`},
	} {
		f.Add(seed.regID, seed.auth, seed.body)
	}
	kinds := []string{"dps.enrollment", "dps.enrollmentGroup", "dps.registration", "dps.challenge", "hub.device"}
	counts := func(t *testing.T) map[string]int {
		out := map[string]int{}
		for _, k := range kinds {
			n, err := e.st.Count(ctx, k)
			if err != nil {
				t.Fatal(err)
			}
			out[k] = n
		}
		return out
	}
	f.Fuzz(func(t *testing.T, regID, auth, body string) {
		if strings.ContainsFunc(auth, func(r rune) bool { return r < 0x20 && r != '\t' || r == 0x7f }) {
			t.Skip("not a value an HTTP client can send in a header")
		}
		e.t = t
		before := counts(t)
		st, answer := e.raw("PUT", "/"+e.dps.IDScope()+"/registrations/"+url.PathEscape(regID)+"/register?api-version=2021-06-01", auth, body)
		if st >= 500 {
			t.Fatalf("HTTP %d %v", st, answer)
		}
		after := counts(t)
		switch {
		case st == 401 && answer["authenticationKey"] != nil: // a challenge, kept
			after["dps.challenge"] = before["dps.challenge"]
		case st == 202: // a registration, and perhaps a new device
			after["dps.registration"], after["hub.device"] = before["dps.registration"], before["hub.device"]
		default:
			if answer["message"] == nil && answer["Message"] == nil {
				t.Errorf("HTTP %d without a message: %v", st, answer)
			}
		}
		for _, k := range kinds {
			if after[k] != before[k] {
				t.Fatalf("HTTP %d changed the %s count from %d to %d", st, k, before[k], after[k])
			}
		}
	})
}

// A poll is answered only for the device's own operation and only to its
// own token, whether from the replica's memory or from the store: fuzzed
// registration IDs, operation IDs and tokens never get another device's
// operation, and never a 5xx.
func FuzzOperationStatus(f *testing.F) {
	e := newEnv(f)
	sym := e.putEnrollment(&dps.Enrollment{RegistrationID: "sym-1", Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
	key := sas.Keys(sym.Attestation.SymmetricKey.PrimaryKey)[0]
	other := e.putEnrollment(&dps.Enrollment{RegistrationID: "sym-2", Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
	otherKey := sas.Keys(other.Attestation.SymmetricKey.PrimaryKey)[0]
	scope := e.dps.IDScope()
	tok := sas.Build(key, scope+"/registrations/sym-1", "registration", time.Now().Add(time.Hour))
	otherTok := sas.Build(otherKey, scope+"/registrations/sym-2", "registration", time.Now().Add(time.Hour))
	register := func(id, tok string) string {
		st, op := e.raw("PUT", "/"+scope+"/registrations/"+id+"/register?api-version=2021-06-01", tok, `{"registrationId":"`+id+`"}`)
		if st != 202 {
			f.Fatalf("registering %s: HTTP %d %v", id, st, op)
		}
		return op["operationId"].(string)
	}
	op, otherOp := register("sym-1", tok), register("sym-2", otherTok)
	legit, _ := sas.Parse(tok)
	for _, seed := range [][3]string{
		{"sym-1", op, tok}, {"SYM-1", op, tok}, {"sym-1", otherOp, tok}, {"sym-2", op, tok},
		{"sym-2", otherOp, tok}, {"sym-1", op, otherTok}, {"sym-1", op, ""}, {"sym-1", "", tok},
		{"sym-1", op, strings.Replace(tok, "sig=", "sig=A", 1)},
	} {
		f.Add(seed[0], seed[1], seed[2])
	}
	f.Fuzz(func(t *testing.T, regID, opID, auth string) {
		if strings.ContainsFunc(auth, func(r rune) bool { return r < 0x20 && r != '\t' || r == 0x7f }) {
			t.Skip("not a value an HTTP client can send in a header")
		}
		e.t = t
		st, answer := e.raw("GET", "/"+scope+"/registrations/"+url.PathEscape(regID)+"/operations/"+url.PathEscape(opID)+"?api-version=2021-06-01", auth, "")
		if st >= 500 {
			t.Fatalf("HTTP %d %v", st, answer)
		}
		if st != 200 {
			return
		}
		got, err := sas.Parse(auth)
		if !strings.EqualFold(regID, "sym-1") || opID != op || err != nil || !bytes.Equal(got.Signature, legit.Signature) {
			t.Fatalf("poll of %q, operation %q answered to token %q: %v", regID, opID, auth, answer)
		}
	})
}

// MQTT usernames come before any authentication: whatever they hold, the
// parsers name no empty identity and no identity holding a '/'.
func FuzzMQTTUsernames(f *testing.F) {
	for _, u := range []string{"hub.example/d1/?api-version=2021-04-12", "hub.example/d1/m1/?api-version=2021-04-12",
		"hub.example/d1/api-version=2021-04-12", "0ne000/registrations/dev-1/api-version=2019-03-31", "//", "a/registrations//x", ""} {
		f.Add(u)
	}
	f.Fuzz(func(t *testing.T, u string) {
		// The client ID the SDKs send with the username: its identity.
		host, path, _ := strings.Cut(u, "/")
		clientID, _, _ := strings.Cut(strings.TrimSuffix(strings.Split(path, "/?")[0], "/"), "/api-version=")
		if got, r, _, ok := parseUsername(u, clientID); ok {
			if got != host || got == "" || strings.Contains(got, "/") || r.Device == "" || strings.Contains(r.Device+r.Module, "/") || r.String() != clientID {
				t.Fatalf("%q with client ID %q: host %q, identity %+v", u, clientID, got, r)
			}
		}
		if scope, regID, ok := parseDPSUsername(u); ok && (scope == "" || regID == "" || strings.Contains(scope+regID, "/")) {
			t.Fatalf("%q: scope %q, registration %q", u, scope, regID)
		}
	})
}

// Whatever x-ms-continuation a client sends, it is refused or names an item
// a store can hold (UTF-8, no NUL, bounded) of the collection paged, and a
// token the server made gives back the item it was made for.
func FuzzContinuation(f *testing.F) {
	for _, seed := range []string{"", "AA", "_w", "L2Vucm9sbG1lbnRzL3F1ZXJ5AGE", "bm90IGEgdG9rZW4"} {
		f.Add(seed, "/enrollments/query", "dev-1")
	}
	f.Fuzz(func(t *testing.T, token, path, item string) {
		if !strings.HasPrefix(path, "/") || strings.ContainsAny(path, "?#") {
			return
		}
		r := httptest.NewRequest("POST", "http://h/", nil)
		r.URL.Path = path
		r.Header.Set("x-ms-continuation", token)
		if after, err := continuation(r); err == nil && (len(after) > maxAfter || !utf8.ValidString(after) || strings.ContainsRune(after, 0) || token != "" && after == "") {
			t.Fatalf("token %q gave item %q", token, after)
		}
		if item == "" || len(item) > maxAfter || !utf8.ValidString(item) || strings.ContainsRune(item, 0) {
			return
		}
		w := httptest.NewRecorder()
		setContinuation(w, r, item)
		r.Header.Set("x-ms-continuation", w.Header().Get("x-ms-continuation"))
		if after, err := continuation(r); err != nil || after != item {
			t.Fatalf("the token made for %q at %s gave %q, %v", item, path, after, err)
		}
	})
}
