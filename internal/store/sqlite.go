package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	_ "modernc.org/sqlite" // registers the pure-Go "sqlite" driver
)

// SQLite is the embedded default store: one file in the data directory.
type SQLite struct {
	db   *sql.DB
	path string
	// Statements are prepared once: parsing SQL costs more than running it.
	get, insert, insertUnder, upsert, update, updateIf, del, delIf, list, count, appendEvent *sql.Stmt

	events *eventBatcher // appends waiting for the group commit
	// wmu is held by this process's writes (documents and event batches)
	// while they run. SQLite allows one writer at a time and makes the others
	// poll, sleeping up to 100 ms between tries; against the event writer's
	// back-to-back transactions a document write could lose for a second.
	// Waiting here instead, a writer gets in after at most one batch.
	wmu sync.Mutex
}

const schema = `
CREATE TABLE IF NOT EXISTS docs (
	kind    TEXT NOT NULL,
	id      TEXT NOT NULL,
	etag    TEXT NOT NULL,
	body    BLOB NOT NULL,
	updated INTEGER NOT NULL,
	PRIMARY KEY (kind, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
	seq        INTEGER PRIMARY KEY AUTOINCREMENT,
	device_id  TEXT NOT NULL,
	module_id  TEXT NOT NULL,
	properties TEXT NOT NULL,
	body       BLOB NOT NULL,
	enqueued   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_device ON events (device_id, seq);
`

// OpenSQLite opens (creating if needed) the database file at path and
// brings its schema up to date.
func OpenSQLite(path string) (*SQLite, error) { return openSQLite(path, upgradeOlder) }

// openSQLite is OpenSQLite, with mode for a database at an older schema
// version.
func openSQLite(path string, mode schemaMode) (*SQLite, error) {
	if _, err := os.Stat(path); mode != upgradeOlder && errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("the SQLite database %s does not exist: it %w (start `hatchery serve` on it first)", path, ErrNotServed)
	}
	// The database holds every key: only its owner may read it (SQLite
	// gives its -wal and -shm files the database's mode).
	if f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600); err == nil {
		f.Close()
	} else if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
		slog.Warn("the database holds every key and others may read it: chmod 600 it and its -wal and -shm files",
			"file", path, "mode", fi.Mode().Perm().String())
	}
	// A file (or directory, for the -wal and -shm files) this user may not
	// write is refused now rather than failing every request.
	for _, p := range []string{path, filepath.Dir(path)} {
		if err := syscall.Access(p, 2 /* W_OK */); err != nil {
			return nil, fmt.Errorf("opening database %s: %s is not writable (%v): give the user running hatchery write access to the file, its directory and its -wal and -shm files", path, p, err)
		}
	}
	q := url.Values{}
	// WAL is not among them: it would be written into any file opened,
	// before it is known to be Hatchery's (migrateSQLite turns it on).
	for _, p := range []string{"synchronous(NORMAL)", "busy_timeout(10000)", "foreign_keys(ON)"} {
		q.Add("_pragma", p)
	}
	q.Set("_txlock", "immediate")
	db, err := sql.Open("sqlite", sqliteURI(path, q))
	if err != nil {
		return nil, err
	}
	// A bounded pool: SQLite in WAL mode keeps the file of every connection
	// it ever closed open, so an unbounded pool leaks descriptors in bursts.
	db.SetMaxOpenConns(16)
	db.SetMaxIdleConns(16)
	// Processes opening a new file together can find it locked while one
	// turns on WAL, which SQLite reports at once rather than waiting.
	err = migrateSQLite(context.Background(), db, mode)
	for try := 0; try < 20 && busy(err); try++ {
		time.Sleep(25 * time.Millisecond)
		err = migrateSQLite(context.Background(), db, mode)
	}
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("opening database %s: %w", path, err)
	}
	s := &SQLite{db: db, path: path}
	// SQLite refuses an event only for its own content: retry alone each time.
	s.events = &eventBatcher{max: maxEventBatch, insert: s.insertEvents, retrySingly: func(error) bool { return true }}
	for _, p := range []struct {
		stmt **sql.Stmt
		sql  string
	}{
		{&s.get, `SELECT etag, body, updated FROM docs WHERE kind=? AND id=?`},
		{&s.insert, `INSERT INTO docs (kind, id, etag, body, updated) VALUES (?,?,?,?,?)`},
		{&s.insertUnder, `INSERT INTO docs (kind, id, etag, body, updated) SELECT ?,?,?,?,?
			WHERE EXISTS (SELECT 1 FROM docs WHERE kind=? AND id=?)`},
		{&s.upsert, `INSERT INTO docs (kind, id, etag, body, updated) VALUES (?,?,?,?,?)
			ON CONFLICT (kind, id) DO UPDATE SET etag=excluded.etag, body=excluded.body, updated=excluded.updated`},
		{&s.update, `UPDATE docs SET etag=?, body=?, updated=? WHERE kind=? AND id=?`},
		{&s.updateIf, `UPDATE docs SET etag=?, body=?, updated=? WHERE kind=? AND id=? AND etag=?`},
		{&s.del, `DELETE FROM docs WHERE kind=? AND id=?`},
		{&s.delIf, `DELETE FROM docs WHERE kind=? AND id=? AND etag=?`},
		{&s.list, `SELECT id, etag, body, updated FROM docs WHERE kind=? AND id>? ORDER BY id LIMIT ?`},
		{&s.count, `SELECT count(*) FROM docs WHERE kind=?`},
		{&s.appendEvent, `INSERT INTO events (device_id, module_id, properties, body, enqueued) VALUES (?,?,?,?,?)`},
	} {
		if *p.stmt, err = db.Prepare(p.sql); err != nil {
			db.Close()
			return nil, fmt.Errorf("preparing %q: %w", p.sql, err)
		}
	}
	return s, nil
}

