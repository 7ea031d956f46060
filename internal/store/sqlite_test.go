package store

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/hatchery/hatchery/internal/testutil"
)

// sqliteBackend gives the conformance suite a new database file per test.
var sqliteBackend = backend{
	name:  "sqlite",
	newDB: func(tb testing.TB) string { return filepath.Join(tb.TempDir(), "h.db") },
	exec: func(tb testing.TB, path, query string) {
		tb.Helper()
		db, err := sql.Open("sqlite", path)
		if err != nil {
			tb.Fatal(err)
		}
		defer db.Close()
		if _, err := db.Exec(query); err != nil {
			tb.Fatalf("%s: %v", query, err)
		}
	},
}

func TestSQLite(t *testing.T) {
	runConformance(t, sqliteBackend)
}

// Open chooses SQLite for an empty DSN (the data directory's file), a
// sqlite: URL or a path, and refuses what it cannot tell.
func TestOpenSQLite(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	for _, dsn := range []string{"", "sqlite:" + filepath.Join(dir, "a.db"), "sqlite://" + filepath.Join(dir, "b.db"), filepath.Join(dir, "c.db")} {
		s, err := Open(ctx, dsn, dir)
		if err != nil {
			t.Fatalf("Open(%q): %v", dsn, err)
		}
		if _, ok := s.(*SQLite); !ok {
			t.Errorf("Open(%q) gave a %T", dsn, s)
		}
		s.Close()
	}
	for _, f := range []string{DefaultSQLiteFile, "a.db", "b.db", "c.db"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("no database file: %v", err)
		}
	}
	for _, dsn := range []string{"mysql://u:secret@h/db", "host=db dbname=hatchery", "sqlite:"} {
		s, err := Open(ctx, dsn, dir)
		if err == nil {
			s.Close()
			t.Errorf("Open(%q) succeeded", dsn)
			continue
		}
		if s != nil {
			t.Errorf("Open(%q) failed but returned a store", dsn)
		}
		t.Logf("Open(%q): %v", dsn, err)
	}
}

// A path is the file it names, whatever characters a URI would read
// otherwise: the database is that file, and nothing is made beside it.
func TestSQLitePathWithURICharacters(t *testing.T) {
	ctx := context.Background()
	for _, name := range []string{"site#1", "p%41", "a?b", "sp ace", "x%", "q=1&r"} {
		root := t.TempDir()
		dir := filepath.Join(root, name, "data")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		s, err := Open(ctx, "", dir)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		_, err = s.Create(ctx, Doc{Kind: "k", ID: "a", Body: []byte(`{}`)})
		s.Close()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if entries, _ := os.ReadDir(root); len(entries) != 1 || entries[0].Name() != name {
			t.Errorf("%s: a file was made beside the data directory: %v", name, entries)
		}
		s, err = OpenCurrent(ctx, "sqlite:"+filepath.Join(dir, DefaultSQLiteFile), "")
		if err != nil {
			t.Fatalf("%s: reopening: %v", name, err)
		}
		if _, err := s.Get(ctx, "k", "a"); err != nil {
			t.Errorf("%s: the document is not in %s: %v", name, filepath.Join(dir, DefaultSQLiteFile), err)
		}
		s.Close()
	}
}

// A database made before schema versions existed was served: the CLI reads
// it as it is, at the version before versioning (migration 1's schema), and
// the server adopts it as version 1.
func TestSQLiteUnversionedDatabase(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "h.db")
	testutil.SQLiteBeforeVersions(t, path, [3]string{"k", "a", `{}`})
	for name, open := range map[string]func(context.Context, string, string) (Store, error){"OpenCurrent": OpenCurrent, "OpenToRead": OpenToRead} {
		s, err := open(ctx, "sqlite:"+path, "")
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if d, err := s.Get(ctx, "k", "a"); err != nil || string(d.Body) != `{}` {
			t.Errorf("%s: the document written before versioning: %+v %v", name, d, err)
		}
		s.Close()
	}
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	var versioned int
	err = db.QueryRow(`SELECT count(*) FROM sqlite_master WHERE name = 'schema_version'`).Scan(&versioned)
	db.Close()
	if err != nil || versioned != 0 {
		t.Fatalf("the reads made schema_version (%v)", err)
	}

	s, err := OpenSQLite(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if d, err := s.Get(ctx, "k", "a"); err != nil || d.ETag != "etag-before-versions" {
		t.Fatalf("the document written before versioning: %+v %v", d, err)
	}
	var v int
	if err := s.db.QueryRow(`SELECT max(version) FROM schema_version`).Scan(&v); err != nil || v != len(sqliteMigrations) {
		t.Fatalf("schema version %d (%v), want %d", v, err, len(sqliteMigrations))
	}
}

