package loadgen

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/dpsapi"
	"github.com/hatchery/hatchery/internal/hubdevice"
	"github.com/hatchery/hatchery/internal/progress"
	"github.com/hatchery/hatchery/internal/provisioning"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/softtpm"
	"github.com/hatchery/hatchery/internal/tpm"
)

// FleetConfig describes a simulated fleet provisioning against a server.
type FleetConfig struct {
	Endpoint    string           // the provisioning service, https://host[:port]
	IDScope     string           // its ID scope
	Service     *azclient.Client // its service API (bulk enrollment)
	TLS         *tls.Config      // trusts the server
	Devices     int
	Attestation string // dps.AttestationTPM or dps.AttestationSymmetricKey
	Prefix      string // registration IDs are Prefix + a number
	// Seed derives the symmetric keys, so a fleet enrolled once can be
	// provisioned again (SkipEnroll) by another run.
	Seed        []byte
	Concurrency int // devices registering at once
	// Rate, when positive, starts devices at this many per second (an open
	// loop, as a fleet powering up does) instead of as fast as Concurrency
	// allows.
	Rate       float64
	KeyPool    int  // TPM: EK/SRK pairs generated and shared among the devices
	SkipEnroll bool // the fleet is enrolled already
	Connect    bool // each provisioned device connects to its hub over MQTT
	HubPort    int  // the hub's MQTT port (8883)
	ServerPIDs []int
	Progress   io.Writer // progress bars; nil draws none
	// Retries is how often a failed bulk enrollment call, registration or
	// hub connection is tried again (after 1, 2, 4 … seconds), as real
	// devices do.
	Retries int
	// X25519Only offers only an X25519 key share, as device TLS stacks
	// without ML-KEM do, instead of Go's default hybrid.
	X25519Only bool
	// Enrolled, when set, is called once the run's devices are enrolled,
	// before anything is counted or measured; runs against the same
	// servers wait in it for each other, so that no run's figures include
	// another's enrollment.
	Enrolled func(context.Context) error
	// Uncounted leaves the enrollments uncounted (Enrolled 0), for runs
	// beside one that counts them.
	Uncounted bool
	// Probe, when positive, is how often FleetAcross times a service API
	// request (reading one device's enrollment) while the devices
	// register: how the service answers its operators under the load.
	Probe time.Duration
}

// FleetResult is what a run measured.
type FleetResult struct {
	Devices     int     `json:"devices"`
	Attestation string  `json:"attestation"`
	Concurrency int     `json:"concurrency"`
	Rate        float64 `json:"rate,omitempty"`
	// StartedPerS is the rate devices actually started at, with a Rate:
	// below it when every worker was busy.
	StartedPerS float64 `json:"startedPerSecond,omitempty"`
	// Enrolled counts the enrollments in the service once the run's own
	// are made, before it registers any device.
	Enrolled    int     `json:"enrolledBefore"`
	EnrollPerS  float64 `json:"enrollmentsPerSecond,omitempty"`
	Provisioned int     `json:"provisioned"`
	Seconds     float64 `json:"seconds"`
	PerSecond   float64 `json:"registrationsPerSecond"`
	Latency     Latency `json:"latency"`
	// Connect says each provisioned device also connected to its hub;
	// Seconds, PerSecond and the CPU figures then include the connections.
	Connect   bool `json:"connect,omitempty"`
	Connected int  `json:"connected,omitempty"`
	Retried   int  `json:"retried,omitempty"` // registrations tried again after a failure
	// EnrollRetried and ConnectRetried count bulk enrollment calls and hub
	// connections tried again after a failure.
	EnrollRetried  int `json:"enrollRetried,omitempty"`
	ConnectRetried int `json:"connectRetried,omitempty"`
	// Throttled counts the 429 answers the devices got, and ThrottledWait
	// the seconds they spent waiting them out: throttling shows only in
	// the latencies otherwise, as devices wait and try again.
	Throttled     int     `json:"throttled"`
	ThrottledWait float64 `json:"throttledWaitSeconds"`
	// Errors counts the devices that were not provisioned, by kind;
	// HubErrors those provisioned that could not connect to their hub.
	Errors    map[string]int `json:"errors"`
	HubErrors map[string]int `json:"hubErrors,omitempty"`
	// ServerCPUPerReg and SimCPUPerReg are CPU milliseconds per
	// registration, from the processes' own accounting.
	ServerCPUPerReg float64 `json:"serverCpuMsPerRegistration,omitempty"`
	SimCPUPerReg    float64 `json:"simulatorCpuMsPerRegistration"`
	// ServerCPUNote says why ServerCPUPerReg is missing.
	ServerCPUNote string `json:"serverCpuNote,omitempty"`
	// Probe times the service API requests made while the devices
	// registered (FleetConfig.Probe); ProbeErrors counts those that failed.
	Probe       *Latency `json:"probe,omitempty"`
	ProbeErrors int      `json:"probeErrors,omitempty"`
	// Interrupted says the run was stopped before every device was done:
	// the figures cover the devices done until then.
	Interrupted bool `json:"interrupted,omitempty"`

	// Histogram and EnrollSeconds are what runs are merged from.
	Histogram     Snapshot `json:"-"`
	EnrollSeconds float64  `json:"-"`
}

