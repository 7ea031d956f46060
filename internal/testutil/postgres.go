package testutil

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Postgres is a PostgreSQL server in a temporary directory, listening on
// a free port of 127.0.0.1 and on a unix socket in that directory.
type Postgres struct {
	bin, dir, runAs string
	port            int
	running         bool
	dbs             atomic.Int64
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

// StartPostgres initializes and starts a cluster for this test, and stops
// and removes it when the test ends. PostgreSQL refuses to run as root, so
// under root the cluster belongs to, and runs as, the postgres system user
// that Debian's package creates.
func StartPostgres(tb testing.TB) *Postgres {
	tb.Helper()
	bin := pgBinDir()
	if bin == "" {
		Missing(tb, "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin: install the Debian package postgresql (apt-get install postgresql)")
	}
	pg := &Postgres{bin: bin}
	var uid, gid int = -1, -1
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			Missing(tb, "running as root, and there is no postgres user to run PostgreSQL as (the Debian package postgresql creates it): %v", err)
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
	data := pg.data()

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
		pg.port = FreePort(tb)
		if lastErr = pg.start(); lastErr == nil {
			break
		}
	}
	if lastErr != nil {
		tb.Fatal(lastErr)
	}
	tb.Cleanup(func() {
		if out, err := pg.command("pg_ctl", "-D", pg.data(), "-m", "immediate", "-w", "stop").CombinedOutput(); err != nil && pg.running {
			tb.Errorf("pg_ctl stop: %v\n%s", err, out)
		}
	})
	return pg
}

func (pg *Postgres) data() string { return filepath.Join(pg.dir, "data") }

// start starts the server on pg.port.
func (pg *Postgres) start() error {
	opts := fmt.Sprintf("-h 127.0.0.1 -p %d -k %s -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300", pg.port, pg.dir)
	out, err := pg.command("pg_ctl", "-D", pg.data(), "-l", filepath.Join(pg.dir, "log"), "-w", "-t", "60", "-o", opts, "start").CombinedOutput()
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(pg.dir, "log"))
		return fmt.Errorf("pg_ctl start: %v\n%s\nserver log:\n%s", err, out, log)
	}
	pg.running = true
	return nil
}

// Stop stops the server, as an outage would: clients' connections break.
// (Fast, not immediate: with the cluster's asynchronous commits, a crash
// would lose the last ones.)
func (pg *Postgres) Stop(tb testing.TB) {
	tb.Helper()
	if out, err := pg.command("pg_ctl", "-D", pg.data(), "-m", "fast", "-w", "stop").CombinedOutput(); err != nil {
		tb.Fatalf("pg_ctl stop: %v\n%s", err, out)
	}
	pg.running = false
}

// Start starts a stopped server again, on its port.
func (pg *Postgres) Start(tb testing.TB) {
	tb.Helper()
	if err := pg.start(); err != nil {
		tb.Fatal(err)
	}
}

// Freeze stops the server's processes where they are (SIGSTOP), as a
// network black hole or a hung host would: connections stay open, and
// nothing answers on them. Thaw undoes it; the test's cleanup thaws too.
func (pg *Postgres) Freeze(tb testing.TB) {
	tb.Helper()
	pg.signalAll(tb, syscall.SIGSTOP)
	tb.Cleanup(func() { pg.signalAll(tb, syscall.SIGCONT) })
}

// Thaw lets a frozen server run again.
func (pg *Postgres) Thaw(tb testing.TB) {
	tb.Helper()
	pg.signalAll(tb, syscall.SIGCONT)
}

// signalAll signals the postmaster and every process it started.
func (pg *Postgres) signalAll(tb testing.TB, sig syscall.Signal) {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join(pg.data(), "postmaster.pid"))
	if err != nil {
		tb.Fatalf("the server's pid: %v", err)
	}
	first, _, _ := strings.Cut(string(b), "\n")
	postmaster, err := strconv.Atoi(strings.TrimSpace(first))
	if err != nil {
		tb.Fatalf("postmaster.pid: %q", first)
	}
	pids := []int{postmaster}
	children, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", postmaster, postmaster))
	for _, f := range strings.Fields(string(children)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	for _, pid := range pids {
		// A process may have ended since the list was read: a backend
		// the postmaster, continued first, has just reaped.
		if err := syscall.Kill(pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
			tb.Errorf("signal %v to %d: %v", sig, pid, err)
		}
	}
}

// command runs a PostgreSQL program as the cluster's owner.
func (pg *Postgres) command(name string, args ...string) *exec.Cmd {
	path := filepath.Join(pg.bin, name)
	if pg.runAs == "" {
		return exec.Command(path, args...)
	}
	return exec.Command("runuser", append([]string{"-u", pg.runAs, "--", path}, args...)...)
}

func (pg *Postgres) URL(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", pg.port, db)
}

// NewDatabase creates an empty database and returns its URL.
func (pg *Postgres) NewDatabase(tb testing.TB) string {
	tb.Helper()
	name := fmt.Sprintf("hatchery_%d", pg.dbs.Add(1))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, pg.URL("postgres"))
	if err != nil {
		tb.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		tb.Fatal(err)
	}
	return pg.URL(name)
}

// Exec runs SQL on the database at dsn, outside any store.
func (pg *Postgres) Exec(tb testing.TB, dsn, sql string) {
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
