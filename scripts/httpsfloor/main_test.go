package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/testutil"
)

// TestFloorServesARegistration runs the server and a few devices in one
// process: every exchange must come back with its size, and the report must
// count them.
func TestFloorServesARegistration(t *testing.T) {
	addr := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
	cert := filepath.Join(t.TempDir(), "floor.der")
	go func() { t.Log(runServer(addr, cert)) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the floor server did not listen on %s: %v", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	res, err := runClients(addr, cert, os.Getpid(), 6, 2, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Six devices may cost the process less than /proc's 10 ms tick.
	if res.Devices != 6 || res.DevicesPerSecond <= 0 || res.ServerCPUMsPerDevice < 0 {
		t.Fatalf("report %+v: want 6 devices and a rate", res)
	}
	if _, err := runClients("127.0.0.1:1", cert, os.Getpid(), 1, 1, 0); err == nil {
		t.Fatal("devices registered against a closed port")
	}
}
