package main

import (
	"cmp"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/hatchery/hatchery/internal/connlimit"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/fileowner"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/hubclient"
	"github.com/hatchery/hatchery/internal/mqtt"
	"github.com/hatchery/hatchery/internal/pki"
	"github.com/hatchery/hatchery/internal/sdnotify"
	"github.com/hatchery/hatchery/internal/server"
	"github.com/hatchery/hatchery/internal/store"
	"github.com/hatchery/hatchery/internal/tlsrefusal"
)

// endpointFile records where `serve` listens, for `info` and the CLI.
const endpointFile = "endpoint.json"

type endpoint struct {
	HostName  string `json:"hostName"`
	HTTPSPort int    `json:"httpsPort"`
	MQTTPort  int    `json:"mqttPort,omitempty"` // absent in files written before it was recorded: 8883
	CACert    string `json:"caCertificate"`
	// ExternalDatabase says the server keeps its state in PostgreSQL, not
	// in the data directory (the URL, with its password, is not written).
	ExternalDatabase bool `json:"externalDatabase,omitempty"`
	// Listen is the address serve listens on, "" for all of them: where
	// the CLI on this machine reaches it, whether or not the host name
	// resolves here.
	Listen string `json:"listen,omitempty"`
}

func (e endpoint) url() string {
	if e.HTTPSPort == 443 {
		return "https://" + e.HostName
	}
	return "https://" + e.HostName + ":" + strconv.Itoa(e.HTTPSPort)
}

// serveOptions are serve's flags.
type serveOptions struct {
	dir, database, host, listen, certFile, keyFile, caFile string
	webhookCA                                              string
	port, mqttPort                                         int
	registrationRate, deviceRate                           float64
	deviceBurst                                            int
	eventRetention                                         time.Duration
	webhookTimeout                                         time.Duration
	messageKiBPerSecond                                    float64
	maxHTTPSConns, maxMQTTConns, maxMQTTUnauthenticated    int
	newCA                                                  bool
	tlsNames                                               []string
}

