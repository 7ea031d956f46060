package main

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/dps"
)

// A write that succeeded is not reported failed because a read after it
// failed: writing the enrollment again would be told it exists, and
// unlinking again that the hub is gone. Each warns and succeeds.
func TestFollowUpReadFailureWarns(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == "DELETE" && strings.HasPrefix(r.URL.Path, "/linkedHubs/"):
			w.WriteHeader(http.StatusNoContent)
		default: // the registration read, the enrollment queries
			w.WriteHeader(http.StatusInternalServerError)
			_, _ = w.Write([]byte(`{"errorCode":500001,"message":"the database is out of reach"}`))
		}
	}))
	defer srv.Close()
	tlsConf := srv.Client().Transport.(*http.Transport).TLSClientConfig
	orig := dpsClient
	t.Cleanup(func() { dpsClient = orig })
	dpsClient = func(*cobra.Command) (*azclient.Client, error) {
		return azclient.New("HostName=dps;SharedAccessKeyName=owner;SharedAccessKey=MDEyMzQ1Njc4OWFiY2RlZg==", srv.URL, "2021-10-01", tlsConf)
	}

	cmd := &cobra.Command{}
	cmd.SetContext(context.Background())
	var stderr bytes.Buffer
	cmd.SetErr(&stderr)
	err := showWrittenEnrollment(cmd, &dps.Enrollment{RegistrationID: "written", Attestation: dps.Attestation{Type: dps.AttestationSymmetricKey}})
	if err != nil || !strings.Contains(stderr.String(), "warning: enrollment written is written, but its registration could not be read") {
		t.Errorf("showing a written enrollment whose registration read fails: %v\n%s", err, stderr.String())
	}

	stderr.Reset()
	hub := hubCmd()
	hub.SetErr(&stderr)
	hub.SetOut(&bytes.Buffer{})
	hub.SetArgs([]string{"unlink", "--hostname", "hub2.test"})
	if err := hub.ExecuteContext(context.Background()); err != nil || !strings.Contains(stderr.String(), "warning: hub hub2.test is unlinked, but whether enrollments still name it could not be checked") {
		t.Errorf("unlinking with the enrollment scan failing: %v\n%s", err, stderr.String())
	}
}
