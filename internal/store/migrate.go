package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Schema migrations: one ordered list of SQL scripts per backend. Element i
// brings the schema from version i to version i+1, and the schema_version
// table holds one row per version applied. Open applies what is missing in
// one transaction, so a database is always at one version or the next, never
// half-way. Released migrations are never edited: a change of schema is a new
// element at the end of both lists.
//
// Migration 1 is the schema the stores had before versioning. It is written
// with IF NOT EXISTS, so a database created before schema_version existed is
// adopted as version 1 without change.
var (
	sqliteMigrations = []string{
		schema, // sqlite.go
	}
	postgresMigrations = []string{
		`CREATE TABLE IF NOT EXISTS docs (
			kind    text COLLATE "C" NOT NULL,
			id      text COLLATE "C" NOT NULL,
			etag    text NOT NULL,
			body    bytea NOT NULL,
			updated timestamptz NOT NULL,
			PRIMARY KEY (kind, id)
		);
		CREATE TABLE IF NOT EXISTS events (
			seq        bigserial PRIMARY KEY,
			device_id  text NOT NULL,
			module_id  text NOT NULL,
			properties text NOT NULL,
			body       bytea NOT NULL,
			enqueued   timestamptz NOT NULL
		);
		CREATE INDEX IF NOT EXISTS events_device ON events (device_id, seq);`,
	}
)

// Column choices on PostgreSQL, for the same answers as SQLite:
//   - kind and id compare byte by byte (COLLATE "C", as SQLite's BINARY), so
//     List's order and its `after` cursor do not depend on the server's
//     locale, and a prefix such as "device/" bounds a range.
//   - bodies are bytea, not jsonb: the store hands back the bytes it was
//     given (jsonb would reorder keys, drop whitespace and duplicate keys).
//   - properties are the JSON text SQLite keeps: jsonb refuses "\u0000",
//     which a device may legitimately send in a property value.

// postgresMigrationLock is the advisory lock key that serializes migrations
// of one database between processes: "hatchery" in ASCII.
const postgresMigrationLock int64 = 0x6861746368657279

// What OpenCurrent refuses.
var (
	ErrNotServed   = errors.New("has not been served yet")
	ErrOlderSchema = errors.New("older than this hatchery's")
)

// schemaMode is what opening a database does with an older schema version.
type schemaMode int

const (
	refuseOlder  schemaMode = iota // OpenCurrent: the CLI beside a running server
	upgradeOlder                   // Open: the server
	readOlder                      // OpenToRead: documents read before the server upgrades
)

// pendingMigrations returns the versions after current that this build
// knows and mode applies, or an error if the database is newer than this
// build, not served yet (but to upgrade), or older and to be refused.
func pendingMigrations(backend string, current int, migrations []string, mode schemaMode) ([]int, error) {
	switch {
	case current > len(migrations):
		return nil, fmt.Errorf("the %s database has schema version %d, newer than this hatchery knows (%d): run a newer hatchery against it", backend, current, len(migrations))
	case current < len(migrations) && mode != upgradeOlder && current == 0:
		return nil, fmt.Errorf("the %s database %w: start `hatchery serve` on it first", backend, ErrNotServed)
	case current < len(migrations) && mode == readOlder:
		return nil, nil // every version has the documents
	case current < len(migrations) && mode == refuseOlder:
		return nil, fmt.Errorf("the %s database has schema version %d, %w (%d): "+
			"`hatchery serve` of this version upgrades it once the servers of the old one have stopped "+
			"(older versions cannot open it then); until then, use the hatchery that serves it", backend, current, ErrOlderSchema, len(migrations))
	}
	var out []int
	for v := current + 1; v <= len(migrations); v++ {
		out = append(out, v)
	}
	if len(out) > 0 && current > 0 {
		slog.Info("upgrading the database schema", "backend", backend, "from", current, "to", len(migrations))
	}
	return out, nil
}

// ErrForeign is a database that holds tables, but not Hatchery's: opening
// it would add Hatchery's beside another application's.
var ErrForeign = errors.New("not a Hatchery database")

// found is what a database holds before it is migrated.
type found struct {
	tables    int      // tables (and views) of any application
	docs      []string // the columns of a table named docs, if there is one
	versioned bool     // schema_version exists
	version   int      // the highest version schema_version records
}

// hatcheryDocs are the columns Hatchery's docs table has had in every version.
var hatcheryDocs = []string{"kind", "id", "etag", "body", "updated"}

// check refuses a database that is neither new (no tables) nor Hatchery's
// (its docs table has Hatchery's columns: schema_version alone is a name
// other tools use too), before anything is written to it.
func (f found) check() error {
	if f.tables == 0 {
		return nil
	}
	for _, c := range hatcheryDocs {
		if !slices.Contains(f.docs, c) {
			what := "tables, but no docs table"
			if len(f.docs) > 0 {
				what = "a docs table without Hatchery's columns (" + strings.Join(hatcheryDocs, ", ") + ")"
			}
			return fmt.Errorf("%w (it has %s), left as it is: point --database at an empty database or a Hatchery one", ErrForeign, what)
		}
	}
	return nil
}

// current is the database's schema version. One made by a release before
// schema_version existed, which has its tables, has migration 1's schema.
func (f found) current() int {
	if !f.versioned && f.tables > 0 {
		return 1
	}
	return f.version
}

