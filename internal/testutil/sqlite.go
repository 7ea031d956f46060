package testutil

import (
	"database/sql"
	"testing"

	_ "modernc.org/sqlite" // registers the pure-Go "sqlite" driver
)

// schemaBeforeVersions is internal/store's SQLite schema in the releases
// before schema_version existed, as they made it.
const schemaBeforeVersions = `
PRAGMA journal_mode = WAL;
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

// SQLiteBeforeVersions makes at path a database of a release before schema
// versions, holding docs: each a kind, an ID and a JSON body.
func SQLiteBeforeVersions(tb testing.TB, path string, docs ...[3]string) {
	tb.Helper()
	db, err := sql.Open("sqlite", path)
	if err != nil {
		tb.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec(schemaBeforeVersions); err != nil {
		tb.Fatal(err)
	}
	for _, d := range docs {
		if _, err := db.Exec(`INSERT INTO docs (kind, id, etag, body, updated) VALUES (?, ?, 'etag-before-versions', ?, 0)`, d[0], d[1], []byte(d[2])); err != nil {
			tb.Fatal(err)
		}
	}
}
