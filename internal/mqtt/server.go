package mqtt

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/connlimit"
	"github.com/hatchery/hatchery/internal/tlsrefusal"
)

// Handler gives the server its application semantics (for Hatchery, those of
// Azure IoT Hub). For each connection the server calls the Handler methods
// one at a time, in packet order; they may call Send. A panic in a method
// closes that connection only.
type Handler interface {
	// Authenticate is called for CONNECT; return 0 to accept, or a CONNACK
	// return code (e.g. 5 not authorized, 4 bad username/password, 2
	// identifier rejected). It may attach per-connection state with
	// c.SetValue, and resume a session the client kept (c.ResumeSession).
	// An invalid code refuses with 5.
	Authenticate(c *Conn, p *Connect) byte
	// Published is called for each PUBLISH from the client. The server sends
	// the PUBACK of a QoS 1 message only after Published returns nil; an error
	// closes the connection (the server logs it and passes it to Closed).
	// p.Payload is not reused by the server. p.Retain is as the client set
	// it: the server retains nothing, as Azure IoT Hub, which passes the
	// flag on with the message.
	Published(c *Conn, p *Publish) error
	// Subscribe decides each topic filter: granted QoS (0/1) or 0x80 failure.
	// The server never grants more than the requested QoS nor more than 1.
	// The filter counts as subscribed while Subscribe runs, so that what it
	// starts sending on it (MQTT permits that before the SUBACK) is sent.
	Subscribe(c *Conn, filter string, qos byte) byte
	// Unsubscribe is called for each filter of an UNSUBSCRIBE.
	Unsubscribe(c *Conn, filter string)
	// Closed is called once, when a connection that Authenticate accepted
	// (returned 0 for) ends: err is nil after DISCONNECT, else why it ended.
	Closed(c *Conn, err error)
}

// Errors of the server and its connections.
var (
	ErrServerClosed        = errors.New("mqtt: server closed")
	ErrConnClosed          = errors.New("mqtt: connection closed")
	ErrNotSubscribed       = errors.New("mqtt: client has no subscription matching the topic")
	ErrTopicName           = errors.New("not a valid topic name")
	ErrTooManyInflight     = errors.New("mqtt: all 65535 packet identifiers await PUBACK")
	ErrProtocolViolation   = errors.New("mqtt: protocol violation")
	ErrKeepAliveTimeout    = errors.New("mqtt: no packet from the client within 1.5 times its keepalive")
	ErrConnectTimeout      = errors.New("mqtt: no CONNECT within the connect timeout")
	ErrTooManyConnections  = errors.New("mqtt: at the connection limit")
	errHandshakeIncomplete = errors.New("mqtt: connection ended before CONNECT")
	errEvicted             = errors.New("mqtt: closed, unauthenticated, to make room for another connection")
)

// Defaults of Server fields left zero.
const (
	DefaultConnectTimeout = 10 * time.Second
	DefaultWriteTimeout   = 10 * time.Second
	readBufferSize        = 1024
)

// DefaultMaxSubscribeFilters bounds the topic filters of one SUBSCRIBE: an
// Azure IoT device holds four or five subscriptions in all.
const DefaultMaxSubscribeFilters = 64

// Server accepts MQTT 3.1.1 connections and hands their packets to Handler.
// It implements QoS 0 and 1 only: a QoS 2 PUBLISH from a client closes the
// connection, and QoS 2 subscriptions are granted QoS 1. It retains no
// messages: a retained PUBLISH is handled as any other. It keeps
// no sessions itself: a Handler that keeps a client's subscriptions resumes
// them with Conn.ResumeSession.
type Server struct {
	Handler        Handler
	MaxPacketSize  int           // default DefaultMaxPacketSize (256 KiB + 8 KiB)
	ConnectTimeout time.Duration // TLS handshake plus CONNECT; default 10 s
	WriteTimeout   time.Duration // per packet write; a client slower than this is closed; default 10 s
	Logger         *slog.Logger  // default slog.Default()

	// MaxSubscribeFilters is how many topic filters one SUBSCRIBE may
	// hold; one with more closes the connection. Default DefaultMaxSubscribeFilters.
	MaxSubscribeFilters int

	// MaxConns bounds the connections open at once, from every listener
	// and ServeConn together: past it a new connection is closed at once.
	// 0: no bound.
	MaxConns int
	// MaxUnauthenticated bounds the connections not authenticated: before
	// CONNECT, in Authenticate, or accepted with Conn.MarkUnauthenticated.
	// At this bound, or at MaxConns, the oldest of them is closed for a new
	// connection, so that clients that never authenticate cannot keep
	// devices out. 0: no bound but MaxConns.
	MaxUnauthenticated int

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[*Conn]struct{}
	limiter   *connlimit.Limiter // nil without bounds
	wg        sync.WaitGroup
}

