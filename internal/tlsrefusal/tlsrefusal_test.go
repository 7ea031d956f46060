package tlsrefusal

import (
	"bytes"
	"crypto/tls"
	"log/slog"
	"net"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/testutil"
)

// A client that does not trust the server's certificate makes the server's
// handshake fail with its alert: that is warned of, once an interval with a
// count; a client that hangs up is not.
func TestNote(t *testing.T) {
	var logs bytes.Buffer
	defer slog.SetDefault(slog.Default())
	slog.SetDefault(slog.New(slog.NewTextHandler(&logs, nil)))
	last.Store(0)

	cert := testutil.NewCert(t, "localhost", false, nil)
	handshake := func(client func(net.Conn)) error {
		a, b := net.Pipe()
		go func() { client(b); b.Close() }()
		defer a.Close()
		return tls.Server(a, &tls.Config{Certificates: []tls.Certificate{cert}}).Handshake()
	}
	untrusting := func(c net.Conn) { _ = tls.Client(c, &tls.Config{ServerName: "localhost"}).Handshake() }
	for range 3 {
		if err := handshake(untrusting); !Note("mqtt", err) {
			t.Fatalf("a client's alert not taken for a refusal: %v", err)
		}
	}
	if err := handshake(func(net.Conn) {}); Note("https", err) {
		t.Errorf("a client hanging up taken for a refusal: %v", err)
	}
	if n := strings.Count(logs.String(), "clients are refusing the server certificate"); n != 1 || !strings.Contains(logs.String(), "refusals=1") {
		t.Errorf("%d warnings for three refusals within a minute:\n%s", n, logs.String())
	}
	last.Store(0) // a minute later
	Note("mqtt", handshake(untrusting))
	if !strings.Contains(logs.String(), "refusals=3") {
		t.Errorf("the next warning does not count the refusals since the last:\n%s", logs.String())
	}
}
