package server

import (
	"encoding/base64"
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/sas"
)

// Past its burst a device is told to retry later, with Retry-After; the
// device client waits and succeeds.
func TestThrottledDevice(t *testing.T) {
	e := newEnv(t)
	e.dps.Throttle = dps.NewThrottle(0, 1, 3)
	register := e.symDevice(t, &dps.Enrollment{RegistrationID: "busy-1"})
	if _, err := register(); err != nil {
		t.Fatal(err)
	}
	en, _ := e.dps.GetEnrollment(ctx, "busy-1")
	key := mustBase64(t, en.Attestation.SymmetricKey.PrimaryKey)
	tok := sas.Build(key, e.dps.IDScope()+"/registrations/busy-1", "registration", time.Now().Add(time.Minute))
	path := "/" + e.dps.IDScope() + "/registrations/busy-1?api-version=2019-03-31"
	throttled := 0
	for range 6 {
		st, body := e.raw("POST", path, tok, "")
		if st == 429 {
			throttled++
			if body["errorCode"] != float64(429001) {
				t.Fatalf("429 body %v", body)
			}
		}
	}
	if throttled == 0 {
		t.Fatal("six requests at once were all admitted")
	}
	req, _ := http.NewRequest("POST", e.ts.URL+path, nil)
	req.Header.Set("Authorization", tok)
	resp, err := e.ts.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 429 || resp.Header.Get("Retry-After") != "1" {
		t.Fatalf("still throttled: HTTP %d, Retry-After %q", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	// Another device is not slowed down, and the busy one gets through by waiting.
	if _, err := e.symDevice(t, &dps.Enrollment{RegistrationID: "calm-1"})(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := register(); err != nil {
		t.Fatalf("the throttled device did not get through: %v", err)
	}
	t.Logf("the throttled device registered after %s", time.Since(start).Round(time.Millisecond))

	// The global rate: registrations beyond it are refused at once.
	e.dps.Throttle = dps.NewThrottle(1, 0, 1)
	regPath := "/" + e.dps.IDScope() + "/registrations/busy-1/register?api-version=2019-03-31"
	codes := map[int]int{}
	for range 3 {
		st, _ := e.raw("PUT", regPath, tok, `{"registrationId":"busy-1"}`)
		codes[st]++
	}
	if codes[429] == 0 || codes[202] == 0 {
		t.Fatalf("three registrations in an instant at 1/s: %v", codes)
	}
}

// Requests that fail authentication do not count against the global rate:
// a flood of them cannot make real devices wait.
func TestBadRequestsDoNotTakeTheGlobalRate(t *testing.T) {
	e := newEnv(t)
	e.dps.Throttle = dps.NewThrottle(1, 0, 1)
	en := e.putEnrollment(&dps.Enrollment{RegistrationID: "real-1", Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
	real := sas.Build(mustBase64(t, en.Attestation.SymmetricKey.PrimaryKey), e.dps.IDScope()+"/registrations/real-1", "registration", time.Now().Add(time.Minute))
	forged := sas.Build([]byte("0123456789abcdef0123456789abcdef"), e.dps.IDScope()+"/registrations/real-1", "registration", time.Now().Add(time.Minute))
	for _, req := range []struct{ id, auth, body string }{
		{"real-1", forged, `{"registrationId":"real-1"}`},
		{"nobody", forged, `{"registrationId":"nobody"}`},
		{"nobody", "", `{"registrationId":"nobody","tpm":{"endorsementKey":"AAAA"}}`},
	} {
		for range 5 {
			if st, body := e.raw("PUT", "/"+e.dps.IDScope()+"/registrations/"+req.id+"/register?api-version=2021-06-01", req.auth, req.body); st == 429 || st < 400 {
				t.Fatalf("bad request for %s: HTTP %d %v", req.id, st, body)
			}
		}
	}
	if st, body := e.raw("PUT", "/"+e.dps.IDScope()+"/registrations/real-1/register?api-version=2021-06-01", real, `{"registrationId":"real-1"}`); st != 202 {
		t.Fatalf("a real device after fifteen bad requests at a global rate of 1/s: HTTP %d %v", st, body)
	}
}

// Anyone who knows an enrolled TPM's EK may ask for its challenges; such a
// flood spends that registration ID's allowance, not everyone's.
func TestChallengeFloodKeepsToItsDevice(t *testing.T) {
	e := newEnv(t)
	e.dps.Throttle = dps.NewThrottle(20, 1, 10)
	e.putEnrollment(&dps.Enrollment{RegistrationID: "tpm-1", Attestation: dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EndorsementKey: testEK(t)}}})
	ask := `{"registrationId":"tpm-1","tpm":{"endorsementKey":"` + testEK(t) + `","storageRootKey":"` + base64.StdEncoding.EncodeToString(otherEK(t)) + `"}}`
	codes := map[int]int{}
	for range 50 {
		st, _ := e.raw("PUT", "/"+e.dps.IDScope()+"/registrations/tpm-1/register?api-version=2021-06-01", "", ask)
		codes[st]++
	}
	if codes[401] != 10 || codes[429] != 40 {
		t.Fatalf("50 challenge requests for one TPM with a burst of 10: %v, want 10 challenges and 40 refusals", codes)
	}
	// The device, holding a challenge, still answers it: the flood spent
	// the challenge allowance, not the device's.
	d, err := e.st.Get(ctx, "dps.challenge", "tpm-1")
	if err != nil {
		t.Fatal(err)
	}
	var pending struct{ Pending []struct{ Key string } }
	if err := json.Unmarshal(d.Body, &pending); err != nil || len(pending.Pending) == 0 {
		t.Fatalf("pending challenges %s: %v", d.Body, err)
	}
	answer := sas.Build(mustBase64(t, pending.Pending[0].Key), e.dps.IDScope()+"/registrations/tpm-1", "registration", time.Now().Add(time.Minute))
	if st, body := e.raw("PUT", "/"+e.dps.IDScope()+"/registrations/tpm-1/register?api-version=2021-06-01", answer, ask); st != 202 {
		t.Fatalf("the device answering its challenge after the flood: HTTP %d %v", st, body)
	}
	en := e.putEnrollment(&dps.Enrollment{RegistrationID: "real-1", Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
	real := sas.Build(mustBase64(t, en.Attestation.SymmetricKey.PrimaryKey), e.dps.IDScope()+"/registrations/real-1", "registration", time.Now().Add(time.Minute))
	if st, body := e.raw("PUT", "/"+e.dps.IDScope()+"/registrations/real-1/register?api-version=2021-06-01", real, `{"registrationId":"real-1"}`); st != 202 {
		t.Fatalf("another device after the flood: HTTP %d %v", st, body)
	}
}
