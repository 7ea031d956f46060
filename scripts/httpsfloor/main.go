// Command httpsfloor measures what any Go HTTPS server spends per TPM
// registration before doing any of the registration's work: a server that
// answers every request with fixed bytes, and clients that each open a new
// TLS connection (X25519, ECDSA P-256, HTTP/1.1) and send it the three
// requests of a TPM registration with their usual sizes. Its server CPU per
// device is the floor under hatchery's, measured the same way
// (scripts/fleet-bench.sh, PARTS=tpm-cpu).
//
//	httpsfloor -serve -addr 127.0.0.1:9444 -cert /tmp/floor.der &
//	httpsfloor -addr 127.0.0.1:9444 -cert /tmp/floor.der -server-pid $! -devices 3000 -rate 290
package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hatchery/hatchery/internal/loadgen"
)

// exchange is one request of a TPM registration and the size of its answer:
// the unauthenticated PUT (EK and SRK) answered by a 401 with an activation
// blob, the signed PUT answered by a 202, and the poll answered with the
// registration state and the hub key's blob.
type exchange struct {
	method       string
	request, ans int
}

var registration = []exchange{{"PUT", 900, 1000}, {"PUT", 900, 250}, {"GET", 0, 1300}}

func main() {
	serve := flag.Bool("serve", false, "run the server")
	addr := flag.String("addr", "127.0.0.1:9444", "the server's address")
	certFile := flag.String("cert", "httpsfloor.der", "the server's certificate (written by -serve, trusted by the client)")
	pid := flag.Int("server-pid", 0, "the server's process, whose CPU is measured")
	devices := flag.Int("devices", 3000, "devices to register")
	concurrency := flag.Int("concurrency", 32, "devices at a time")
	rate := flag.Float64("rate", 0, "devices started per second (0: as fast as they finish)")
	flag.Parse()
	if *serve {
		log.Fatal(runServer(*addr, *certFile))
	}
	if *pid <= 0 || *devices <= 0 || *concurrency <= 0 {
		log.Fatal("-server-pid, -devices and -concurrency must be positive")
	}
	res, err := runClients(*addr, *certFile, *pid, *devices, *concurrency, *rate)
	if err != nil {
		log.Fatal(err)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	enc.Encode(res)
}

func runServer(addr, certFile string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: host},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.ParseIP(host)}, DNSNames: []string{host},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(certFile, der, 0o644); err != nil {
		return err
	}
	answers := map[string][]byte{}
	for i, e := range registration {
		answers[fmt.Sprint(i)] = bytes.Repeat([]byte("a"), e.ans)
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Write(answers[r.URL.Query().Get("step")])
	})
	srv := &http.Server{Addr: addr, Handler: h, ReadHeaderTimeout: 10 * time.Second,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, NextProtos: []string{"http/1.1"}}}
	return srv.ListenAndServeTLS("", "")
}

// result is what the client reports, in the units of `hatchery fleet simulate`.
type result struct {
	Devices              int     `json:"devices"`
	Seconds              float64 `json:"seconds"`
	DevicesPerSecond     float64 `json:"devicesPerSecond"`
	ServerCPUMsPerDevice float64 `json:"serverCpuMsPerDevice"`
}

func runClients(addr, certFile string, pid, devices, concurrency int, rate float64) (*result, error) {
	der, err := os.ReadFile(certFile)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", certFile, err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(cert)
	conf := &tls.Config{RootCAs: roots, CurvePreferences: []tls.CurveID{tls.X25519}}
	cpu0, err := loadgen.CPUSeconds(pid)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, concurrency)
	for range concurrency {
		wg.Go(func() {
			for i := next.Add(1); i <= int64(devices); i = next.Add(1) {
				if rate > 0 {
					time.Sleep(time.Until(start.Add(time.Duration(float64(i) / rate * float64(time.Second)))))
				}
				if err := register(conf, addr); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	if err := errors.Join(collect(errs)...); err != nil {
		return nil, err
	}
	elapsed := time.Since(start).Seconds()
	cpu1, err := loadgen.CPUSeconds(pid)
	if err != nil {
		return nil, err
	}
	return &result{Devices: devices, Seconds: elapsed, DevicesPerSecond: float64(devices) / elapsed,
		ServerCPUMsPerDevice: (cpu1 - cpu0) / float64(devices) * 1000}, nil
}

// register sends one device's three requests over a TLS connection of its own.
func register(conf *tls.Config, addr string) error {
	tr := &http.Transport{TLSClientConfig: conf, MaxIdleConnsPerHost: 1}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: time.Minute}
	for i, e := range registration {
		req, err := http.NewRequestWithContext(context.Background(), e.method,
			fmt.Sprintf("https://%s/scope/registrations/device?step=%d", addr, i), bytes.NewReader(make([]byte, e.request)))
		if err != nil {
			return err
		}
		resp, err := c.Do(req)
		if err != nil {
			return err
		}
		n, _ := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || n != int64(e.ans) {
			return fmt.Errorf("step %d: HTTP %d with %d bytes, want 200 with %d", i, resp.StatusCode, n, e.ans)
		}
	}
	return nil
}

func collect(errs <-chan error) []error {
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	return all
}
