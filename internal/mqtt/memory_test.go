package mqtt

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestIdleConnectionMemory reports the server's heap and stack bytes per idle
// connection. The clients run in a child process (this test binary again) so
// that only the server's memory is counted. Kernel socket buffers are not
// included. Opt in with HATCHERY_MEMTEST=1; HATCHERY_MEMTEST_CONNS sets the
// number of connections (default 2000; the file descriptor limit must allow
// it).
func TestIdleConnectionMemory(t *testing.T) {
	if os.Getenv("HATCHERY_MEMTEST") != "1" {
		t.Skip("set HATCHERY_MEMTEST=1 to measure memory per idle connection (opens 2000 connections)")
	}
	n := 2000
	if s := os.Getenv("HATCHERY_MEMTEST_CONNS"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil || n <= 0 {
			t.Fatalf("HATCHERY_MEMTEST_CONNS=%q: want a positive number", s)
		}
	}
	// Go's TLS client offers an X25519MLKEM768 key share, which makes its
	// ClientHello about 1.2 KB bigger; crypto/tls keeps buffers of that size
	// for the connection's lifetime. Clients offering X25519 alone (OpenSSL
	// before 3.5, for one) cost less.
	for _, mode := range []string{"tls-mlkem", "tls-x25519", "tcp"} {
		t.Run(mode, func(t *testing.T) { measureIdle(t, n, mode) })
	}
}

