package store

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Postgres is the store shared by several `hatchery serve` replicas. It
// answers exactly as SQLite does; what differs is that other processes
// write to the same tables, so every conditional write is one statement
// whose WHERE clause is the condition, and row locks do the rest.
//
// It talks to the server through pgxpool directly rather than database/sql:
// the pool prepares and caches each statement per connection by itself,
// bytea and timestamptz map to []byte and time.Time without adapters, and a
// batch of inserts travels in one round trip.
type Postgres struct {
	pool   *pgxpool.Pool
	events *eventBatcher // appends waiting for the group commit
	// opTimeout bounds each operation, waiting for a connection included.
	opTimeout time.Duration
}

// pgOpTimeout is how long one operation may take before it fails as the
// database out of reach (Unavailable: 503, MQTT CONNACK 3). A server that
// stops answering — a network black hole, a stopped process — would
// otherwise hold every request until the kernel gives up on the
// connection, a quarter of an hour later. Healthy operations are
// single-row statements, pages of at most a thousand rows and event
// batches of at most a thousand messages and 8 MiB (maxBatchBytes): well
// within it. Waiting for a pooled connection counts too.
var pgOpTimeout = 30 * time.Second // a variable for tests

// bound is ctx limited to one operation's time.
func (p *Postgres) bound(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, p.opTimeout)
}

// defaultPostgresConns is the pool size unless the URL sets pool_max_conns:
// pgxpool's own default (the number of CPUs, at least 4) is too few for a
// server whose every request waits on the database.
const defaultPostgresConns = 16

// OpenPostgres connects to the database at url (postgres://user:pass@host/db?...)
// and brings its schema up to date. pgx's URL parameters apply
// (sslmode, pool_max_conns, default_query_exec_mode=exec behind PgBouncer, ...).
func OpenPostgres(ctx context.Context, dsn string) (*Postgres, error) {
	return openPostgres(ctx, dsn, upgradeOlder)
}

// openPostgres is OpenPostgres, with mode for a database at an older
// schema version.
func openPostgres(ctx context.Context, dsn string, mode schemaMode) (*Postgres, error) {
	where := redactDSN(dsn)
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("database URL %s: %w", where, err)
	}
	if !strings.Contains(dsn, "pool_max_conns") {
		cfg.MaxConns = max(cfg.MaxConns, defaultPostgresConns)
	}
	// A server gone without a word (a black hole, a host that died) is
	// noticed on idle connections too, the relay's listening one among
	// them, within half a minute rather than Go's default 2.5.
	cfg.ConnConfig.DialFunc = (&net.Dialer{
		Timeout:         cmp.Or(cfg.ConnConfig.ConnectTimeout, 10*time.Second),
		KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: 15 * time.Second, Interval: 5 * time.Second, Count: 3},
	}).DialContext
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connecting to PostgreSQL at %s: %w", where, err)
	}
	// The first answer is bounded like any operation: a server that takes
	// connections and says nothing would hold the start for good. The
	// migrations after it are not (a large table may take minutes).
	ping, cancel := context.WithTimeout(ctx, pgOpTimeout)
	defer cancel()
	if err := pool.Ping(ping); err != nil {
		pool.Close()
		if errors.Is(ping.Err(), context.DeadlineExceeded) {
			return nil, fmt.Errorf("PostgreSQL at %s took connections but did not answer within %v: %w", where, pgOpTimeout, err)
		}
		return nil, fmt.Errorf("connecting to PostgreSQL at %s: %w", where, err)
	}
	if err := migratePostgres(ctx, pool, mode); err != nil {
		pool.Close()
		return nil, fmt.Errorf("opening database %s: %w", where, err)
	}
	p := &Postgres{pool: pool, opTimeout: pgOpTimeout}
	p.events = &eventBatcher{max: pgMaxEventBatch, insert: p.insertEvents, retrySingly: func(err error) bool {
		var refused *pgconn.PgError // the server refused a statement: not a lost connection
		return errors.As(err, &refused)
	}}
	return p, nil
}

// redactDSN is the URL without its passwords, for error messages: the
// user's, and those pgx takes from the query (password, and sslpassword,
// the client key's), however their names are escaped.
func redactDSN(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil {
		return "(unparsable URL)"
	}
	if u.RawQuery != "" {
		pairs := strings.Split(u.RawQuery, "&")
		for i, pair := range pairs {
			key, _, _ := strings.Cut(pair, "=")
			if name, err := url.QueryUnescape(key); err != nil || name == "password" || name == "sslpassword" {
				pairs[i] = key + "=xxxxx"
			}
		}
		u.RawQuery = strings.Join(pairs, "&")
	}
	u.Fragment, u.RawFragment = "", "" // the rest of a password with an unescaped #
	return u.Redacted()
}

