package main

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net/url"
	"os"
	"os/signal"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/loadgen"
)

func fleetCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "fleet", Short: "Simulate fleets of devices against a running Hatchery"}
	cmd.AddCommand(fleetSimulateCmd())
	return cmd
}

func fleetSimulateCmd() *cobra.Command {
	var o struct {
		devices, concurrency, keyPool, mqttPort int
		retries                                 int
		rate                                    float64
		probe                                   time.Duration
		attestation, prefix                     string
		replicas                                []string
		serverPIDs                              []int
		skipEnroll, connect, x25519             bool
	}
	cmd := &cobra.Command{
		Use:   "simulate",
		Short: "Enroll and provision many simulated devices, and measure it",
		Long: `Simulates --devices devices of the installation in --data-dir, served by a
running ` + "`hatchery serve`" + ` on this machine:

  1. enrolls them with the bulk API (sim-0-0, sim-0-1, …: --prefix, the
     replica's number, the device's; skip with --skip-enroll);
  2. provisions them, --concurrency at a time, each over its own new TLS
     connection, as real devices do: TPM devices with a software TPM doing the
     device half of the attestation (two credential activations, four RSA-2048
     private-key operations), symmetric-key devices with their keys;
  3. optionally (--connect) connects each device to its hub over MQTT.

It reports registrations per second, latency percentiles, failures by kind and
the CPU milliseconds per registration of the server (from its own accounting in
/proc) and of the simulator. RSA key generation is slow, so TPM devices share
--key-pool endorsement/storage key pairs; the server's work is the same.
--replicas spreads devices over several servers on one database. --probe times
an operator's request (reading an enrollment) while the devices register.`,
		Example: `  hatchery fleet simulate --data-dir /tmp/hb --devices 10000 --attestation tpm
  hatchery fleet simulate --data-dir /tmp/hb --devices 100000 --concurrency 256 -o json`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			if os.Getenv("GOGC") == "" {
				// A short-lived load tool: trade memory for CPU, which the
				// server on the same machine needs.
				debug.SetGCPercent(400)
			}
			site, err := loadSite(cmd)
			if err != nil {
				return err
			}
			if !cmd.Flags().Changed("mqtt-port") {
				o.mqttPort = site.HubMQTTPort
			}
			att := map[string]string{"tpm": dps.AttestationTPM, "symmetrickey": dps.AttestationSymmetricKey}[strings.ToLower(o.attestation)]
			if att == "" {
				return fmt.Errorf("--attestation %q: use tpm or symmetrickey", o.attestation)
			}
			if att == dps.AttestationTPM && o.skipEnroll {
				return errors.New("--skip-enroll works with symmetric keys only: simulated TPMs get new keys on each run")
			}
			lb, err := site.loopback()
			if err != nil {
				return err
			}
			tlsConf := lb.tls
			endpoints := o.replicas
			if len(endpoints) == 0 {
				endpoints = []string{lb.url}
			}
			pids := o.serverPIDs
			if len(pids) == 0 {
				for _, e := range endpoints {
					u, err := url.Parse(e)
					if err != nil {
						return fmt.Errorf("--replicas %q: %w", e, err)
					}
					if port, err := strconv.Atoi(portOf(u)); err == nil {
						if pid, _, err := loadgen.FindListener(port); err == nil {
							pids = append(pids, pid)
						}
					}
				}
			}
			svc, err := azclient.New(site.ProvisioningServiceConnectionString, endpoints[0], "2021-10-01", tlsConf.Clone())
			if err != nil {
				return err
			}
			if o.devices <= 0 || o.concurrency <= 0 {
				return errors.New("--devices and --concurrency must be positive")
			}
			res, err := loadgen.FleetAcross(ctx, loadgen.FleetConfig{IDScope: site.IDScope, Service: svc, TLS: tlsConf,
				Devices: o.devices, Attestation: att, Prefix: o.prefix, Seed: []byte(o.prefix),
				Concurrency: o.concurrency, KeyPool: o.keyPool, SkipEnroll: o.skipEnroll, Connect: o.connect,
				HubPort: o.mqttPort, X25519Only: o.x25519, Rate: o.rate, Retries: o.retries,
				ServerPIDs: pids, Progress: cmd.ErrOrStderr(), Probe: o.probe}, endpoints)
			if res == nil {
				return err
			}
			return renderFleet(cmd, res)
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.devices, "devices", 1000, "how many devices")
	f.StringVar(&o.attestation, "attestation", "symmetrickey", "tpm or symmetrickey")
	f.IntVar(&o.concurrency, "concurrency", 64, "devices registering at once")
	f.Float64Var(&o.rate, "rate", 0, "start this many devices per second instead of as many as --concurrency allows")
	f.IntVar(&o.keyPool, "key-pool", 64, "TPM: endorsement/storage key pairs shared among the devices")
	f.StringVar(&o.prefix, "prefix", "sim-", "registration ID prefix")
	f.BoolVar(&o.skipEnroll, "skip-enroll", false, "the devices are enrolled already (by a run with the same --prefix)")
	f.BoolVar(&o.connect, "connect", false, "connect each provisioned device to its hub over MQTT")
	f.IntVar(&o.mqttPort, "mqtt-port", 0, "the hub's MQTT port, with --connect (default: the installation's)")
	f.StringSliceVar(&o.replicas, "replicas", nil, "service URLs of several replicas (default: the installation's, over loopback)")
	f.IntVar(&o.retries, "retries", 0, "how often a failed bulk enrollment call, registration or hub connection is tried again, after 1, 2, 4 … s")
	f.BoolVar(&o.x25519, "x25519", false, "offer only an X25519 key share, as device TLS stacks without ML-KEM do")
	f.IntSliceVar(&o.serverPIDs, "server-pid", nil, "server processes whose CPU to count (default: those listening on the service ports)")
	f.DurationVar(&o.probe, "probe", 0, "time a service API request (reading an enrollment) this often while the devices register, e.g. 100ms")
	return cmd
}

