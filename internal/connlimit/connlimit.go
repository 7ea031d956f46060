// Package connlimit bounds how many connections a server holds open at
// once, so that a flood of clients cannot take every file descriptor the
// process has. Connections that have not earned their place — an HTTPS
// connection waiting for a request, before its first or between two; an
// MQTT connection not authenticated — are evictable: at the bound, or at
// the bound of evictable ones, the one evictable longest is closed to make
// room for a new client, once it has been so for Grace. While none has, a
// new client waits (Wait) or is refused (Take).
package connlimit

import (
	"container/list"
	"log/slog"
	"net"
	"sync"
	"time"
)

// logPeriod is how often a limiter logs what it did, at most.
var logPeriod = time.Minute

// Grace is how long a connection stays evictable before it may be closed
// to make room: longer than a client under load takes for its TLS
// handshake and its first request or CONNECT, so that a burst of clients
// does not close its own members part-way, and shorter than the servers'
// 10 s for them.
var Grace = 5 * time.Second

// Limiter bounds a set of connections.
type Limiter struct {
	name         string // for the log: which port
	evictable    string // for the log: what its evictable connections are
	max          int
	maxEvictable int

	mu      sync.Mutex
	open    int
	line    list.List     // evictable *Slot, the longest evictable at the front
	changed chan struct{} // closed when a slot is released or becomes evictable; nil: no one waits
	evicted tally
	waited  tally
	refused tally
}

// NewLimiter bounds a set at max connections, of which at most
// maxEvictable are evictable. name and evictable say in its log which port
// it bounds and what its evictable connections are ("mqtt",
// "unauthenticated").
func NewLimiter(name, evictable string, max, maxEvictable int) *Limiter {
	l := &Limiter{name: name, evictable: evictable, max: max, maxEvictable: maxEvictable}
	l.waited.report = func(n int) {
		slog.Warn(name+": every connection is busy at the connection limit: new clients wait", "times", n, "limit", max)
	}
	l.refused.report = func(n int) {
		slog.Warn(name+": at the connection limit: new connections refused", "refused", n, "limit", max)
	}
	l.evicted.report = func(n int) {
		attrs := []any{"closed", n, "limit", max}
		if maxEvictable < max {
			attrs = append(attrs, evictable+"Limit", maxEvictable)
		}
		slog.Info(name+": closed "+evictable+" connections to make room for new ones", attrs...)
	}
	return l
}

// Slot is one connection's place in a Limiter. The methods of a nil Slot
// do nothing.
type Slot struct {
	l     *Limiter
	close func()        // closes the connection to make room
	elem  *list.Element // in l.line while evictable
	since time.Time     // when it became evictable
	held  bool
}

// Wait takes a slot for a new connection, which close closes, evictable
// from the start. At either bound it closes the connection evictable
// longest, once it has been for Grace; with none, it waits until a slot is
// released or one has been evictable that long, or until done is closed
// (and then returns net.ErrClosed).
func (l *Limiter) Wait(close func(), done <-chan struct{}) (*Slot, error) {
	for waited := false; ; waited = true {
		l.mu.Lock()
		if s, victim := l.takeLocked(close); s != nil {
			l.mu.Unlock()
			l.evict(victim)
			return s, nil
		}
		if l.changed == nil {
			l.changed = make(chan struct{})
		}
		changed := l.changed
		var ripe <-chan time.Time // when the longest evictable may be closed
		if front := l.line.Front(); front != nil {
			ripe = time.After(time.Until(front.Value.(*Slot).since.Add(Grace)))
		}
		l.mu.Unlock()
		if !waited {
			l.waited.count()
		}
		select {
		case <-changed:
		case <-ripe:
		case <-done:
			return nil, net.ErrClosed
		}
	}
}

// Take takes a slot as Wait does, but returns nil at once rather than wait.
// Refusals are logged at most once a logPeriod.
func (l *Limiter) Take(close func()) *Slot {
	l.mu.Lock()
	s, victim := l.takeLocked(close)
	l.mu.Unlock()
	l.evict(victim)
	if s == nil {
		l.refused.count()
	}
	return s
}

// takeLocked admits a new connection if there is room, or a connection
// evictable for Grace to close for it (the victim, whose slot is released
// already).
func (l *Limiter) takeLocked(close func()) (s, victim *Slot) {
	now := time.Now()
	if l.open >= l.max || l.line.Len() >= l.maxEvictable {
		front := l.line.Front()
		if front == nil || now.Sub(front.Value.(*Slot).since) < Grace {
			return nil, nil
		}
		victim = front.Value.(*Slot)
		l.releaseLocked(victim)
	}
	s = &Slot{l: l, close: close, held: true, since: now}
	l.open++
	s.elem = l.line.PushBack(s)
	return s, victim
}

