package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/loadgen"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/store"
)

// benchCmd is `hatchery bench`: load tests against a running installation.
func benchCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "bench", Short: "Load-test a running Hatchery on this machine"}
	cmd.AddCommand(benchMQTTCmd(), benchMQTTWorkerCmd())
	return cmd
}

func benchMQTTCmd() *cobra.Command {
	var o struct {
		devices, perWorker, mqttPort, serverPID, provisionConc, connectConc int
		fanout, fanoutConc, fanoutLoad                                      int
		prefix                                                              string
		duration, settle, keepAlive                                         time.Duration
		rate, closeRate                                                     float64
		cleanup, verifyStream, x25519                                       bool
	}
	cmd := &cobra.Command{
		Use:   "mqtt",
		Short: "Hold many device connections on the hub's MQTT endpoint and measure memory, telemetry and fan-out",
		Long: `Runs a bounded load test against the hub of the installation in --data-dir,
served by a running ` + "`hatchery serve`" + ` on this machine, over loopback only:

  1. provisions --devices devices (bench-000000, …) through the registry REST API;
  2. connects them over MQTT/TLS with SAS tokens from worker processes (this
     binary again, at most --per-worker connections each), every device
     subscribed to desired-property patches, and reads the server's resident
     memory (VmRSS) before and after: memory per idle connection;
  3. sends QoS 1 telemetry from every connection for --duration and counts the
     acknowledged messages, then the stored ones (events table and event stream);
  4. patches the desired properties of --fanout devices through the REST API and
     times the arrival of each patch at its device (also during step 3 with
     --fanout-under-load).

Devices are kept for the next run unless --cleanup; their keys are derived
from the hub's owner key. Use a scratch data directory: the telemetry stays
in its event stream. Progress goes to stderr, the figures to stdout
(--output json for scripts).`,
		Example: `  hatchery serve --data-dir /tmp/hb --hostname localhost --https-port 9443 --mqtt-port 9883 &
  hatchery bench mqtt --data-dir /tmp/hb --mqtt-port 9883 --devices 19000 --duration 30s`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			started := time.Now()
			logf := func(format string, args ...any) {
				fmt.Fprintf(os.Stderr, "[%6.1fs] %s\n", time.Since(started).Seconds(), fmt.Sprintf(format, args...))
			}
			site, err := loadSite(cmd)
			if err != nil {
				return err
			}
			if !cmd.Flags().Changed("mqtt-port") {
				o.mqttPort = site.HubMQTTPort
			}
			lb, err := site.loopback()
			if err != nil {
				return err
			}
			caPEM := lb.caPEM
			registry, err := azclient.New(site.HubConnectionString, lb.url, "2021-04-12", lb.tls)
			if err != nil {
				return err
			}
			owner, err := sas.ParseConnectionString(site.HubConnectionString)
			if err != nil {
				return err
			}
			pid := o.serverPID
			if pid == 0 {
				var cmdline string
				if pid, cmdline, err = loadgen.FindListener(o.mqttPort); err != nil {
					return fmt.Errorf("finding the server: %w (is `hatchery serve --mqtt-port %d` running?)", err, o.mqttPort)
				}
				if !strings.Contains(" "+cmdline+" ", " serve ") {
					return fmt.Errorf("port %d is served by process %d (%s), not `hatchery serve`: pass --server-pid", o.mqttPort, pid, cmdline)
				}
				logf("server: pid %d (%s)", pid, cmdline)
			}
			exe, err := os.Executable()
			if err != nil {
				return err
			}
			// The telemetry is counted in the store itself, opened beside the server.
			dir, _ := cmd.Flags().GetString("data-dir")
			st, err := store.OpenCurrent(ctx, database(cmd), dir)
			if err != nil {
				return err
			}
			defer st.Close()
			cfg := loadgen.Config{
				Devices: o.devices, PerWorker: o.perWorker, Prefix: o.prefix,
				HubHost: site.HubHostName, MQTTAddr: site.local(strconv.Itoa(o.mqttPort)), CAPEM: caPEM,
				Registry: registry, KeySeed: sas.DeriveDeviceKey(owner.Key, "hatchery bench mqtt"),
				ProvisionConcurrency: o.provisionConc, ConnectConcurrency: o.connectConc, KeepAlive: o.keepAlive, Settle: o.settle, CloseRate: o.closeRate, X25519Only: o.x25519,
				ServerPID: pid, Events: st,
				Telemetry: o.duration, Rate: o.rate, VerifyStream: o.verifyStream,
				FanoutSamples: o.fanout, FanoutConcurrency: o.fanoutConc, FanoutUnderLoad: o.fanoutLoad,
				Cleanup: o.cleanup, Log: logf,
				Start: func(ctx context.Context) (*loadgen.Process, error) { return startBenchWorker(exe) },
			}
			res, err := loadgen.Run(ctx, cfg)
			if err != nil {
				return err
			}
			return renderBench(cmd, benchReport{Started: started.UTC().Format(time.RFC3339), GoVersion: runtime.Version(),
				CPUs: runtime.NumCPU(), MemTotalKiB: memTotalKiB(), Result: res})
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.devices, "devices", 1000, "device connections to open (the hub issue's target is 19000)")
	f.IntVar(&o.perWorker, "per-worker", 9000, "at most this many connections per worker process (each needs as many open files)")
	f.StringVar(&o.prefix, "device-prefix", "bench-", "device IDs are this prefix and a six-digit number")
	f.IntVar(&o.mqttPort, "mqtt-port", 0, "the MQTT port of the running hatchery serve, connected to on 127.0.0.1 (default: the installation's)")
	f.IntVar(&o.serverPID, "server-pid", 0, "the server process, for its memory (default: the process listening on --mqtt-port)")
	f.BoolVar(&o.x25519, "x25519-only", false, "devices offer only an X25519 TLS key share (as OpenSSL before 3.5 and most embedded TLS stacks), not Go's default X25519MLKEM768")
	f.IntVar(&o.provisionConc, "provision-concurrency", 32, "registry requests in flight while provisioning")
	f.IntVar(&o.connectConc, "connect-concurrency", 64, "connections being set up at once, over all workers")
	f.DurationVar(&o.keepAlive, "keepalive", 4*time.Minute, "MQTT keep-alive of each device connection")
	f.DurationVar(&o.settle, "settle", 10*time.Second, "idle time after connecting before the server's memory is read again")
	f.DurationVar(&o.duration, "duration", 30*time.Second, "length of the telemetry phase (0 skips it)")
	f.Float64Var(&o.rate, "rate", 0, "telemetry messages/s over all connections (0: each connection sends again as soon as its message is acknowledged)")
	f.BoolVar(&o.verifyStream, "verify-stream", true, "also count the stored telemetry by reading the event stream API")
	f.IntVar(&o.fanout, "fanout", 1000, "desired-property patches to time on idle connections (0 skips)")
	f.IntVar(&o.fanoutConc, "fanout-concurrency", 1, "desired-property patches in flight at once")
	f.IntVar(&o.fanoutLoad, "fanout-under-load", 200, "desired-property patches spread over the telemetry phase (0: none)")
	f.Float64Var(&o.closeRate, "disconnect-rate", 2000, "disconnections/s at the end, over all workers (0: all at once)")
	f.BoolVar(&o.cleanup, "cleanup", false, "delete the devices at the end")
	return cmd
}