func (s *Server) maxPacketSize() int {
	if s.MaxPacketSize > 0 {
		return s.MaxPacketSize
	}
	return DefaultMaxPacketSize
}

func (s *Server) maxSubscribeFilters() int {
	if s.MaxSubscribeFilters > 0 {
		return s.MaxSubscribeFilters
	}
	return DefaultMaxSubscribeFilters
}

func (s *Server) connectTimeout() time.Duration {
	if s.ConnectTimeout > 0 {
		return s.ConnectTimeout
	}
	return DefaultConnectTimeout
}

func (s *Server) writeTimeout() time.Duration {
	if s.WriteTimeout > 0 {
		return s.WriteTimeout
	}
	return DefaultWriteTimeout
}

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.Default()
}

// Serve accepts connections on l (typically from tls.NewListener) until Close
// and then returns ErrServerClosed. Serve may be called for several listeners.
func (s *Server) Serve(l net.Listener) error {
	if s.Handler == nil {
		return errors.New("mqtt: Server.Handler is nil")
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	if s.listeners == nil {
		s.listeners = make(map[net.Listener]struct{})
		s.conns = make(map[*Conn]struct{})
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()

	var delay time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if s.isClosed() {
				return ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of file descriptors and the like: back off as net/http does.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.logger().Warn("mqtt: accept failed; retrying", "err", err, "retry_in", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		if c := newConn(s, nc); errors.Is(s.start(c), ErrTooManyConnections) {
			c.raw.Close()
		}
	}
}

// ServeConn serves one connection accepted elsewhere — MQTT over WebSocket,
// inside an HTTPS request, whose TLS is state — and returns at once. It
// counts against MaxConns as the listeners' connections do: past it,
// ServeConn returns ErrTooManyConnections and leaves nc to the caller to
// close. A connection that has a CloseNow method, as a WebSocket has, is
// closed with it when the server ends it (as a TLS connection's TCP,
// without an alert), and with Close when it ends of itself.
func (s *Server) ServeConn(nc net.Conn, state *tls.ConnectionState) error {
	if s.Handler == nil {
		return errors.New("mqtt: Server.Handler is nil")
	}
	c := newConn(s, nc)
	c.tlsState = state
	return s.start(c)
}

// start serves c, unless the server is closed (ErrServerClosed; c is
// closed) or has no room for it (ErrTooManyConnections).
func (s *Server) start(c *Conn) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		c.nc.Close()
		return ErrServerClosed
	}
	if s.limiter == nil && (s.MaxConns > 0 || s.MaxUnauthenticated > 0) {
		s.limiter = connlimit.NewLimiter("mqtt", "unauthenticated", orNoBound(s.MaxConns), orNoBound(s.MaxUnauthenticated))
	}
	if s.limiter != nil {
		// Closed in the background: a WebSocket's close waits for the client.
		if c.slot = s.limiter.Take(func() { go c.closeWith(errEvicted) }); c.slot == nil {
			return ErrTooManyConnections
		}
	}
	if s.conns == nil {
		s.conns = make(map[*Conn]struct{})
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	go c.serve()
	return nil
}

func orNoBound(n int) int {
	if n > 0 {
		return n
	}
	return math.MaxInt
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Close closes the listeners and all connections, then waits until every
// connection's goroutine has finished (and Handler.Closed has returned), so it
// must not be called from a Handler method.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	var ls []net.Listener
	for l := range s.listeners {
		ls = append(ls, l)
	}
	cs := make([]*Conn, 0, len(s.conns))
	for c := range s.conns {
		cs = append(cs, c)
	}
	s.mu.Unlock()
	var errs []error
	for _, l := range ls {
		if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	for _, c := range cs {
		c.closeWith(ErrServerClosed)
	}
	s.wg.Wait()
	return errors.Join(errs...)
}

// Conn is one client connection.
type Conn struct {
	srv         *Server
	nc          net.Conn             // what packets are read from and written to
	raw         net.Conn             // the TCP connection under nc, or nc closing at once: closed without a goodbye
	tc          *tls.Conn            // nil without TLS of its own
	tlsState    *tls.ConnectionState // the TLS a connection without tc is carried in (WebSocket over HTTPS)
	clientID    string               // set before Authenticate, then immutable
	readTimeout time.Duration
	accepted    bool
	// slot is the connection's place under the server's bounds (nil:
	// none), evictable until it is authenticated.
	slot            *connlimit.Slot
	unauthenticated bool // accepted without credentials: MarkUnauthenticated

	// Used only by the reading goroutine. br is borrowed from readerPool
	// while packets are buffered and returned when the connection idles.
	br    *bufio.Reader
	first [1]byte
	// readBy is the keep-alive read deadline set last, as time since
	// monoEpoch (monotonic, and smaller than a time.Time); 0: none.
	readBy time.Duration
	// refusedBefore: a subscription of this connection was refused, and
	// logged at Info; later refusals are logged at Debug.
	refusedBefore bool

	wmu sync.Mutex // serializes writes

	mu       sync.Mutex // guards the fields below
	closed   bool
	closeErr error
	subs     []subscription
	resume   []Subscription         // what ResumeSession asked to subscribe again; nil: no session
	inflight map[uint16]func(error) // QoS 1 packets sent, awaiting PUBACK
	nextID   uint16
	value    any
}

type subscription struct {
	filter string
	qos    byte
}

var readerPool = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, readBufferSize) }}

