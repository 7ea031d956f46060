package main

import (
	"bytes"
	"encoding/json"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/testutil"
)

// Killed with SIGKILL in the middle of provisioning a 10,000-device fleet
// and started again, the server loses nothing: the devices retry, and in the
// end every one is assigned, with one registration record and one hub
// identity each, and every enrollment is there.
func TestKillDuringFleetProvisioning(t *testing.T) {
	if testing.Short() {
		t.Skip("provisions 10,000 devices")
	}
	c := &cli{t: t, bin: filepath.Join(t.TempDir(), "hatchery"), dataDir: t.TempDir()}
	c.build()
	https, mqtt := testutil.FreePort(t), testutil.FreePort(t)
	start := func() *exec.Cmd {
		srv := exec.Command(c.bin, "serve", "--data-dir", c.dataDir, "--hostname", "localhost",
			"--https-port", strconv.Itoa(https), "--mqtt-port", strconv.Itoa(mqtt), "--log-level", "error")
		if err := srv.Start(); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if conn, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(https)); err == nil {
				conn.Close()
				return srv
			}
		}
		t.Fatal("the server did not start")
		return nil
	}
	srv := start()
	t.Cleanup(func() {
		_ = srv.Process.Signal(syscall.SIGTERM)
		_ = srv.Wait()
	})

	const devices = 10000
	var out bytes.Buffer
	sim := exec.Command(c.bin, "fleet", "simulate", "--data-dir", c.dataDir, "--devices", strconv.Itoa(devices),
		"--concurrency", "64", "--retries", "6", "-o", "json")
	sim.Stdout = &out
	if err := sim.Start(); err != nil {
		t.Fatal(err)
	}
	// Kill the server once provisioning is well under way.
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		var n struct{ Count int }
		if raw, err := c.run("registration", "list", "-o", "json"); err == nil {
			var regs []json.RawMessage
			_ = json.Unmarshal([]byte(raw), &regs)
			n.Count = len(regs)
		}
		if n.Count >= devices/5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("provisioning did not get under way")
		}
	}
	if err := srv.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = srv.Wait()
	time.Sleep(500 * time.Millisecond) // devices see the server gone
	srv = start()

	if err := sim.Wait(); err != nil {
		t.Fatalf("fleet simulate: %v\n%s", err, out.String())
	}
	var r map[string]any
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if r["provisioned"] != float64(devices) || r["retried"] == nil {
		t.Fatalf("after the restart: %v", r)
	}
	count := func(args ...string) map[string]int {
		var items []map[string]any
		if err := json.Unmarshal([]byte(c.ok(append(args, "-o", "json")...)), &items); err != nil {
			t.Fatal(err)
		}
		seen := map[string]int{}
		for _, it := range items {
			id, _ := it["registrationId"].(string)
			if id == "" {
				id, _ = it["deviceId"].(string)
			}
			seen[id]++
			if s, ok := it["status"].(string); ok && strings.Contains(strings.Join(args, " "), "registration") && s != "assigned" {
				t.Errorf("%s is %s", id, s)
			}
		}
		return seen
	}
	for what, args := range map[string][]string{
		"enrollments":   {"enrollment", "list"},
		"registrations": {"registration", "list"},
		"hub devices":   {"device", "list"},
	} {
		seen := count(args...)
		if len(seen) != devices {
			t.Errorf("%d %s for %d devices", len(seen), what, devices)
		}
		for id, n := range seen {
			if n != 1 {
				t.Errorf("%s: %s listed %d times", what, id, n)
			}
		}
	}
}

// Killed with devices connected, the server leaves them recorded
// "Connected"; started again, it records them disconnected, as nothing is
// connected to it, rather than for good.
func TestKilledServerForgetsConnections(t *testing.T) {
	c := startServe(t)
	bench := exec.Command(c.bin, "bench", "mqtt", "--data-dir", c.dataDir, "--mqtt-port", strconv.Itoa(c.mqttPort),
		"--devices", "5", "--per-worker", "5", "--duration", "0", "--settle", "5m", "--fanout", "0", "--fanout-under-load", "0")
	if err := bench.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = bench.Process.Kill(); _ = bench.Wait() }()
	states := func() map[string]int {
		var devs []struct{ DeviceID, ConnectionState string }
		if err := json.Unmarshal([]byte(c.ok("device", "list", "-o", "json")), &devs); err != nil {
			t.Fatal(err)
		}
		n := map[string]int{}
		for _, d := range devs {
			n[d.ConnectionState]++
		}
		return n
	}
	waitFor := func(what string, ok func(map[string]int) bool) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			n := states()
			if ok(n) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: devices by state %v", what, n)
			}
		}
	}
	waitFor("the devices connect", func(n map[string]int) bool { return n["Connected"] == 5 })
	if err := syscall.Kill(c.serverPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = bench.Process.Kill()
	_ = bench.Wait()
	c.serve()
	waitFor("the server started again", func(n map[string]int) bool { return n["Disconnected"] == 5 })
}
