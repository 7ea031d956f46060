package store

import (
	"context"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/testutil"
)

// TestPostgres runs the conformance suite against a real PostgreSQL server
// that it starts itself, in a temporary cluster.
func TestPostgres(t *testing.T) {
	pg := testutil.StartPostgres(t)
	runConformance(t, backend{name: "postgres", newDB: pg.NewDatabase, exec: pg.Exec})
}

// Open chooses the backend by the DSN's form.
func TestOpenPostgresURL(t *testing.T) {
	pg := testutil.StartPostgres(t)
	dsn := pg.NewDatabase(t)
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
