package loadgen

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hatchery/hatchery/internal/hubdevice"
	"github.com/hatchery/hatchery/internal/sas"
)

// WorkerConfig is the first line a worker reads: which devices it connects
// and where.
type WorkerConfig struct {
	Addr        string        `json:"addr"` // the MQTT endpoint, host:port on loopback
	Host        string        `json:"host"` // the hub's host name: username, token audience, TLS server name
	CAPEM       []byte        `json:"caPem"`
	KeySeed     []byte        `json:"keySeed"` // device keys are derived from it
	Prefix      string        `json:"prefix"`
	First       int           `json:"first"` // device indexes First … First+Count-1
	Count       int           `json:"count"`
	Concurrency int           `json:"concurrency"` // connections being set up at once
	KeepAlive   time.Duration `json:"keepAlive"`
	CloseRate   float64       `json:"closeRate"`  // disconnections/s at the end (0: all at once)
	X25519Only  bool          `json:"x25519Only"` // offer only an X25519 key share, as clients without ML-KEM do
	Run         string        `json:"run"`        // tags the run's telemetry and desired patches
}

// command is what the coordinator sends a worker after its config.
type command struct {
	Cmd      string        `json:"cmd"` // "telemetry"
	Duration time.Duration `json:"duration"`
	Rate     float64       `json:"rate"` // messages/s from this worker; 0: each connection sends again as soon as its message is acknowledged
}

// report is a line a worker writes.
type report struct {
	Type string `json:"type"` // progress, connected, telemetry-progress, telemetry, desired

	Connected     int      `json:"connected,omitempty"`
	Failed        int      `json:"failed,omitempty"`
	FailedIndexes []int    `json:"failedIndexes,omitempty"`
	Errors        []string `json:"errors,omitempty"`  // a few distinct ones
	Dropped       int      `json:"dropped,omitempty"` // connections that ended unasked

	Start     time.Time `json:"start,omitzero"`
	End       time.Time `json:"end,omitzero"`
	Acked     int64     `json:"acked,omitempty"`     // acknowledged within the phase
	AckedLate int64     `json:"ackedLate,omitempty"` // sent within the phase, acknowledged after it
	SendFail  int64     `json:"sendFailed,omitempty"`
	Latency   *Snapshot `json:"latency,omitempty"`

	Seq    int64 `json:"seq,omitempty"`
	AtNano int64 `json:"at,omitempty"` // when the device received a desired patch
}

// DeviceID names device i of a run.
func DeviceID(prefix string, i int) string { return fmt.Sprintf("%s%06d", prefix, i) }

// deviceKeys are a device's primary and secondary keys (base64), derived
// from the seed as an enrollment group derives its devices' keys.
func deviceKeys(seed []byte, id string) (primary, secondary string) {
	return base64.StdEncoding.EncodeToString(sas.DeriveDeviceKey(seed, id)),
		base64.StdEncoding.EncodeToString(sas.DeriveDeviceKey(seed, id+"/secondary"))
}

// errSample keeps the first few distinct error messages.
type errSample struct {
	mu   sync.Mutex
	msgs []string
}

func (e *errSample) add(err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	msg := err.Error()
	if len(e.msgs) >= 5 {
		return
	}
	for _, m := range e.msgs {
		if m == msg {
			return
		}
	}
	e.msgs = append(e.msgs, msg)
}

func (e *errSample) list() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.msgs...)
}

// worker holds one process's connections.
type worker struct {
	cfg     WorkerConfig
	tls     *tls.Config
	clients []*hubdevice.Client

	outMu sync.Mutex
	out   *json.Encoder
}

func (w *worker) send(r report) {
	w.outMu.Lock()
	defer w.outMu.Unlock()
	_ = w.out.Encode(r)
}

// RunWorker is a worker process's body: it reads its config from in,
// connects its devices (each subscribed to desired-property patches),
// reports on out, runs the telemetry phases it is told to, and disconnects
// when in ends.
func RunWorker(ctx context.Context, in io.Reader, out io.Writer) error {
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	if !sc.Scan() {
		return fmt.Errorf("no worker configuration on stdin: %v", sc.Err())
	}
	w := &worker{out: json.NewEncoder(out)}
	if err := json.Unmarshal(sc.Bytes(), &w.cfg); err != nil {
		return fmt.Errorf("worker configuration: %w", err)
	}
	if limit, err := RaiseFileLimit(); err == nil && limit < w.cfg.Count+64 {
		return fmt.Errorf("this process may open %d files, too few for %d connections: raise the limit (ulimit -n) or run more, smaller workers", limit, w.cfg.Count)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(w.cfg.CAPEM) {
		return errors.New("worker configuration: no CA certificate")
	}
	w.tls = &tls.Config{RootCAs: roots, ServerName: w.cfg.Host, MinVersion: tls.VersionTLS12}
	if w.cfg.X25519Only {
		w.tls.CurvePreferences = []tls.CurveID{tls.X25519}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer w.closeAll()

	w.connect(ctx)
	for sc.Scan() {
		var c command
		if err := json.Unmarshal(sc.Bytes(), &c); err != nil {
			return fmt.Errorf("worker command %q: %w", sc.Text(), err)
		}
		switch c.Cmd {
		case "telemetry":
			go w.telemetry(ctx, c.Duration, c.Rate)
		default:
			return fmt.Errorf("unknown worker command %q", c.Cmd)
		}
	}
	return sc.Err() // the coordinator closed stdin: disconnect and end
}

// connect opens the worker's connections, reporting progress every second.
func (w *worker) connect(ctx context.Context) {
	n := w.cfg.Count
	w.clients = make([]*hubdevice.Client, n)
	var connected, failed atomic.Int64
	var errs errSample
	stop := every(time.Second, func() {
		w.send(report{Type: "progress", Connected: int(connected.Load()), Failed: int(failed.Load())})
	})
	sem := make(chan struct{}, max(w.cfg.Concurrency, 1))
	var wg sync.WaitGroup
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			c, err := w.dial(ctx, w.cfg.First+i)
			if err != nil {
				failed.Add(1)
				errs.add(err)
				return
			}
			w.clients[i] = c
			connected.Add(1)
		})
	}
	wg.Wait()
	stop()
	r := report{Type: "connected", Connected: int(connected.Load()), Failed: int(failed.Load()), Errors: errs.list()}
	for i, c := range w.clients {
		if c == nil {
			r.FailedIndexes = append(r.FailedIndexes, w.cfg.First+i)
		}
	}
	w.send(r)
}