func serveCmd() *cobra.Command {
	var o serveOptions
	var logLevel string
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the provisioning service and the IoT hub",
		Long: "Runs the Device Provisioning Service and the IoT hub on one HTTPS port.\n" +
			"On first start it creates the data directory, a local CA and a server certificate\n" +
			"for --hostname, localhost, the loopback addresses and --tls-name's names, the ID scope\n" +
			"and the access policies.",
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.database = database(cmd)
			var level slog.Level
			if err := level.UnmarshalText([]byte(logLevel)); err != nil {
				return fmt.Errorf("--log-level %q: use debug, info, warn or error", logLevel)
			}
			slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})))
			return serve(cmd.Context(), o)
		},
	}
	// Its own --data-dir: the CLI's default may be the package's service's.
	cmd.Flags().StringVar(&o.dir, "data-dir", userDataDir(), "directory holding the database, TLS material and settings")
	h, _ := os.Hostname()
	cmd.Flags().StringVar(&o.host, "hostname", h, "host name devices and SDKs use for the provisioning service and the hub")
	cmd.Flags().IntVar(&o.port, "https-port", 443, "HTTPS port (the Azure SDKs expect 443)")
	cmd.Flags().IntVar(&o.mqttPort, "mqtt-port", 8883, "MQTT over TLS port of the hub's device endpoint (the Azure SDKs expect 8883)")
	cmd.Flags().StringVar(&o.listen, "listen", "", "address to listen on (default: all addresses)")
	cmd.Flags().StringVar(&o.certFile, "tls-cert", "", "server certificate PEM (default: issued by the local CA)")
	cmd.Flags().StringVar(&o.keyFile, "tls-key", "", "server key PEM, with --tls-cert")
	cmd.Flags().StringSliceVar(&o.tlsNames, "tls-name", nil, "another host name or IP address devices reach this server by, for the local CA's certificate (repeat, or separate with commas)")
	cmd.Flags().BoolVar(&o.newCA, "new-ca", false, "make this server's local CA the one the database's devices trust, although they trust another: a new one if tls/ has none, else the one there (every device must then be given its certificate); for one start, not to keep in the options")
	cmd.Flags().StringVar(&o.caFile, "tls-ca", "", "with --tls-cert: the CA certificate PEM that issued it, which devices and the CLI trust (default: the system's CAs)")
	cmd.Flags().DurationVar(&o.webhookTimeout, "webhook-timeout", 10*time.Second, "how long a custom allocation webhook has to answer, each time a device registers (the device's registration request waits for it)")
	cmd.Flags().StringVar(&o.webhookCA, "webhook-ca", "", "PEM of the CA certificates that custom allocation webhooks' TLS certificates come from, trusted besides the system's")
	cmd.Flags().StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	cmd.Flags().Float64Var(&o.registrationRate, "registration-rate", 10000, "device registrations admitted per second in total, beyond which devices are told to retry later (0: no limit)")
	cmd.Flags().Float64Var(&o.deviceRate, "device-rate", 1, "requests per second one registration ID may make after its burst (0: no limit)")
	cmd.Flags().IntVar(&o.deviceBurst, "device-burst", 10, "requests one registration ID may make at once")
	cmd.Flags().IntVar(&o.maxHTTPSConns, "max-https-connections", 4096, "HTTPS connections open at once, so that a flood of clients cannot take every file descriptor from the MQTT devices: past it, the connection idle longest (or still to send its first request) is closed for a new client once it has been idle 5 s, and the new client waits while none has (MQTT over WebSocket counts until the upgrade, then among --max-mqtt-connections)")
	cmd.Flags().IntVar(&o.maxMQTTConns, "max-mqtt-connections", 0, "MQTT connections open at once, on the MQTT port and over WebSocket together; past it new ones are closed at once (default: the open-file limit less --max-https-connections and 256 for the rest)")
	cmd.Flags().IntVar(&o.maxMQTTUnauthenticated, "max-mqtt-unauthenticated", 0, "MQTT connections not authenticated open at once (yet to send CONNECT, or registration sessions without credentials): past it, or at --max-mqtt-connections, the oldest of them (if it has been so for 5 s) is closed for a new connection, which is refused otherwise; 0: a quarter of --max-mqtt-connections, at least 1024")
	cmd.Flags().Float64Var(&o.messageKiBPerSecond, "device-message-rate", 64, "KiB per second of device-to-cloud messages one device may send on average, in bursts of 16 s worth; beyond it HTTPS answers 429 and MQTT holds the message (up to 30 s, then disconnects) (0: no limit)")
	cmd.Flags().DurationVar(&o.eventRetention, "event-retention", 24*time.Hour, "how long device-to-cloud messages are kept for readers of the event stream (0: forever)")
	return cmd
}

func serve(ctx context.Context, o serveOptions) error {
	if err := o.check(); err != nil {
		return err
	}
	if err := os.MkdirAll(o.dir, 0o700); err != nil {
		return fmt.Errorf("creating data directory: %w", err)
	}
	dir, err := filepath.Abs(o.dir) // endpoint.json's paths serve the CLI from anywhere
	if err != nil {
		return err
	}
	o.dir = dir
	fi, err := os.Stat(o.dir)
	if err != nil {
		return err
	}
	if err := rootMayServe(o.dir, fi); err != nil {
		return err
	}
	if fi.Mode().Perm()&0o077 != 0 {
		slog.Warn("the data directory holds the CA key and every device's keys, and others may read it: chmod 700 it",
			"dir", o.dir, "mode", fi.Mode().Perm().String())
	}
	unlock, err := lockFile(filepath.Join(o.dir, serveLock), "data directory "+o.dir)
	if err != nil {
		return err
	}
	defer unlock()
	unlockDB, err := lockDatabase(o.database, o.dir)
	if err != nil {
		return err
	}
	defer unlockDB()
	// Whatever refuses to start does so before the database is opened,
	// which upgrades its schema for good.
	if err := checkCA(ctx, o); err != nil {
		return err
	}
	tlsConfig, caFile, err := serverTLS(o)
	if err != nil {
		return err
	}
	st, err := store.Open(ctx, o.database, o.dir)
	if err != nil {
		return err
	}
	defer st.Close()
	if err := recordCA(ctx, st, o); err != nil {
		return err
	}
	hubSvc, dpsSvc, err := openServices(ctx, o, st, caFile)
	if err != nil {
		return err
	}
	ln, mqttLn, err := listen(o, tlsConfig)
	if err != nil {
		return err
	}
	// Written once both ports are this server's: the CLI finds it by this file.
	ep, _ := json.MarshalIndent(endpoint{HostName: o.host, HTTPSPort: o.port, MQTTPort: o.mqttPort, CACert: caFile, ExternalDatabase: o.database != "", Listen: o.listen}, "", "  ")
	if err := os.WriteFile(filepath.Join(o.dir, endpointFile), ep, 0o644); err != nil {
		ln.Close()
		mqttLn.Close()
		return err
	}
	return run(ctx, o, hubSvc, dpsSvc, tlsConfig, ln, mqttLn)
}

