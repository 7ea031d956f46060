// Package tlsrefusal tells the operator when clients refuse the server's
// certificate. A client that does not trust it, or finds it does not name
// the host it asked for, ends the handshake with a TLS alert; probes and
// scanners merely hang up. The first is the operator's to fix, and is
// worth a warning even though handshake failures are otherwise noise.
package tlsrefusal

import (
	"log/slog"
	"strings"
	"sync/atomic"
	"time"
)

// Interval is how often refusals are warned of, at most.
const Interval = time.Minute

var (
	last    atomic.Int64 // when a refusal was last warned of (Unix nanoseconds)
	refused atomic.Int64 // refusals since then
)

// Note warns of err, at most once an Interval with the count since the
// last warning, if it is a client's alert ending a handshake, and reports
// whether it was one. where names the port ("https", "mqtt").
func Note(where string, err error) bool {
	if err == nil || !isRefusal(err.Error()) {
		return false
	}
	n := refused.Add(1)
	now := time.Now().UnixNano()
	if prev := last.Load(); now-prev >= int64(Interval) && last.CompareAndSwap(prev, now) {
		refused.Add(-n)
		slog.Warn("clients are refusing the server certificate: check that it names the host devices connect to and that they trust its CA (hatchery info shows both)",
			"port", where, "refusals", n, "last", err.Error())
	}
	return true
}

// isRefusal reports whether a handshake error text is an alert the client
// sent ("remote error: tls: …"), as crypto/tls words it.
func isRefusal(text string) bool { return strings.Contains(text, "remote error: tls:") }