// A SQLite file of another application is not touched at all, its journal
// mode included.
func TestSQLiteForeignFileUnchanged(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app.db")
	sqliteBackend.exec(t, path, `CREATE TABLE users (id integer PRIMARY KEY, name text); INSERT INTO users VALUES (1, 'a')`)
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if s, err := OpenSQLite(path); err == nil || !errors.Is(err, ErrForeign) {
		if s != nil {
			s.Close()
		}
		t.Fatalf("opening another application's database: %v", err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Error("the refused database was changed")
	}
	for _, f := range []string{path + "-wal", path + "-shm"} {
		if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: %v, want none", f, err)
		}
	}
}

// The database holds every key: a new one is its owner's alone, however
// open the directory and the umask.
func TestSQLiteFileMode(t *testing.T) {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "hatchery.db")
	s, err := OpenSQLite(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Create(context.Background(), Doc{Kind: "k", ID: "1", Body: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{path, path + "-wal", path + "-shm"} {
		fi, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", filepath.Base(f), fi.Mode().Perm())
		}
	}
}

// A database without space says so as ErrFull, whichever backend: here
// SQLite, held to a few pages, and PostgreSQL's SQLSTATE.
func TestFullIsErrFull(t *testing.T) {
	s, err := OpenSQLite(filepath.Join(t.TempDir(), "h.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.db.SetMaxOpenConns(1) // the page limit is the connection's
	if _, err := s.db.Exec(`PRAGMA max_page_count = 16`); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for i := 0; ; i++ {
		_, err := s.Create(ctx, Doc{Kind: "k", ID: fmt.Sprint(i), Body: make([]byte, 2000)})
		if errors.Is(err, ErrFull) {
			break
		}
		if err != nil || i > 1000 {
			t.Fatalf("writing past the page limit: %v after %d documents", err, i)
		}
	}

	for _, err := range []error{
		fmt.Errorf("insert: %w", &pgconn.PgError{Code: "53100", Message: "could not extend file"}),
	} {
		if !errors.Is(full(err), ErrFull) {
			t.Errorf("%v is not ErrFull", err)
		}
	}
	for _, err := range []error{nil, errors.New("other"), &pgconn.PgError{Code: "23505"}} {
		if errors.Is(full(err), ErrFull) {
			t.Errorf("%v taken for ErrFull", err)
		}
	}
}

// A DeleteTree whose delete of the documents under the parent fails
// part-way commits nothing: the parent stays with them.
func TestSQLiteDeleteTreeFailingUnder(t *testing.T) {
	ctx := context.Background()
	path := sqliteBackend.newDB(t)
	s := sqliteBackend.open(t, path)
	for _, d := range []Doc{doc("dev", "d", `{}`), doc("mod", "d/a", `1`), doc("mod", "d/b", `2`)} {
		if _, err := s.Create(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	sqliteBackend.exec(t, path, `CREATE TRIGGER refuse BEFORE DELETE ON docs WHEN old.id = 'd/b' BEGIN SELECT RAISE(ABORT, 'refused'); END`)
	if _, err := s.DeleteTree(ctx, "dev", "d", "", "mod"); err == nil {
		t.Fatal("DeleteTree succeeded with a delete under the parent refused")
	}
	for _, id := range []string{"d", "d/a", "d/b"} {
		kind := map[bool]string{true: "dev", false: "mod"}[id == "d"]
		if _, err := s.Get(ctx, kind, id); err != nil {
			t.Errorf("%s %s after the failed DeleteTree: %v", kind, id, err)
		}
	}
}
