package loadgen

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// FleetAcross runs cfg's fleet against several replicas of one service at
// once: one run per endpoint, the devices, concurrency and rate split
// between them, registering only when every run has enrolled its devices.
// It counts the enrollments and measures time and CPU (cfg.ServerPIDs' and
// its own) from then until every run is done; the first run draws the
// progress; one run failing stops the others. Interrupted (ctx cancelled),
// it returns what was measured until then with ctx's error.
func FleetAcross(ctx context.Context, cfg FleetConfig, endpoints []string) (*FleetResult, error) {
	if len(endpoints) == 0 || cfg.Devices <= 0 || cfg.Concurrency <= 0 {
		return nil, errors.New("a fleet needs endpoints, devices and concurrency")
	}
	per := (cfg.Devices + len(endpoints) - 1) / len(endpoints)
	runs := min(len(endpoints), (cfg.Devices+per-1)/per) // not more than there are devices for
	results := make([]*FleetResult, runs)
	errs := make([]error, runs+1) // and counting the enrollments
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg, enrolled sync.WaitGroup
	enrolled.Add(runs)
	allEnrolled := make(chan struct{})
	var m *meter
	var count int
	wg.Go(func() {
		enrolled.Wait()
		if runCtx.Err() != nil {
			return // a run ended before enrolling
		}
		if count, errs[runs] = countEnrollments(runCtx, cfg.Service, cfg.Retries); errs[runs] != nil {
			cancel()
			return
		}
		m = startMeter(cfg.ServerPIDs)
		close(allEnrolled)
	})
	var pr *prober
	if cfg.Probe > 0 {
		pr = startProbe(runCtx, cfg, allEnrolled)
	}
	for i, e := range endpoints[:runs] {
		var once sync.Once
		arrived := func() { once.Do(enrolled.Done) } // at the barrier, or out of the run
		run := cfg
		run.Endpoint, run.Devices, run.Prefix = e, min(per, cfg.Devices-i*per), fmt.Sprintf("%s%d-", cfg.Prefix, i)
		run.Concurrency, run.Rate = max(cfg.Concurrency/runs, 1), cfg.Rate/float64(runs)
		run.ServerPIDs, run.Uncounted = nil, true // counted and measured here
		if i > 0 {
			run.Progress = nil
		}
		run.Enrolled = func(ctx context.Context) error {
			arrived()
			select {
			case <-allEnrolled:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		wg.Go(func() {
			defer arrived()
			if results[i], errs[i] = Fleet(runCtx, run); errs[i] != nil {
				cancel()
			}
		})
	}
	wg.Wait()
	probed, probeErrors := pr.stop()
	// The runs that were stopped because another failed say only that.
	if failed := slices.DeleteFunc(errs, func(err error) bool { return err == nil || errors.Is(err, context.Canceled) }); len(failed) > 0 {
		return nil, errors.Join(failed...)
	}
	results = slices.DeleteFunc(results, func(r *FleetResult) bool { return r == nil })
	if m == nil || len(results) == 0 { // interrupted before anything was measured
		return nil, runCtx.Err()
	}
	res := merge(results)
	res.Rate, res.Enrolled = cfg.Rate, count
	res.Probe, res.ProbeErrors = probed, probeErrors
	m.stop(res)
	if err := ctx.Err(); err != nil {
		res.Interrupted = true
		return res, err
	}
	return res, nil
}

// merge adds up the runs against several replicas, all but their time and
// CPU, which are measured across them.
func merge(rs []*FleetResult) *FleetResult {
	m := *rs[0]
	m.Errors, m.HubErrors, m.Histogram = map[string]int{}, map[string]int{}, Snapshot{}
	m.Devices, m.Concurrency, m.StartedPerS, m.Connected, m.Retried = 0, 0, 0, 0, 0
	m.EnrollRetried, m.ConnectRetried, m.Throttled, m.ThrottledWait = 0, 0, 0, 0
	var enrollSecs float64
	for _, r := range rs {
		for k, v := range r.Errors {
			m.Errors[k] += v
		}
		for k, v := range r.HubErrors {
			m.HubErrors[k] += v
		}
		m.Histogram.Merge(r.Histogram)
		m.Devices += r.Devices
		m.Concurrency += r.Concurrency
		m.StartedPerS += r.StartedPerS // the runs start together
		m.Connected += r.Connected
		m.Retried += r.Retried
		m.EnrollRetried += r.EnrollRetried
		m.ConnectRetried += r.ConnectRetried
		m.Throttled += r.Throttled
		m.ThrottledWait += r.ThrottledWait
		enrollSecs = max(enrollSecs, r.EnrollSeconds)
	}
	m.Latency = m.Histogram.Summary()
	m.Provisioned = int(m.Latency.Count)
	// The runs enroll together: the fleet is enrolled when the slowest is.
	m.EnrollSeconds, m.EnrollPerS = enrollSecs, 0
	if enrollSecs > 0 {
		m.EnrollPerS = float64(m.Devices) / enrollSecs
	}
	return &m
}

// prober times a service API request every FleetConfig.Probe while the
// devices register.
type prober struct {
	hist   Histogram
	errors atomic.Int64
	done   chan struct{}
	ended  sync.WaitGroup
}

// startProbe starts probing once the fleet is enrolled (from then on the
// device read exists), until stop.
func startProbe(ctx context.Context, cfg FleetConfig, enrolled <-chan struct{}) *prober {
	p := &prober{done: make(chan struct{})}
	path := "/enrollments/" + cfg.Prefix + "0-0" // the first run's first device
	p.ended.Go(func() {
		select {
		case <-enrolled:
		case <-p.done:
			return
		}
		tick := time.NewTicker(cfg.Probe)
		defer tick.Stop()
		for {
			t0 := time.Now()
			if err := cfg.Service.Do(ctx, "GET", path, "", nil, nil); err != nil {
				p.errors.Add(1)
			} else {
				p.hist.Record(time.Since(t0))
			}
			select {
			case <-tick.C:
			case <-p.done:
				return
			case <-ctx.Done():
				return
			}
		}
	})
	return p
}

// stop ends the probing and returns its latencies (nil without a probe or
// an answer) and how many probes failed.
func (p *prober) stop() (*Latency, int) {
	if p == nil {
		return nil, 0
	}
	close(p.done)
	p.ended.Wait()
	s := p.hist.Snapshot()
	if s.Count() == 0 {
		return nil, int(p.errors.Load())
	}
	l := s.Summary()
	return &l, int(p.errors.Load())
}