// BehindRate says devices started well below the Rate asked for: the
// workers were all busy, and the latencies include the wait for one.
func (r *FleetResult) BehindRate() bool {
	return r.Rate > 0 && r.StartedPerS > 0 && r.StartedPerS < 0.95*r.Rate
}

// Fleet enrolls the fleet with the bulk API (unless SkipEnroll) and
// provisions every device concurrently, each over its own new TLS
// connection, as a device of that attestation does.
func Fleet(ctx context.Context, cfg FleetConfig) (*FleetResult, error) {
	if cfg.Devices <= 0 || cfg.Concurrency <= 0 {
		return nil, errors.New("devices and concurrency must be positive")
	}
	res := &FleetResult{Devices: cfg.Devices, Attestation: cfg.Attestation, Concurrency: cfg.Concurrency, Rate: cfg.Rate,
		Connect: cfg.Connect, Errors: map[string]int{}, HubErrors: map[string]int{}}
	devs, err := newSimDevices(cfg)
	if err != nil {
		return nil, err
	}
	if !cfg.SkipEnroll {
		start := time.Now()
		if res.EnrollRetried, err = enrollFleet(ctx, cfg, devs); err != nil {
			return nil, err
		}
		res.EnrollSeconds = time.Since(start).Seconds()
		res.EnrollPerS = float64(len(devs)) / res.EnrollSeconds
	}
	if cfg.Enrolled != nil {
		if err := cfg.Enrolled(ctx); err != nil {
			return nil, err
		}
	}
	if !cfg.Uncounted {
		if res.Enrolled, err = countEnrollments(ctx, cfg.Service, cfg.Retries); err != nil {
			return nil, err
		}
	}

	m := startMeter(cfg.ServerPIDs)
	var hist Histogram
	var mu sync.Mutex
	failed := func(kinds map[string]int, err error) {
		mu.Lock()
		kinds[errorKind(err)]++
		mu.Unlock()
	}
	var connected, retried, connectRetried atomic.Int64
	var th throttling
	bar := newBar(cfg.Progress, "provisioning", len(devs))
	jobs := make(chan job)
	var wg sync.WaitGroup
	for range cfg.Concurrency {
		wg.Go(func() {
			for j := range jobs {
				t0 := j.due
				if t0.IsZero() {
					t0 = time.Now()
				}
				var state *dpsapi.RegistrationState
				err := withRetries(ctx, cfg.Retries, &retried, func() (err error) {
					state, err = j.d.register(ctx, cfg, &th)
					return err
				})
				if err != nil {
					failed(res.Errors, err)
				} else {
					hist.Record(time.Since(t0))
					if cfg.Connect {
						// A hub restarting meanwhile refuses it for a while.
						if err := withRetries(ctx, cfg.Retries, &connectRetried, func() error { return j.d.connect(ctx, cfg, state) }); err != nil {
							failed(res.HubErrors, err)
						} else {
							connected.Add(1)
						}
					}
				}
				bar.Add(1)
			}
		})
	}
	last := dispatch(ctx, devs, cfg.Rate, m.start, jobs)
	wg.Wait()
	bar.Done()
	if cfg.Rate > 0 && len(devs) > 1 && last.After(m.start) {
		res.StartedPerS = float64(len(devs)-1) / last.Sub(m.start).Seconds()
	}
	res.Histogram = hist.Snapshot()
	res.Latency = res.Histogram.Summary()
	res.Provisioned = int(res.Latency.Count)
	res.Connected = int(connected.Load())
	res.Retried = int(retried.Load())
	res.ConnectRetried = int(connectRetried.Load())
	res.Throttled, res.ThrottledWait = int(th.answers.Load()), time.Duration(th.wait.Load()).Seconds()
	m.stop(res)
	return res, ctx.Err()
}

