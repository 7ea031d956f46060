// Package sdnotify tells systemd how a Type=notify service is doing, over
// the datagram socket systemd names in $NOTIFY_SOCKET: `systemctl start`
// returns once the service says it is ready, not when its process starts.
// Outside systemd it does nothing.
package sdnotify

import (
	"net"
	"os"
)

// Ready says the service is ready: its ports are open.
func Ready() error { return send("READY=1") }

// Stopping says the service is shutting down.
func Stopping() error { return send("STOPPING=1") }

// send writes state to $NOTIFY_SOCKET, when systemd set it. A name
// beginning with '@' is in the abstract namespace, which Go's syscall
// package reads the same way.
func send(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte(state))
	return err
}
