package daemon

import (
	"testing"
	"time"
)

// A connection dropped (as `iotedge system reprovision` drops it) takes its
// token renewal along: a renewal firing with no connection closed a nil
// client and took the daemon down.
func TestDroppedHubConnNeverRenews(t *testing.T) {
	h := hubConn{done: make(chan struct{}), renew: time.After(0)}
	h.drop()
	h.drop() // dropping what is already dropped is harmless
	select {
	case <-h.renew:
		t.Fatal("the renewal of a dropped connection fired")
	case <-h.done:
		t.Fatal("a dropped connection still reports its end")
	case <-time.After(50 * time.Millisecond):
	}
}