func newConn(s *Server, nc net.Conn) *Conn {
	c := &Conn{srv: s, nc: nc, raw: nc}
	if tc, ok := nc.(*tls.Conn); ok {
		c.tc = tc
		c.raw = tc.NetConn()
	} else if a, ok := nc.(nowCloser); ok {
		c.raw = closingNow{nc, a}
	}
	return c
}

// nowCloser is a connection that can also close without its goodbye (a
// WebSocket's close handshake), which a client that does not answer it
// would keep open for seconds.
type nowCloser interface{ CloseNow() error }

// closingNow closes its connection at once.
type closingNow struct {
	net.Conn
	a nowCloser
}

func (c closingNow) Close() error { return c.a.CloseNow() }

// ClientID returns the client identifier of CONNECT (for Azure IoT Hub the
// device ID, or "device/module").
func (c *Conn) ClientID() string { return c.clientID }

// RemoteAddr returns the client's address.
func (c *Conn) RemoteAddr() net.Addr { return c.raw.RemoteAddr() }

// TLS returns the TLS connection state (with the client's certificates for
// X.509 authentication), or nil when the connection is not TLS.
func (c *Conn) TLS() *tls.ConnectionState {
	if c.tc == nil {
		return c.tlsState
	}
	cs := c.tc.ConnectionState()
	return &cs
}

// SetValue attaches v to the connection.
func (c *Conn) SetValue(v any) {
	c.mu.Lock()
	c.value = v
	c.mu.Unlock()
}

// Value returns what SetValue attached.
func (c *Conn) Value() any {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.value
}

// ResumeSession, called from Handler.Authenticate for a client that
// connected with CleanSession 0, resumes the session the Handler kept for
// it: the CONNACK says a session is present, and the server then subscribes
// the client to subs again, calling Handler.Subscribe for each as for a
// SUBSCRIBE (without a SUBACK), before it reads the client's next packet.
func (c *Conn) ResumeSession(subs []Subscription) {
	c.mu.Lock()
	c.resume = append([]Subscription{}, subs...)
	c.mu.Unlock()
}

// MarkUnauthenticated, called from Handler.Authenticate for a client it
// accepts without knowing who it is, keeps the connection among the
// unauthenticated ones that Server.MaxUnauthenticated bounds, the first to
// be closed to make room for others.
func (c *Conn) MarkUnauthenticated() { c.unauthenticated = true }

// Close closes the connection; Handler.Closed then receives ErrConnClosed.
func (c *Conn) Close() { c.closeWith(ErrConnClosed) }

// IsClosed reports whether the connection has been closed, by Close or by
// the server (to make room for another, or stopping): an Authenticate still
// running for it need not act for a client that can no longer be answered.
func (c *Conn) IsClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// Subscribed reports whether the client has a subscription matching topic.
func (c *Conn) Subscribed(topic string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.grantedLocked(topic)
	return ok
}

