package main

import (
	"bytes"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestBenchMQTT runs `hatchery bench mqtt` with 50 devices against a
// `hatchery serve`, both the built binary, as an operator would.
func TestBenchMQTT(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("bench mqtt reads the server's memory from /proc")
	}
	bin := filepath.Join(t.TempDir(), "hatchery")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	if out, _ := exec.Command(bin, "bench", "mqtt", "--help").CombinedOutput(); !strings.Contains(string(out), "--fanout") {
		t.Skip("`hatchery bench` is not registered in main.go")
	}
	dataDir := t.TempDir()
	port, mqttPort := freePort(t), freePort(t)
	var log bytes.Buffer
	srv := exec.Command(bin, "serve", "--data-dir", dataDir, "--hostname", "localhost",
		"--https-port", strconv.Itoa(port), "--mqtt-port", strconv.Itoa(mqttPort))
	srv.Stdout, srv.Stderr = &log, &log
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = srv.Process.Signal(syscall.SIGTERM)
		_ = srv.Wait()
		if t.Failed() {
			t.Logf("server log:\n%s", log.String())
		}
	})
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(mqttPort)); err == nil {
			c.Close()
			if _, err := os.Stat(filepath.Join(dataDir, endpointFile)); err == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("server did not start:\n%s", log.String())
		}
	}

	var stdout, stderr bytes.Buffer
	bench := exec.Command(bin, "bench", "mqtt", "--data-dir", dataDir, "--mqtt-port", strconv.Itoa(mqttPort),
		"--devices", "50", "--per-worker", "20", "--duration", "1s", "--settle", "0s",
		"--fanout", "10", "--fanout-under-load", "5", "--cleanup", "--output", "json")
	bench.Stdout, bench.Stderr = &stdout, &stderr
	if err := bench.Run(); err != nil {
		t.Fatalf("bench mqtt: %v\n%s", err, stderr.String())
	}
	var r struct {
		Workers int `json:"workers"`
		Connect struct {
			Established int `json:"established"`
		} `json:"connect"`
		Memory struct {
			ServerPID int   `json:"serverPid"`
			BeforeKiB int64 `json:"rssBeforeKiB"`
		} `json:"memory"`
		Telemetry struct {
			Acked        int64 `json:"acked"`
			AckedLate    int64 `json:"ackedLate"`
			Stored       int64 `json:"stored"`
			StoredStream int64 `json:"storedStream"`
		} `json:"telemetry"`
		Fanout struct {
			Received int `json:"received"`
		} `json:"fanout"`
		Deleted int `json:"deletedDevices"`
	}
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		t.Fatalf("%v: %s", err, stdout.String())
	}
	tel := r.Telemetry
	if r.Workers != 3 || r.Connect.Established != 50 || r.Memory.ServerPID != srv.Process.Pid || r.Memory.BeforeKiB <= 0 ||
		tel.Acked == 0 || tel.Stored != tel.Acked+tel.AckedLate || tel.StoredStream != tel.Stored ||
		r.Fanout.Received != 10 || r.Deleted != 50 {
		t.Fatalf("unexpected result:\n%s\nprogress:\n%s", stdout.String(), stderr.String())
	}
}
