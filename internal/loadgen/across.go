package loadgen

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
)

// FleetAcross runs cfg's fleet against several replicas of one service at
// once: one run per endpoint, the devices, concurrency and rate split
// between them, registering only when every run has enrolled its devices.
// The first run counts the servers' CPU (cfg.ServerPIDs) and draws the
// progress; one run failing stops the others.
func FleetAcross(ctx context.Context, cfg FleetConfig, endpoints []string) (*FleetResult, error) {
	if len(endpoints) == 0 || cfg.Devices <= 0 || cfg.Concurrency <= 0 {
		return nil, errors.New("a fleet needs endpoints, devices and concurrency")
	}
	per := (cfg.Devices + len(endpoints) - 1) / len(endpoints)
	runs := min(len(endpoints), (cfg.Devices+per-1)/per) // not more than there are devices for
	results := make([]*FleetResult, runs)
	errs := make([]error, runs)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg, enrolled sync.WaitGroup
	enrolled.Add(runs)
	allEnrolled := make(chan struct{})
	go func() { enrolled.Wait(); close(allEnrolled) }()
	for i, e := range endpoints[:runs] {
		var once sync.Once
		arrived := func() { once.Do(enrolled.Done) } // at the barrier, or out of the run
		run := cfg
		run.Endpoint, run.Devices, run.Prefix = e, min(per, cfg.Devices-i*per), fmt.Sprintf("%s%d-", cfg.Prefix, i)
		run.Concurrency, run.Rate = max(cfg.Concurrency/runs, 1), cfg.Rate/float64(runs)
		if i > 0 {
			run.ServerPIDs, run.Progress, run.Uncounted = nil, nil, true // the first run counts for all
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
			if results[i], errs[i] = Fleet(ctx, run); errs[i] != nil {
				cancel()
			}
		})
	}
	wg.Wait()
	// The runs that were stopped because another failed say only that.
	if failed := slices.DeleteFunc(errs, func(err error) bool { return err == nil || errors.Is(err, context.Canceled) }); len(failed) > 0 {
		return nil, errors.Join(failed...)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return merge(results), nil
}

// merge adds up the runs against several replicas; the first carries the
// server CPU of all of them.
func merge(rs []*FleetResult) *FleetResult {
	m := *rs[0]
	m.Errors = map[string]int{}
	var secs float64
	for i, r := range rs {
		for k, v := range r.Errors {
			m.Errors[k] += v
		}
		secs = max(secs, r.Seconds)
		if i > 0 {
			m.Devices += r.Devices
			m.Provisioned += r.Provisioned
			m.Connected += r.Connected
			m.Retried += r.Retried
			m.Concurrency += r.Concurrency
			m.Latency.Max = max(m.Latency.Max, r.Latency.Max)
			m.Latency.P99 = max(m.Latency.P99, r.Latency.P99) // the worst replica's
		}
	}
	if len(rs) > 1 {
		// The first run's CPU figures cover every run (one simulator
		// process; the first run carries every server's), so they are
		// spread over every run's registrations. The simulator's was left
		// over the first run's alone, about len(rs) times too high.
		share := float64(rs[0].Provisioned) / float64(max(m.Provisioned, 1))
		m.SimCPUPerReg *= share
		m.ServerCPUPerReg *= share
	}
	m.Seconds = secs
	m.PerSecond = float64(m.Provisioned) / secs
	return &m
}