// Close waits for appends already queued to be committed, then closes the pool.
func (p *Postgres) Close() error {
	p.events.close()
	p.pool.Close()
	return nil
}

// limitArg maps a limit to its LIMIT parameter: SQLite reads a negative
// LIMIT as none, PostgreSQL refuses it but reads NULL as none.
func limitArg(limit int) any {
	if limit < 0 {
		return nil
	}
	return limit
}

func (p *Postgres) Get(ctx context.Context, kind, id string) (Doc, error) {
	ctx, cancel := p.bound(ctx)
	defer cancel()
	d := Doc{Kind: kind, ID: id}
	err := p.pool.QueryRow(ctx, `SELECT etag, body, updated FROM docs WHERE kind=$1 AND id=$2`, kind, id).
		Scan(&d.ETag, &d.Body, &d.Updated)
	if errors.Is(err, pgx.ErrNoRows) {
		return d, ErrNotFound
	}
	return d, err
}

// Create inserts unless the key is taken. Concurrent creates of one key, from
// any number of processes, meet at the primary key: the first insert to
// commit wins, the others wait for it and then insert nothing.
func (p *Postgres) Create(ctx context.Context, d Doc) (Doc, error) {
	ctx, cancel := p.bound(ctx)
	defer cancel()
	d.ETag, d.Updated = newETag(), time.Now()
	tag, err := p.exec(ctx, `INSERT INTO docs (kind, id, etag, body, updated) VALUES ($1,$2,$3,$4,$5)
		ON CONFLICT (kind, id) DO NOTHING`, d.Kind, d.ID, d.ETag, d.Body, d.Updated)
	if err != nil {
		return d, full(err)
	}
	if tag.RowsAffected() == 0 {
		return d, ErrExists
	}
	return d, nil
}

// CreateUnder holds a key-share lock on the parent while it inserts: a
// DeleteTree deleting the parent waits for it to commit, and then deletes
// the new document with the others; one that deleted the parent first makes
// the lock find no row, and nothing is inserted.
func (p *Postgres) CreateUnder(ctx context.Context, d Doc, parentKind, parentID string) (Doc, error) {
	ctx, cancel := p.bound(ctx)
	defer cancel()
	d.ETag, d.Updated = newETag(), time.Now()
	tag, err := p.exec(ctx, `WITH parent AS (SELECT 1 FROM docs WHERE kind=$6 AND id=$7 FOR KEY SHARE)
		INSERT INTO docs (kind, id, etag, body, updated) SELECT $1,$2,$3,$4,$5 FROM parent
		ON CONFLICT (kind, id) DO NOTHING`, d.Kind, d.ID, d.ETag, d.Body, d.Updated, parentKind, parentID)
	if err != nil {
		return d, full(err)
	}
	if tag.RowsAffected() > 0 {
		return d, nil
	}
	// The parent first: a missing one is the answer even when a leftover
	// holds the child's ID, as with SQLite.
	if _, err := p.Get(ctx, parentKind, parentID); err != nil {
		return d, err
	}
	if _, err := p.Get(ctx, d.Kind, d.ID); err == nil {
		return d, ErrExists
	}
	return d, ErrNotFound
}

// DeleteTree deletes the parent, then its documents under it, in two
// statements of one transaction: the second, run under a snapshot of its
// own (read committed), sees a CreateUnder that the first waited for.
func (p *Postgres) DeleteTree(ctx context.Context, kind, id, ifMatch string, under ...string) ([]Doc, error) {
	ctx, cancel := p.bound(ctx)
	defer cancel()
	tx, err := p.pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.ReadCommitted})
	if err != nil {
		return nil, err
	}
	defer tx.Rollback(ctx)
	stmt, args := pgDeletion(kind, id, ifMatch)
	tag, err := tx.Exec(ctx, stmt, args...)
	if err != nil {
		return nil, full(err)
	}
	if tag.RowsAffected() == 0 {
		tx.Rollback(ctx)
		return nil, p.missOrMismatch(ctx, kind, id)
	}
	lo, hi := subtree(id)
	rows, err := tx.Query(ctx, `DELETE FROM docs WHERE kind = ANY($1) AND id>=$2 AND id<$3 RETURNING kind, id`, under, lo, hi)
	if err != nil {
		return nil, full(err)
	}
	var gone []Doc
	for rows.Next() {
		var d Doc
		if err := rows.Scan(&d.Kind, &d.ID); err != nil {
			rows.Close()
			return nil, err
		}
		gone = append(gone, d)
	}
	if rows.Close(); rows.Err() != nil {
		return nil, full(rows.Err())
	}
	return gone, full(tx.Commit(ctx))
}

