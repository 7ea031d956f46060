package loadgen

import (
	"testing"
	"time"
)

// Merged runs summarize their latencies together, and the fleet is enrolled
// when the slowest run has enrolled its devices.
func TestMerge(t *testing.T) {
	run := func(ms, n int, enrollSecs float64, errs map[string]int) *FleetResult {
		var h Histogram
		for range n {
			h.Record(time.Duration(ms) * time.Millisecond)
		}
		return &FleetResult{Devices: n + len(errs), Histogram: h.Snapshot(), EnrollSeconds: enrollSecs, Errors: errs}
	}
	m := merge([]*FleetResult{run(10, 40, 1, nil), run(1, 60, 2, map[string]int{"timeout": 1})})
	near := func(got, want float64) bool { return got > want*0.96 && got < want*1.04 }
	if m.Provisioned != 100 || m.Latency.Count != 100 || !near(m.Latency.P50, 1) || !near(m.Latency.P99, 10) {
		t.Errorf("merged latency %+v, provisioned %d", m.Latency, m.Provisioned)
	}
	if m.Devices != 101 || m.EnrollPerS != 50.5 || m.Errors["timeout"] != 1 {
		t.Errorf("merged %+v", m)
	}
}
