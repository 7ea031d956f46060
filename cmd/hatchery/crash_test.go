package main

import (
	"bytes"
	"encoding/json"
	"net"
	"net/url"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/testutil"
)

// Killed with SIGKILL in the middle of enrolling a 10,000-device fleet with
// the bulk API, and again in the middle of provisioning it, and started
// again each time, the server loses nothing: the simulator tries again, and
// in the end every enrollment is there once, every device is assigned once,
// to a hub identity of its own that no other registration names, and has
// connected to it with the credentials it holds.
func TestKillDuringFleetProvisioning(t *testing.T) {
	const devices = 10000
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
	kill := func() {
		t.Helper()
		if err := srv.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		_ = srv.Wait()
		time.Sleep(500 * time.Millisecond) // clients see the server gone
		srv = start()
	}
	var info siteInfo
	if err := json.Unmarshal([]byte(c.ok("info", "-o", "json")), &info); err != nil {
		t.Fatal(err)
	}
	lb, err := info.loopback()
	if err != nil {
		t.Fatal(err)
	}
	svc, err := azclient.New(info.ProvisioningServiceConnectionString, lb.url, "2021-10-01", lb.tls)
	if err != nil {
		t.Fatal(err)
	}
	// count counts what a service query lists, cheaply enough to watch the
	// run closely; -1 while the server does not answer.
	count := func(path string) int {
		all, err := azclient.QueryAll[struct{}](t.Context(), svc, path, "*")
		if err != nil {
			return -1
		}
		return len(all)
	}
	var out, stderr bytes.Buffer // stderr: progress, and why it failed
	simDone := make(chan error, 1)
	killWhen := func(what, path string, from int) {
		t.Helper()
		// Each look is a full query: not so often that it crowds the server
		// and the simulator on a small machine.
		for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
			select {
			case err := <-simDone:
				t.Fatalf("fleet simulate ended while %s: %v\n%s%s", what, err, out.String(), tail(stderr.String()))
			default:
			}
			n := count(path)
			if n >= devices {
				t.Fatalf("%s was done before the server could be killed", what)
			}
			if n >= from {
				kill()
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s did not get under way: %d", what, n)
			}
		}
	}

	sim := exec.Command(c.bin, "fleet", "simulate", "--data-dir", c.dataDir, "--devices", strconv.Itoa(devices),
		"--concurrency", "64", "--retries", "6", "--connect", "-o", "json")
	sim.Stdout, sim.Stderr = &out, &stderr
	if err := sim.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sim.Process.Kill() }) // if the test ends first
	go func() { simDone <- sim.Wait() }()
	// Each bulk call writes 1,000 enrollments: this kill cuts one short.
	killWhen("enrolling", "/enrollments/query", devices/4+devices/20)
	killWhen("provisioning", "/registrations/"+url.PathEscape("*")+"/query", devices/5)
	if err := <-simDone; err != nil {
		t.Fatalf("fleet simulate: %v\n%s%s", err, out.String(), tail(stderr.String()))
	}
	var r struct {
		Provisioned, Connected, Retried, EnrollRetried int
		ServerCPUNote                                  string
	}
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	// The server found as the simulator started was killed while it
	// enrolled, before the CPU meter read it.
	if r.Provisioned != devices || r.Connected != devices || r.Retried == 0 || r.EnrollRetried == 0 ||
		!strings.HasPrefix(r.ServerCPUNote, "server process could not be read: ") {
		t.Fatalf("after the restarts: %s", out.String())
	}

	list := func(args ...string) []map[string]string {
		var items []map[string]any
		if err := json.Unmarshal([]byte(c.ok(append(args, "-o", "json")...)), &items); err != nil {
			t.Fatal(err)
		}
		var rows []map[string]string // the string fields
		for _, it := range items {
			row := map[string]string{}
			for k, v := range it {
				if s, ok := v.(string); ok {
					row[k] = s
				}
			}
			rows = append(rows, row)
		}
		return rows
	}
	want := map[string]bool{}
	for i := range devices {
		want["sim-0-"+strconv.Itoa(i)] = true
	}
	// once checks that rows name each of want by key exactly once.
	once := func(what, key string, rows []map[string]string) {
		t.Helper()
		seen := map[string]int{}
		for _, row := range rows {
			seen[row[key]]++
		}
		for id, n := range seen {
			if n != 1 || !want[id] {
				t.Errorf("%s: %q listed %d times", what, id, n)
			}
		}
		if len(seen) != len(want) {
			t.Errorf("%d %s for %d devices", len(seen), what, len(want))
		}
	}
	once("enrollments", "registrationId", list("enrollment", "list"))
	regs := list("registration", "list")
	once("registrations", "registrationId", regs)
	hubDevices := list("device", "list")
	once("hub devices", "deviceId", hubDevices)

	// Each registration names a hub identity, and no two the same one: with
	// as many of each, every hub device is some registration's.
	exists := map[string]bool{}
	for _, d := range hubDevices {
		exists[d["deviceId"]] = true
	}
	named := map[string]string{}
	for _, reg := range regs {
		id, dev := reg["registrationId"], reg["deviceId"]
		if reg["status"] != "assigned" {
			t.Errorf("%s is %s", id, reg["status"])
		}
		// A registration whose answer the kill lost is made again, and
		// finds the device it made, on the same hub.
		if sub := reg["substatus"]; sub != "initialAssignment" && sub != "reprovisionedToInitialAssignment" {
			t.Errorf("%s: substatus %q", id, sub)
		}
		if reg["assignedHub"] != info.HubHostName || !exists[dev] {
			t.Errorf("%s is assigned to %s/%s, which does not exist", id, reg["assignedHub"], dev)
		}
		if other, ok := named[dev]; ok {
			t.Errorf("%s and %s are both hub device %s", other, id, dev)
		}
		named[dev] = id
	}
}

// tail is the end of a long output.
func tail(s string) string {
	return s[max(len(s)-500, 0):]
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
