package tpmservice

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// DefaultSocket is where aziot-tpmd listens and clients look for it.
const DefaultSocket = "/run/aziot/tpmd.sock"

// Listen creates the Unix socket socketPath, replacing a stale one, with
// mode 0660 and, when group is not empty and exists, that group: only the
// service's user and the group's members (the edge daemon) may connect.
// The socket is complete before it appears under its name, so no client
// ever sees it with other permissions. Closing the listener removes it.
func Listen(socketPath, group string) (net.Listener, error) {
	// The directory is systemd's RuntimeDirectory=; without systemd it
	// is made here, as iotedged makes its own.
	dir := filepath.Dir(socketPath)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("socket directory %s: %w (create it: mkdir -p %s)", dir, err, dir)
	}
	// The kernel's limit is 108 bytes with the NUL; the temporary name
	// below is longer than socketPath by at most 12.
	if len(socketPath)+12 > 107 {
		return nil, fmt.Errorf("socket path %s is too long for a Unix socket (at most 95 bytes here)", socketPath)
	}
	if err := checkStale(socketPath); err != nil {
		return nil, err
	}
	gid := -1
	if group != "" {
		g, err := user.LookupGroup(group)
		switch {
		case errors.As(err, new(user.UnknownGroupError)):
			slog.Warn("socket group does not exist: only the service's own user and group can connect", "group", group, "socket", socketPath)
		case err != nil:
			return nil, fmt.Errorf("looking up group %s for the socket: %w", group, err)
		default:
			gid, _ = strconv.Atoi(g.Gid)
		}
	}

	// Bind under a temporary name, set the permissions, then rename over
	// socketPath (which also replaces a stale socket atomically).
	tmp := filepath.Join(dir, fmt.Sprintf(".%s.%d", filepath.Base(socketPath), os.Getpid()))
	os.Remove(tmp)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("creating socket %s: %w", socketPath, err)
	}
	l.SetUnlinkOnClose(false) // the name it would unlink is tmp
	fail := func(err error) (net.Listener, error) {
		l.Close()
		os.Remove(tmp)
		return nil, err
	}
	if err := os.Chmod(tmp, 0o660); err != nil {
		return fail(fmt.Errorf("socket %s: %w", socketPath, err))
	}
	if gid >= 0 {
		if err := os.Chown(tmp, -1, gid); err != nil {
			if errors.Is(err, fs.ErrPermission) {
				err = fmt.Errorf("the service's user must be root or a member of group %s (usermod -aG %s USER): %w", group, group, err)
			}
			return fail(fmt.Errorf("giving socket %s to group %s: %w", socketPath, group, err))
		}
	}
	if err := os.Rename(tmp, socketPath); err != nil {
		return fail(fmt.Errorf("socket %s: %w", socketPath, err))
	}
	return &unixListener{l, socketPath}, nil
}

// checkStale fails when socketPath is something other than a socket, or a
// socket another server still answers on: replacing either would break it.
func checkStale(socketPath string) error {
	fi, err := os.Lstat(socketPath)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket %s: %w", socketPath, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket: refusing to replace it", socketPath)
	}
	c, err := net.DialTimeout("unix", socketPath, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("socket %s: another aziot-tpmd is already serving on it", socketPath)
	}
	return nil
}

// unixListener removes its socket when closed.
type unixListener struct {
	*net.UnixListener
	path string
}

func (l *unixListener) Close() error {
	err := l.UnixListener.Close()
	// After a privilege drop the directory may not let us; the next start
	// replaces the stale socket anyway.
	if rerr := os.Remove(l.path); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
		slog.Debug("socket not removed", "socket", l.path, "error", rerr)
	}
	return err
}

// isNotRunning reports whether err means nobody listens on the socket.
func isNotRunning(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOENT)
}
