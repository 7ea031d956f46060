package store

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
)

// DefaultSQLiteFile is the database file in the data directory when no
// database is named.
const DefaultSQLiteFile = "hatchery.db"

// Open opens the store named by dsn, as given to `hatchery serve --database`:
//
//   - "" — SQLite, the file hatchery.db in dataDir;
//   - postgres://... or postgresql://... — PostgreSQL, shared by replicas;
//   - sqlite:PATH, sqlite://PATH or a plain file path — SQLite at PATH
//     (relative to the working directory).
//
// Either way the schema is brought up to date before Open returns: Open is
// for the server. The CLI's commands use OpenCurrent.
func Open(ctx context.Context, dsn, dataDir string) (Store, error) {
	return open(ctx, dsn, dataDir, upgradeOlder)
}

// OpenCurrent is Open without the upgrade: a database at an older schema
// version is refused. Upgrading is for a server of the new version to do,
// once those of the old one have stopped, not for a command run beside them
// (a backup taken before an upgrade, say).
func OpenCurrent(ctx context.Context, dsn, dataDir string) (Store, error) {
	return open(ctx, dsn, dataDir, refuseOlder)
}

// OpenToRead is OpenCurrent that also reads a database at an older schema
// version, as it is: for the server to look at its documents (which every
// version has) before it decides to upgrade it. Not for writing.
func OpenToRead(ctx context.Context, dsn, dataDir string) (Store, error) {
	return open(ctx, dsn, dataDir, readOlder)
}

func open(ctx context.Context, dsn, dataDir string, mode schemaMode) (Store, error) {
	if isPostgres(dsn) {
		p, err := openPostgres(ctx, dsn, mode)
		if err != nil {
			return nil, err // not a nil *Postgres in a non-nil Store
		}
		return p, nil
	}
	path, err := SQLitePath(dsn, dataDir)
	if err != nil {
		return nil, err
	}
	s, err := openSQLite(path, mode)
	if err != nil {
		return nil, err
	}
	return s, nil
}

func isPostgres(dsn string) bool {
	return strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://")
}

// SQLitePath is the SQLite file dsn names, as Open reads it; "" for a
// PostgreSQL URL.
func SQLitePath(dsn, dataDir string) (string, error) {
	path := dsn
	switch {
	case isPostgres(dsn):
		return "", nil
	case dsn == "":
		return filepath.Join(dataDir, DefaultSQLiteFile), nil
	case strings.HasPrefix(dsn, "sqlite://"):
		path = strings.TrimPrefix(dsn, "sqlite://")
	case strings.HasPrefix(dsn, "sqlite:"):
		path = strings.TrimPrefix(dsn, "sqlite:")
	case strings.Contains(dsn, "://"):
		scheme, _, _ := strings.Cut(dsn, "://")
		return "", fmt.Errorf("database URL scheme %q is not supported: give a postgres:// URL or a SQLite file path", scheme)
	case looksLikeKeywordDSN(dsn):
		return "", fmt.Errorf("database: this looks like a PostgreSQL keyword/value connection string: give it as a URL, postgres://user:password@host:5432/dbname")
	}
	if path == "" {
		return "", fmt.Errorf("database: the SQLite URL names no file: give sqlite:/path/to/hatchery.db")
	}
	return path, nil
}

// looksLikeKeywordDSN tells "host=db dbname=hatchery" from a file path, so
// that it is not taken for the name of a new SQLite file.
func looksLikeKeywordDSN(dsn string) bool {
	for _, kw := range []string{"host=", "dbname=", "user=", "password=", "sslmode="} {
		if strings.HasPrefix(dsn, kw) || strings.Contains(dsn, " "+kw) {
			return true
		}
	}
	return false
}
