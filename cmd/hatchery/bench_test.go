package main

import (
	"bytes"
	"encoding/json"
	"os/exec"
	"runtime"
	"strconv"
	"testing"
)

// TestBenchMQTT runs `hatchery bench mqtt` with 50 devices against a
// `hatchery serve`, both the built binary, as an operator would.
func TestBenchMQTT(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("bench mqtt reads the server's memory from /proc")
	}
	c := startServe(t)

	var stdout, stderr bytes.Buffer
	bench := exec.Command(c.bin, "bench", "mqtt", "--data-dir", c.dataDir, "--mqtt-port", strconv.Itoa(c.mqttPort),
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
	if r.Workers != 3 || r.Connect.Established != 50 || r.Memory.ServerPID != c.serverPID || r.Memory.BeforeKiB <= 0 ||
		tel.Acked == 0 || tel.Stored != tel.Acked+tel.AckedLate || tel.StoredStream != tel.Stored ||
		r.Fanout.Received != 10 || r.Deleted != 50 {
		t.Fatalf("unexpected result:\n%s\nprogress:\n%s", stdout.String(), stderr.String())
	}
}
