// Command iotedged is the IoT Edge daemon: it provisions the device, runs
// the edge agent's modules on the Moby engine and serves the workload and
// management APIs. It runs under systemd (packaging/systemd) or in the
// foreground.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hatchery/hatchery/internal/edge/daemon"
)

func main() {
	var o daemon.Options
	var level string
	flag.StringVar(&o.ConfigPath, "config", "/etc/aziot/config.toml", "the runtime's configuration")
	flag.StringVar(&o.StateDir, "state-dir", "/var/lib/aziot/edged", "where the identity backup and last deployment are kept")
	flag.StringVar(&o.RunDir, "run-dir", "/var/run/iotedge", "where the management and workload sockets are created")
	flag.StringVar(&o.TPMSocket, "tpm-socket", "/run/aziot/tpmd.sock", `aziot-tpmd's socket; "" opens the TPM in this process`)
	flag.IntVar(&o.HubPort, "hub-port", 8883, "the hub's MQTT port")
	flag.IntVar(&o.HubHTTPSPort, "hub-https-port", 443, "the hub's HTTPS port (X.509 devices read their modules' identities there)")
	flag.StringVar(&o.EngineOwner, "engine-owner", "agent", "the owner label of this runtime's containers")
	flag.DurationVar(&o.HubTokenLifetime, "hub-token-lifetime", time.Hour, "how long the agent's hub tokens last; it connects again with a new one after three quarters of it")
	flag.StringVar(&level, "log-level", "info", "debug, info, warn or error")
	flag.Parse()

	o.Level = new(slog.LevelVar)
	if err := o.Level.UnmarshalText([]byte(level)); err != nil {
		fmt.Fprintf(os.Stderr, "iotedged: --log-level %q: use debug, info, warn or error\n", level)
		os.Exit(2)
	}
	o.Logs = daemon.NewLogBuffer(2000)
	slog.SetDefault(slog.New(o.Logs.Tee(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: o.Level}), o.Level)))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := daemon.New(o).Run(ctx); err != nil {
		slog.Error("iotedged stopped", "error", err)
		os.Exit(1)
	}
}