// evict closes victim, if any, whose slot takeLocked released, and logs
// such closings once a logPeriod.
func (l *Limiter) evict(victim *Slot) {
	if victim == nil {
		return
	}
	victim.close()
	l.evicted.count()
}

// Evictable puts the connection at the back of the line of those that may
// be closed to make room (an HTTPS connection waiting for a request).
func (s *Slot) Evictable() {
	if s == nil {
		return
	}
	l := s.l
	l.mu.Lock()
	defer l.mu.Unlock()
	if s.held && s.elem == nil {
		s.elem, s.since = l.line.PushBack(s), time.Now()
		l.signalLocked()
	}
}

// Keep takes the connection out of the line of evictable ones (an HTTPS
// connection serving a request).
func (s *Slot) Keep() {
	if s == nil {
		return
	}
	l := s.l
	l.mu.Lock()
	defer l.mu.Unlock()
	if s.elem != nil {
		l.line.Remove(s.elem)
		s.elem = nil
	}
}

// Release gives the slot back; releasing it again does nothing.
func (s *Slot) Release() {
	if s == nil {
		return
	}
	l := s.l
	l.mu.Lock()
	defer l.mu.Unlock()
	l.releaseLocked(s)
}

func (l *Limiter) releaseLocked(s *Slot) {
	if !s.held {
		return
	}
	s.held = false
	l.open--
	if s.elem != nil {
		l.line.Remove(s.elem)
		s.elem = nil
	}
	l.signalLocked()
}

func (l *Limiter) signalLocked() {
	if l.changed != nil {
		close(l.changed)
		l.changed = nil
	}
}

// tally counts events to report them at most once a logPeriod: the first
// of a quiet period at once, those after it together when the period ends.
type tally struct {
	report func(n int)

	mu      sync.Mutex
	n       int
	last    time.Time
	pending bool // a report is due at last+logPeriod
}

func (t *tally) count() {
	t.mu.Lock()
	t.n++
	now := time.Now()
	if now.Sub(t.last) >= logPeriod {
		n := t.n
		t.n, t.last = 0, now
		t.mu.Unlock()
		t.report(n)
		return
	}
	if !t.pending {
		t.pending = true
		time.AfterFunc(t.last.Add(logPeriod).Sub(now), t.flush)
	}
	t.mu.Unlock()
}

func (t *tally) flush() {
	t.mu.Lock()
	n := t.n
	t.n, t.last, t.pending = 0, time.Now(), false
	t.mu.Unlock()
	if n > 0 {
		t.report(n)
	}
}

// Listen wraps l so that at most n of its connections are open at once. Its
// connections are evictable until marked Active, and again once marked
// Idle: http.Server's ConnState hook tells them apart. name is for the log.
func Listen(name string, l net.Listener, n int) net.Listener {
	return &listener{Listener: l, lim: NewLimiter(name, "idle", n, n), done: make(chan struct{})}
}

type listener struct {
	net.Listener
	lim       *Limiter
	done      chan struct{}
	closeOnce sync.Once
}

// Accept accepts a connection, then makes room for it: a client arriving
// while every connection is busy is served once one is done with its
// request, rather than closed.
func (l *listener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	slot, err := l.lim.Wait(func() { nc.Close() }, l.done)
	if err != nil {
		nc.Close()
		return nil, err
	}
	return &conn{Conn: nc, slot: slot}, nil
}

func (l *listener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// Idle marks c, or the connection it wraps (as a *tls.Conn does), as
// waiting for a request: it may be closed to make room for a new client.
func Idle(c net.Conn) {
	if v := find(c); v != nil {
		v.slot.Evictable()
	}
}

// Active marks c, or the connection it wraps, as serving a request: it is
// kept until it is done.
func Active(c net.Conn) {
	if v := find(c); v != nil {
		v.slot.Keep()
	}
}

// Release gives back the slot of c, or of the connection c wraps, before
// it closes: for a connection handed on to be bounded elsewhere, as an
// HTTPS connection upgraded to a WebSocket that carries MQTT. Closing it
// later gives back nothing more.
func Release(c net.Conn) {
	if v := find(c); v != nil {
		v.slot.Release()
	}
}

// find returns the connection of a listener from Listen that c is or wraps.
func find(c net.Conn) *conn {
	for {
		switch v := c.(type) {
		case *conn:
			return v
		case interface{ NetConn() net.Conn }:
			c = v.NetConn()
		default:
			return nil
		}
	}
}

// conn gives its slot back when closed, however often it is closed.
type conn struct {
	net.Conn
	slot *Slot
}

func (c *conn) Close() error {
	err := c.Conn.Close()
	c.slot.Release()
	return err
}
