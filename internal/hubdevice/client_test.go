package hubdevice

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/mqtt"
)

// pipeClient is a client whose hub reads what it is sent and never answers.
func pipeClient(t *testing.T) (*Client, net.Conn) {
	t.Helper()
	local, hub := net.Pipe()
	go func() { _, _ = io.Copy(io.Discard, hub) }()
	t.Cleanup(func() { local.Close(); hub.Close() })
	return &Client{conn: local, acks: map[uint16]chan error{}, twin: map[string]chan response{},
		subs: map[string]func(*mqtt.Publish){}, done: make(chan struct{})}, hub
}

func (c *Client) pending() (acks, twin int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.acks), len(c.twin)
}

// A request that times out, or whose write fails, leaves nothing waiting
// for its answer: a long-lived connection would otherwise keep them all.
func TestUnansweredRequestsForgotten(t *testing.T) {
	c, hub := pipeClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := c.SendEvent(ctx, []byte("{}"), nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("SendEvent: %v, want the deadline", err)
	}
	if _, err := c.GetTwin(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("GetTwin: %v, want the deadline", err)
	}
	if acks, twin := c.pending(); acks != 0 || twin != 0 {
		t.Fatalf("after timeouts, %d acks and %d twin requests still awaited", acks, twin)
	}

	hub.Close()
	if err := c.SendEvent(context.Background(), []byte("{}"), nil); err == nil {
		t.Fatal("SendEvent on a closed connection: no error")
	}
	if _, err := c.GetTwin(context.Background()); err == nil {
		t.Fatal("GetTwin on a closed connection: no error")
	}
	if acks, twin := c.pending(); acks != 0 || twin != 0 {
		t.Fatalf("after failed writes, %d acks and %d twin requests still awaited", acks, twin)
	}
}
