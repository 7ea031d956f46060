package connlimit

import (
	"bufio"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

func TestListen(t *testing.T) {
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := Listen(raw, 1)
	accepted := make(chan net.Conn, 2)
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
	for range 2 {
		c, err := net.Dial("tcp", raw.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	first := <-accepted
	select {
	case <-accepted:
		t.Fatal("a second connection was accepted while the first, at the bound of 1, was open")
	case <-time.After(200 * time.Millisecond):
	}
	first.Close()
	first.Close() // a second close gives back nothing more
	select {
	case c := <-accepted:
		c.Close()
	case <-time.After(10 * time.Second):
		t.Fatal("the waiting connection was not accepted once the first closed")
	}
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
	ts.Listener = Listen(raw, 1)
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
