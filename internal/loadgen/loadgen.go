// Package loadgen drives the service as a fleet of devices would, for the
// two load commands.
//
// `hatchery fleet simulate` (Fleet, in fleet.go) enrolls simulated devices
// with the bulk API and provisions them over HTTPS, each on a TLS
// connection of its own, TPM devices with a software TPM, and reports
// registrations per second, latencies and CPU per registration.
//
// `hatchery bench mqtt` drives the hub's MQTT device endpoint. A
// coordinator (Run) provisions devices through the registry REST API and
// starts worker processes (RunWorker), each holding up to several thousand
// TLS connections; it then measures the
// server's memory per idle connection, telemetry throughput into the
// durable event stream, and how long a desired-property change takes to
// reach a connected device.
//
// Workers are separate processes because one process may open only so many
// files, and so that the server's memory is measured alone. The coordinator
// and workers speak JSON lines over the workers' stdin and stdout.
package loadgen

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/store"
)

// Registry is the hub's service REST API (an *azclient.Client).
type Registry interface {
	Do(ctx context.Context, method, path, ifMatch string, in, out any) error
	Stream(ctx context.Context, path string) (io.ReadCloser, error)
}

// EventReader reads the hub's durable event stream from its store (a
// store.Store opened beside the server).
type EventReader interface {
	Events(ctx context.Context, deviceID string, after int64, limit int) ([]store.Event, error)
}

// Process is a started worker: commands go to In, reports come from Out.
// Closing In tells the worker to disconnect and exit.
type Process struct {
	In   io.WriteCloser
	Out  io.Reader
	Wait func() error
	Kill func() // ends a worker that does not exit when asked
	Pid  int    // the worker's process ID, for its CPU time (0: in this process)
}

// Config is one benchmark run.
type Config struct {
	Devices   int    // connections to open
	PerWorker int    // at most this many per worker process
	Prefix    string // device IDs are Prefix000000, Prefix000001, …

	HubHost  string   // the hub's host name
	MQTTAddr string   // the MQTT endpoint on loopback, host:port
	CAPEM    []byte   // the CA that issued the server certificate
	Registry Registry // the hub's REST API, with a registry-write policy
	KeySeed  []byte   // device keys are derived from it (deviceKeys)

	ProvisionConcurrency int           // registry requests at once
	ConnectConcurrency   int           // connections being set up at once, over all workers
	KeepAlive            time.Duration // MQTT keep-alive of each connection
	Settle               time.Duration // idle time before the memory is read again
	CloseRate            float64       // disconnections/s at the end, over all workers (0: all at once)
	X25519Only           bool          // clients offer only X25519, not Go's default X25519MLKEM768 hybrid

	ServerPID int         // the server process, for RSS and CPU (0: not measured)
	Events    EventReader // the hub's store, where the telemetry is counted (nil: not counted)

	Telemetry    time.Duration // length of the telemetry phase (0: skipped)
	Rate         float64       // telemetry messages/s over all connections (0: as fast as acknowledged)
	VerifyStream bool          // also count the phase's events by reading the event stream

	FanoutSamples     int // desired patches on idle connections (0: skipped)
	FanoutConcurrency int // patches in flight at once
	FanoutUnderLoad   int // desired patches spread over the telemetry phase (0: none)

	Cleanup bool // delete the devices at the end

	Start func(ctx context.Context) (*Process, error) // starts a worker
	Log   func(format string, args ...any)            // progress
}

// Result holds the figures of a run.
type Result struct {
	Run       string           `json:"run"`
	Devices   int              `json:"devices"`
	Workers   int              `json:"workers"`
	Provision ProvisionResult  `json:"provision"`
	Connect   ConnectResult    `json:"connect"`
	Memory    *MemoryResult    `json:"memory,omitempty"`
	Telemetry *TelemetryResult `json:"telemetry,omitempty"`
	Fanout    *FanoutResult    `json:"fanout,omitempty"`
	// FanoutUnderLoad is desired patches sent during the telemetry phase.
	FanoutUnderLoad *FanoutResult `json:"fanoutUnderLoad,omitempty"`
	// Dropped is connections that had ended unasked by the end of the
	// telemetry phase.
	Dropped int `json:"droppedConnections"`
	Deleted int `json:"deletedDevices,omitempty"`
}

// ProvisionResult counts the registry work.
type ProvisionResult struct {
	Created  int     `json:"created"`
	Existing int     `json:"existing"` // already there with the derived keys
	Updated  int     `json:"updated"`  // there with other keys, re-keyed
	Failed   int     `json:"failed"`
	Seconds  float64 `json:"seconds"`
}

// ConnectResult is the connection phase.
type ConnectResult struct {
	Established int      `json:"established"`
	Failed      int      `json:"failed"`
	Seconds     float64  `json:"seconds"`
	PerSecond   float64  `json:"perSecond"`
	Errors      []string `json:"errors,omitempty"`
	CPU         *CPU     `json:"cpu,omitempty"`
}

