package loadgen

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/mqtt"
	"github.com/hatchery/hatchery/internal/server"
)

// At a rate, each device is due at its own time whether or not a worker is
// free then, and a rate the workers cannot keep up with shows.
func TestDispatchAtRate(t *testing.T) {
	devs := make([]*simDevice, 5)
	jobs := make(chan job)
	start := time.Now()
	done := make(chan time.Time)
	go func() { done <- dispatch(context.Background(), devs, 100, start, jobs) }()
	i := 0
	for j := range jobs {
		if want := start.Add(time.Duration(i) * 10 * time.Millisecond); !j.due.Equal(want) {
			t.Errorf("device %d due %v after the start, want %v", i, j.due.Sub(start), want.Sub(start))
		}
		i++
		time.Sleep(30 * time.Millisecond) // one worker, slower than the rate
	}
	last := <-done
	r := &FleetResult{Rate: 100, StartedPerS: float64(len(devs)-1) / last.Sub(start).Seconds()}
	if i != len(devs) || !r.BehindRate() {
		t.Errorf("%d devices, started at %.0f/s: behind the rate %v", i, r.StartedPerS, r.BehindRate())
	}
	if (&FleetResult{Rate: 100, StartedPerS: 96}).BehindRate() || (&FleetResult{StartedPerS: 50}).BehindRate() {
		t.Error("behind a rate it kept, or that was not set")
	}
}

// A hub connection's failure is a hub failure, whatever caused it.
func TestErrorKindHub(t *testing.T) {
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
	for err, want := range map[error]string{
		refused:                        "connection refused or reset",
		fmt.Errorf("hub: %w", refused): "hub: connection refused or reset",
		fmt.Errorf("hub: %w", errors.New("x: not authorized")): "hub: not authorized",
		fmt.Errorf("hub: %w", context.DeadlineExceeded):        "hub: timeout",
	} {
		if got := errorKind(err); got != want {
			t.Errorf("errorKind(%v) = %q, want %q", err, got, want)
		}
	}
}

// --retries covers each step a server restarting interrupts: a bulk
// enrollment call cut off, counting the enrollments, a hub refusing
// connections for a while; and the
// 429s a device waits out are counted, not just slower.
func TestFleetRetriesAndThrottling(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const host = "127.0.0.1" // the httptest certificate's, and dialable
	_, hubSvc, dpsSvc, ts := inProcessService(ctx, t, host)
	clientTLS := ts.Client().Transport.(*http.Transport).TLSClientConfig
	if err := dpsSvc.LinkHub(ctx, dps.LinkedHub{HostName: host, ConnectionString: hubSvc.OwnerConnectionString(),
		Endpoint: ts.URL, ApplyAllocationPolicy: true}); err != nil {
		t.Fatal(err)
	}
	ts.Config.ErrorLog = slog.NewLogLogger(slog.DiscardHandler, slog.LevelDebug)

	// The hub's MQTT port opens only a while after the first device is
	// assigned: its first connection is refused.
	hold, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mqttPort := hold.Addr().(*net.TCPAddr).Port
	hold.Close()
	devices := &mqtt.Server{Handler: server.NewDeviceEndpoint(hubSvc), Logger: slog.New(slog.DiscardHandler)}
	t.Cleanup(func() { _ = devices.Close() })
	var openHub sync.Once
	startHub := func() {
		ln, err := tls.Listen("tcp", hold.Addr().String(), ts.TLS)
		if err != nil {
			t.Error(err)
			return
		}
		go func() { _ = devices.Serve(ln) }()
	}

	var enrolls, queries, registers atomic.Int32
	cutOff := func(w http.ResponseWriter) {
		conn, _, _ := w.(http.Hijacker).Hijack()
		conn.Close()
	}
	api := server.New(dpsSvc, hubSvc, nil)
	ts.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/enrollments") && enrolls.Add(1) == 1:
			api.ServeHTTP(httptest.NewRecorder(), r) // written, and the answer lost
			cutOff(w)
			return
		case strings.HasSuffix(r.URL.Path, "/enrollments/query") && queries.Add(1) == 1:
			cutOff(w)
			return
		case r.Method == http.MethodPut && strings.HasSuffix(r.URL.Path, "/register") && registers.Add(1) == 1:
			w.Header().Set("Retry-After", "1")
			http.Error(w, `{"errorCode":429001,"message":"throttled"}`, http.StatusTooManyRequests)
			return
		case strings.Contains(r.URL.Path, "/operations/"):
			defer openHub.Do(func() { time.AfterFunc(500*time.Millisecond, startHub) })
		}
		api.ServeHTTP(w, r)
	})

	svc, err := azclient.New(dpsSvc.OwnerConnectionString(), ts.URL, "2021-10-01", clientTLS)
	if err != nil {
		t.Fatal(err)
	}
	res, err := Fleet(ctx, FleetConfig{Endpoint: ts.URL, IDScope: dpsSvc.IDScope(), Service: svc, TLS: clientTLS,
		Devices: 2, Attestation: dps.AttestationSymmetricKey, Prefix: "rt-", Seed: []byte("seed"), Concurrency: 1,
		Connect: true, HubPort: mqttPort, Retries: 3})
	if err != nil {
		t.Fatal(err)
	}
	if res.Provisioned != 2 || res.Connected != 2 || len(res.Errors) != 0 || len(res.HubErrors) != 0 {
		t.Fatalf("provisioned %d, connected %d, errors %v, hub errors %v", res.Provisioned, res.Connected, res.Errors, res.HubErrors)
	}
	if res.Enrolled != 2 || res.EnrollRetried != 1 || res.ConnectRetried == 0 || res.Throttled != 1 || res.ThrottledWait < 0.9 {
		t.Fatalf("enrollment calls retried %d, hub connections %d, throttled %d (%.1f s)",
			res.EnrollRetried, res.ConnectRetried, res.Throttled, res.ThrottledWait)
	}
}

// Replicas' URLs reaching one server process count its CPU once.
func TestMeterCountsAProcessOnce(t *testing.T) {
	if m := startMeter([]int{os.Getpid(), os.Getpid()}); len(m.pids) != 1 {
		t.Fatalf("server processes %v", m.pids)
	}
}

// A server process gone by the end of the run leaves its CPU unknown, and
// the result says why.
func TestMeterServerChanged(t *testing.T) {
	cmd := exec.Command("sleep", "10")
	if err := cmd.Start(); err != nil {
		t.Skip(err)
	}
	m := startMeter([]int{cmd.Process.Pid})
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	res := &FleetResult{Provisioned: 1}
	m.stop(res)
	if res.ServerCPUPerReg != 0 || res.ServerCPUNote != "server process changed during the run" {
		t.Fatalf("server CPU %v, note %q", res.ServerCPUPerReg, res.ServerCPUNote)
	}
}

// A server process that could not be read at the start is said to be
// so, not to have changed during the run.
func TestMeterServerUnreadable(t *testing.T) {
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Skip(err)
	}
	m := startMeter([]int{cmd.Process.Pid}) // gone already
	res := &FleetResult{Provisioned: 1}
	m.stop(res)
	if res.ServerCPUPerReg != 0 || !strings.HasPrefix(res.ServerCPUNote, "server process could not be read: ") {
		t.Fatalf("server CPU %v, note %q", res.ServerCPUPerReg, res.ServerCPUNote)
	}
}