// benchMQTTWorkerCmd is the worker process `bench mqtt` starts.
func benchMQTTWorkerCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "mqtt-worker",
		Short:  "Worker process of `bench mqtt` (reads its configuration on stdin)",
		Hidden: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return loadgen.RunWorker(cmd.Context(), os.Stdin, os.Stdout)
		},
	}
}

// startBenchWorker re-executes this binary as a worker. The worker exits
// when its stdin closes, which also happens if this process dies.
func startBenchWorker(exe string) (*loadgen.Process, error) {
	c := exec.Command(exe, "bench", "mqtt-worker")
	in, err := c.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := c.StdoutPipe()
	if err != nil {
		return nil, err
	}
	c.Stderr = os.Stderr
	if err := c.Start(); err != nil {
		return nil, err
	}
	return &loadgen.Process{In: in, Out: out, Wait: c.Wait, Kill: func() { _ = c.Process.Kill() }, Pid: c.Process.Pid}, nil
}

// benchReport is a run's figures with the machine they were measured on.
type benchReport struct {
	Started     string `json:"started"`
	GoVersion   string `json:"goVersion"`
	CPUs        int    `json:"cpus"`
	MemTotalKiB int64  `json:"memTotalKiB,omitempty"`
	*loadgen.Result
}

func memTotalKiB() int64 {
	data, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "MemTotal:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return n
		}
	}
	return 0
}

