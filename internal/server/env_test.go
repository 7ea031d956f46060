package server

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"

	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/hubclient"
	"github.com/hatchery/hatchery/internal/provisioning"
	"github.com/hatchery/hatchery/internal/store"
	"github.com/hatchery/hatchery/internal/testutil"
)

const host = "hatchery.test"

// env is a running server on loopback with a real store: SQLite, or
// PostgreSQL (newEnvAt).
type env struct {
	t      testing.TB
	ts     *httptest.Server
	st     store.Store
	dps    *dps.Service
	hub    *hub.Service
	tls    *tls.Config
	dpsAPI *azclient.Client
	hubAPI *azclient.Client
}

func newEnv(t testing.TB) *env {
	return newEnvAt(t, filepath.Join(t.TempDir(), "h.db"))
}

// newEnvAt is newEnv on the database dsn names, as store.Open takes it: a
// SQLite file's path or a PostgreSQL URL (pgDatabase).
func newEnvAt(t testing.TB, dsn string) *env {
	t.Helper()
	ctx := context.Background()
	st, err := store.Open(ctx, dsn, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	e := &env{t: t, st: st}
	e.ts = httptest.NewUnstartedServer(nil)
	e.ts.TLS = &tls.Config{ClientAuth: tls.RequestClientCert} // as hatchery serve: X.509 devices
	e.ts.StartTLS()
	t.Cleanup(e.ts.Close)
	e.tls = e.ts.Client().Transport.(*http.Transport).TLSClientConfig
	if e.hub, err = hub.Open(ctx, st, host); err != nil {
		t.Fatal(err)
	}
	if e.dps, err = dps.Open(ctx, st, &hubclient.Pool{TLS: e.tls, Local: e.hub}, host); err != nil {
		t.Fatal(err)
	}
	e.dps.CAs = e.hub
	if hubs, _ := e.dps.LinkedHubs(ctx); len(hubs) == 0 {
		if err := e.dps.LinkHub(ctx, dps.LinkedHub{HostName: host, ConnectionString: e.hub.OwnerConnectionString(),
			Endpoint: e.ts.URL, ApplyAllocationPolicy: true}); err != nil {
			t.Fatal(err)
		}
	}
	e.ts.Config.Handler = New(e.dps, e.hub, nil)
	if e.dpsAPI, err = azclient.New(e.dps.OwnerConnectionString(), e.ts.URL, "2021-10-01", e.tls); err != nil {
		t.Fatal(err)
	}
	if e.hubAPI, err = azclient.New(e.hub.OwnerConnectionString(), e.ts.URL, "2021-04-12", e.tls); err != nil {
		t.Fatal(err)
	}
	return e
}

// TestOnPostgres runs the API tests whose answers depend on the store on
// PostgreSQL too, each on its own database of one server.
func TestOnPostgres(t *testing.T) {
	pg := testutil.StartPostgres(t)
	for _, tc := range []struct {
		name string
		test func(*testing.T, *env)
	}{
		{"QueryPaging", testQueryPaging},
		{"ContinuationTokens", testContinuationTokens},
		{"BulkEnrollments", testBulkEnrollments},
		{"BulkEnrollmentGroups", testBulkEnrollmentGroups},
		{"BulkStopped", testBulkStopped},
	} {
		t.Run(tc.name, func(t *testing.T) { tc.test(t, newEnvAt(t, pg.NewDatabase(t))) })
	}
}

func (e *env) device(regID string) *provisioning.Client {
	return &provisioning.Client{Endpoint: e.ts.URL, IDScope: e.dps.IDScope(), RegistrationID: regID,
		HTTP: e.ts.Client(), MaxPolls: 5}
}

// counts snapshots how many documents of each kind are stored.
// pool reaches e's hub as the provisioning service does.
func (e *env) pool() *hubclient.Pool { return &hubclient.Pool{TLS: e.tls, Local: e.hub} }

// replica is another provisioning service replica over st (e's store, or
// a wrapper of it), reaching hubs through registry.
func (e *env) replica(t *testing.T, st store.Store, registry dps.Registry) *dps.Service {
	t.Helper()
	d, err := dps.Open(ctx, st, registry, host)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func (e *env) counts() map[string]int {
	out := map[string]int{}
	for _, k := range []string{"dps.enrollment", "dps.enrollmentGroup", "dps.registration", "dps.operation", "dps.challenge", "hub.device"} {
		n, err := e.st.Count(context.Background(), k)
		if err != nil {
			e.t.Fatal(err)
		}
		out[k] = n
	}
	return out
}

// captureLog sends the default logger to a buffer until the test ends.
func captureLog(t testing.TB) *testutil.SyncBuffer {
	b := &testutil.SyncBuffer{}
	old := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(b, nil)))
	t.Cleanup(func() { slog.SetDefault(old) })
	return b
}