func measureIdle(t *testing.T, n int, mode string) {
	useTLS := mode != "tcp"
	h := &benchHandler{}
	ts := startServer(t, h, useTLS, func(s *Server) { s.Logger = slog.New(slog.DiscardHandler) })
	caFile := ""
	if useTLS {
		caFile = filepath.Join(t.TempDir(), "ca.pem")
		srvConf, _ := testTLSConfigs(t) // the server's self-signed certificate
		der := srvConf.Certificates[0].Certificate[0]
		if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	before := settledMemStats()
	cmd := exec.Command(os.Args[0], "-test.run=^TestMemtestClientProcess$", "-test.v")
	cmd.Env = append(os.Environ(),
		"HATCHERY_MEMTEST_CLIENT="+ts.addr,
		"HATCHERY_MEMTEST_CLIENT_CONNS="+strconv.Itoa(n),
		"HATCHERY_MEMTEST_CLIENT_CA="+caFile,
		"HATCHERY_MEMTEST_CLIENT_X25519="+strconv.FormatBool(mode == "tls-x25519"))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		stdin.Close()
		cmd.Wait()
	}()
	sc := bufio.NewScanner(stdout)
	ready := false
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "READY") {
			ready = true
			break
		}
		t.Log("client: " + line)
	}
	if !ready {
		t.Fatal("client process failed")
	}
	go func() {
		for sc.Scan() {
		}
	}()
	for h.accepted.Load() != int64(n) {
		if time.Since(start) > 2*time.Minute {
			t.Fatalf("%d of %d connections accepted", h.accepted.Load(), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("%d connections set up in %v", n, time.Since(start).Round(time.Millisecond))
	after := settledMemStats()

	per := func(a, b uint64) float64 { return (float64(a) - float64(b)) / float64(n) }
	heap := per(after.HeapAlloc, before.HeapAlloc)
	stack := per(after.StackInuse, before.StackInuse)
	t.Logf("per idle connection: %.0f bytes = %.0f live heap + %.0f goroutine stack "+
		"(heap in use, with fragmentation: %.0f)",
		heap+stack, heap, stack, per(after.HeapInuse, before.HeapInuse))
	t.Logf("goroutines: %d", runtime.NumGoroutine())
}

// settledMemStats collects garbage (and lets the GC shrink idle stacks)
// before reading the memory statistics.
func settledMemStats() runtime.MemStats {
	for range 5 {
		runtime.GC()
		time.Sleep(20 * time.Millisecond)
	}
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m
}

// TestMemtestClientProcess is the client side of TestIdleConnectionMemory,
// run in a child process. Each connection behaves like an Azure IoT device
// SDK after connecting: three subscriptions, one QoS 1 telemetry message, a
// PINGREQ, then idle.
func TestMemtestClientProcess(t *testing.T) {
	addr := os.Getenv("HATCHERY_MEMTEST_CLIENT")
	if addr == "" {
		t.Skip("the client process of TestIdleConnectionMemory")
	}
	n, _ := strconv.Atoi(os.Getenv("HATCHERY_MEMTEST_CLIENT_CONNS"))
	var tlsConf *tls.Config
	if ca := os.Getenv("HATCHERY_MEMTEST_CLIENT_CA"); ca != "" {
		pemBytes, err := os.ReadFile(ca)
		if err != nil {
			t.Fatal(err)
		}
		block, _ := pem.Decode(pemBytes)
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		roots := x509.NewCertPool()
		roots.AddCert(cert)
		tlsConf = &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"}
		if os.Getenv("HATCHERY_MEMTEST_CLIENT_X25519") == "true" {
			tlsConf.CurvePreferences = []tls.CurveID{tls.X25519}
		}
	}
	conns := make([]net.Conn, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	errs := make(chan error, n)
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			nc, err := deviceSession(addr, tlsConf, fmt.Sprintf("device-%06d", i))
			if err != nil {
				errs <- err
				return
			}
			conns[i] = nc
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	fmt.Println("READY")
	// Hold the connections until the parent closes stdin.
	bufio.NewReader(os.Stdin).ReadString('\n')
	for _, nc := range conns {
		nc.Close()
	}
}

func deviceSession(addr string, tlsConf *tls.Config, id string) (net.Conn, error) {
	var nc net.Conn
	var err error
	if tlsConf != nil {
		nc, err = tls.Dial("tcp", addr, tlsConf)
	} else {
		nc, err = net.Dial("tcp", addr)
	}
	if err != nil {
		return nil, err
	}
	br := bufio.NewReaderSize(nc, 512)
	send := func(p Packet) error { _, err := p.WriteTo(nc); return err }
	expect := func(want PacketType) error {
		nc.SetReadDeadline(time.Now().Add(time.Minute))
		p, err := ReadPacket(br, 0)
		if err != nil {
			return err
		}
		if p.Type() != want {
			return fmt.Errorf("%s: got %s, want %s", id, p.Type(), want)
		}
		return nil
	}
	sas := "SharedAccessSignature sr=hatchery.example.net%2Fdevices%2F" + id +
		"&sig=6Ws3nNg3ZaZ3yH4eG0l0Q2z6JtW%2BqJ6y3iS6f1RkR2k%3D&se=1900000000"
	steps := []struct {
		p    Packet
		want PacketType
	}{
		{&Connect{ClientID: id, CleanSession: true, KeepAlive: 1177, HasUsername: true,
			Username:    "hatchery.example.net/" + id + "/?api-version=2021-04-12&DeviceClientType=azure-iot-device%2F1.18.4",
			HasPassword: true, Password: []byte(sas)}, TypeConnack},
		{&Subscribe{PacketID: 1, Subscriptions: []Subscription{
			{Filter: "devices/" + id + "/messages/devicebound/#", QoS: 1},
			{Filter: "$iothub/twin/res/#", QoS: 0},
			{Filter: "$iothub/methods/POST/#", QoS: 0},
		}}, TypeSuback},
		{&Publish{QoS: 1, PacketID: 2, Topic: "devices/" + id + "/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8",
			Payload: []byte(`{"temperature":21.5,"humidity":40}`)}, TypePuback},
		{&Pingreq{}, TypePingresp},
	}
	for _, s := range steps {
		if err := send(s.p); err != nil {
			return nil, err
		}
		if err := expect(s.want); err != nil {
			return nil, err
		}
	}
	return nc, nil
}