// sqliteURI is the driver's name for the file at path with the parameters
// q. SQLite reads it as a URI, in which ?, # and % would end or change the
// path: escaped, they are part of the file's name. Absolute, the path
// cannot be taken for the URI's authority.
func sqliteURI(path string, q url.Values) string {
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	return (&url.URL{Scheme: "file", Path: path, RawQuery: q.Encode()}).String()
}

// Path is the database file.
func (s *SQLite) Path() string { return s.path }

// BackupTo writes a consistent copy of the database, taken while others
// keep writing, into path, a file that must not exist yet; the copy holds
// every key too, so only its owner may read it.
func (s *SQLite) BackupTo(ctx context.Context, path string) error {
	// Made here, empty, its owner's alone: VACUUM INTO fills an empty file.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	f.Close()
	_, err = s.db.ExecContext(ctx, `VACUUM INTO ?`, path)
	return err
}

// Close waits for appends already queued to be committed, then closes the database.
func (s *SQLite) Close() error {
	s.events.close()
	return s.db.Close()
}

func (s *SQLite) Get(ctx context.Context, kind, id string) (Doc, error) {
	d := Doc{Kind: kind, ID: id}
	var updated int64
	err := s.get.QueryRowContext(ctx, kind, id).
		Scan(&d.ETag, &d.Body, &updated)
	if errors.Is(err, sql.ErrNoRows) {
		return d, ErrNotFound
	}
	d.Updated = time.UnixMilli(updated)
	return d, err
}

func (s *SQLite) Create(ctx context.Context, d Doc) (Doc, error) {
	d.ETag, d.Updated = newETag(), time.Now()
	s.wmu.Lock()
	_, err := s.insert.ExecContext(ctx, d.Kind, d.ID, d.ETag, d.Body, d.Updated.UnixMilli())
	s.wmu.Unlock()
	if uniqueViolation(err) {
		return d, ErrExists
	}
	return d, full(err)
}