// MemoryResult is the server's resident memory around the connection phase.
type MemoryResult struct {
	ServerPID        int     `json:"serverPid"`
	OpenFilesLimit   int     `json:"serverOpenFilesLimit,omitempty"`
	BeforeKiB        int64   `json:"rssBeforeKiB"`
	ConnectedKiB     int64   `json:"rssConnectedKiB"` // right after the last connection
	SettledKiB       int64   `json:"rssSettledKiB"`   // after Settle
	SettleSeconds    float64 `json:"settleSeconds"`
	PerConnectionKiB float64 `json:"kibPerConnection"` // (settled − before) / established
	// PerConnectionConnectedKiB is (connected − before) / established: with
	// the garbage of the connection burst not yet collected.
	PerConnectionConnectedKiB float64 `json:"kibPerConnectionConnected"`
	AfterTelemetryKiB         int64   `json:"rssAfterTelemetryKiB,omitempty"`
}

// TelemetryResult is the telemetry phase.
type TelemetryResult struct {
	Seconds     float64  `json:"seconds"`
	Connections int      `json:"connections"`
	TargetRate  float64  `json:"targetRate,omitempty"`
	Acked       int64    `json:"acked"`     // acknowledged within the phase
	AckedLate   int64    `json:"ackedLate"` // in flight at its end, acknowledged after
	Failed      int64    `json:"failed"`
	PerSecond   float64  `json:"perSecond"` // Acked / Seconds
	Latency     Latency  `json:"ackLatency"`
	Errors      []string `json:"errors,omitempty"`
	// Stored counts the phase's events in the store (-1: not counted);
	// StoredStream counts them in the event stream API (-1: not read).
	Stored       int64 `json:"stored"`
	StoredStream int64 `json:"storedStream"`
	Missing      int64 `json:"missing"` // acknowledged but not stored: must be 0
	CPU          *CPU  `json:"cpu,omitempty"`
	// ServerDiskWriteBytes is what the server caused to be written to
	// storage during the phase (/proc/PID/io write_bytes): the database's
	// WAL and checkpoints.
	ServerDiskWriteBytes      int64   `json:"serverDiskWriteBytes,omitempty"`
	ServerDiskBytesPerMessage float64 `json:"serverDiskBytesPerMessage,omitempty"`
	// ServerCPUPerMessageUS is server CPU per acknowledged message, in µs.
	ServerCPUPerMessageUS float64 `json:"serverCpuPerMessageUs,omitempty"`
}

// FanoutResult is the time from the PATCH of a twin's desired properties
// to the device receiving the patch.
type FanoutResult struct {
	Sent     int      `json:"sent"`
	Received int      `json:"received"`
	Lost     int      `json:"lost"` // not received within 5 s
	Failed   int      `json:"failed"`
	Latency  Latency  `json:"latency"`
	Patch    Latency  `json:"patchRequest"` // the REST call alone
	Errors   []string `json:"errors,omitempty"`
}

type tagged struct {
	w   int
	r   report
	eof error // the worker's output ended (nil r)
}

type runner struct {
	cfg     Config
	run     string
	log     func(string, ...any)
	procs   []*Process
	configs []WorkerConfig
	encs    []*json.Encoder
	reports chan tagged
	failed  map[int]bool // device indexes that did not connect
	dropped int

	seq     atomic.Int64
	waitMu  sync.Mutex
	waiters map[int64]chan int64
}

