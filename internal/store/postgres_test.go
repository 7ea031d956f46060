package store

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/testutil"
)

// TestPostgres runs the conformance suite against a real PostgreSQL server
// that it starts itself, in a temporary cluster.
func TestPostgres(t *testing.T) {
	pg := testutil.StartPostgres(t)
	runConformance(t, backend{name: "postgres", newDB: pg.NewDatabase, exec: pg.Exec})
}

// Open chooses the backend by the DSN's form.
func TestOpenPostgresURL(t *testing.T) {
	pg := testutil.StartPostgres(t)
	dsn := pg.NewDatabase(t)
	for _, u := range []string{dsn, strings.Replace(dsn, "postgres://", "postgresql://", 1)} {
		s, err := Open(context.Background(), u, t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := s.(*Postgres); !ok {
			t.Errorf("Open(%q) gave a %T", u, s)
		}
		s.Close()
	}
	// A wrong password is reported without the password.
	bad := strings.Replace(dsn, "postgres@", "nobody:s3cret@", 1)
	s, err := Open(context.Background(), bad, t.TempDir())
	if err == nil {
		s.Close()
		t.Fatal("Open with an unknown user succeeded")
	}
	if s != nil {
		t.Errorf("failed Open returned a non-nil store %#v", s)
	}
	if strings.Contains(err.Error(), "s3cret") {
		t.Errorf("the error shows the password: %v", err)
	}
}

// A relay says, each time it starts listening, that it may have missed
// messages: when it first listens, and when it listens again after its
// connection dropped; what is published after that arrives.
func TestRelayListensAgain(t *testing.T) {
	pg := testutil.StartPostgres(t)
	dsn := pg.NewDatabase(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st, err := OpenPostgres(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	got, missed := make(chan string, 100), make(chan struct{}, 10)
	go st.Subscribe(ctx, func(msg string) { got <- msg }, func() { missed <- struct{}{} })
	// Publish until the listener hears: it starts listening on its own time.
	heard := func(msg string) {
		t.Helper()
		deadline := time.After(20 * time.Second)
		for {
			if err := st.Publish(ctx, msg); err != nil {
				t.Fatal(err)
			}
			select {
			case m := <-got:
				if m == msg {
					return
				}
			case <-time.After(100 * time.Millisecond):
			case <-deadline:
				t.Fatalf("%q never arrived", msg)
			}
		}
	}
	heard("first")
	select {
	case <-missed: // signals published before it listened
	case <-time.After(20 * time.Second):
		t.Fatal("missed not called once listening")
	}
	pg.Exec(t, dsn, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()`)
	select {
	case <-missed:
	case <-time.After(20 * time.Second):
		t.Fatal("missed not called after the listening connection was terminated")
	}
	heard("second")
}
