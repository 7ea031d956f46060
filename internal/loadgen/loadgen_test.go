package loadgen

import (
	"context"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/hubclient"
	"github.com/hatchery/hatchery/internal/mqtt"
	"github.com/hatchery/hatchery/internal/server"
	"github.com/hatchery/hatchery/internal/store"
)

// host is the hub's name; the httptest certificate is issued for it.
const host = "example.com"

// TestRun runs the whole benchmark with 50 connections against an
// in-process hub, with the workers as goroutines.
func TestRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	st, hubSvc, dpsSvc, ts := inProcessService(ctx, t, host)
	clientTLS := ts.Client().Transport.(*http.Transport).TLSClientConfig
	ts.Config.Handler = server.New(dpsSvc, hubSvc, nil)
	ts.Config.ErrorLog = slog.NewLogLogger(slog.DiscardHandler, slog.LevelDebug)

	ln, err := tls.Listen("tcp", "127.0.0.1:0", ts.TLS)
	if err != nil {
		t.Fatal(err)
	}
	devices := &mqtt.Server{Handler: server.NewDeviceEndpoint(hubSvc), Logger: slog.New(slog.DiscardHandler)}
	go func() { _ = devices.Serve(ln) }()
	t.Cleanup(func() { _ = devices.Close() })

	registry, err := azclient.New(hubSvc.OwnerConnectionString(), ts.URL, "2021-04-12", clientTLS)
	if err != nil {
		t.Fatal(err)
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ts.Certificate().Raw})

	cfg := Config{
		Devices: 50, PerWorker: 20, Prefix: "lg-",
		HubHost: host, MQTTAddr: ln.Addr().String(), CAPEM: caPEM, Registry: registry, KeySeed: []byte("seed"),
		ProvisionConcurrency: 8, ConnectConcurrency: 8, KeepAlive: time.Minute,
		ServerPID: os.Getpid(), Events: st,
		Telemetry: time.Second, VerifyStream: true,
		FanoutSamples: 20, FanoutConcurrency: 2, FanoutUnderLoad: 5,
		Log:   t.Logf,
		Start: inProcessWorker,
	}
	res, err := Run(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if res.Workers != 3 || res.Provision.Created != 50 || res.Connect.Established != 50 || res.Connect.Failed != 0 {
		t.Fatalf("workers %d, provisioning %+v, connections %+v", res.Workers, res.Provision, res.Connect)
	}
	if res.Memory == nil || res.Memory.BeforeKiB <= 0 || res.Memory.SettledKiB <= 0 {
		t.Fatalf("memory %+v", res.Memory)
	}
	tel := res.Telemetry
	if tel == nil || tel.Acked == 0 || tel.Failed != 0 || tel.Missing != 0 ||
		tel.Stored != tel.Acked+tel.AckedLate || tel.StoredStream != tel.Stored {
		t.Fatalf("telemetry %+v", tel)
	}
	if f := res.Fanout; f == nil || f.Sent != 20 || f.Received != 20 || f.Latency.Max <= 0 {
		t.Fatalf("fan-out %+v", res.Fanout)
	}
	if f := res.FanoutUnderLoad; f == nil || f.Received != 5 {
		t.Fatalf("fan-out under load %+v", res.FanoutUnderLoad)
	}

	// A second run finds the devices with their keys, and cleans up.
	cfg.Telemetry, cfg.FanoutSamples, cfg.Cleanup, cfg.ServerPID = 0, 0, true, 0
	res, err = Run(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if res.Provision.Existing != 50 || res.Connect.Established != 50 || res.Deleted != 50 {
		t.Fatalf("second run: provisioning %+v, connections %+v, deleted %d", res.Provision, res.Connect, res.Deleted)
	}
	if n, _ := st.Count(ctx, "hub.device"); n != 0 {
		t.Fatalf("%d devices left", n)
	}
}

// inProcessService opens a hub and a provisioning service, named host, on
// a new SQLite store, with the provisioning service writing the hub in
// process, and a TLS test server, started without a handler, whose client
// trusts it.
func inProcessService(ctx context.Context, t *testing.T, host string) (*store.SQLite, *hub.Service, *dps.Service, *httptest.Server) {
	t.Helper()
	st, err := store.OpenSQLite(filepath.Join(t.TempDir(), "hatchery.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	hubSvc, err := hub.Open(ctx, st, host)
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewUnstartedServer(nil)
	ts.StartTLS()
	t.Cleanup(ts.Close)
	clientTLS := ts.Client().Transport.(*http.Transport).TLSClientConfig
	dpsSvc, err := dps.Open(ctx, st, &hubclient.Pool{TLS: clientTLS, Local: hubSvc}, host)
	if err != nil {
		t.Fatal(err)
	}
	return st, hubSvc, dpsSvc, ts
}

// inProcessWorker runs RunWorker on pipes, as the worker process would.
func inProcessWorker(ctx context.Context) (*Process, error) {
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := RunWorker(ctx, inR, outW)
		outW.CloseWithError(err)
		inR.Close()
		done <- err
	}()
	return &Process{In: inW, Out: outR, Wait: func() error { return <-done },
		Kill: func() { inR.CloseWithError(errors.New("killed")) }}, nil
}

func TestHistogram(t *testing.T) {
	var h Histogram
	for i := 1; i <= 1000; i++ {
		h.Record(time.Duration(i) * time.Millisecond)
	}
	s := h.Snapshot()
	var other Histogram
	other.Record(5 * time.Second)
	s.Merge(other.Snapshot())
	l := s.Summary()
	near := func(got, want float64) bool { return got > want*0.96 && got < want*1.04 }
	if l.Count != 1001 || !near(l.P50, 501) || !near(l.P99, 991) || l.Max != 5000 {
		t.Fatalf("summary %+v", l)
	}
	for us := range uint64(1 << 20) {
		if i := histIndex(us); histLow(i) > us || histLow(i+1) <= us {
			t.Fatalf("%d µs in bucket %d [%d, %d)", us, i, histLow(i), histLow(i+1))
		}
	}
}

func TestThousands(t *testing.T) {
	for n, want := range map[int64]string{0: "0", 999: "999", 1000: "1,000", 19000: "19,000", 1234567: "1,234,567", -2500: "-2,500"} {
		if got := Thousands(n); got != want {
			t.Errorf("Thousands(%d) = %q", n, got)
		}
	}
}

// fakeEvents is a stream whose sequence numbers are the given ones.
type fakeEvents []int64

func (f fakeEvents) Events(_ context.Context, _ string, after int64, limit int) ([]store.Event, error) {
	var out []store.Event
	for _, s := range f {
		if s > after && len(out) < limit {
			out = append(out, store.Event{Seq: s})
		}
	}
	return out, nil
}

func TestLastSeq(t *testing.T) {
	for _, seqs := range [][]int64{nil, {1}, {1, 2, 3}, {5}, {1, 2, 1000}, {7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17}, {1 << 40}} {
		want := int64(0)
		if len(seqs) > 0 {
			want = seqs[len(seqs)-1]
		}
		if got, err := lastSeq(context.Background(), fakeEvents(seqs)); err != nil || got != want {
			t.Errorf("lastSeq(%v) = %d, %v; want %d", seqs, got, err, want)
		}
	}
}

// Percentiles are nearest-rank, the same from the histogram and from a
// sorted sample: of 1–4 ms, p50 is 2 ms and p99 4 ms.
func TestNearestRank(t *testing.T) {
	var h Histogram
	var ds []time.Duration
	for i := 1; i <= 4; i++ {
		h.Record(time.Duration(i) * time.Millisecond)
		ds = append(ds, time.Duration(i)*time.Millisecond)
	}
	near := func(got, want float64) bool { return got > want*0.96 && got < want*1.04 }
	if l := h.Snapshot().Summary(); !near(l.P50, 2) || !near(l.P99, 4) {
		t.Errorf("histogram %+v", l)
	}
	if l := summarize(ds); l.P50 != 2 || l.P99 != 4 {
		t.Errorf("sample %+v", l)
	}
	for _, c := range []struct {
		q    float64
		n    int
		want int
	}{{0.5, 1, 1}, {0.99, 1, 1}, {0, 5, 1}, {0.5, 5, 3}, {0.99, 5, 5}, {1, 5, 5}, {0.99, 100, 99}, {0.5, 10, 5}} {
		if got := nearestRank(c.q, c.n); got != c.want {
			t.Errorf("nearestRank(%v, %d) = %d, want %d", c.q, c.n, got, c.want)
		}
	}
}
