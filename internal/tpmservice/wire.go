package tpmservice

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// The service speaks the subset of HTTP/1.1 its clients send (Go's
// net/http, curl --unix-socket): one request at a time per connection,
// bodies with Content-Length. Serving it without net/http keeps the TPM
// service's resident memory about 2 MiB smaller, which matters on the
// small devices the runtime targets.

const (
	maxHeader     = 8 << 10
	headerTimeout = 10 * time.Second
	bodyTimeout   = 30 * time.Second
	// writeTimeout bounds writing an answer to a client that reads slowly.
	writeTimeout = 2 * time.Minute
	idleTimeout  = 5 * time.Minute
)

// request is what the service needs of an HTTP request.
type request struct {
	method, path string
	body         []byte
	close        bool // the client asked to close the connection after the answer
}

// response is a status and a JSON answer.
type response struct {
	status int
	allow  string // for 405
	v      any
}

var statusText = map[int]string{
	200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
	409: "Conflict", 411: "Length Required", 413: "Request Entity Too Large", 422: "Unprocessable Entity",
	431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
}

// errMalformed is a request that cannot be read; the answer closes the connection.
type errMalformed struct {
	status int
	msg    string
}

func (e *errMalformed) Error() string { return e.msg }

// readRequest reads one request from br; io.EOF means the client closed
// the connection between requests.
func readRequest(br *bufio.Reader, conn net.Conn) (*request, error) {
	_ = conn.SetReadDeadline(time.Now().Add(idleTimeout))
	if _, err := br.Peek(1); err != nil {
		return nil, err
	}
	_ = conn.SetReadDeadline(time.Now().Add(headerTimeout))
	lr := &limitedLines{r: br, left: maxHeader}
	line, err := lr.line()
	if err != nil {
		return nil, err
	}
	method, rest, ok1 := strings.Cut(line, " ")
	target, proto, ok2 := strings.Cut(rest, " ")
	if !ok1 || !ok2 || !strings.HasPrefix(proto, "HTTP/1.") || !strings.HasPrefix(target, "/") {
		return nil, &errMalformed{400, fmt.Sprintf("malformed request line %q", line)}
	}
	r := &request{method: method, path: target, close: proto == "HTTP/1.0"}
	if i := strings.IndexByte(r.path, '?'); i >= 0 {
		r.path = r.path[:i]
	}
	length := -1
	for {
		line, err := lr.line()
		if err != nil {
			return nil, err
		}
		if line == "" {
			break
		}
		name, value, ok := strings.Cut(line, ":")
		if !ok {
			return nil, &errMalformed{400, fmt.Sprintf("malformed header line %q", line)}
		}
		value = strings.TrimSpace(value)
		switch strings.ToLower(name) {
		case "content-length":
			n, err := strconv.Atoi(value)
			if err != nil || n < 0 {
				return nil, &errMalformed{400, fmt.Sprintf("Content-Length %q is not a length", value)}
			}
			length = n
		case "transfer-encoding":
			return nil, &errMalformed{501, "chunked bodies are not accepted: send Content-Length"}
		case "connection":
			r.close = r.close || strings.EqualFold(value, "close")
		}
	}
	if length > maxBody {
		return nil, &errMalformed{413, fmt.Sprintf("request body larger than %d bytes", maxBody)}
	}
	if length > 0 {
		_ = conn.SetReadDeadline(time.Now().Add(bodyTimeout))
		r.body = make([]byte, length)
		if _, err := io.ReadFull(br, r.body); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// limitedLines reads CRLF-terminated lines within a byte budget.
type limitedLines struct {
	r    *bufio.Reader
	left int
}

func (l *limitedLines) line() (string, error) {
	var b []byte
	for {
		frag, err := l.r.ReadSlice('\n')
		l.left -= len(frag)
		if l.left < 0 {
			return "", &errMalformed{431, fmt.Sprintf("request header larger than %d bytes", maxHeader)}
		}
		b = append(b, frag...)
		if err == nil {
			return strings.TrimRight(string(b), "\r\n"), nil
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			return "", err
		}
	}
}

// readResponse reads the service's answer: status and body (bounded).
func readResponse(br *bufio.Reader) (int, []byte, error) {
	lr := &limitedLines{r: br, left: maxHeader}
	line, err := lr.line()
	if err != nil {
		return 0, nil, err
	}
	proto, rest, _ := strings.Cut(line, " ")
	code, _, _ := strings.Cut(rest, " ")
	status, err := strconv.Atoi(code)
	if !strings.HasPrefix(proto, "HTTP/1.") || err != nil || status < 100 || status > 599 {
		return 0, nil, fmt.Errorf("malformed status line %q", line)
	}
	length := -1
	for {
		line, err := lr.line()
		if err != nil {
			return 0, nil, err
		}
		if line == "" {
			break
		}
		if name, value, ok := strings.Cut(line, ":"); ok && strings.EqualFold(name, "content-length") {
			if length, err = strconv.Atoi(strings.TrimSpace(value)); err != nil || length < 0 || length > 1<<20 {
				return 0, nil, fmt.Errorf("bad Content-Length %q", value)
			}
		}
	}
	if length < 0 {
		return 0, nil, errors.New("the answer has no Content-Length")
	}
	body := make([]byte, length)
	_, err = io.ReadFull(br, body)
	return status, body, err
}

func writeResponse(w io.Writer, rsp response, closing bool) error {
	body, err := json.Marshal(rsp.v)
	if err != nil {
		return err
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n", rsp.status, statusText[rsp.status], len(body)+1)
	if rsp.allow != "" {
		fmt.Fprintf(&b, "Allow: %s\r\n", rsp.allow)
	}
	if closing {
		b.WriteString("Connection: close\r\n")
	}
	b.WriteString("\r\n")
	b.Write(body)
	b.WriteByte('\n')
	_, err = w.Write(b.Bytes())
	return err
}

// ServeListener serves s on l until ctx is done, then lets requests in
// flight finish for up to ten seconds and closes l.
func ServeListener(ctx context.Context, l net.Listener, s *Server) error {
	var (
		mu    sync.Mutex
		conns = map[net.Conn]bool{} // open connections: true while a request is in flight
		wg    sync.WaitGroup
	)
	busy := func(c net.Conn, b bool) {
		mu.Lock()
		defer mu.Unlock()
		if _, open := conns[c]; open {
			conns[c] = b
		}
	}
	var closeOnce sync.Once
	closeListener := func() { closeOnce.Do(func() { l.Close() }) }
	stop := context.AfterFunc(ctx, func() {
		closeListener()
		mu.Lock()
		defer mu.Unlock()
		for c, inFlight := range conns {
			if !inFlight {
				c.Close() // idle: nothing to finish
			}
		}
	})
	defer stop()
	var err error
	for backoff := 5 * time.Millisecond; ; {
		var c net.Conn
		c, err = l.Accept()
		if err != nil && ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
			// Out of file descriptors, an aborted connection: wait and go
			// on, as net/http does, rather than take the TPM service down.
			slog.Warn("accepting a connection failed", "error", err, "retry", backoff)
			time.Sleep(backoff)
			backoff = min(backoff*2, time.Second)
			continue
		}
		if err != nil {
			break
		}
		backoff = 5 * time.Millisecond
		mu.Lock()
		conns[c] = false
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.serveConn(ctx, c, busy)
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
		}()
	}
	closeListener()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		<-done
	}
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// serveConn answers the requests of one connection in turn.
func (s *Server) serveConn(ctx context.Context, c net.Conn, busy func(net.Conn, bool)) {
	defer c.Close()
	uid, known := peerUID(c)
	br := bufio.NewReader(c)
	for ctx.Err() == nil {
		r, err := readRequest(br, c)
		if err != nil {
			if m, ok := errors.AsType[*errMalformed](err); ok {
				s.log.Warn("malformed request", "error", m.msg)
				_ = c.SetWriteDeadline(time.Now().Add(headerTimeout))
				_ = writeResponse(c, response{status: m.status, v: errorResponse{m.msg}}, true)
			}
			return
		}
		busy(c, true)
		rsp := s.answer(r, uid, known)
		closing := r.close || ctx.Err() != nil
		_ = c.SetWriteDeadline(time.Now().Add(writeTimeout))
		err = writeResponse(c, rsp, closing)
		busy(c, false)
		if err != nil || closing {
			return
		}
	}
}

// peerUID is the user of the process at the other end of a Unix socket
// connection, as the kernel says (SO_PEERCRED); known false otherwise.
func peerUID(c net.Conn) (uid uint32, known bool) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return 0, false
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, false
	}
	var cred *syscall.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil || cerr != nil {
		return 0, false
	}
	return cred.Uid, true
}
