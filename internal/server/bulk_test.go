package server

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/sas"
)

func TestBulkEnrollments(t *testing.T) {
	e := newEnv(t)
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

// serviceToken is a provisioningserviceowner token for raw requests.
func (e *env) serviceToken() string {
	cs, err := sas.ParseConnectionString(e.dps.OwnerConnectionString())
	if err != nil {
		e.t.Fatal(err)
	}
	return sas.Build(cs.Key, cs.HostName, cs.KeyName, time.Now().Add(time.Hour))
}