// grantedLocked returns the highest QoS granted to a filter matching topic.
func (c *Conn) grantedLocked(topic string) (byte, bool) {
	var qos byte
	found := false
	for _, s := range c.subs {
		if matchTopic(s.filter, topic) {
			found = true
			qos = max(qos, s.qos)
		}
	}
	return qos, found
}

// Send publishes to the client if it has a matching subscription (else it
// returns ErrNotSubscribed) at QoS min(qos, granted QoS, 1). For QoS 1 it
// assigns a packet identifier and calls onAck (which may be nil) with nil
// when the PUBACK arrives, or with an error wrapping ErrConnClosed when the
// connection ends first; a message delivered at QoS 0 calls onAck(nil) before
// Send returns. onAck is called exactly once if and only if Send returns nil,
// and never while Send's locks are held.
//
// Send is safe for concurrent use. A write that does not finish within the
// server's WriteTimeout closes the connection.
func (c *Conn) Send(topic string, payload []byte, qos byte, onAck func(error)) error {
	if err := ValidateTopicName(topic); err != nil {
		return fmt.Errorf("mqtt: topic %s: %w: %w", quote(topic), ErrTopicName, err)
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return ErrConnClosed
	}
	granted, ok := c.grantedLocked(topic)
	if !ok {
		c.mu.Unlock()
		return ErrNotSubscribed
	}
	qos = min(qos, granted, 1)
	var id uint16
	if qos == 1 {
		var err error
		if id, err = c.allocIDLocked(onAck); err != nil {
			c.mu.Unlock()
			return err
		}
	}
	c.mu.Unlock()

	p := Publish{Topic: topic, Payload: payload, QoS: qos, PacketID: id}
	if err := c.write(&p); err != nil {
		if qos == 1 {
			c.mu.Lock()
			_, mine := c.inflight[id]
			delete(c.inflight, id)
			c.mu.Unlock()
			if !mine {
				// The connection's shutdown already reported the failure to onAck.
				return nil
			}
		}
		return err
	}
	if qos == 0 && onAck != nil {
		onAck(nil)
	}
	return nil
}

func (c *Conn) allocIDLocked(onAck func(error)) (uint16, error) {
	if c.inflight == nil {
		c.inflight = make(map[uint16]func(error))
	}
	if len(c.inflight) >= 65535 {
		return 0, ErrTooManyInflight
	}
	for {
		c.nextID++
		if c.nextID == 0 {
			c.nextID = 1
		}
		if _, used := c.inflight[c.nextID]; !used {
			c.inflight[c.nextID] = onAck
			return c.nextID, nil
		}
	}
}

// write encodes p into a pooled buffer and writes it under the write lock
// with the write deadline. A failed write closes the connection.
func (c *Conn) write(p Packet) error {
	bp := getBuf()
	b, err := p.Encode((*bp)[:0])
	if err != nil {
		putBuf(bp, b)
		return err
	}
	c.wmu.Lock()
	c.nc.SetWriteDeadline(time.Now().Add(c.srv.writeTimeout()))
	_, err = c.nc.Write(b)
	c.wmu.Unlock()
	putBuf(bp, b)
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			err = fmt.Errorf("mqtt: writing %s: client did not read for %s: %w", p.Type(), c.srv.writeTimeout(), err)
		} else {
			err = fmt.Errorf("mqtt: writing %s: %w", p.Type(), err)
		}
		c.closeWith(err)
		return err
	}
	return nil
}

// closeWith closes the connection, recording why if it is the first reason.
// It closes the TCP connection directly, since sending a TLS close_notify
// could block behind a stalled writer; the connection's goroutine then
// finishes.
func (c *Conn) closeWith(reason error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.closeErr = reason
	c.mu.Unlock()
	c.raw.Close()
}

// serve runs the TLS handshake and the CONNECT exchange, then hands the
// connection to a new goroutine for reading packets. The handshake and
// Authenticate grow a goroutine's stack well past what a parked reader needs;
// starting afresh leaves an idle connection with a small stack at once
// instead of after several garbage collections.
func (c *Conn) serve() {
	if err := c.guard(c.connect); err != nil {
		c.finish(err)
		return
	}
	go c.readLoop()
}

