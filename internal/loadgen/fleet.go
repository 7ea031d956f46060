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
	// Retries is how often a device whose registration failed tries again
	// (after 1, 2, 4 … seconds), as real devices do.
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
}

// FleetResult is what a run measured.
type FleetResult struct {
	Devices     int     `json:"devices"`
	Attestation string  `json:"attestation"`
	Concurrency int     `json:"concurrency"`
	Rate        float64 `json:"rate,omitempty"`
	Enrolled    int     `json:"enrolledBefore"` // enrollments in the service before the run
	EnrollPerS  float64 `json:"enrollmentsPerSecond,omitempty"`
	Provisioned int     `json:"provisioned"`
	Seconds     float64 `json:"seconds"`
	PerSecond   float64 `json:"registrationsPerSecond"`
	Latency     Latency `json:"latency"`
	Connected   int     `json:"connected,omitempty"`
	Retried     int     `json:"retried,omitempty"` // registrations tried again after a failure
	// Errors counts failed devices by kind.
	Errors map[string]int `json:"errors"`
	// ServerCPUPerReg and SimCPUPerReg are CPU milliseconds per
	// registration, from the processes' own accounting.
	ServerCPUPerReg float64 `json:"serverCpuMsPerRegistration,omitempty"`
	SimCPUPerReg    float64 `json:"simulatorCpuMsPerRegistration"`
}

// Fleet enrolls the fleet with the bulk API (unless SkipEnroll) and
// provisions every device concurrently, each over its own new TLS
// connection, as a device of that attestation does.
func Fleet(ctx context.Context, cfg FleetConfig) (*FleetResult, error) {
	if cfg.Devices <= 0 || cfg.Concurrency <= 0 {
		return nil, errors.New("devices and concurrency must be positive")
	}
	res := &FleetResult{Devices: cfg.Devices, Attestation: cfg.Attestation, Concurrency: cfg.Concurrency, Rate: cfg.Rate, Errors: map[string]int{}}
	devs, err := newSimDevices(cfg)
	if err != nil {
		return nil, err
	}
	if !cfg.SkipEnroll {
		start := time.Now()
		if err := enrollFleet(ctx, cfg, devs); err != nil {
			return nil, err
		}
		res.EnrollPerS = float64(len(devs)) / time.Since(start).Seconds()
	}
	if cfg.Enrolled != nil {
		if err := cfg.Enrolled(ctx); err != nil {
			return nil, err
		}
	}
	if !cfg.Uncounted {
		all, err := azclient.QueryAll[struct{}](ctx, cfg.Service, "/enrollments/query", "*")
		if err != nil {
			return nil, err
		}
		res.Enrolled = len(all)
	}

	server0 := serverCPU(cfg.ServerPIDs)
	sim0 := selfCPU()
	var hist Histogram
	var mu sync.Mutex
	var connected, retried atomic.Int64
	bar := newBar(cfg.Progress, "provisioning", len(devs))
	jobs := make(chan *simDevice)
	var wg sync.WaitGroup
	start := time.Now()
	for range cfg.Concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for d := range jobs {
				t0 := time.Now()
				state, err := d.register(ctx, cfg)
				for attempt := 0; err != nil && attempt < cfg.Retries && ctx.Err() == nil; attempt++ {
					retried.Add(1)
					select {
					case <-time.After(time.Second << attempt):
					case <-ctx.Done():
					}
					state, err = d.register(ctx, cfg)
				}
				if err == nil {
					hist.Record(time.Since(t0))
					if cfg.Connect {
						err = d.connect(ctx, cfg, state)
						if err == nil {
							connected.Add(1)
						}
					}
				}
				if err != nil {
					mu.Lock()
					res.Errors[errorKind(err)]++
					mu.Unlock()
				}
				bar.Add(1)
			}
		}()
	}
	var tick *time.Ticker
	if cfg.Rate > 0 {
		tick = time.NewTicker(time.Duration(float64(time.Second) / cfg.Rate))
		defer tick.Stop()
	}
	for _, d := range devs {
		if tick != nil {
			select {
			case <-tick.C:
			case <-ctx.Done():
			}
		}
		select {
		case jobs <- d:
		case <-ctx.Done():
		}
	}
	close(jobs)
	wg.Wait()
	bar.Done()
	res.Seconds = time.Since(start).Seconds()
	res.Latency = hist.Snapshot().Summary()
	res.Provisioned = int(res.Latency.Count)
	res.PerSecond = float64(res.Provisioned) / res.Seconds
	res.Connected = int(connected.Load())
	res.Retried = int(retried.Load())
	if res.Provisioned > 0 {
		if server1 := serverCPU(cfg.ServerPIDs); server0 >= 0 && server1 >= 0 {
			res.ServerCPUPerReg = (server1 - server0) * 1000 / float64(res.Provisioned)
		}
		res.SimCPUPerReg = (selfCPU() - sim0) * 1000 / float64(res.Provisioned)
	}
	return res, ctx.Err()
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

// enrollFleet creates (or replaces) the devices' enrollments with the bulk API.
func enrollFleet(ctx context.Context, cfg FleetConfig, devs []*simDevice) error {
	const batch = 1000
	bar := newBar(cfg.Progress, "enrolling", len(devs))
	defer bar.Done()
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
		if err := cfg.Service.Do(ctx, "POST", "/enrollments", "", &dps.BulkOperation{Mode: dps.BulkUpdate, Enrollments: es}, &out); err != nil {
			return fmt.Errorf("enrolling: %w", err)
		}
		if !out.IsSuccessful && len(out.Errors) > 0 {
			return fmt.Errorf("enrolling %s: %s", out.Errors[0].RegistrationID, out.Errors[0].ErrorStatus)
		}
		bar.Add(len(es))
	}
	return nil
}

// register provisions the device over a TLS connection of its own.
func (d *simDevice) register(ctx context.Context, cfg FleetConfig) (*dpsapi.RegistrationState, error) {
	conf := cfg.TLS.Clone()
	conf.NextProtos = nil // HTTP/1.1, as device SDKs speak it
	if cfg.X25519Only {
		conf.CurvePreferences = []tls.CurveID{tls.X25519}
	}
	tr := &http.Transport{TLSClientConfig: conf, MaxIdleConnsPerHost: 1}
	defer tr.CloseIdleConnections()
	c := &provisioning.Client{Endpoint: cfg.Endpoint, IDScope: cfg.IDScope, RegistrationID: d.regID,
		HTTP: &http.Client{Transport: tr, Timeout: time.Minute}}
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

// errorKind groups a device's failure for the report.
func errorKind(err error) string {
	var pe *provisioning.Error
	var ne net.Error
	switch {
	case errors.As(err, &pe):
		return fmt.Sprintf("HTTP %d (errorCode %d)", pe.Status, pe.ErrorCode)
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET):
		return "connection refused or reset"
	case strings.HasPrefix(err.Error(), "hub: "):
		return "hub connection"
	}
	msg := err.Error()
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		msg = msg[i+2:]
	}
	return msg
}

// serverCPU sums the servers' CPU seconds; -1 if unknown.
func serverCPU(pids []int) float64 {
	if len(pids) == 0 {
		return -1
	}
	sum := 0.0
	for _, p := range pids {
		c, err := CPUSeconds(p)
		if err != nil {
			return -1
		}
		sum += c
	}
	return sum
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
