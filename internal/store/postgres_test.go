package store

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// TestPostgres runs the conformance suite against a real PostgreSQL server
// that it starts itself, in a temporary cluster.
func TestPostgres(t *testing.T) {
	pg := startPostgres(t)
	runConformance(t, backend{name: "postgres", newDB: pg.newDatabase, exec: pg.exec})
}

// Open chooses the backend by the DSN's form.
func TestOpenPostgresURL(t *testing.T) {
	pg := startPostgres(t)
	dsn := pg.newDatabase(t)
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

// pgCluster is a PostgreSQL server in a temporary directory, listening on
// a free port of 127.0.0.1 and on a unix socket in that directory.
type pgCluster struct {
	bin, dir, runAs string
	port            int
	dbs             atomic.Int64
}

// pgMissing fails under CI=true, where the postgresql package is installed
// by scripts/install-test-deps.sh, and skips elsewhere.
func pgMissing(tb testing.TB, format string, args ...any) {
	tb.Helper()
	if os.Getenv("CI") == "true" {
		tb.Fatalf(format, args...)
	}
	tb.Skipf(format, args...)
}

// pgBinDir returns the newest /usr/lib/postgresql/N/bin with initdb and pg_ctl.
func pgBinDir() string {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(dirs, func(a, b string) int { // by version number, not as text
		va, _ := strconv.Atoi(filepath.Base(filepath.Dir(a)))
		vb, _ := strconv.Atoi(filepath.Base(filepath.Dir(b)))
		return va - vb
	})
	for i := len(dirs) - 1; i >= 0; i-- {
		_, e1 := os.Stat(filepath.Join(dirs[i], "initdb"))
		_, e2 := os.Stat(filepath.Join(dirs[i], "pg_ctl"))
		if e1 == nil && e2 == nil {
			return dirs[i]
		}
	}
	return ""
}

// startPostgres initializes and starts a cluster for this test, and stops
// and removes it when the test ends. PostgreSQL refuses to run as root, so
// under root the cluster belongs to, and runs as, the postgres system user
// that Debian's package creates.
func startPostgres(tb testing.TB) *pgCluster {
	tb.Helper()
	bin := pgBinDir()
	if bin == "" {
		pgMissing(tb, "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin: install the Debian package postgresql (apt-get install postgresql)")
	}
	pg := &pgCluster{bin: bin}
	var uid, gid int = -1, -1
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			pgMissing(tb, "running as root, and there is no postgres user to run PostgreSQL as (the Debian package postgresql creates it): %v", err)
		}
		pg.runAs = "postgres"
		uid, _ = strconv.Atoi(u.Uid)
		gid, _ = strconv.Atoi(u.Gid)
	}
	// Not t.TempDir: its parent is private to this user, and the server may
	// run as another. The socket path must stay under 108 bytes.
	dir, err := os.MkdirTemp("", "hatchery-pg-")
	if err != nil {
		tb.Fatal(err)
	}
	pg.dir = dir
	tb.Cleanup(func() { os.RemoveAll(dir) })
	if uid >= 0 {
		if err := os.Chown(dir, uid, gid); err != nil {
			tb.Fatal(err)
		}
	}
	data := filepath.Join(dir, "data")

	// A linguistic default collation (ICU), where the server has it: the
	// store must order IDs byte by byte regardless.
	base := []string{"-D", data, "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-sync", "--no-instructions"}
	if out, err := pg.command("initdb", append(base, "--locale-provider=icu", "--icu-locale=en-US", "--locale=C.UTF-8")...).CombinedOutput(); err != nil {
		tb.Logf("initdb with an ICU collation failed (%v), using the default:\n%s", err, out)
		os.RemoveAll(data)
		if out, err := pg.command("initdb", base...).CombinedOutput(); err != nil {
			tb.Fatalf("initdb: %v\n%s", err, out)
		}
	}

	// Another process may take the port between the probe and the bind;
	// then the server does not start, and we try another.
	var lastErr error
	for range 5 {
		pg.port = freePort(tb)
		opts := fmt.Sprintf("-h 127.0.0.1 -p %d -k %s -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300", pg.port, dir)
		out, err := pg.command("pg_ctl", "-D", data, "-l", filepath.Join(dir, "log"), "-w", "-t", "60", "-o", opts, "start").CombinedOutput()
		if err == nil {
			lastErr = nil
			break
		}
		log, _ := os.ReadFile(filepath.Join(dir, "log"))
		lastErr = fmt.Errorf("pg_ctl start: %v\n%s\nserver log:\n%s", err, out, log)
	}
	if lastErr != nil {
		tb.Fatal(lastErr)
	}
	tb.Cleanup(func() {
		if out, err := pg.command("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop").CombinedOutput(); err != nil {
			tb.Errorf("pg_ctl stop: %v\n%s", err, out)
		}
	})
	return pg
}

// command runs a PostgreSQL program as the cluster's owner.
func (pg *pgCluster) command(name string, args ...string) *exec.Cmd {
	path := filepath.Join(pg.bin, name)
	if pg.runAs == "" {
		return exec.Command(path, args...)
	}
	return exec.Command("runuser", append([]string{"-u", pg.runAs, "--", path}, args...)...)
}

func (pg *pgCluster) url(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", pg.port, db)
}

// newDatabase creates an empty database and returns its URL.
func (pg *pgCluster) newDatabase(tb testing.TB) string {
	tb.Helper()
	name := fmt.Sprintf("hatchery_%d", pg.dbs.Add(1))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, pg.url("postgres"))
	if err != nil {
		tb.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		tb.Fatal(err)
	}
	return pg.url(name)
}

// exec runs SQL on the database at dsn, outside any store.
func (pg *pgCluster) exec(tb testing.TB, dsn, sql string) {
	tb.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		tb.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, sql); err != nil {
		tb.Fatalf("%s: %v", sql, err)
	}
}

// freePort returns a port of 127.0.0.1 that was free a moment ago, below
// Linux's ephemeral range so that no outgoing connection holds it.
func freePort(tb testing.TB) int {
	tb.Helper()
	for range 200 {
		port := 10000 + rand.IntN(22000)
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err == nil {
			l.Close()
			return port
		}
	}
	tb.Fatal("found no free port on 127.0.0.1")
	return 0
}