// withRetries calls f until it succeeds, tried again at most retries times
// after 1, 2, 4 … seconds, each counted in retried; interrupted, it
// returns f's last error.
func withRetries(ctx context.Context, retries int, retried *atomic.Int64, f func() error) error {
	err := f()
	for attempt := 0; err != nil && attempt < retries && ctx.Err() == nil; attempt++ {
		retried.Add(1)
		select {
		case <-time.After(time.Second << attempt):
		case <-ctx.Done():
			return err
		}
		err = f()
	}
	return err
}

// throttling counts the 429 answers devices waited out, and the wait.
type throttling struct {
	answers, wait atomic.Int64 // wait in nanoseconds
}

func (t *throttling) throttled(wait time.Duration) {
	t.answers.Add(1)
	t.wait.Add(int64(wait))
}

// countEnrollments counts the enrollments in the service, tried again as
// the bulk calls before it are.
func countEnrollments(ctx context.Context, svc *azclient.Client, retries int) (n int, err error) {
	err = withRetries(ctx, retries, new(atomic.Int64), func() error {
		all, err := azclient.QueryAll[struct{}](ctx, svc, "/enrollments/query", "*")
		n = len(all)
		return err
	})
	return n, err
}

// meter measures a fleet's provisioning: the wall time and the CPU the
// servers and this process spend in it.
type meter struct {
	pids        []int
	start       time.Time
	server, sim float64 // CPU seconds at the start
	unread      error   // why the server's CPU could not be read at the start
}

func startMeter(serverPIDs []int) *meter {
	// Replicas' URLs may reach one process: count its CPU once.
	pids := slices.Compact(slices.Sorted(slices.Values(serverPIDs)))
	m := &meter{pids: pids, sim: selfCPU(), start: time.Now()}
	m.server, m.unread = serverCPU(pids)
	return m
}

// stop sets res's time, rate and CPU per registration from its Provisioned.
func (m *meter) stop(res *FleetResult) {
	res.Seconds = time.Since(m.start).Seconds()
	res.PerSecond = float64(res.Provisioned) / res.Seconds
	res.ServerCPUPerReg, res.SimCPUPerReg, res.ServerCPUNote = 0, 0, ""
	if res.Provisioned > 0 {
		switch server, err := serverCPU(m.pids); {
		case len(m.pids) == 0:
			res.ServerCPUNote = "server process not found: pass --server-pid"
		case m.unread != nil:
			// Given wrong, or ended before the registrations began.
			res.ServerCPUNote = "server process could not be read: " + m.unread.Error()
		case err != nil:
			// Found when the simulator started, it ended: its CPU until then is
			// lost with it, and the new process's is not all the run's.
			res.ServerCPUNote = "server process changed during the run"
		default:
			res.ServerCPUPerReg = (server - m.server) * 1000 / float64(res.Provisioned)
		}
		res.SimCPUPerReg = (selfCPU() - m.sim) * 1000 / float64(res.Provisioned)
	}
}

