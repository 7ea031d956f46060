package store

import (
	"context"
	"errors"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

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

// Passwords stay out of the messages about a database URL, wherever the
// URL carries them.
func TestRedactDSN(t *testing.T) {
	for _, dsn := range []string{
		"postgres://hatch:S3cretPW@127.0.0.1:1/h",
		"postgres://hatch@127.0.0.1:1/h?password=S3cretPW&sslmode=disable",
		"postgresql://hatch@127.0.0.1:1/h?sslmode=disable&pass%77ord=S3cretPW",
		"postgres://hatch@127.0.0.1:1/h?sslmode=disable&sslpassword=S3cretPW",
		"postgres://hatch@127.0.0.1:1/h?password=S3c%zzretPW",
		"postgres://hatch@127.0.0.1:1/h?password=S3c#retPW",
	} {
		if got := redactDSN(dsn); strings.Contains(got, "S3c") || strings.Contains(got, "retPW") {
			t.Errorf("redactDSN(%q) = %q", dsn, got)
		}
	}
	if got, want := redactDSN("postgres://hatch@db:5432/h?sslmode=disable&password=x"), "postgres://hatch@db:5432/h?sslmode=disable&password=xxxxx"; got != want {
		t.Errorf("redactDSN = %q, want %q", got, want)
	}
	// Nothing listens on port 1: the error names the server, not the password.
	s, err := Open(context.Background(), "postgres://hatch@127.0.0.1:1/h?password=S3cretPW&sslmode=disable&connect_timeout=5", t.TempDir())
	if err == nil {
		s.Close()
		t.Fatal("opened a database where there is none")
	}
	if strings.Contains(err.Error(), "S3cretPW") || !strings.Contains(err.Error(), "127.0.0.1:1") {
		t.Errorf("the error: %v", err)
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

// A database that takes no writes — a standby, the old primary after a
// failover — fails them as unavailable, and ReadOnly says why; it still
// answers reads.
func TestReadOnlyPostgresIsUnavailable(t *testing.T) {
	pg := testutil.StartPostgres(t)
	ctx := context.Background()
	dsn := pg.NewDatabase(t)
	st, err := OpenPostgres(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if _, err := st.Create(ctx, Doc{Kind: "k", ID: "a", Body: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	// What a standby answers, for the sessions the store has open already.
	pg.Exec(t, dsn, `ALTER SYSTEM SET default_transaction_read_only = on`)
	pg.Exec(t, dsn, `SELECT pg_reload_conf()`)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		_, err = st.Put(ctx, Doc{Kind: "k", ID: "a", Body: []byte(`{}`)}, "")
		if err != nil || time.Now().After(deadline) {
			break
		}
	}
	_, appendErr := st.AppendEvent(ctx, Event{DeviceID: "d", Body: []byte("x"), Enqueued: time.Now()})
	for name, err := range map[string]error{"Put": err, "AppendEvent": appendErr} {
		if !ReadOnly(err) || !Unavailable(err) {
			t.Errorf("%s on a read-only database: %v, want an error ReadOnly and Unavailable report", name, err)
		}
	}
	if _, err := st.Get(ctx, "k", "a"); err != nil {
		t.Errorf("Get on a read-only database: %v", err)
	}
	for _, err := range []error{nil, errors.New("other"), &pgconn.PgError{Code: "23505"}} {
		if ReadOnly(err) {
			t.Errorf("%v taken for read-only", err)
		}
	}
}

// A server that stops answering, its connections left open, fails each
// operation as unavailable within the operation's bound rather than
// holding it until the kernel gives up on the connection; once it answers
// again, so does the store.
func TestPostgresThatStopsAnswering(t *testing.T) {
	pg := testutil.StartPostgres(t)
	ctx := context.Background()
	st, err := OpenPostgres(ctx, pg.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.opTimeout = 2 * time.Second
	if _, err := st.Create(ctx, Doc{Kind: "k", ID: "a", Body: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}

	pg.Freeze(t)
	for name, op := range map[string]func() error{
		"Get":    func() error { _, err := st.Get(ctx, "k", "a"); return err },
		"Put":    func() error { _, err := st.Put(ctx, Doc{Kind: "k", ID: "a", Body: []byte(`{}`)}, ""); return err },
		"List":   func() error { _, err := st.List(ctx, "k", "", 10); return err },
		"Append": func() error { _, err := st.AppendEvent(ctx, Event{DeviceID: "d", Body: []byte("x")}); return err },
	} {
		start := time.Now()
		err := op()
		took := time.Since(start)
		if !Unavailable(err) {
			t.Errorf("%s on a server that does not answer: %v, want an error Unavailable reports", name, err)
		}
		if took > 10*time.Second {
			t.Errorf("%s took %v with a bound of %v", name, took, st.opTimeout)
		}
	}

	pg.Thaw(t)
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, err := st.Get(ctx, "k", "a")
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the store did not recover once the server answered again: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// The store's connections probe an idle server: 15 s of silence, then
// three probes 5 s apart.
func TestPostgresConnectionsKeepAlive(t *testing.T) {
	pg := testutil.StartPostgres(t)
	st, err := OpenPostgres(context.Background(), pg.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c, err := st.pool.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Release()
	tcp, ok := c.Conn().PgConn().Conn().(*net.TCPConn)
	if !ok {
		t.Fatalf("the connection is a %T, not TCP", c.Conn().PgConn().Conn())
	}
	raw, err := tcp.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int{}
	_ = raw.Control(func(fd uintptr) {
		for name, opt := range map[string][2]int{
			"SO_KEEPALIVE":  {syscall.SOL_SOCKET, syscall.SO_KEEPALIVE},
			"TCP_KEEPIDLE":  {syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE},
			"TCP_KEEPINTVL": {syscall.IPPROTO_TCP, syscall.TCP_KEEPINTVL},
			"TCP_KEEPCNT":   {syscall.IPPROTO_TCP, syscall.TCP_KEEPCNT},
		} {
			v, err := syscall.GetsockoptInt(int(fd), opt[0], opt[1])
			if err != nil {
				t.Errorf("%s: %v", name, err)
			}
			got[name] = v
		}
	})
	for name, want := range map[string]int{"SO_KEEPALIVE": 1, "TCP_KEEPIDLE": 15, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3} {
		if got[name] != want {
			t.Errorf("%s = %d, want %d", name, got[name], want)
		}
	}
}

// Opening a database whose server takes connections and says nothing
// fails within the operation's bound, rather than holding a start for good.
func TestOpenPostgresThatDoesNotAnswer(t *testing.T) {
	pg := testutil.StartPostgres(t)
	dsn := pg.NewDatabase(t)
	defer func(was time.Duration) { pgOpTimeout = was }(pgOpTimeout)
	pgOpTimeout = 2 * time.Second
	pg.Freeze(t)
	start := time.Now()
	st, err := OpenPostgres(context.Background(), dsn)
	if err == nil {
		st.Close()
		t.Fatal("opened a database whose server does not answer")
	}
	if !Unavailable(err) || !strings.Contains(err.Error(), "did not answer within 2s") {
		t.Errorf("open: %v, want the database out of reach, said so", err)
	}
	if took := time.Since(start); took > 15*time.Second {
		t.Errorf("open took %v with a bound of %v", took, pgOpTimeout)
	}
}

// A database (or role) whose default isolation is stricter than READ
// COMMITTED changes nothing: replicas opening together migrate once, and
// racing conditional writes lose with ErrPrecondition, not a
// serialization failure.
func TestPostgresStricterDefaultIsolation(t *testing.T) {
	pg := testutil.StartPostgres(t)
	for _, iso := range []string{"repeatable read", "serializable"} {
		t.Run(iso, func(t *testing.T) {
			b := backend{name: "postgres", exec: pg.Exec, newDB: func(tb testing.TB) string {
				dsn := pg.NewDatabase(tb)
				pg.Exec(tb, dsn, `DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET default_transaction_isolation TO '''||'`+iso+`'||'''', current_database()); END $$`)
				return dsn
			}}
			t.Run("ConcurrentOpen", func(t *testing.T) { testConcurrentOpen(t, b) })
			t.Run("PutRace", func(t *testing.T) { testPutRace(t, b) })
			t.Run("DeleteRace", func(t *testing.T) { testDeleteRace(t, b) })
		})
	}
	if err := (&pgconn.PgError{Code: "40001"}); !Unavailable(err) {
		t.Errorf("a serialization failure is not retryable: Unavailable(%v) = false", err)
	}
}
