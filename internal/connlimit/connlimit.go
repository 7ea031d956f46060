// Package connlimit bounds how many connections a listener holds open at
// once: past the bound, new clients wait in the kernel's backlog until a
// connection closes, so that a flood of slow clients cannot take every file
// descriptor the process has.
package connlimit

import (
	"net"
	"sync"
)

// Listen wraps l so that at most n of its connections are open at once.
func Listen(l net.Listener, n int) net.Listener {
	return &listener{Listener: l, slots: make(chan struct{}, n), done: make(chan struct{})}
}

type listener struct {
	net.Listener
	slots     chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

func (l *listener) Accept() (net.Conn, error) {
	select {
	case l.slots <- struct{}{}:
	case <-l.done:
		return nil, net.ErrClosed
	}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.slots
		return nil, err
	}
	return &conn{Conn: c, release: sync.OnceFunc(func() { <-l.slots })}, nil
}

func (l *listener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// Release gives back the slot of c, or of the connection c wraps (as a
// *tls.Conn does), before it closes: for a connection handed on to be
// bounded elsewhere, as an HTTPS connection upgraded to a WebSocket that
// carries MQTT. Closing it later gives back nothing more.
func Release(c net.Conn) {
	for {
		switch v := c.(type) {
		case *conn:
			v.release()
			return
		case interface{ NetConn() net.Conn }:
			c = v.NetConn()
		default:
			return
		}
	}
}

// conn gives its slot back when closed, however often it is closed.
type conn struct {
	net.Conn
	release func()
}

func (c *conn) Close() error {
	err := c.Conn.Close()
	c.release()
	return err
}