// job is a device to register and, at a set rate, when it is due.
type job struct {
	d   *simDevice
	due time.Time
}

// dispatch hands the devices to the workers and closes jobs: as fast as they
// take them, or with a rate, device i due at start + i/rate whether or not
// a worker is free by then, so that its latency, timed from then, includes
// any wait for one. It returns when it handed over the last device.
func dispatch(ctx context.Context, devs []*simDevice, rate float64, start time.Time, jobs chan<- job) (last time.Time) {
	defer close(jobs)
	for i, d := range devs {
		j := job{d: d}
		if rate > 0 {
			j.due = start.Add(time.Duration(float64(i) / rate * float64(time.Second)))
			select {
			case <-time.After(time.Until(j.due)):
			case <-ctx.Done():
				return last
			}
		}
		select {
		case jobs <- j:
			last = time.Now()
		case <-ctx.Done():
			return last
		}
	}
	return last
}

// simDevice is one simulated device.
type simDevice struct {
	regID string
	key   []byte       // symmetric key
	tpm   *softtpm.TPM // or a software TPM
}

func newSimDevices(cfg FleetConfig) ([]*simDevice, error) {
	devs := make([]*simDevice, cfg.Devices)
	var pool []*softtpm.Keys
	if cfg.Attestation == dps.AttestationTPM {
		// RSA key generation dominates: a pool of pairs, made in parallel.
		pool = make([]*softtpm.Keys, max(min(cfg.KeyPool, cfg.Devices), 1))
		var wg sync.WaitGroup
		errs := make(chan error, len(pool))
		for i := range pool {
			wg.Add(1)
			go func() {
				defer wg.Done()
				k, err := softtpm.NewKeys()
				pool[i] = k
				errs <- err
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				return nil, err
			}
		}
	}
	for i := range devs {
		d := &simDevice{regID: cfg.Prefix + strconv.Itoa(i)}
		if pool != nil {
			d.tpm = softtpm.New(pool[i%len(pool)])
		} else {
			d.key = sas.DeriveDeviceKey(cfg.Seed, d.regID)
		}
		devs[i] = d
	}
	return devs, nil
}

// enrollFleet creates (or replaces) the devices' enrollments with the bulk
// API, and returns how often a bulk call was tried again. Each enrollment
// of a call is written on its own, so a call that failed (the server
// restarting) may have written some: mode update writes them again as
// they are, with the keys the devices hold.
func enrollFleet(ctx context.Context, cfg FleetConfig, devs []*simDevice) (int, error) {
	const batch = 1000
	bar := newBar(cfg.Progress, "enrolling", len(devs))
	defer bar.Done()
	var retried atomic.Int64
	for at := 0; at < len(devs); at += batch {
		var es []*dps.Enrollment
		for _, d := range devs[at:min(at+batch, len(devs))] {
			e := &dps.Enrollment{RegistrationID: d.regID}
			if d.tpm != nil {
				ek, _ := d.tpm.EndorsementKey()
				e.Attestation = dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EndorsementKey: base64.StdEncoding.EncodeToString(ek)}}
			} else {
				k := base64.StdEncoding.EncodeToString(d.key)
				e.Attestation = dps.Attestation{Type: dps.AttestationSymmetricKey, SymmetricKey: &dps.SymmetricKeyAttestation{PrimaryKey: k, SecondaryKey: k}}
			}
			es = append(es, e)
		}
		var out dps.BulkResult
		if err := withRetries(ctx, cfg.Retries, &retried, func() error {
			out = dps.BulkResult{}
			return cfg.Service.Do(ctx, "POST", "/enrollments", "", &dps.BulkOperation{Mode: dps.BulkUpdate, Enrollments: es}, &out)
		}); err != nil {
			return int(retried.Load()), fmt.Errorf("enrolling: %w", err)
		}
		if !out.IsSuccessful && len(out.Errors) > 0 {
			return int(retried.Load()), fmt.Errorf("enrolling %s: %s", out.Errors[0].RegistrationID, out.Errors[0].ErrorStatus)
		}
		bar.Add(len(es))
	}
	return int(retried.Load()), nil
}