func renderFleet(cmd *cobra.Command, r *loadgen.FleetResult) error {
	perReg, timed := "registration", ""
	if r.Connect {
		perReg, timed = "registration and hub connection", ", hub connections included"
	}
	rows := [][2]string{
		{"Devices", fmt.Sprintf("%d %s, %d at a time%s", r.Devices, r.Attestation, r.Concurrency, rateText(r.Rate, r.StartedPerS))},
		{"Enrollments in the service", strconv.Itoa(r.Enrolled)},
		{"Provisioned", fmt.Sprintf("%d in %.1f s%s: %.0f registrations/s", r.Provisioned, r.Seconds, timed, r.PerSecond)},
		{"Registration latency", fmt.Sprintf("p50 %.1f ms, p99 %.1f ms, max %.1f ms", r.Latency.P50, r.Latency.P99, r.Latency.Max)},
		{"Server CPU per " + perReg, orDash(cmp.Or(msText(r.ServerCPUPerReg), r.ServerCPUNote))},
		{"Simulator CPU per " + perReg, orDash(msText(r.SimCPUPerReg))},
	}
	if r.BehindRate() {
		rows = append(rows, [2]string{"Warning", fmt.Sprintf("devices started at %.0f/s, not %.0f/s: every worker was busy; the latencies include the wait for one", r.StartedPerS, r.Rate)})
	}
	if r.EnrollPerS > 0 {
		rows = append(rows, [2]string{"Enrollment (bulk)", fmt.Sprintf("%.0f/s", r.EnrollPerS)})
	}
	if p := r.Probe; p != nil || r.ProbeErrors > 0 {
		text := fmt.Sprintf("%d failed", r.ProbeErrors)
		if p != nil {
			text = fmt.Sprintf("%d requests: p50 %.1f ms, p99 %.1f ms, max %.1f ms; %s", p.Count, p.P50, p.P99, p.Max, text)
		}
		rows = append(rows, [2]string{"Service API while registering", text})
	}
	if r.Throttled > 0 {
		rows = append(rows, [2]string{"Throttled (HTTP 429)", fmt.Sprintf("%d answers, %.1f s waited out", r.Throttled, r.ThrottledWait)})
	}
	for _, n := range []struct {
		what string
		n    int
	}{{"Bulk enrollment calls tried again", r.EnrollRetried}, {"Registrations tried again", r.Retried}, {"Hub connections tried again", r.ConnectRetried}} {
		if n.n > 0 {
			rows = append(rows, [2]string{n.what, strconv.Itoa(n.n)})
		}
	}
	if r.Connect {
		rows = append(rows, [2]string{"Connected to the hub", strconv.Itoa(r.Connected)})
	}
	rows = append(rows, failureRows(r.Errors)...)
	rows = append(rows, failureRows(r.HubErrors)...)
	if r.Interrupted {
		rows = append(rows, [2]string{"Interrupted", "the figures cover the devices done until then"})
	}
	if err := render(cmd, r, rows); err != nil {
		return err
	}
	switch {
	case r.Interrupted:
		return errors.New("interrupted")
	case r.Provisioned < r.Devices:
		return errors.New(strconv.Itoa(r.Devices-r.Provisioned) + " devices were not provisioned")
	case r.Connect && r.Connected < r.Provisioned:
		return errors.New(strconv.Itoa(r.Provisioned-r.Connected) + " provisioned devices did not connect to their hub")
	}
	return nil
}

// failureRows lists failures by kind, sorted.
func failureRows(kinds map[string]int) [][2]string {
	var rows [][2]string
	for _, k := range slices.Sorted(maps.Keys(kinds)) {
		rows = append(rows, [2]string{"Failed: " + k, strconv.Itoa(kinds[k])})
	}
	return rows
}

func rateText(rate, started float64) string {
	if rate <= 0 {
		return ""
	}
	if started <= 0 {
		return fmt.Sprintf(", started at %.0f/s", rate)
	}
	return fmt.Sprintf(", started at %.0f/s (asked for %.0f/s)", started, rate)
}

func msText(ms float64) string {
	if ms <= 0 {
		return ""
	}
	return fmt.Sprintf("%.3f ms", ms)
}