func (c *Conn) readLoop() { c.finish(c.guard(c.loop)) }

// guard runs f, turning a panic (in a Handler method, say) into an error so
// that one bad connection cannot take the others down.
func (c *Conn) guard(f func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			c.srv.logger().Error("mqtt: panic serving connection", "client_id", c.clientID,
				"remote", c.RemoteAddr().String(), "panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("%w: %v", errPanic, r)
		}
	}()
	return f()
}

// finish closes the connection, fails the messages awaiting PUBACK and calls
// Handler.Closed.
func (c *Conn) finish(err error) {
	s := c.srv
	defer s.wg.Done()
	c.mu.Lock()
	ending := !c.closed // the connection ends on its own: no one else closed it
	if ending {
		c.closed, c.closeErr = true, err
	}
	c.mu.Unlock()
	if ending && c.tc != nil {
		// End TLS politely with close_notify (crypto/tls bounds it to 5 s).
		c.tc.Close()
	} else if ending {
		c.nc.Close()
	}
	c.slot.Release()
	c.releaseReader()

	c.mu.Lock()
	reason := c.closeErr
	inflight := c.inflight
	c.inflight = nil
	c.mu.Unlock()
	if len(inflight) > 0 {
		ackErr := ErrConnClosed
		if reason != nil && reason != ErrConnClosed {
			ackErr = fmt.Errorf("%w: %w", ErrConnClosed, reason)
		}
		for _, onAck := range inflight {
			if onAck != nil {
				c.protect("onAck", func() { onAck(ackErr) })
			}
		}
	}
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()

	c.logClose(reason)
	if c.accepted {
		c.protect("Closed", func() { s.Handler.Closed(c, reason) })
	}
}

// protect runs a callback, turning a panic into a log entry.
func (c *Conn) protect(what string, f func()) {
	defer func() {
		if r := recover(); r != nil {
			c.srv.logger().Error("mqtt: panic in "+what, "client_id", c.clientID,
				"remote", c.RemoteAddr().String(), "panic", r, "stack", string(debug.Stack()))
		}
	}()
	f()
}

func (c *Conn) logClose(reason error) {
	log := c.srv.logger()
	attrs := []any{"client_id", c.clientID, "remote", c.RemoteAddr().String()}
	switch {
	case reason == nil:
		log.Debug("mqtt: client disconnected", attrs...)
	case errors.Is(reason, ErrServerClosed), errors.Is(reason, ErrConnClosed):
		log.Debug("mqtt: connection closed", append(attrs, "reason", reason)...)
	case errors.Is(reason, ErrMalformed), errors.Is(reason, ErrPacketTooLarge),
		errors.Is(reason, ErrProtocolViolation), errors.Is(reason, ErrKeepAliveTimeout),
		errors.Is(reason, ErrUnacceptableProtocolVersion), errors.Is(reason, errRefused):
		log.Info("mqtt: connection closed", append(attrs, "reason", reason)...)
	case errors.Is(reason, errHandler), errors.Is(reason, errPanic):
		log.Warn("mqtt: connection closed", append(attrs, "reason", reason)...)
	case tlsrefusal.Note("mqtt", reason): // the client does not accept the certificate
	default: // network errors, other TLS handshake failures, scanners
		log.Debug("mqtt: connection closed", append(attrs, "reason", reason)...)
	}
}

var (
	errRefused = errors.New("mqtt: connection refused")
	errHandler = errors.New("mqtt: handler")
	errPanic   = errors.New("mqtt: panic")
)

func violation(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocolViolation, fmt.Sprintf(format, args...))
}

// loop reads and handles packets until the connection ends; it returns nil
// after DISCONNECT.
func (c *Conn) loop() error {
	for {
		p, err := c.readPacket()
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return fmt.Errorf("%w (%s)", ErrKeepAliveTimeout, c.readTimeout)
			}
			return err
		}
		if err := c.handle(p); err != nil {
			return err
		}
		if _, ok := p.(*Disconnect); ok {
			return nil
		}
	}
}

