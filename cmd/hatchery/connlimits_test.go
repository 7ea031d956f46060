package main

import (
	"bufio"
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// loopback is where and how this machine reaches c's server.
func (c *cli) loopback() *loopback {
	c.t.Helper()
	var info siteInfo
	if err := json.Unmarshal([]byte(c.ok("info", "-o", "json")), &info); err != nil {
		c.t.Fatal(err)
	}
	lb, err := info.loopback()
	if err != nil {
		c.t.Fatal(err)
	}
	return lb
}

// Idle keep-alive connections filling --max-https-connections do not keep a
// new client from being answered: the one idle longest is closed for it.
func TestIdleHTTPSConnectionsMakeRoom(t *testing.T) {
	c := startServeOn(t, "--max-https-connections", "4")
	lb := c.loopback()
	addr := strings.TrimPrefix(lb.url, "https://")
	for range 4 {
		conn, err := tls.Dial("tcp", addr, lb.tls)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	// Idle connections last 2 minutes: a client left waiting for one to
	// close would not be answered within this.
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: lb.tls}}
	defer client.CloseIdleConnections()
	resp, err := client.Get(lb.url + "/healthz")
	if err != nil {
		t.Fatalf("a new client while idle connections fill the bound: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /healthz: HTTP %d", resp.StatusCode)
	}
}