// lockDatabase locks the SQLite file database names (nothing for
// PostgreSQL), not only the data directory: another server's --database
// may name this one's file, directly or by a symlink, so the lock is taken
// beside the file the path resolves to.
func lockDatabase(database, dir string) (unlock func(), err error) {
	path, err := store.SQLitePath(database, dir)
	if err != nil || path == "" {
		return func() {}, err
	}
	if real, err := filepath.EvalSymlinks(path); err == nil { // a new file has no links yet
		path = real
	}
	return lockFile(path+".lock", "database "+path)
}

// rootMayServe keeps root from serving a data directory that another
// user's server serves, such as the package's service, user hatchery, in
// /var/lib/hatchery: the files root would create there (locks, a renewed
// certificate) would keep that server from starting again.
func rootMayServe(dir string, fi os.FileInfo) error {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if os.Geteuid() != 0 || !ok || st.Uid == 0 {
		return nil
	}
	hint := "run serve as that user, or serve another --data-dir"
	if isPackagedDataDir(dir) {
		hint = "it is the hatchery service's: `sudo systemctl start hatchery` serves it, as user hatchery"
	}
	return fmt.Errorf("the data directory %s is not root's (%s): %s", dir, fileowner.Describe(fi), hint)
}

func (o *serveOptions) check() error {
	switch {
	case o.host == "":
		return errors.New("--hostname is empty: give the name devices will use to reach this server")
	case o.maxHTTPSConns < 1:
		return errors.New("--max-https-connections must be at least 1")
	case o.maxMQTTConns < 0:
		return errors.New("--max-mqtt-connections must be at least 1, or 0 for what the open-file limit leaves")
	case o.maxMQTTUnauthenticated < 0:
		return errors.New("--max-mqtt-unauthenticated must be at least 1, or 0 for a quarter of --max-mqtt-connections")
	case o.webhookTimeout <= 0:
		return errors.New("--webhook-timeout must be more than 0: give a duration such as 10s")
	case o.eventRetention < 0:
		return errors.New("--event-retention is negative: give a duration such as 24h, or 0 to keep messages forever")
	case (o.certFile == "") != (o.keyFile == ""):
		return errors.New("--tls-cert and --tls-key go together")
	case o.caFile != "" && o.certFile == "":
		return errors.New("--tls-ca goes with --tls-cert: without it, the local CA issues the server certificate")
	case len(o.tlsNames) > 0 && o.certFile != "":
		return errors.New("--tls-name is for the local CA's certificate: with --tls-cert, the names are your certificate's")
	case slices.Contains(o.tlsNames, ""):
		return errors.New("--tls-name is empty: give a host name or an IP address")
	}
	return nil
}

