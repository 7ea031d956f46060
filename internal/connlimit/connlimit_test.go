package connlimit

import (
	"bufio"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"sync/atomic"
	"testing"
	"time"
)

// At the bound, a connection waiting for a request — its first, or the
// next on a kept-alive connection — is closed for a new client, the one
// waiting longest first; a new client waits only while every connection
// is serving a request.
func TestListen(t *testing.T) {
	defer func(g time.Duration) { Grace = g }(Grace)
	Grace = 0 // TestGrace has it
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := Listen("test", raw, 2)
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	dial := func() net.Conn {
		c, err := net.Dial("tcp", raw.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	next := func(what string) net.Conn {
		t.Helper()
		select {
		case c := <-accepted:
			return c
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: not accepted", what)
			return nil
		}
	}
	none := func(what string) {
		t.Helper()
		select {
		case <-accepted:
			t.Fatalf("%s: accepted", what)
		case <-time.After(200 * time.Millisecond):
		}
	}
	closedByServer := func(c net.Conn, what string) {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); errors.Is(err, os.ErrDeadlineExceeded) || err == nil {
			t.Fatalf("%s: still open (%v)", what, err)
		}
	}

	aClient, bClient := dial(), dial()
	a, _ := next("the first connection"), next("the second connection")
	cClient := dial()
	c := next("a third connection, while the first two wait for their first request")
	closedByServer(aClient, "the connection waiting longest, once a third arrived")
	Active(c)
	dial()
	Active(next("a fourth connection"))
	closedByServer(bClient, "the second connection, once a fourth arrived")
	a.Close() // closed to make room, it has given its slot back already

	dial()
	none("a connection while both at the bound serve a request")
	Idle(c)
	next("the waiting connection, once one at the bound went idle")
	closedByServer(cClient, "the idle connection, for the waiting one")

	l.Close()
	if _, ok := <-accepted; ok {
		t.Fatal("accepted after Close")
	}
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v", err)
	}
}

// An HTTPS connection taken over by its handler (a WebSocket upgrade)
// gives its slot back, under TLS too, so that the connections it carries
// do not hold the HTTPS bound for as long as they last.
func TestReleaseHijacked(t *testing.T) {
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hijacked := make(chan net.Conn, 1)
	ts := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/upgrade" {
			return
		}
		c, rw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		rw.WriteString("HTTP/1.1 101 Switching Protocols\r\n\r\n")
		rw.Flush()
		hijacked <- c
	}))
	ts.Listener = Listen("test", raw, 1)
	ts.Config.ConnState = func(c net.Conn, s http.ConnState) {
		if s == http.StateHijacked {
			Release(c)
		}
	}
	ts.StartTLS()
	defer ts.Close()

	up, err := tls.Dial("tcp", raw.Addr().String(), &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	up.Write([]byte("GET /upgrade HTTP/1.1\r\nHost: x\r\n\r\n"))
	if resp, err := http.ReadResponse(bufio.NewReader(up), nil); err != nil || resp.StatusCode != 101 {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	defer (<-hijacked).Close()

	client := ts.Client()
	client.Timeout = 5 * time.Second
	resp, err := client.Get(ts.URL + "/other")
	if err != nil {
		t.Fatalf("a request while the upgraded connection stays open, at the bound of 1: %v", err)
	}
	resp.Body.Close()
}

// A connection within its grace is not closed for a newcomer, who is
// refused (Take) or waits (Wait); once past it, it is.
func TestGrace(t *testing.T) {
	defer func(g time.Duration) { Grace = g }(Grace)
	Grace = 300 * time.Millisecond
	l := NewLimiter("test", "idle", 1, 1)
	var closed atomic.Bool
	first := l.Take(func() { closed.Store(true) })
	if first == nil {
		t.Fatal("the first connection was refused")
	}
	if l.Take(func() {}) != nil || closed.Load() {
		t.Fatal("a connection within its grace was closed for a newcomer")
	}
	start := time.Now()
	if _, err := l.Wait(func() {}, nil); err != nil || !closed.Load() {
		t.Fatalf("a waiting newcomer: %v, the first closed: %v", err, closed.Load())
	}
	if waited := time.Since(start); waited < 200*time.Millisecond {
		t.Errorf("the newcomer waited %s, less than the first connection's grace", waited)
	}
}

// The first event of a quiet period is reported at once, the others of the
// period together at its end, none lost.
func TestTallyReportsEveryEvent(t *testing.T) {
	defer func(p time.Duration) { logPeriod = p }(logPeriod)
	logPeriod = 100 * time.Millisecond
	reports := make(chan int, 10)
	tl := tally{report: func(n int) { reports <- n }}
	for range 5 {
		tl.count()
	}
	if n := <-reports; n != 1 {
		t.Fatalf("first report: %d events, want 1", n)
	}
	select {
	case n := <-reports:
		if n != 4 {
			t.Fatalf("second report: %d events, want the other 4", n)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the events after the first were never reported")
	}
}