// Run runs the benchmark. It always stops its workers before returning.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if cfg.Devices <= 0 {
		return nil, errors.New("no devices to connect")
	}
	if cfg.PerWorker <= 0 {
		cfg.PerWorker = 9000
	}
	cfg.ProvisionConcurrency = max(cfg.ProvisionConcurrency, 1)
	cfg.ConnectConcurrency = max(cfg.ConnectConcurrency, 1)
	cfg.FanoutConcurrency = max(cfg.FanoutConcurrency, 1)
	if cfg.Log == nil {
		cfg.Log = func(string, ...any) {}
	}
	var b [6]byte
	_, _ = rand.Read(b[:])
	r := &runner{cfg: cfg, run: hex.EncodeToString(b[:]), log: cfg.Log, reports: make(chan tagged, 256),
		failed: map[int]bool{}, waiters: map[int64]chan int64{}}
	res := &Result{Run: r.run, Devices: cfg.Devices}
	defer r.stopWorkers()

	var err error
	if res.Provision, err = r.provision(ctx); err != nil {
		return res, err
	}
	if cfg.ServerPID > 0 {
		res.Memory = &MemoryResult{ServerPID: cfg.ServerPID}
		res.Memory.OpenFilesLimit, _ = openFilesLimit(cfg.ServerPID)
		if l := res.Memory.OpenFilesLimit; l > 0 && l < cfg.Devices+64 {
			r.log("warning: the server may open only %d files, fewer than %d connections need", l, cfg.Devices)
		}
		if res.Memory.BeforeKiB, err = rssKiB(cfg.ServerPID); err != nil {
			return res, err
		}
		r.log("server pid %d: RSS %s KiB before connecting", cfg.ServerPID, Thousands(res.Memory.BeforeKiB))
	}
	cpu0 := r.cpuNow()
	if res.Connect, err = r.connect(ctx); err != nil {
		return res, err
	}
	res.Workers = len(r.procs)
	res.Connect.CPU = r.cpuSince(cpu0)
	if cfg.ServerPID > 0 {
		m := res.Memory
		m.ConnectedKiB, _ = rssKiB(cfg.ServerPID)
		r.log("RSS %s KiB with %s connections; idling %s", Thousands(m.ConnectedKiB), Thousands(int64(res.Connect.Established)), cfg.Settle)
		if err := sleep(ctx, cfg.Settle); err != nil {
			return res, err
		}
		m.SettledKiB, _ = rssKiB(cfg.ServerPID)
		m.SettleSeconds = cfg.Settle.Seconds()
		if n := float64(res.Connect.Established); n > 0 {
			m.PerConnectionKiB = float64(m.SettledKiB-m.BeforeKiB) / n
			m.PerConnectionConnectedKiB = float64(m.ConnectedKiB-m.BeforeKiB) / n
		}
		r.log("RSS %s KiB after %s idle: %.1f KiB per connection", Thousands(m.SettledKiB), cfg.Settle, m.PerConnectionKiB)
	}
	if res.Connect.Established == 0 {
		return res, fmt.Errorf("no connection was established: %s", strings.Join(res.Connect.Errors, "; "))
	}
	if cfg.Telemetry > 0 {
		if res.Telemetry, res.FanoutUnderLoad, err = r.telemetry(ctx, res.Connect.Established); err != nil {
			return res, err
		}
		if cfg.ServerPID > 0 {
			res.Memory.AfterTelemetryKiB, _ = rssKiB(cfg.ServerPID)
		}
	}
	if cfg.FanoutSamples > 0 {
		r.warm(ctx, cfg.FanoutConcurrency)
		r.log("fan-out: %d desired-property patches on idle connections, %d at a time", cfg.FanoutSamples, cfg.FanoutConcurrency)
		f := r.fanout(ctx, cfg.FanoutSamples, cfg.FanoutConcurrency, 0)
		res.Fanout = &f
		r.log("fan-out: %d/%d received; p50 %.2f ms, p99 %.2f ms, max %.2f ms", f.Received, f.Sent, f.Latency.P50, f.Latency.P99, f.Latency.Max)
	}
	r.stopWorkers()
	res.Dropped = r.dropped
	if cfg.Cleanup {
		res.Deleted = r.cleanup(ctx)
	}
	return res, nil
}

// provision creates the devices, or re-keys those left by an earlier run
// with other keys.
func (r *runner) provision(ctx context.Context) (ProvisionResult, error) {
	n := r.cfg.Devices
	r.log("provisioning %s devices %s … %s through the registry API, %d requests at a time",
		Thousands(int64(n)), DeviceID(r.cfg.Prefix, 0), DeviceID(r.cfg.Prefix, n-1), r.cfg.ProvisionConcurrency)
	var created, existing, updated, failed atomic.Int64
	var errs errSample
	start := time.Now()
	stop := every(time.Second, func() {
		d := created.Load() + existing.Load() + updated.Load()
		r.log("  %s/%s devices ready (%.0f/s)", Thousands(d), Thousands(int64(n)), float64(d)/time.Since(start).Seconds())
	})
	sem := make(chan struct{}, r.cfg.ProvisionConcurrency)
	var wg sync.WaitGroup
	for i := range n {
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			switch outcome, err := r.ensureDevice(ctx, DeviceID(r.cfg.Prefix, i)); {
			case err != nil:
				failed.Add(1)
				errs.add(err)
			case outcome == "created":
				created.Add(1)
			case outcome == "existing":
				existing.Add(1)
			default:
				updated.Add(1)
			}
		})
	}
	wg.Wait()
	stop()
	p := ProvisionResult{Created: int(created.Load()), Existing: int(existing.Load()), Updated: int(updated.Load()),
		Failed: int(failed.Load()), Seconds: time.Since(start).Seconds()}
	r.log("provisioned in %.1f s: %d created, %d already there, %d re-keyed, %d failed",
		p.Seconds, p.Created, p.Existing, p.Updated, p.Failed)
	if err := ctx.Err(); err != nil {
		return p, err
	}
	if p.Failed > 0 {
		return p, fmt.Errorf("%d devices could not be provisioned: %s", p.Failed, strings.Join(errs.list(), "; "))
	}
	return p, nil
}