// dial connects device i and subscribes it to desired-property patches,
// reporting the run's benchmark patches as they arrive.
func (w *worker) dial(ctx context.Context, i int) (*hubdevice.Client, error) {
	id := DeviceID(w.cfg.Prefix, i)
	primary, _ := deviceKeys(w.cfg.KeySeed, id)
	key, _ := base64.StdEncoding.DecodeString(primary)
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	c, err := hubdevice.Dial(ctx, hubdevice.Options{Host: w.cfg.Host, Addr: w.cfg.Addr, DeviceID: id, TLS: w.tls,
		KeepAlive: w.cfg.KeepAlive, TokenLifetime: 24 * time.Hour,
		Sign: func(aud string, exp time.Time) (string, error) { return sas.Build(key, aud, "", exp), nil }})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", id, err)
	}
	err = c.OnDesired(ctx, func(patch []byte) {
		at := time.Now().UnixNano()
		var p struct {
			Bench struct {
				Run string `json:"run"`
				Seq int64  `json:"seq"`
			} `json:"bench"`
		}
		if json.Unmarshal(patch, &p) == nil && p.Bench.Run == w.cfg.Run {
			w.send(report{Type: "desired", Seq: p.Bench.Seq, AtNano: at})
		}
	})
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("%s: subscribing to desired properties: %w", id, err)
	}
	return c, nil
}

// dropped counts connections that ended without being closed by the worker.
func (w *worker) dropped() int {
	n := 0
	for _, c := range w.clients {
		if c == nil {
			continue
		}
		select {
		case <-c.Done():
			n++
		default:
		}
	}
	return n
}

// closeAll disconnects every device, at CloseRate: the server records each
// disconnection in its database, and a burst of thousands at once measures
// nothing the benchmark reports.
func (w *worker) closeAll() {
	var pause time.Duration
	if w.cfg.CloseRate > 0 {
		pause = time.Duration(float64(time.Second) / w.cfg.CloseRate)
	}
	next := time.Now()
	var wg sync.WaitGroup
	for _, c := range w.clients {
		if c == nil {
			continue
		}
		if pause > 0 {
			time.Sleep(time.Until(next))
			next = next.Add(pause)
		}
		wg.Go(c.Close)
	}
	wg.Wait()
}

// telemetry sends QoS 1 messages from every connection for d: each
// connection has one message in flight at a time; with a rate, the
// connections share it evenly, each starting at a random offset.
func (w *worker) telemetry(ctx context.Context, d time.Duration, rate float64) {
	var live []*hubdevice.Client
	for _, c := range w.clients {
		if c != nil {
			live = append(live, c)
		}
	}
	var interval time.Duration
	if rate > 0 && len(live) > 0 {
		interval = time.Duration(float64(len(live)) / rate * float64(time.Second))
	}
	var h Histogram
	var acked, late, failed atomic.Int64
	var errs errSample
	props := url.Values{"$.ct": {"application/json"}, "$.ce": {"utf-8"}, "benchRun": {w.cfg.Run}}
	start := time.Now()
	deadline := start.Add(d)
	defer every(time.Second, func() {
		w.send(report{Type: "telemetry-progress", Acked: acked.Load(), SendFail: failed.Load()})
	})()
	var wg sync.WaitGroup
	for _, c := range live {
		wg.Go(func() {
			next := start
			if interval > 0 {
				next = start.Add(rand.N(interval))
			}
			for seq := 1; ; seq++ {
				if interval > 0 {
					if now := time.Now(); next.Before(now) {
						next = now // behind: do not send a burst to catch up
					}
					if !next.Before(deadline) {
						return
					}
					time.Sleep(time.Until(next))
					next = next.Add(interval)
				}
				if !time.Now().Before(deadline) {
					return
				}
				body := []byte(`{"temperature":21.5,"humidity":40,"seq":` + strconv.Itoa(seq) + `}`)
				sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				t0 := time.Now()
				err := c.SendEvent(sctx, body, props)
				t1 := time.Now()
				cancel()
				if err != nil {
					failed.Add(1)
					errs.add(err)
					select {
					case <-c.Done():
						return // the connection is gone
					case <-ctx.Done():
						return
					default:
						continue
					}
				}
				h.Record(t1.Sub(t0))
				if t1.Before(deadline) {
					acked.Add(1)
				} else {
					late.Add(1)
				}
			}
		})
	}
	wg.Wait()
	snap := h.Snapshot()
	w.send(report{Type: "telemetry", Start: start, End: deadline, Acked: acked.Load(), AckedLate: late.Load(),
		SendFail: failed.Load(), Errors: errs.list(), Latency: &snap, Dropped: w.dropped()})
}