// inspectSQLite reads what the SQLite database holds, refusing one that is
// not Hatchery's (check).
func inspectSQLite(ctx context.Context, q interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
	QueryContext(context.Context, string, ...any) (*sql.Rows, error)
}) (found, error) {
	var f found
	err := q.QueryRowContext(ctx, `SELECT count(*), count(*) FILTER (WHERE name = 'schema_version') FROM sqlite_master
		WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite\_%' ESCAPE '\'`).Scan(&f.tables, &f.versioned)
	if err != nil {
		return f, err
	}
	rows, err := q.QueryContext(ctx, `SELECT name FROM pragma_table_info('docs')`)
	if err != nil {
		return f, err
	}
	defer rows.Close()
	for rows.Next() {
		var c string
		if err := rows.Scan(&c); err != nil {
			return f, err
		}
		f.docs = append(f.docs, c)
	}
	if err := rows.Err(); err != nil {
		return f, err
	}
	if err := f.check(); err != nil || !f.versioned {
		return f, err
	}
	err = q.QueryRowContext(ctx, `SELECT coalesce(max(version), 0) FROM schema_version`).Scan(&f.version)
	return f, err
}

// migrateSQLite brings the SQLite database up to date. The transaction
// begins IMMEDIATE (the DSN's _txlock), taking SQLite's write lock first: a
// second process opening the same file waits for it (busy_timeout), then
// finds the migrations applied.
func migrateSQLite(ctx context.Context, db *sql.DB, mode schemaMode) error {
	if mode != upgradeOlder { // read without the write lock each transaction takes
		f, err := inspectSQLite(ctx, db)
		if err != nil {
			return err
		}
		_, err = pendingMigrations("SQLite", f.current(), sqliteMigrations, mode)
		return err
	}
	if err := applySQLiteMigrations(ctx, db); err != nil {
		return err
	}
	// Only once the file is known to be Hatchery's: the journal mode is
	// the file's, and stays.
	_, err := db.ExecContext(ctx, `PRAGMA journal_mode = WAL`)
	return err
}

// applySQLiteMigrations applies what the database lacks, in one transaction.
func applySQLiteMigrations(ctx context.Context, db *sql.DB) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback() // a no-op after Commit
	f, err := inspectSQLite(ctx, tx)
	if err != nil {
		return err
	}
	// One from before schema_version is at version 0 here: migration 1,
	// which makes only what is missing, adopts it.
	pending, err := pendingMigrations("SQLite", f.version, sqliteMigrations, upgradeOlder)
	if err != nil || len(pending) == 0 {
		return err
	}
	if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_version (
		version INTEGER PRIMARY KEY,
		applied INTEGER NOT NULL
	)`); err != nil {
		return err
	}
	for _, v := range pending {
		if _, err := tx.ExecContext(ctx, sqliteMigrations[v-1]); err != nil {
			return fmt.Errorf("schema migration %d: %w", v, err)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO schema_version (version, applied) VALUES (?, ?)`, v, time.Now().UnixMilli()); err != nil {
			return err
		}
	}
	return tx.Commit()
}

// migratePostgres brings the PostgreSQL database up to date. Replicas may
// start together: a transaction-scoped advisory lock lets one migrate while
// the others wait, then find nothing left to do. DDL is transactional on
// PostgreSQL, so a failed migration leaves the previous version intact.
func migratePostgres(ctx context.Context, pool *pgxpool.Pool, mode schemaMode) error {
	if mode != upgradeOlder {
		f, err := inspectPostgres(ctx, pool)
		if err != nil {
			return err
		}
		_, err = pendingMigrations("PostgreSQL", f.current(), postgresMigrations, mode)
		return err
	}
	// READ COMMITTED, whatever the session's default: each statement after
	// the lock must see what the replica that held it committed, not a
	// snapshot taken before the wait.
	return pgx.BeginTxFunc(ctx, pool, pgx.TxOptions{IsoLevel: pgx.ReadCommitted}, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, postgresMigrationLock); err != nil {
			return err
		}
		f, err := inspectPostgres(ctx, tx)
		if err != nil {
			return err
		}
		pending, err := pendingMigrations("PostgreSQL", f.version, postgresMigrations, mode)
		if err != nil || len(pending) == 0 {
			return err
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_version (
			version integer PRIMARY KEY,
			applied timestamptz NOT NULL DEFAULT now()
		)`); err != nil {
			return err
		}
		for _, v := range pending {
			if _, err := tx.Exec(ctx, postgresMigrations[v-1]); err != nil {
				return fmt.Errorf("schema migration %d: %w", v, err)
			}
			if _, err := tx.Exec(ctx, `INSERT INTO schema_version (version) VALUES ($1)`, v); err != nil {
				return err
			}
		}
		return nil
	})
}

// inspectPostgres reads what the PostgreSQL database holds, in the schemas
// its unqualified names are looked up in (the search path), refusing one
// that is not Hatchery's (check).
func inspectPostgres(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}) (found, error) {
	var f found
	err := q.QueryRow(ctx, `SELECT
		(SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			WHERE n.nspname = ANY (current_schemas(false)) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')),
		(SELECT coalesce(array_agg(attname::text), '{}') FROM pg_attribute
			WHERE attrelid = to_regclass('docs') AND attnum > 0 AND NOT attisdropped),
		to_regclass('schema_version') IS NOT NULL`).Scan(&f.tables, &f.docs, &f.versioned)
	if err != nil {
		return f, err
	}
	if err := f.check(); err != nil || !f.versioned {
		return f, err
	}
	err = q.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM schema_version`).Scan(&f.version)
	return f, err
}