// openServices opens the hub and the provisioning service on st, the hub
// linked to the provisioning service.
func openServices(ctx context.Context, o serveOptions, st store.Store, caFile string) (*hub.Service, *dps.Service, error) {
	roots, err := pki.Roots(caFile) // linked hubs may be other servers with this CA
	if err != nil {
		return nil, nil, err
	}
	hubSvc, err := hub.Open(ctx, st, o.host)
	if err != nil {
		return nil, nil, err
	}
	if err := hubSvc.SweepLeftovers(ctx); err != nil {
		return nil, nil, err
	}
	// Each linked hub is verified by the name in its endpoint URL.
	registry := &hubclient.Pool{TLS: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}, Local: hubSvc}
	dpsSvc, err := dps.Open(ctx, st, registry, o.host)
	if err != nil {
		return nil, nil, err
	}
	// One set of CA certificates serves both: X.509 groups may reference them.
	dpsSvc.CAs = hubSvc
	dpsSvc.Throttle = dps.NewThrottle(o.registrationRate, o.deviceRate, o.deviceBurst)
	dpsSvc.WebhookTimeout = o.webhookTimeout
	if o.webhookCA != "" {
		webhookRoots, err := pki.Roots(o.webhookCA)
		if err != nil {
			return nil, nil, fmt.Errorf("--webhook-ca: %w", err)
		}
		dpsSvc.Webhooks = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: webhookRoots, MinVersion: tls.VersionTLS12}}}
	}
	hubSvc.MessageBytes = hub.NewMessageLimit(o.messageKiBPerSecond * 1024)
	if err := linkOwnHub(ctx, dpsSvc, hubSvc, o.port); err != nil {
		return nil, nil, err
	}
	return hubSvc, dpsSvc, nil
}

// httpErrorLog is the HTTPS server's error log. Its TLS handshake
// failures (port probes, scanners) are noise at info level, but for
// clients refusing the certificate, which tlsrefusal warns of.
type httpErrorLog struct{}

func (httpErrorLog) Write(p []byte) (int, error) {
	if line := strings.TrimSpace(string(p)); !tlsrefusal.Note("https", errors.New(line)) {
		slog.Debug(line)
	}
	return len(p), nil
}

// listen takes the HTTPS and the MQTT port.
func listen(o serveOptions, tlsConfig *tls.Config) (https, mqttLn net.Listener, err error) {
	https, err = net.Listen("tcp", net.JoinHostPort(o.listen, strconv.Itoa(o.port)))
	if err != nil {
		return nil, nil, fmt.Errorf("listening on port %d: %w (%spass --https-port to use another)", o.port, err, privilegedHint(o.port))
	}
	mqttLn, err = tls.Listen("tcp", net.JoinHostPort(o.listen, strconv.Itoa(o.mqttPort)), tlsConfig)
	if err != nil {
		https.Close()
		return nil, nil, fmt.Errorf("listening on MQTT port %d: %w (%spass --mqtt-port to use another)", o.mqttPort, err, privilegedHint(o.mqttPort))
	}
	return connlimit.Listen("https", https, o.maxHTTPSConns), mqttLn, nil
}