// CreateUnder is one statement: SQLite runs one writer at a time, so no
// DeleteTree can come between its check of the parent and its insert.
func (s *SQLite) CreateUnder(ctx context.Context, d Doc, parentKind, parentID string) (Doc, error) {
	d.ETag, d.Updated = newETag(), time.Now()
	s.wmu.Lock()
	res, err := s.insertUnder.ExecContext(ctx, d.Kind, d.ID, d.ETag, d.Body, d.Updated.UnixMilli(), parentKind, parentID)
	s.wmu.Unlock()
	switch {
	case uniqueViolation(err):
		return d, ErrExists
	case err != nil:
		return d, full(err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return d, ErrNotFound
	}
	return d, nil
}

func (s *SQLite) Put(ctx context.Context, d Doc, ifMatch string) (Doc, error) {
	d.ETag, d.Updated = newETag(), time.Now()
	var res sql.Result
	var err error
	s.wmu.Lock()
	switch ifMatch {
	case "":
		res, err = s.upsert.ExecContext(ctx, d.Kind, d.ID, d.ETag, d.Body, d.Updated.UnixMilli())
	case "*":
		res, err = s.update.ExecContext(ctx, d.ETag, d.Body, d.Updated.UnixMilli(), d.Kind, d.ID)
	default:
		res, err = s.updateIf.ExecContext(ctx, d.ETag, d.Body, d.Updated.UnixMilli(), d.Kind, d.ID, ifMatch)
	}
	s.wmu.Unlock()
	if err != nil {
		return d, full(err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return d, s.missOrMismatch(ctx, d.Kind, d.ID)
	}
	return d, nil
}

func (s *SQLite) Delete(ctx context.Context, kind, id, ifMatch string) error {
	del, args := s.deletion(kind, id, ifMatch)
	s.wmu.Lock()
	res, err := del.ExecContext(ctx, args...)
	s.wmu.Unlock()
	if err != nil {
		return full(err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return s.missOrMismatch(ctx, kind, id)
	}
	return nil
}

// deletion is the statement, and its arguments, that deletes kind/id under
// ifMatch ("" and "*" whatever its etag).
func (s *SQLite) deletion(kind, id, ifMatch string) (*sql.Stmt, []any) {
	if ifMatch == "" || ifMatch == "*" {
		return s.del, []any{kind, id}
	}
	return s.delIf, []any{kind, id, ifMatch}
}

func (s *SQLite) DeleteTree(ctx context.Context, kind, id, ifMatch string, under ...string) ([]Doc, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	del, args := s.deletion(kind, id, ifMatch)
	res, err := tx.StmtContext(ctx, del).ExecContext(ctx, args...)
	if err != nil {
		return nil, full(err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		tx.Rollback()
		return nil, s.missOrMismatch(ctx, kind, id)
	}
	lo, hi := subtree(id)
	var gone []Doc
	for _, k := range under {
		rows, err := tx.QueryContext(ctx, `DELETE FROM docs WHERE kind=? AND id>=? AND id<? RETURNING id`, k, lo, hi)
		if err != nil {
			return nil, full(err)
		}
		for rows.Next() {
			d := Doc{Kind: k}
			if err := rows.Scan(&d.ID); err != nil {
				rows.Close()
				return nil, err
			}
			gone = append(gone, d)
		}
		// A delete that failed part-way ends the rows early: commit
		// nothing, or the parent would go with children left behind.
		if err := errors.Join(rows.Err(), rows.Close()); err != nil {
			return nil, full(err)
		}
	}
	return gone, full(tx.Commit())
}

// uniqueViolation is whether err is an insert refused for a document ID
// taken.
func uniqueViolation(err error) bool {
	return err != nil && strings.Contains(err.Error(), "UNIQUE constraint")
}

// missOrMismatch tells why a conditional write touched no row.
func (s *SQLite) missOrMismatch(ctx context.Context, kind, id string) error {
	if _, err := s.Get(ctx, kind, id); err != nil {
		return err // ErrNotFound, or why it could not be read
	}
	return ErrPrecondition
}

func (s *SQLite) List(ctx context.Context, kind, after string, limit int) ([]Doc, error) {
	rows, err := s.list.QueryContext(ctx, kind, after, limit)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Doc
	for rows.Next() {
		d := Doc{Kind: kind}
		var updated int64
		if err := rows.Scan(&d.ID, &d.ETag, &d.Body, &updated); err != nil {
			return nil, err
		}
		d.Updated = time.UnixMilli(updated)
		out = append(out, d)
	}
	return out, rows.Err()
}

func (s *SQLite) Count(ctx context.Context, kind string) (int, error) {
	var n int
	err := s.count.QueryRowContext(ctx, kind).Scan(&n)
	return n, err
}

// AppendEvent stores e and returns its sequence number once it is
// committed; concurrent appends share a transaction (see eventBatcher).
func (s *SQLite) AppendEvent(ctx context.Context, e Event) (int64, error) {
	return s.events.append(ctx, e)
}

// maxEventBatch bounds one transaction, so that the write lock is not held
// for long against the document writes waiting behind it (a few ms with
// 19,000 devices, where each insert touches its own index page).
const maxEventBatch = 250

// insertEvents inserts the events in one transaction and sets their seq.
func (s *SQLite) insertEvents(ps []*pendingEvent) error {
	ctx := context.Background() // the batch is not any one caller's
	s.wmu.Lock()
	defer s.wmu.Unlock()
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback() // a no-op after Commit
	stmt := tx.StmtContext(ctx, s.appendEvent)
	for _, p := range ps {
		res, err := stmt.ExecContext(ctx, p.DeviceID, p.ModuleID, p.props, p.Body, p.Enqueued.UnixMilli())
		if err != nil {
			return err
		}
		if p.seq, err = res.LastInsertId(); err != nil {
			return err
		}
	}
	return tx.Commit()
}

// DeleteEventsBefore deletes from the oldest event on, which seq finds by
// its key: events are appended in time order.
func (s *SQLite) DeleteEventsBefore(ctx context.Context, t time.Time, limit int) (int64, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	res, err := s.db.ExecContext(ctx, `DELETE FROM events WHERE seq IN
		(SELECT seq FROM (SELECT seq, enqueued FROM events ORDER BY seq LIMIT ?) WHERE enqueued < ?)`, limit, t.UnixMilli())
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

func (s *SQLite) Events(ctx context.Context, deviceID string, after int64, limit int) ([]Event, error) {
	q := `SELECT seq, device_id, module_id, properties, body, enqueued FROM events WHERE seq>? ORDER BY seq LIMIT ?`
	args := []any{after, limit}
	if deviceID != "" {
		q = `SELECT seq, device_id, module_id, properties, body, enqueued FROM events WHERE device_id=? AND seq>? ORDER BY seq LIMIT ?`
		args = append([]any{deviceID}, args...)
	}
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Event
	for rows.Next() {
		var e Event
		var props string
		var enq int64
		if err := rows.Scan(&e.Seq, &e.DeviceID, &e.ModuleID, &props, &e.Body, &enq); err != nil {
			return nil, err
		}
		if err := json.Unmarshal([]byte(props), &e.Properties); err != nil {
			return nil, err
		}
		e.Enqueued = time.UnixMilli(enq)
		out = append(out, e)
	}
	return out, rows.Err()
}