// register provisions the device over a TLS connection of its own.
func (d *simDevice) register(ctx context.Context, cfg FleetConfig, th *throttling) (*dpsapi.RegistrationState, error) {
	conf := cfg.TLS.Clone()
	conf.NextProtos = nil // HTTP/1.1, as device SDKs speak it
	if cfg.X25519Only {
		conf.CurvePreferences = []tls.CurveID{tls.X25519}
	}
	tr := &http.Transport{TLSClientConfig: conf, MaxIdleConnsPerHost: 1}
	defer tr.CloseIdleConnections()
	c := &provisioning.Client{Endpoint: cfg.Endpoint, IDScope: cfg.IDScope, RegistrationID: d.regID,
		HTTP: &http.Client{Transport: tr, Timeout: time.Minute}, Throttled: th.throttled}
	if d.tpm != nil {
		return c.RegisterTPM(ctx, d.tpm, tpm.IdentityHandle(tpm.DefaultAuthKeyIndex))
	}
	return c.RegisterSymmetricKey(ctx, d.key)
}

// connect opens the provisioned device's hub session and closes it.
func (d *simDevice) connect(ctx context.Context, cfg FleetConfig, st *dpsapi.RegistrationState) error {
	token := func(aud string, exp time.Time) (string, error) { return sas.Build(d.key, aud, "", exp), nil }
	if d.tpm != nil {
		token = func(aud string, exp time.Time) (string, error) {
			return sas.BuildSigned(func(data []byte) ([]byte, error) {
				return d.tpm.HMAC(tpm.IdentityHandle(tpm.DefaultAuthKeyIndex), data)
			}, aud, "", exp)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	c, err := hubdevice.Dial(ctx, hubdevice.Options{Host: st.AssignedHub, Port: cfg.HubPort, DeviceID: st.DeviceID, TLS: cfg.TLS, Sign: token})
	if err != nil {
		return fmt.Errorf("hub: %w", err)
	}
	c.Close()
	return nil
}

// errorKind groups a device's failure for the report; a hub connection's
// failures are "hub: " and the kind of what failed.
func errorKind(err error) string {
	// Before the causes below, which a hub connection's failure wraps too.
	if cause := errors.Unwrap(err); cause != nil && strings.HasPrefix(err.Error(), "hub: ") {
		return "hub: " + errorKind(cause)
	}
	var pe *provisioning.Error
	var ne net.Error
	switch {
	case errors.As(err, &pe):
		return fmt.Sprintf("HTTP %d (errorCode %d)", pe.Status, pe.ErrorCode)
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET):
		return "connection refused or reset"
	}
	msg := err.Error()
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		msg = msg[i+2:]
	}
	return msg
}

// serverCPU sums the servers' CPU seconds; -1 if unknown.
// serverCPU sums the CPU seconds of the server processes.
func serverCPU(pids []int) (float64, error) {
	sum := 0.0
	for _, p := range pids {
		c, err := CPUSeconds(p)
		if err != nil {
			return 0, err // names the process's /proc file
		}
		sum += c
	}
	return sum, nil
}

func selfCPU() float64 {
	c, _ := CPUSeconds(os.Getpid())
	return c
}

func newBar(w io.Writer, what string, total int) *progress.Bar {
	if w == nil {
		w = io.Discard
	}
	return progress.New(w, what, total)
}
