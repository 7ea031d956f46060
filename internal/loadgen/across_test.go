package loadgen

import "testing"

// Merged runs spread the first run's CPU figures, which cover every run,
// over every run's registrations.
func TestMergeSpreadsCPU(t *testing.T) {
	m := merge([]*FleetResult{
		{Provisioned: 100, SimCPUPerReg: 2, ServerCPUPerReg: 1, Seconds: 1},
		{Provisioned: 100, Seconds: 2},
	})
	if m.Provisioned != 200 || m.SimCPUPerReg != 1 || m.ServerCPUPerReg != 0.5 || m.Seconds != 2 {
		t.Fatalf("merged %+v", m)
	}
}