// run serves both ports and the background work until SIGINT or SIGTERM,
// or until the MQTT port fails, which would leave the server half there.
func run(ctx context.Context, o serveOptions, hubSvc *hub.Service, dpsSvc *dps.Service, tlsConfig *tls.Config, ln, mqttLn net.Listener) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	maxMQTT := maxMQTTConns(o)
	devices := &mqtt.Server{Handler: server.NewDeviceEndpointWithDPS(hubSvc, dpsSvc), Logger: slog.Default(),
		MaxConns: maxMQTT, MaxUnauthenticated: cmp.Or(o.maxMQTTUnauthenticated, max(maxMQTT/4, 1024))}
	mqttErr := make(chan error, 1)
	go func() {
		if err := devices.Serve(mqttLn); err != nil && !errors.Is(err, mqtt.ErrServerClosed) {
			mqttErr <- fmt.Errorf("the MQTT port stopped: %w", err)
			stop()
		}
	}()
	srv := &http.Server{Handler: server.New(dpsSvc, hubSvc, devices), TLSConfig: tlsConfig,
		// A request, body included, arrives within 30 s (SDK bodies are at
		// most 1 MiB), so clients trickling bytes cannot hold connections.
		ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second, IdleTimeout: 2 * time.Minute,
		ErrorLog: log.New(httpErrorLog{}, "", 0),
		// At the HTTPS bound, a connection waiting for a request (idle
		// keep-alive, or not yet sent its first) is closed for a new
		// client; one serving a request is not. A connection upgraded to
		// MQTT over WebSocket leaves the HTTPS bound: it lasts as long as
		// the device stays, and is an MQTT connection from then on.
		ConnState: func(c net.Conn, s http.ConnState) {
			switch s {
			case http.StateActive:
				connlimit.Active(c)
			case http.StateIdle:
				connlimit.Idle(c)
			case http.StateHijacked:
				connlimit.Release(c)
			}
		}}
	if o.eventRetention > 0 {
		go hubSvc.ExpireEvents(ctx, o.eventRetention)
	}
	go hubSvc.RelaySignals(ctx)
	go dpsSvc.KeepLeaving(ctx)
	go hubSvc.Heartbeat(ctx)
	go hubSvc.EvaluateConfigurations(ctx)
	go hubSvc.SweepC2D(ctx)
	jobsStopped := make(chan struct{}) // jobs hand themselves back before the store closes
	go func() { hubSvc.RunJobs(ctx); close(jobsStopped) }()
	// Stopping lets requests in flight finish (a direct method among them
	// needs its device still connected), then closes the device
	// connections, recording them disconnected, before the store closes.
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		<-ctx.Done()
		_ = sdnotify.Stopping()
		slog.Info("hatchery stopping: finishing requests in flight for up to 5 s, then closing device connections")
		shut, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(shut); err != nil {
			_ = srv.Close()
		}
		_ = devices.Close()
	}()
	slog.Info("hatchery serving", "version", Version, "https", ln.Addr().String(), "mqtt", mqttLn.Addr().String(), "maxMqttConnections", maxMQTT, "hostname", o.host, "idScope", dpsSvc.IDScope(), "dataDir", o.dir)
	if err := sdnotify.Ready(); err != nil {
		slog.Warn("could not tell systemd the server is ready", "err", err)
	}
	if err := srv.ServeTLS(ln, "", ""); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	<-stopped
	<-jobsStopped
	select {
	case err := <-mqttErr:
		return err
	default:
		return nil
	}
}

// fileReserve is what the open-file limit keeps beside the HTTPS and MQTT
// connections: the database and its pool, the listeners, connections out
// (linked hubs, webhooks), connections closed and not yet gone.
const fileReserve = 256

// maxMQTTConns is --max-mqtt-connections, or what the open-file limit
// leaves beside --max-https-connections and fileReserve: a flood of MQTT
// clients then meets its own bound rather than the process's, at which
// every accept fails, HTTPS and MQTT alike.
func maxMQTTConns(o serveOptions) int {
	if o.maxMQTTConns > 0 {
		return o.maxMQTTConns
	}
	// The Go runtime has raised the soft limit to the hard one already.
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		slog.Warn("cannot read the open-file limit: MQTT connections are not bounded; set --max-mqtt-connections", "error", err)
		return 0
	}
	files := int(min(l.Cur, math.MaxInt32))
	n := files - o.maxHTTPSConns - fileReserve
	if n < files/2 {
		n = files / 2
		slog.Warn("the open-file limit leaves little beside --max-https-connections: raise it (LimitNOFILE= for systemd) or lower --max-https-connections",
			"openFiles", files, "maxHttpsConnections", o.maxHTTPSConns, "maxMqttConnections", n)
	}
	return n
}

// privilegedHint explains a refused port below 1024.
func privilegedHint(port int) string {
	if port < 1024 {
		return "ports below 1024 need root or CAP_NET_BIND_SERVICE; "
	}
	return ""
}