func (r *runner) ensureDevice(ctx context.Context, id string) (string, error) {
	primary, secondary := deviceKeys(r.cfg.KeySeed, id)
	want := hub.Device{DeviceID: id, Status: "enabled",
		Authentication: hub.Authentication{Type: "sas", SymmetricKey: hub.SymmetricKey{PrimaryKey: primary, SecondaryKey: secondary}}}
	path := "/devices/" + url.PathEscape(id)
	err := r.cfg.Registry.Do(ctx, http.MethodPut, path, "", want, nil)
	if err == nil {
		return "created", nil
	}
	if azerr.As(err).Status() != http.StatusConflict {
		return "", err
	}
	var got hub.Device
	if err := r.cfg.Registry.Do(ctx, http.MethodGet, path, "", nil, &got); err != nil {
		return "", err
	}
	if got.Status == "enabled" && got.Authentication.SymmetricKey == want.Authentication.SymmetricKey {
		return "existing", nil
	}
	return "updated", r.cfg.Registry.Do(ctx, http.MethodPut, path, "*", want, nil)
}

// connect starts the workers and waits until each has tried all its
// connections.
func (r *runner) connect(ctx context.Context) (ConnectResult, error) {
	n := r.cfg.Devices
	workers := (n + r.cfg.PerWorker - 1) / r.cfg.PerWorker
	r.log("connecting %s devices over TLS to %s from %d worker processes, %d connections being set up at a time",
		Thousands(int64(n)), r.cfg.MQTTAddr, workers, r.cfg.ConnectConcurrency)
	start := time.Now()
	first := 0
	for w := range workers {
		count := n / workers
		if w < n%workers {
			count++
		}
		wc := WorkerConfig{Addr: r.cfg.MQTTAddr, Host: r.cfg.HubHost, CAPEM: r.cfg.CAPEM, KeySeed: r.cfg.KeySeed,
			Prefix: r.cfg.Prefix, First: first, Count: count, KeepAlive: r.cfg.KeepAlive, Run: r.run, CloseRate: r.cfg.CloseRate / float64(workers), X25519Only: r.cfg.X25519Only,
			Concurrency: max(r.cfg.ConnectConcurrency/workers, 1)}
		first += count
		p, err := r.cfg.Start(ctx)
		if err != nil {
			return ConnectResult{}, fmt.Errorf("starting worker %d: %w", w, err)
		}
		r.procs = append(r.procs, p)
		r.configs = append(r.configs, wc)
		enc := json.NewEncoder(p.In)
		r.encs = append(r.encs, enc)
		go r.read(w, p.Out)
		if err := enc.Encode(wc); err != nil {
			return ConnectResult{}, fmt.Errorf("configuring worker %d: %w", w, err)
		}
	}
	progress := make([]report, workers)
	doneCount := 0
	var res ConnectResult
	var errs []string
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for doneCount < workers {
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-tick.C:
			up, failed := 0, 0
			for _, p := range progress {
				up += p.Connected
				failed += p.Failed
			}
			r.log("  %s/%s connected, %d failed (%.0f/s)", Thousands(int64(up)), Thousands(int64(n)), failed, float64(up)/time.Since(start).Seconds())
		case t := <-r.reports:
			switch {
			case t.eof != nil:
				return res, fmt.Errorf("worker %d ended while connecting: %w", t.w, t.eof)
			case t.r.Type == "progress":
				progress[t.w] = t.r
			case t.r.Type == "connected":
				progress[t.w] = t.r
				doneCount++
				res.Established += t.r.Connected
				res.Failed += t.r.Failed
				for _, i := range t.r.FailedIndexes {
					r.failed[i] = true
				}
				for _, e := range t.r.Errors {
					if len(errs) < 5 {
						errs = append(errs, e)
					}
				}
			}
		}
	}
	res.Seconds = time.Since(start).Seconds()
	res.PerSecond = float64(res.Established) / res.Seconds
	res.Errors = errs
	r.log("connected %s of %s in %.1f s (%.0f/s), %d failed", Thousands(int64(res.Established)), Thousands(int64(n)), res.Seconds, res.PerSecond, res.Failed)
	for _, e := range errs {
		r.log("  connection error: %s", e)
	}
	return res, nil
}

