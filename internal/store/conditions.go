package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"

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

// Unavailable reports whether err is the database out of reach — refusing
// connections, not answering in time, or shutting down — or refusing every
// write (ReadOnly), or aborting a transaction that a retry would pass
// (serialization failure, deadlock), rather than something wrong with a
// request: a condition clients should retry later.
func Unavailable(err error) bool {
	var connect *pgconn.ConnectError
	var netErr net.Error
	var pg *pgconn.PgError
	switch {
	case err == nil, errors.Is(err, context.Canceled): // the client went away: pgx calls that a timeout too
		return false
	case errors.As(err, &pg):
		// Class 08 is connection exceptions; 57P01–57P03, the server
		// shutting down or starting up.
		switch pg.Code {
		case "57P01", "57P02", "57P03":
			return true
		}
		return strings.HasPrefix(pg.Code, "08") || ReadOnly(err) || Contended(err)
	case errors.As(err, &connect), errors.As(err, &netErr), pgconn.Timeout(err),
		errors.Is(err, context.DeadlineExceeded), errors.Is(err, errStoreClosed),
		errors.Is(err, io.ErrUnexpectedEOF): // a connection lost mid-answer
		return true
	}
	return false
}

// Contended reports whether err is a transaction PostgreSQL aborted for
// another's sake, which a retry would pass: a serialization failure
// (40001) or a deadlock (40P01).
func Contended(err error) bool {
	var pg *pgconn.PgError
	return errors.As(err, &pg) && (pg.Code == "40001" || pg.Code == "40P01")
}

// ReadOnly reports whether err is a write the database refuses because it
// takes none (SQLSTATE 25006): a PostgreSQL standby, such as the old
// primary after a failover, or a database set default_transaction_read_only.
func ReadOnly(err error) bool {
	var pg *pgconn.PgError
	return errors.As(err, &pg) && pg.Code == "25006"
}

// busy reports whether SQLite refused err's statement for a lock another
// connection held (SQLITE_BUSY), without waiting for it.
func busy(err error) bool {
	var lite *sqlite.Error
	return errors.As(err, &lite) && lite.Code()&0xff == 5
}