// exec runs one statement in a transaction of its own. Under READ
// COMMITTED, the default, a conditional write that waited for another's
// row sees it as committed; under a stricter database or role default it
// fails with a serialization error instead, and run again, with a snapshot
// of its own, it sees the row so. (A session setting would do as well but
// not through PgBouncer, which refuses startup parameters it does not know
// and shares server sessions among clients.)
func (p *Postgres) exec(ctx context.Context, stmt string, args ...any) (pgconn.CommandTag, error) {
	for attempt := 1; ; attempt++ {
		tag, err := p.pool.Exec(ctx, stmt, args...)
		if !Contended(err) || attempt == 5 || ctx.Err() != nil {
			return tag, err
		}
	}
}

// The conditional writes are single statements whose WHERE clause is the
// condition. Two writers holding one etag cannot both succeed: the second
// UPDATE waits for the first's row lock, rechecks the row as committed and
// finds another etag.
const (
	pgUpsert = `INSERT INTO docs (kind, id, etag, body, updated) VALUES ($1,$2,$3,$4,$5)
		ON CONFLICT (kind, id) DO UPDATE SET etag=excluded.etag, body=excluded.body, updated=excluded.updated`
	pgUpdate   = `UPDATE docs SET etag=$3, body=$4, updated=$5 WHERE kind=$1 AND id=$2`
	pgUpdateIf = `UPDATE docs SET etag=$3, body=$4, updated=$5 WHERE kind=$1 AND id=$2 AND etag=$6`
	pgDelete   = `DELETE FROM docs WHERE kind=$1 AND id=$2`
	pgDeleteIf = `DELETE FROM docs WHERE kind=$1 AND id=$2 AND etag=$3`
)

func (p *Postgres) Put(ctx context.Context, d Doc, ifMatch string) (Doc, error) {
	ctx, cancel := p.bound(ctx)
	defer cancel()
	d.ETag, d.Updated = newETag(), time.Now()
	var tag pgconn.CommandTag
	var err error
	switch ifMatch {
	case "":
		tag, err = p.exec(ctx, pgUpsert, d.Kind, d.ID, d.ETag, d.Body, d.Updated)
	case "*":
		tag, err = p.exec(ctx, pgUpdate, d.Kind, d.ID, d.ETag, d.Body, d.Updated)
	default:
		tag, err = p.exec(ctx, pgUpdateIf, d.Kind, d.ID, d.ETag, d.Body, d.Updated, ifMatch)
	}
	if err != nil {
		return d, full(err)
	}
	if tag.RowsAffected() == 0 {
		return d, p.missOrMismatch(ctx, d.Kind, d.ID)
	}
	return d, nil
}

// pgDeletion is the statement, and its arguments, that deletes kind/id
// under ifMatch ("" and "*" whatever its etag).
func pgDeletion(kind, id, ifMatch string) (string, []any) {
	if ifMatch == "" || ifMatch == "*" {
		return pgDelete, []any{kind, id}
	}
	return pgDeleteIf, []any{kind, id, ifMatch}
}

func (p *Postgres) Delete(ctx context.Context, kind, id, ifMatch string) error {
	ctx, cancel := p.bound(ctx)
	defer cancel()
	stmt, args := pgDeletion(kind, id, ifMatch)
	tag, err := p.exec(ctx, stmt, args...)
	if err != nil {
		return full(err)
	}
	if tag.RowsAffected() == 0 {
		return p.missOrMismatch(ctx, kind, id)
	}
	return nil
}

// missOrMismatch tells why a conditional write touched no row. It reads
// after the write, as SQLite does: a document deleted meanwhile by another
// replica is reported missing, not as a mismatch.
func (p *Postgres) missOrMismatch(ctx context.Context, kind, id string) error {
	var one int
	err := p.pool.QueryRow(ctx, `SELECT 1 FROM docs WHERE kind=$1 AND id=$2`, kind, id).Scan(&one)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return ErrNotFound
	case err != nil:
		return err
	}
	return ErrPrecondition
}