// read dispatches a worker's reports: desired-patch receipts to their
// waiters, everything else to the reports channel.
func (r *runner) read(w int, out io.Reader) {
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		var rep report
		if err := json.Unmarshal(sc.Bytes(), &rep); err != nil {
			r.reports <- tagged{w: w, eof: fmt.Errorf("unreadable report %q: %w", sc.Text(), err)}
			return
		}
		if rep.Type == "desired" {
			r.waitMu.Lock()
			ch := r.waiters[rep.Seq]
			delete(r.waiters, rep.Seq)
			r.waitMu.Unlock()
			if ch != nil {
				ch <- rep.AtNano
			}
			continue
		}
		r.reports <- tagged{w: w, r: rep}
	}
	err := sc.Err()
	if err == nil {
		err = io.EOF
	}
	r.reports <- tagged{w: w, eof: err}
}

// telemetry runs the telemetry phase on every worker, with desired patches
// spread over it if asked, and counts what was stored.
func (r *runner) telemetry(ctx context.Context, conns int) (*TelemetryResult, *FanoutResult, error) {
	d := r.cfg.Telemetry
	res := &TelemetryResult{Connections: conns, TargetRate: r.cfg.Rate, Stored: -1, StoredStream: -1}
	var seqBefore int64
	if r.cfg.Events != nil {
		var err error
		if seqBefore, err = lastSeq(ctx, r.cfg.Events); err != nil {
			return nil, nil, fmt.Errorf("reading the event stream's last sequence number: %w", err)
		}
	}
	rate := "as fast as acknowledged (one message in flight per connection)"
	if r.cfg.Rate > 0 {
		rate = fmt.Sprintf("%.0f messages/s in total", r.cfg.Rate)
	}
	r.log("telemetry: QoS 1 from %s connections for %s, %s", Thousands(int64(conns)), d, rate)
	if r.cfg.FanoutUnderLoad > 0 {
		r.warm(ctx, 16)
	}
	cpu0 := r.cpuNow()
	io0, ioErr := writeBytes(r.cfg.ServerPID)
	for w, enc := range r.encs {
		share := 0.0
		if r.cfg.Rate > 0 {
			share = r.cfg.Rate * float64(r.configs[w].Count) / float64(r.cfg.Devices)
		}
		if err := enc.Encode(command{Cmd: "telemetry", Duration: d, Rate: share}); err != nil {
			return nil, nil, fmt.Errorf("starting telemetry on worker %d: %w", w, err)
		}
	}
	var underLoad *FanoutResult
	var fanDone chan struct{}
	if n := r.cfg.FanoutUnderLoad; n > 0 {
		fanDone = make(chan struct{})
		go func() {
			defer close(fanDone)
			// Start after a tenth of the phase, when the load has built up.
			if sleep(ctx, d/10) != nil {
				return
			}
			// Patches start on schedule, not after the previous one arrived.
			f := r.fanout(ctx, n, 16, d*8/10/time.Duration(n))
			underLoad = &f
		}()
	}
	start := time.Now()
	hist, first, last, err := r.collectTelemetry(ctx, res, start)
	if err != nil {
		return nil, nil, err
	}
	res.CPU = r.cpuSince(cpu0)
	if io1, err := writeBytes(r.cfg.ServerPID); err == nil && ioErr == nil {
		res.ServerDiskWriteBytes = io1 - io0
	}
	res.Seconds = last.Sub(first).Seconds()
	if res.Seconds <= 0 {
		res.Seconds = time.Since(start).Seconds()
	}
	res.PerSecond = float64(res.Acked) / res.Seconds
	res.Latency = hist.Summary()
	if total := res.Acked + res.AckedLate; total > 0 && res.CPU != nil && res.CPU.Server > 0 {
		res.ServerCPUPerMessageUS = res.CPU.Server * 1e6 / float64(total)
	}
	if total := res.Acked + res.AckedLate; total > 0 {
		res.ServerDiskBytesPerMessage = float64(res.ServerDiskWriteBytes) / float64(total)
	}
	r.logTelemetry(res)
	if fanDone != nil {
		<-fanDone
		if underLoad != nil {
			r.log("fan-out under load: %d/%d received; p50 %.2f ms, p99 %.2f ms, max %.2f ms",
				underLoad.Received, underLoad.Sent, underLoad.Latency.P50, underLoad.Latency.P99, underLoad.Latency.Max)
		}
	}
	if r.cfg.Events != nil {
		if err := r.verifyStored(ctx, res, seqBefore); err != nil {
			return res, underLoad, err
		}
	}
	return res, underLoad, nil
}

