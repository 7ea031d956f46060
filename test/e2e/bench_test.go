package e2e

import (
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/moby/mobytest"
)

// BenchmarkEdgeRuntime measures, per iteration on a fresh device, the time
// from `iotedge config apply` to the deployment's module running (TPM
// provisioning through DPS included), and the resident memory of the
// runtime's daemons (iotedged and aziot-tpmd) afterwards.
//
//	go test ./test/e2e -run '^$' -bench EdgeRuntime -benchtime 3x
func BenchmarkEdgeRuntime(b *testing.B) {
	var applyTotal time.Duration
	var rssTotal, pssTotal int
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		d := benchDevice(b)
		b.StartTimer()
		start := time.Now()
		d.mustIotedge("config", "apply")
		d.waitModule("sensor", "running")
		applyTotal += time.Since(start)
		b.StopTimer()
		time.Sleep(2 * time.Second) // let the daemons settle
		edged, tpmd := d.daemon.cmd.Process.Pid, d.tpmd.cmd.Process.Pid
		b.Logf("RSS: iotedged %d KiB, aziot-tpmd %d KiB; PSS: %d KiB, %d KiB",
			memKiB(b, edged, "status", "VmRSS:"), memKiB(b, tpmd, "status", "VmRSS:"),
			memKiB(b, edged, "smaps_rollup", "Pss:"), memKiB(b, tpmd, "smaps_rollup", "Pss:"))
		rssTotal += memKiB(b, edged, "status", "VmRSS:") + memKiB(b, tpmd, "status", "VmRSS:")
		pssTotal += memKiB(b, edged, "smaps_rollup", "Pss:") + memKiB(b, tpmd, "smaps_rollup", "Pss:")
		d.daemon.stop() // the next device reuses the module's name
		d.removeContainers()
	}
	b.ReportMetric(float64(applyTotal.Milliseconds())/float64(b.N), "ms-apply-to-running")
	b.ReportMetric(float64(rssTotal)/float64(b.N)/1024, "MiB-rss-daemons")
	b.ReportMetric(float64(pssTotal)/float64(b.N)/1024, "MiB-pss-daemons")
}

// benchDevice is a device whose deployment waits for it: enrolled, with
// services started and config.toml written, not yet applied.
func benchDevice(b *testing.B) *device {
	t := b
	requireTools(t)
	image := mobytest.New(t).Image("")
	s := startSite(t)
	d := newDevice(t, s)
	regID, ek := provisionInfo(t, d.tcti)
	s.hatchery("enrollment", "create", "--attestation-type", "tpm", "--registration-id", regID,
		"--endorsement-key", ek, "--device-id", "edge-1", "--edge-enabled", "--initial-twin-tags", `{"environment":"prod"}`)
	deploy(t, s, "base", "10", map[string]any{"sensor": module(image, "always")})
	d.startServices()
	d.writeConfig(d.configFromTemplate(regID))
	return d
}

// memKiB reads a kB field of /proc/<pid>/<file>.
func memKiB(b *testing.B, pid int, file, field string) int {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/" + file)
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == field {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	b.Fatalf("no %s in /proc/%d/%s", field, pid, file)
	return 0
}