func (p *Postgres) List(ctx context.Context, kind, after string, limit int) ([]Doc, error) {
	ctx, cancel := p.bound(ctx)
	defer cancel()
	rows, err := p.pool.Query(ctx, `SELECT id, etag, body, updated FROM docs WHERE kind=$1 AND id>$2 ORDER BY id LIMIT $3`,
		kind, after, limitArg(limit))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Doc
	for rows.Next() {
		d := Doc{Kind: kind}
		if err := rows.Scan(&d.ID, &d.ETag, &d.Body, &d.Updated); err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, rows.Err()
}

func (p *Postgres) Count(ctx context.Context, kind string) (int, error) {
	ctx, cancel := p.bound(ctx)
	defer cancel()
	var n int
	err := p.pool.QueryRow(ctx, `SELECT count(*) FROM docs WHERE kind=$1`, kind).Scan(&n)
	return n, err
}

// pgMaxEventBatch bounds one transaction, and so how long it holds the
// events table against the other replicas.
const pgMaxEventBatch = 1000

// AppendEvent stores e and returns its sequence number once it is committed.
//
// Sequence numbers are handed out in commit order, across all replicas: each
// transaction appending events first locks the events table against other
// appends (readers are not blocked), so a reader that has seen sequence
// number n will never later see a smaller one appear. Without that, a
// bigserial taken by a transaction that commits late would be skipped by a
// consumer reading with Events(after) as its cursor.
//
// As on SQLite, concurrent appends in one process share a transaction
// (group commit, see eventBatcher).
func (p *Postgres) AppendEvent(ctx context.Context, e Event) (int64, error) {
	return p.events.append(ctx, e)
}

// insertEvents inserts the events in one transaction, in order, and sets
// their seq. The inserts travel as one pipelined batch.
func (p *Postgres) insertEvents(as []*pendingEvent) error {
	ctx, cancel := p.bound(context.Background()) // the batch is not any one caller's
	defer cancel()
	return pgx.BeginTxFunc(ctx, p.pool, pgx.TxOptions{IsoLevel: pgx.ReadCommitted}, func(tx pgx.Tx) error {
		// The lock is its own statement, before the batch: pgx prepares a
		// batch's statements before running any, and preparing the INSERT
		// takes a lock on events that would then be held while waiting for
		// this one, deadlocking two replicas.
		if _, err := tx.Exec(ctx, `LOCK TABLE events IN EXCLUSIVE MODE`); err != nil {
			return err
		}
		b := &pgx.Batch{}
		for _, a := range as {
			b.Queue(`INSERT INTO events (device_id, module_id, properties, body, enqueued) VALUES ($1,$2,$3,$4,$5) RETURNING seq`,
				a.DeviceID, a.ModuleID, a.props, a.Body, a.Enqueued)
		}
		br := tx.SendBatch(ctx, b)
		for _, a := range as {
			if err := br.QueryRow().Scan(&a.seq); err != nil {
				br.Close()
				return err
			}
		}
		return br.Close()
	})
}

// DeleteEventsBefore deletes from the oldest event on, which seq finds by
// its key: events are appended in time order.
func (p *Postgres) DeleteEventsBefore(ctx context.Context, t time.Time, limit int) (int64, error) {
	ctx, cancel := p.bound(ctx)
	defer cancel()
	tag, err := p.pool.Exec(ctx, `DELETE FROM events WHERE seq IN
		(SELECT seq FROM (SELECT seq, enqueued FROM events ORDER BY seq LIMIT $1) oldest WHERE enqueued < $2)`, limit, t)
	if err != nil {
		return 0, err
	}
	return tag.RowsAffected(), nil
}

func (p *Postgres) Events(ctx context.Context, deviceID string, after int64, limit int) ([]Event, error) {
	ctx, cancel := p.bound(ctx)
	defer cancel()
	q := `SELECT seq, device_id, module_id, properties, body, enqueued FROM events WHERE seq>$1 ORDER BY seq LIMIT $2`
	args := []any{after, limitArg(limit)}
	if deviceID != "" {
		q = `SELECT seq, device_id, module_id, properties, body, enqueued FROM events WHERE device_id=$3 AND seq>$1 ORDER BY seq LIMIT $2`
		args = append(args, deviceID)
	}
	rows, err := p.pool.Query(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Event
	for rows.Next() {
		var e Event
		var props string
		if err := rows.Scan(&e.Seq, &e.DeviceID, &e.ModuleID, &props, &e.Body, &e.Enqueued); err != nil {
			return nil, err
		}
		if err := json.Unmarshal([]byte(props), &e.Properties); err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, rows.Err()
}