// connect runs the TLS handshake and the CONNECT exchange under the connect
// timeout.
func (c *Conn) connect() error {
	s := c.srv
	timeout := s.connectTimeout()
	c.nc.SetDeadline(time.Now().Add(timeout))
	if c.tc != nil {
		if err := c.tc.Handshake(); err != nil {
			return fmt.Errorf("mqtt: TLS handshake: %w", err)
		}
	}
	p, err := c.readPacket()
	if err != nil {
		switch {
		case errors.Is(err, ErrUnacceptableProtocolVersion):
			c.write(&Connack{ReturnCode: RefusedProtocolVersion})
		case errors.Is(err, os.ErrDeadlineExceeded):
			return fmt.Errorf("%w (%s)", ErrConnectTimeout, timeout)
		case err == io.EOF:
			return errHandshakeIncomplete
		}
		return err
	}
	cp, ok := p.(*Connect)
	if !ok {
		return violation("%s before CONNECT", p.Type())
	}
	c.clientID = cp.ClientID
	if cp.KeepAlive > 0 {
		c.readTimeout = time.Duration(cp.KeepAlive) * 1500 * time.Millisecond
	}
	code := s.Handler.Authenticate(c, cp)
	if code > RefusedNotAuthorized {
		s.logger().Error("mqtt: Handler.Authenticate returned an invalid CONNACK code; refusing with 5",
			"code", code, "client_id", c.clientID)
		code = RefusedNotAuthorized
	}
	c.accepted = code == Accepted // from here on Closed must be called
	if c.accepted && !c.unauthenticated {
		c.slot.Keep()
	}
	c.mu.Lock()
	resume := c.resume
	c.resume = nil
	c.mu.Unlock()
	if err := c.write(&Connack{SessionPresent: code == Accepted && resume != nil, ReturnCode: code}); err != nil {
		return err
	}
	if code != Accepted {
		return fmt.Errorf("%w: CONNACK return code %d", errRefused, code)
	}
	c.nc.SetReadDeadline(time.Time{})
	c.grantAll(resume)
	return nil
}

// readPacket reads the next packet. While the connection idles it holds no
// read buffer: it waits for the packet's first byte with a one-byte read and
// then borrows a bufio.Reader until the buffered bytes are used up.
func (c *Conn) readPacket() (Packet, error) {
	max := c.srv.maxPacketSize()
	c.renewReadDeadline()
	if c.br != nil && c.br.Buffered() > 0 {
		return ReadPacket(c.br, max)
	}
	c.releaseReader()
	if _, err := io.ReadFull(c.nc, c.first[:]); err != nil {
		return nil, err
	}
	c.br = readerPool.Get().(*bufio.Reader)
	c.br.Reset(c.nc)
	return readPacket(c.first[0], c.br, max)
}

// monoEpoch is what readBy counts from.
var monoEpoch = time.Now()

// renewReadDeadline gives the client its keep-alive time again as a packet
// starts, whether it waits to be read or is buffered already (a client
// whose packets span its writes may never leave the buffer empty). A busy
// connection renews only when the deadline moves by a tenth of that time,
// sparing a poller update per packet: it ends after 1.35 to 1.5 times the
// keep-alive, within MQTT's one and a half.
func (c *Conn) renewReadDeadline() {
	if !c.accepted || c.readTimeout <= 0 {
		return
	}
	by := time.Since(monoEpoch) + c.readTimeout
	if by-c.readBy < c.readTimeout/10 {
		return
	}
	c.readBy = by
	c.nc.SetReadDeadline(monoEpoch.Add(by))
}

func (c *Conn) releaseReader() {
	if c.br != nil {
		c.br.Reset(nil)
		readerPool.Put(c.br)
		c.br = nil
	}
}