func renderBench(cmd *cobra.Command, r benchReport) error {
	if jsonOutput(cmd) {
		return printJSON(r)
	}
	n := func(v int64) string { return loadgen.Thousands(v) }
	lat := func(l loadgen.Latency) string {
		return fmt.Sprintf("p50 %.2f ms, p99 %.2f ms, max %.2f ms (%s samples)", l.P50, l.P99, l.Max, n(int64(l.Count)))
	}
	rows := [][2]string{
		{"Machine", fmt.Sprintf("%d CPUs, %.1f GiB, %s, %s", r.CPUs, float64(r.MemTotalKiB)/(1<<20), r.GoVersion, r.Started)},
		{"Devices / worker processes", fmt.Sprintf("%s / %d", n(int64(r.Devices)), r.Workers)},
		{"Provisioning", fmt.Sprintf("%s created, %s already there, %s re-keyed in %.1f s",
			n(int64(r.Provision.Created)), n(int64(r.Provision.Existing)), n(int64(r.Provision.Updated)), r.Provision.Seconds)},
		{"Connections established", fmt.Sprintf("%s (%d failed) in %.1f s = %.0f/s",
			n(int64(r.Connect.Established)), r.Connect.Failed, r.Connect.Seconds, r.Connect.PerSecond)},
	}
	if m := r.Memory; m != nil {
		rows = append(rows,
			[2]string{"Server RSS before / connected / settled", fmt.Sprintf("%s / %s / %s KiB", n(m.BeforeKiB), n(m.ConnectedKiB), n(m.SettledKiB))},
			[2]string{"Server memory per idle connection", fmt.Sprintf("%.1f KiB right after connecting, %.1f KiB after %.0f s idle (RSS growth / connections)",
				m.PerConnectionConnectedKiB, m.PerConnectionKiB, m.SettleSeconds)})
	}
	if t := r.Telemetry; t != nil {
		rows = append(rows,
			[2]string{"Telemetry acknowledged", fmt.Sprintf("%s in %.1f s = %.0f messages/s (+%s in flight at the end, %d failed)",
				n(t.Acked), t.Seconds, t.PerSecond, n(t.AckedLate), t.Failed)},
			[2]string{"Telemetry ack latency", lat(t.Latency)},
			[2]string{"Stored (store / event stream API)", fmt.Sprintf("%s / %s, %d acknowledged but missing", n(t.Stored), n(t.StoredStream), t.Missing)})
		if t.ServerCPUPerMessageUS > 0 {
			rows = append(rows, [2]string{"Server CPU per message", fmt.Sprintf("%.1f µs", t.ServerCPUPerMessageUS)})
		}
		if t.ServerDiskWriteBytes > 0 {
			rows = append(rows, [2]string{"Server storage writes", fmt.Sprintf("%s MiB = %.0f bytes per message", n(t.ServerDiskWriteBytes>>20), t.ServerDiskBytesPerMessage)})
		}
		if c := t.CPU; c != nil {
			rows = append(rows, [2]string{"CPU during telemetry", fmt.Sprintf("%.1f s wall × %d cores: server %.1f s, load generator %.1f s, other processes %.1f s, idle %.1f s",
				c.Wall, c.Cores, c.Server, c.Loadgen, c.Other, c.Idle)})
		}
		if m := r.Memory; m != nil && m.AfterTelemetryKiB > 0 {
			rows = append(rows, [2]string{"Server RSS after telemetry", n(m.AfterTelemetryKiB) + " KiB"})
		}
	}
	if f := r.Fanout; f != nil {
		rows = append(rows, [2]string{"Desired fan-out, idle", fmt.Sprintf("%s; %d/%d received", lat(f.Latency), f.Received, f.Sent)})
	}
	if f := r.FanoutUnderLoad; f != nil {
		rows = append(rows, [2]string{"Desired fan-out, under telemetry", fmt.Sprintf("%s; %d/%d received", lat(f.Latency), f.Received, f.Sent)})
	}
	rows = append(rows, [2]string{"Connections dropped by the server", strconv.Itoa(r.Dropped)})
	if r.Deleted > 0 {
		rows = append(rows, [2]string{"Devices deleted", n(int64(r.Deleted))})
	}
	if err := render(cmd, r, rows); err != nil {
		return err
	}
	if r.Telemetry != nil && r.Telemetry.Missing > 0 {
		return errors.New("acknowledged telemetry is missing from the event stream")
	}
	return nil
}
