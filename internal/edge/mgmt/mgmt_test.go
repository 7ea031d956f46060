package mgmt

import (
	"errors"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/hatchery/hatchery/internal/starthint"
)

// TestDialError: a socket the user may not open is not a stopped daemon.
func TestDialError(t *testing.T) {
	dial := func(errno syscall.Errno) error {
		return &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", errno)}
	}
	if err := dialError(dial(syscall.EACCES)); errors.Is(err, ErrNotRunning) || !strings.Contains(err.Error(), "sudo usermod -aG iotedge") {
		t.Errorf("permission denied: %v", err)
	}
	if err := dialError(dial(syscall.ENOENT)); !errors.Is(err, ErrNotRunning) || !strings.Contains(err.Error(), starthint.Service("iotedged", "iotedged")) {
		t.Errorf("no socket: %v", err)
	}
	other := errors.New("malformed HTTP response")
	if err := dialError(other); err != other {
		t.Errorf("other error: %v", err)
	}
}