// handle acts on one packet after CONNECT.
func (c *Conn) handle(p Packet) error {
	h := c.srv.Handler
	switch p := p.(type) {
	case *Publish:
		if p.QoS > 1 {
			return violation("PUBLISH to %s with QoS %d: only QoS 0 and 1 are supported", quote(p.Topic), p.QoS)
		}
		if err := h.Published(c, p); err != nil {
			return fmt.Errorf("%w: PUBLISH to %s: %w", errHandler, quote(p.Topic), err)
		}
		if p.QoS == 1 {
			return c.write(&Puback{PacketID: p.PacketID})
		}
	case *Puback:
		c.mu.Lock()
		onAck, ok := c.inflight[p.PacketID]
		delete(c.inflight, p.PacketID)
		c.mu.Unlock()
		if ok && onAck != nil {
			onAck(nil)
		}
		// A PUBACK for an unknown identifier is ignored, as a late duplicate.
	case *Subscribe:
		if n, max := len(p.Subscriptions), c.srv.maxSubscribeFilters(); n > max {
			return violation("SUBSCRIBE with %d topic filters: at most %d are accepted in one", n, max)
		}
		return c.write(&Suback{PacketID: p.PacketID, ReturnCodes: c.grantAll(p.Subscriptions)})
	case *Unsubscribe:
		if n, max := len(p.Filters), c.srv.maxSubscribeFilters(); n > max {
			return violation("UNSUBSCRIBE with %d topic filters: at most %d are accepted in one", n, max)
		}
		for _, f := range p.Filters {
			offStack(func() struct{} { h.Unsubscribe(c, f); return struct{}{} })
			c.unsubscribe(f)
		}
		return c.write(&Unsuback{PacketID: p.PacketID})
	case *Pingreq:
		return c.write(&Pingresp{})
	case *Disconnect:
	case *Connect:
		return violation("second CONNECT")
	default:
		return violation("%s from a client", p.Type())
	}
	return nil
}

// offStack runs a Handler method that may go deep (into a store, say) on
// a goroutine of its own and waits for it, so that the connection's read
// goroutine, which stays with the connection while it idles, does not keep
// the grown stack (8 KiB and more per connection) until garbage
// collections shrink it. A panic comes back with its stack, for guard.
func offStack[T any](f func() T) T {
	type result struct {
		v        T
		panicked any
	}
	done := make(chan result, 1)
	go func() {
		defer func() {
			if r := recover(); r != nil {
				done <- result{panicked: fmt.Sprintf("%v\n%s", r, debug.Stack())}
			}
		}()
		done <- result{v: f()}
	}()
	r := <-done
	if r.panicked != nil {
		panic(r.panicked)
	}
	return r.v
}

// grantAll grants subs one by one and returns their SUBACK codes. What the
// Handler refused is logged once, with a count and an example, however
// many filters a client sends.
func (c *Conn) grantAll(subs []Subscription) []byte {
	codes := make([]byte, len(subs))
	refused, example := 0, ""
	for i, sub := range subs {
		if codes[i] = c.grant(sub); codes[i] == SubscribeFailure {
			if refused == 0 {
				example = sub.Filter
			}
			refused++
		}
	}
	if refused > 0 {
		// The first refusal of a connection says why it fails; the
		// client's retries would only repeat it.
		level := slog.LevelInfo
		if c.refusedBefore {
			level = slog.LevelDebug
		}
		c.refusedBefore = true
		c.srv.logger().Log(context.Background(), level, "mqtt: subscriptions refused", "client_id", c.clientID,
			"refused", refused, "of", len(subs), "filter", quote(example))
	}
	return codes
}

// grant asks the Handler about one filter, subscribes the client to it if
// granted, and returns the SUBACK code.
func (c *Conn) grant(sub Subscription) byte {
	undo := c.subscribe(sub.Filter, min(sub.QoS, 1))
	g := offStack(func() byte { return c.srv.Handler.Subscribe(c, sub.Filter, sub.QoS) })
	switch {
	case g == SubscribeFailure:
	case g <= 2:
		g = min(g, sub.QoS, 1)
	default:
		c.srv.logger().Error("mqtt: Handler.Subscribe returned an invalid code; refusing the filter",
			"code", g, "client_id", c.clientID, "filter", sub.Filter)
		g = SubscribeFailure
	}
	if g == SubscribeFailure {
		undo()
	} else {
		c.subscribe(sub.Filter, g)
	}
	return g
}

// subscribe records filter at qos (adding or replacing, section 3.8.4); undo puts back what there was before
// (the filter at its former QoS, or nothing).
func (c *Conn) subscribe(filter string, qos byte) (undo func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range c.subs {
		if c.subs[i].filter == filter {
			was := c.subs[i].qos
			c.subs[i].qos = qos
			return func() { c.subscribe(filter, was) }
		}
	}
	// Clone: the filter aliases the SUBSCRIBE packet, which may be large.
	c.subs = append(c.subs, subscription{filter: strings.Clone(filter), qos: qos})
	return func() { c.unsubscribe(filter) }
}

func (c *Conn) unsubscribe(filter string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range c.subs {
		if c.subs[i].filter == filter {
			c.subs = append(c.subs[:i], c.subs[i+1:]...)
			return
		}
	}
}
