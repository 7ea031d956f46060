package tpmservice

import (
	"bufio"
	"net"
	"strings"
	"testing"
	"time"
)

// pipeConn is a net.Conn reading from a string, for the request parser.
type pipeConn struct{ net.Conn }

func (pipeConn) SetReadDeadline(time.Time) error { return nil }

func parse(s string) (*request, error) {
	return readRequest(bufio.NewReader(strings.NewReader(s)), pipeConn{})
}

func TestReadRequest(t *testing.T) {
	r, err := parse("POST /sign?x=1 HTTP/1.1\r\nHost: x\r\ncontent-length: 2\r\nConnection: close\r\n\r\n{}")
	if err != nil || r.method != "POST" || r.path != "/sign" || string(r.body) != "{}" || !r.close {
		t.Fatalf("%+v %v", r, err)
	}
	if r, err := parse("GET /endorsement-key HTTP/1.0\r\n\r\n"); err != nil || !r.close || r.body != nil {
		t.Fatalf("HTTP/1.0: %+v %v", r, err)
	}
	for _, tc := range []struct {
		in     string
		status int
	}{
		{"GET /\r\n\r\n", 400},
		{"GET sign HTTP/1.1\r\n\r\n", 400},
		{"GET / SPDY/3\r\n\r\n", 400},
		{"POST /sign HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400},
		{"POST /sign HTTP/1.1\r\nContent-Length: many\r\n\r\n", 400},
		{"POST /sign HTTP/1.1\r\nno colon here\r\n\r\n", 400},
		{"POST /sign HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501},
		{"POST /sign HTTP/1.1\r\nContent-Length: 70000\r\n\r\n", 413},
		{"GET / HTTP/1.1\r\nX: " + strings.Repeat("a", maxHeader) + "\r\n\r\n", 431},
	} {
		_, err := parse(tc.in)
		m, ok := err.(*errMalformed)
		if !ok || m.status != tc.status {
			t.Errorf("%.40q: %v, want %d", tc.in, err, tc.status)
		}
	}
	// A body shorter than announced is an I/O error, not a request.
	if _, err := parse("POST /sign HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}"); err == nil {
		t.Error("truncated body accepted")
	}
}

func TestReadResponse(t *testing.T) {
	status, body, err := readResponse(bufio.NewReader(strings.NewReader("HTTP/1.1 409 Conflict\r\nContent-Length: 3\r\n\r\n{}\n")))
	if err != nil || status != 409 || string(body) != "{}\n" {
		t.Fatalf("%d %q %v", status, body, err)
	}
	for _, in := range []string{"", "HTTP/1.1 OK\r\n\r\n", "HTTP/1.1 200 OK\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n"} {
		if _, _, err := readResponse(bufio.NewReader(strings.NewReader(in))); err == nil {
			t.Errorf("%q accepted", in)
		}
	}
}

func FuzzReadRequest(f *testing.F) {
	f.Add("POST /sign HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
	f.Add("GET /endorsement-key HTTP/1.1\r\nHost: aziot-tpmd\r\n\r\n")
	f.Add("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
	f.Fuzz(func(t *testing.T, in string) {
		r, err := parse(in)
		if err == nil && (len(r.body) > maxBody || !strings.HasPrefix(r.path, "/")) {
			t.Fatalf("accepted %+v", r)
		}
	})
}

func FuzzReadResponse(f *testing.F) {
	f.Add("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{}\n")
	f.Add("HTTP/1.1 409 Conflict\r\nContent-Length: 99\r\n\r\n{}")
	f.Add("HTTP/1.1 -5 Odd\r\nContent-Length: 0\r\n\r\n")
	f.Fuzz(func(t *testing.T, in string) {
		status, body, err := readResponse(bufio.NewReader(strings.NewReader(in)))
		if err == nil && (status < 100 || status > 599 || len(body) > 1<<20) {
			t.Fatalf("accepted status %d with %d bytes", status, len(body))
		}
	})
}
