package store

import (
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgconn"
	"modernc.org/sqlite"
)

// ErrFull is a write refused because the database has no space left: a
// condition for the operator, which clients should retry later, not a
// failure of what they sent.
var ErrFull = errors.New("the database has no space left")

// full marks err as ErrFull when the database says so.
func full(err error) error {
	var lite *sqlite.Error
	var pg *pgconn.PgError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &lite) && lite.Code()&0xff == 13, // SQLITE_FULL and its extended codes
		errors.As(err, &pg) && pg.Code == "53100": // disk_full
		return fmt.Errorf("%w: %w", ErrFull, err)
	}
	return err
}

// busy reports whether SQLite refused err's statement for a lock another
// connection held (SQLITE_BUSY), without waiting for it.
func busy(err error) bool {
	var lite *sqlite.Error
	return errors.As(err, &lite) && lite.Code()&0xff == 5
}
