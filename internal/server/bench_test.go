package server

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/sas"
)

// BenchmarkTPMRegistration measures the server side of one complete TPM
// registration: the 401 challenge (activation blob), the signed PUT
// (verification, hub key wrapped for the TPM, assignment through the hub's
// registry API, store writes) and the operation poll. The device's TPM work
// is left out: the benchmark reads the challenge key from the store instead.
// Device requests go straight to the handler, so the figure is the server's
// own work; the device is written to the hub of the same process directly.
func BenchmarkTPMRegistration(b *testing.B) {
	e := newBenchEnv(b)
	ekRaw, _ := os.ReadFile("../attest/testdata/ek.pub")
	srkRaw, _ := os.ReadFile("../attest/testdata/srk.pub")
	ek, srk := base64.StdEncoding.EncodeToString(ekRaw), base64.StdEncoding.EncodeToString(srkRaw)
	scope := e.dps.IDScope()
	h := e.ts.Config.Handler
	i := 0
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		id := fmt.Sprintf("tpm-%07d", i)
		i++
		if _, err := e.dps.PutEnrollment(context.Background(), id, "", &dps.Enrollment{
			Attestation: dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EndorsementKey: ek}}}); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		body := `{"registrationId":"` + id + `","tpm":{"endorsementKey":"` + ek + `","storageRootKey":"` + srk + `"}}`
		url := e.ts.URL + "/" + scope + "/registrations/" + id
		if st := do(b, h, "PUT", url+"/register?api-version=2019-03-31", "", body, nil); st != 401 {
			b.Fatalf("challenge: %d", st)
		}
		b.StopTimer()
		doc, err := e.st.Get(context.Background(), "dps.challenge", id)
		if err != nil {
			b.Fatal(err)
		}
		var ch struct{ Pending []struct{ Key string } }
		_ = json.Unmarshal(doc.Body, &ch)
		key, _ := base64.StdEncoding.DecodeString(ch.Pending[0].Key)
		tok := sas.Build(key, scope+"/registrations/"+id, "registration", time.Now().Add(time.Hour))
		b.StartTimer()
		var op dps.Operation
		if st := do(b, h, "PUT", url+"/register?api-version=2019-03-31", tok, body, &op); st != 202 {
			b.Fatalf("register: %d", st)
		}
		if st := do(b, h, "GET", url+"/operations/"+op.OperationID+"?api-version=2019-03-31", tok, "", &op); st != 200 || op.Status != "assigned" {
			b.Fatalf("poll: %d %+v", st, op)
		}
	}
}

// BenchmarkSymmetricKeyRegistration is the same for a symmetric-key device.
func BenchmarkSymmetricKeyRegistration(b *testing.B) {
	e := newBenchEnv(b)
	scope := e.dps.IDScope()
	h := e.ts.Config.Handler
	key := []byte("0123456789abcdef0123456789abcdef")
	i := 0
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		id := fmt.Sprintf("sym-%07d", i)
		i++
		if _, err := e.dps.PutEnrollment(context.Background(), id, "", &dps.Enrollment{
			Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey, SymmetricKey: &dps.SymmetricKeyAttestation{
				PrimaryKey: base64.StdEncoding.EncodeToString(key), SecondaryKey: base64.StdEncoding.EncodeToString(key)}}}); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		url := e.ts.URL + "/" + scope + "/registrations/" + id
		tok := sas.Build(key, scope+"/registrations/"+id, "registration", time.Now().Add(time.Hour))
		var op dps.Operation
		if st := do(b, h, "PUT", url+"/register?api-version=2019-03-31", tok, `{"registrationId":"`+id+`"}`, &op); st != 202 {
			b.Fatalf("register: %d", st)
		}
		if st := do(b, h, "GET", url+"/operations/"+op.OperationID+"?api-version=2019-03-31", tok, "", &op); st != 200 {
			b.Fatalf("poll: %d", st)
		}
	}
}

func newBenchEnv(b *testing.B) *env { return newEnvAt(b, filepath.Join(b.TempDir(), "h.db")) }

func do(b testing.TB, h http.Handler, method, url, auth, body string, out any) int {
	req := httptest.NewRequest(method, url, strings.NewReader(body))
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if out != nil {
		if err := json.Unmarshal(rec.Body.Bytes(), out); err != nil {
			b.Fatal(err)
		}
	}
	return rec.Code
}
