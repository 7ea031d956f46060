package sdnotify

import (
	"net"
	"path/filepath"
	"testing"
	"time"
)

// listen stands in for systemd: a datagram socket named by NOTIFY_SOCKET.
func listen(t *testing.T, name string) *net.UnixConn {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	t.Setenv("NOTIFY_SOCKET", name)
	return c
}

func receive(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 64)
	n, err := c.Read(b)
	if err != nil {
		t.Fatal(err)
	}
	return string(b[:n])
}

func TestStates(t *testing.T) {
	for _, name := range []string{filepath.Join(t.TempDir(), "notify"), "@hatchery-sdnotify-test"} {
		c := listen(t, name)
		if err := Ready(); err != nil {
			t.Fatalf("%s: Ready: %v", name, err)
		}
		if got := receive(t, c); got != "READY=1" {
			t.Errorf("%s: got %q, want READY=1", name, got)
		}
		if err := Stopping(); err != nil {
			t.Fatalf("%s: Stopping: %v", name, err)
		}
		if got := receive(t, c); got != "STOPPING=1" {
			t.Errorf("%s: got %q, want STOPPING=1", name, got)
		}
	}
}

// Outside systemd there is nothing to tell.
func TestWithoutSystemd(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	if err := Ready(); err != nil {
		t.Errorf("Ready without NOTIFY_SOCKET: %v", err)
	}
}

// A socket that is gone is an error the caller can log.
func TestSocketGone(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "gone"))
	if err := Ready(); err == nil {
		t.Error("Ready to a socket that does not exist succeeded")
	}
}