// collectTelemetry gathers every worker's telemetry report into res, and
// the merged latencies and the span the workers sent over; it logs the
// progress they report every 5 s meanwhile.
func (r *runner) collectTelemetry(ctx context.Context, res *TelemetryResult, start time.Time) (hist Snapshot, first, last time.Time, err error) {
	d := r.cfg.Telemetry
	timeout := time.After(d + 2*time.Minute)
	progress := make([]int64, len(r.procs))
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for got := 0; got < len(r.procs); {
		select {
		case <-ctx.Done():
			return hist, first, last, ctx.Err()
		case <-tick.C:
			var n int64
			for _, a := range progress {
				n += a
			}
			el := time.Since(start)
			r.log("  %2.0f s of %s: %s acknowledged (%.0f/s)", el.Seconds(), d, Thousands(n), float64(n)/el.Seconds())
		case <-timeout:
			return hist, first, last, fmt.Errorf("telemetry: %d of %d workers reported within %s", got, len(r.procs), d+2*time.Minute)
		case t := <-r.reports:
			if t.eof != nil {
				return hist, first, last, fmt.Errorf("worker %d ended during telemetry: %w", t.w, t.eof)
			}
			if t.r.Type == "telemetry-progress" {
				progress[t.w] = t.r.Acked
				continue
			}
			if t.r.Type != "telemetry" {
				continue
			}
			got++
			res.Acked += t.r.Acked
			res.AckedLate += t.r.AckedLate
			res.Failed += t.r.SendFail
			r.dropped += t.r.Dropped
			if t.r.Latency != nil {
				hist.Merge(*t.r.Latency)
			}
			if first.IsZero() || t.r.Start.Before(first) {
				first = t.r.Start
			}
			if t.r.End.After(last) {
				last = t.r.End
			}
			for _, e := range t.r.Errors {
				if len(res.Errors) < 5 {
					res.Errors = append(res.Errors, e)
				}
			}
		}
	}
	return hist, first, last, nil
}

// logTelemetry logs what the telemetry phase measured.
func (r *runner) logTelemetry(res *TelemetryResult) {
	r.log("telemetry: %s acknowledged in %.1f s = %.0f messages/s (+%s in flight at the end, %d failed); ack latency p50 %.1f ms, p99 %.1f ms, max %.1f ms",
		Thousands(res.Acked), res.Seconds, res.PerSecond, Thousands(res.AckedLate), res.Failed, res.Latency.P50, res.Latency.P99, res.Latency.Max)
	if res.ServerDiskWriteBytes > 0 {
		r.log("  server storage writes: %s MiB, %.0f bytes per message", Thousands(res.ServerDiskWriteBytes>>20), res.ServerDiskBytesPerMessage)
	}
	if c := res.CPU; c != nil {
		r.log("  CPU over %.1f s × %d cores: server %.1f s, load generator %.1f s, other processes %.1f s, idle %.1f s",
			c.Wall, c.Cores, c.Server, c.Loadgen, c.Other, c.Idle)
	}
	for _, e := range res.Errors {
		r.log("  send error: %s", e)
	}
}

// verifyStored counts the run's messages in the store, and through the
// event stream API with VerifyStream, against those acknowledged.
func (r *runner) verifyStored(ctx context.Context, res *TelemetryResult, seqBefore int64) error {
	acked := res.Acked + res.AckedLate
	t0 := time.Now()
	n, err := r.countStored(ctx, seqBefore)
	if err != nil {
		return fmt.Errorf("counting the stored events: %w", err)
	}
	res.Stored = n
	res.Missing = max(acked-res.Stored, 0)
	r.log("store: %s of the run's messages stored (%s acknowledged), counted in %.1f s", Thousands(res.Stored), Thousands(acked), time.Since(t0).Seconds())
	if r.cfg.VerifyStream {
		t0 := time.Now()
		n, err := r.countStream(ctx, seqBefore)
		if err != nil {
			return err
		}
		res.StoredStream = n
		r.log("event stream API: %s of the run's messages read back in %.1f s", Thousands(n), time.Since(t0).Seconds())
		if n != res.Stored {
			r.log("ERROR: the event stream API shows %s of the run's messages, the store %s", Thousands(n), Thousands(res.Stored))
		}
	}
	if res.Missing > 0 {
		r.log("ERROR: %d acknowledged messages are not in the store", res.Missing)
	}
	return nil
}

// lastSeq finds the last sequence number of the event stream with
// O(log n) reads: Events after x is empty exactly when x is at least the
// last. Sequence numbers may have gaps.
func lastSeq(ctx context.Context, ev EventReader) (int64, error) {
	after := func(x int64) (bool, error) {
		evs, err := ev.Events(ctx, "", x, 1)
		return len(evs) > 0, err
	}
	lo, hi := int64(0), int64(1) // events after lo; none after hi (once found)
	for {
		more, err := after(hi)
		if err != nil {
			return 0, err
		}
		if !more {
			break
		}
		lo, hi = hi, hi*2
	}
	if more, err := after(lo); err != nil || !more {
		return lo, err
	}
	for hi-lo > 1 { // events after lo, none after hi
		mid := lo + (hi-lo)/2
		more, err := after(mid)
		if err != nil {
			return 0, err
		}
		if more {
			lo = mid
		} else {
			hi = mid
		}
	}
	return hi, nil
}

// countStored counts the run's events in the store after seq after.
func (r *runner) countStored(ctx context.Context, after int64) (int64, error) {
	var n int64
	for {
		evs, err := r.cfg.Events.Events(ctx, "", after, 5000)
		if err != nil {
			return n, err
		}
		for _, e := range evs {
			if e.Properties["benchRun"] == r.run {
				n++
			}
			after = e.Seq
		}
		if len(evs) < 5000 {
			return n, nil
		}
	}
}

// countStream reads the event stream from after and counts the run's events.
func (r *runner) countStream(ctx context.Context, after int64) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	body, err := r.cfg.Registry.Stream(ctx, "/events?after="+strconv.FormatInt(after, 10))
	if err != nil {
		return 0, fmt.Errorf("reading the event stream: %w", err)
	}
	defer body.Close()
	needle := []byte(`"benchRun":"` + r.run + `"`)
	sc := bufio.NewScanner(body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	var n int64
	for sc.Scan() {
		if bytes.Contains(sc.Bytes(), needle) {
			n++
		}
	}
	if err := sc.Err(); err != nil {
		return n, fmt.Errorf("reading the event stream: %w", err)
	}
	return n, nil
}

// fanout patches the desired properties of n connected devices, count at a
// time (pace apart, if set), and times each patch's arrival at the device.
func (r *runner) fanout(ctx context.Context, n, concurrency int, pace time.Duration) FanoutResult {
	devices := r.sample(n)
	var mu sync.Mutex
	var lat, patch []time.Duration
	res := FanoutResult{}
	var errs errSample
	sem := make(chan struct{}, concurrency)
	var wg sync.WaitGroup
	for k := range n {
		if k > 0 && pace > 0 && sleep(ctx, pace) != nil {
			break
		}
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			seq := r.seq.Add(1)
			ch := make(chan int64, 1)
			r.waitMu.Lock()
			r.waiters[seq] = ch
			r.waitMu.Unlock()
			forget := func() {
				r.waitMu.Lock()
				delete(r.waiters, seq)
				r.waitMu.Unlock()
			}
			body := map[string]any{"properties": map[string]any{"desired": map[string]any{
				"bench": map[string]any{"run": r.run, "seq": seq}}}}
			dev := devices[k%len(devices)]
			t0 := time.Now()
			err := r.cfg.Registry.Do(ctx, http.MethodPatch, "/twins/"+url.PathEscape(dev), "*", body, nil)
			t1 := time.Now()
			mu.Lock()
			res.Sent++
			if err != nil {
				res.Failed++
				mu.Unlock()
				forget()
				errs.add(err)
				return
			}
			patch = append(patch, t1.Sub(t0))
			mu.Unlock()
			select {
			case at := <-ch:
				mu.Lock()
				res.Received++
				lat = append(lat, time.Unix(0, at).Sub(t0))
				mu.Unlock()
			case <-time.After(5 * time.Second):
				forget()
				mu.Lock()
				res.Lost++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	res.Latency, res.Patch, res.Errors = summarize(lat), summarize(patch), errs.list()
	return res
}

// warm opens n connections to the REST API (n reads at once), so that the
// timed patches do not pay for TLS handshakes.
func (r *runner) warm(ctx context.Context, n int) {
	var wg sync.WaitGroup
	for _, id := range r.sample(n) {
		wg.Go(func() { _ = r.cfg.Registry.Do(ctx, http.MethodGet, "/twins/"+url.PathEscape(id), "", nil, nil) })
	}
	wg.Wait()
}

// sample picks up to n connected devices spread over the whole range.
func (r *runner) sample(n int) []string {
	var ids []string
	step := max(r.cfg.Devices/max(n, 1), 1)
	for i := 0; i < r.cfg.Devices && len(ids) < n; i += step {
		if !r.failed[i] {
			ids = append(ids, DeviceID(r.cfg.Prefix, i))
		}
	}
	for i := 0; i < r.cfg.Devices && len(ids) < n; i++ { // fill gaps left by failed ones
		if !r.failed[i] && i%step != 0 {
			ids = append(ids, DeviceID(r.cfg.Prefix, i))
		}
	}
	return ids
}

// stopWorkers closes the workers' input, which makes them disconnect and
// exit, and waits for them; a worker still running a minute after its
// disconnections should have ended is killed.
func (r *runner) stopWorkers() {
	if len(r.procs) == 0 {
		return
	}
	r.log("disconnecting and stopping %d workers", len(r.procs))
	grace := 60 * time.Second
	if r.cfg.CloseRate > 0 {
		grace += time.Duration(float64(r.cfg.Devices) / r.cfg.CloseRate * float64(time.Second))
	}
	var wg sync.WaitGroup
	for _, p := range r.procs {
		p.In.Close()
		wg.Go(func() {
			done := make(chan struct{})
			go func() { _ = p.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(grace):
				p.Kill()
				<-done
			}
		})
	}
	wg.Wait()
	r.procs = nil
	// Let the readers finish, so no reader blocks on the channel forever.
	go func() {
		for range r.reports {
		}
	}()
}

// cleanup deletes the run's devices once the server has seen them
// disconnect (within a minute).
func (r *runner) cleanup(ctx context.Context) int {
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); {
		connected := 0
		for _, id := range r.sample(20) {
			var d hub.Device
			if r.cfg.Registry.Do(ctx, http.MethodGet, "/devices/"+url.PathEscape(id), "", nil, &d) == nil && d.ConnectionState == "Connected" {
				connected++
			}
		}
		if connected == 0 || sleep(ctx, time.Second) != nil {
			break
		}
	}
	r.log("deleting %s devices", Thousands(int64(r.cfg.Devices)))
	var deleted atomic.Int64
	sem := make(chan struct{}, r.cfg.ProvisionConcurrency)
	var wg sync.WaitGroup
	for i := range r.cfg.Devices {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			path := "/devices/" + url.PathEscape(DeviceID(r.cfg.Prefix, i))
			for range 3 {
				err := r.cfg.Registry.Do(ctx, http.MethodDelete, path, "*", nil, nil)
				if err == nil || azerr.As(err).Status() == http.StatusNotFound {
					deleted.Add(1)
					return
				}
			}
		})
	}
	wg.Wait()
	return int(deleted.Load())
}

// CPU is the processor time spent during a phase, in seconds. The load
// generator shares the machine with the server; Other is everything else
// running meanwhile, which should be near zero for a clean measurement.
type CPU struct {
	Wall    float64 `json:"wallSeconds"`
	Cores   int     `json:"cores"`
	Server  float64 `json:"serverSeconds"`
	Loadgen float64 `json:"loadgenSeconds"` // the coordinator and its workers
	Other   float64 `json:"otherSeconds"`
	Idle    float64 `json:"idleSeconds"`
}

type cpuSnap struct {
	at                  time.Time
	busy, idle          float64
	server, loadgen     float64
	serverOK, machineOK bool
}

func (r *runner) cpuNow() cpuSnap {
	s := cpuSnap{at: time.Now()}
	s.busy, s.idle, s.machineOK = machineCPU()
	if r.cfg.ServerPID > 0 {
		var err error
		s.server, err = CPUSeconds(r.cfg.ServerPID)
		s.serverOK = err == nil
	}
	s.loadgen, _ = CPUSeconds(os.Getpid())
	for _, p := range r.procs {
		if p.Pid > 0 {
			c, _ := CPUSeconds(p.Pid)
			s.loadgen += c
		}
	}
	return s
}

// cpuSince is the CPU spent since s0 (nil if the machine's is unknown).
func (r *runner) cpuSince(s0 cpuSnap) *CPU {
	s1 := r.cpuNow()
	if !s0.machineOK || !s1.machineOK {
		return nil
	}
	c := &CPU{Wall: s1.at.Sub(s0.at).Seconds(), Cores: runtime.NumCPU(), Loadgen: s1.loadgen - s0.loadgen, Idle: s1.idle - s0.idle}
	if s0.serverOK && s1.serverOK {
		c.Server = s1.server - s0.server
	}
	c.Other = max(s1.busy-s0.busy-c.Server-c.Loadgen, 0)
	return c
}

// machineCPU reads the machine's busy and idle CPU seconds from /proc/stat.
func machineCPU() (busy, idle float64, ok bool) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, false
	}
	line, _, _ := strings.Cut(string(data), "\n")
	f := strings.Fields(line) // cpu user nice system idle iowait irq softirq steal …
	if len(f) < 9 || f[0] != "cpu" {
		return 0, 0, false
	}
	v := make([]float64, 9)
	for i := 1; i < 9; i++ {
		v[i], _ = strconv.ParseFloat(f[i], 64)
	}
	busy = v[1] + v[2] + v[3] + v[6] + v[7] + v[8]
	idle = v[4] + v[5]
	return busy / 100, idle / 100, true // USER_HZ is 100 on Linux
}

// CPUSeconds reads a process's user+system CPU time from /proc.
func CPUSeconds(pid int) (float64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat is unreadable", pid)
	}
	f := strings.Fields(string(data[i+1:])) // state is f[0]; utime, stime are fields 14, 15 of the line
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat is unreadable", pid)
	}
	utime, err1 := strconv.ParseFloat(f[11], 64)
	stime, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat is unreadable", pid)
	}
	return (utime + stime) / 100, nil // USER_HZ is 100 on Linux
}

// every runs f each period until the returned stop is called.
func every(period time.Duration, f func()) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(period)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				f()
			}
		}
	})
	return func() { close(done); wg.Wait() }
}

func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Thousands formats n with comma separators.
func Thousands(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}
