package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/pki"
	"github.com/hatchery/hatchery/internal/store"
	"github.com/hatchery/hatchery/internal/testutil"
)

// checkCA and recordCA against a database that records a CA: the one it
// records is served, another is refused, a missing one is not made anew;
// --new-ca replaces the record.
func TestLocalCARecord(t *testing.T) {
	ctx := context.Background()
	o := serveOptions{dir: t.TempDir()}
	st, err := store.Open(ctx, "", o.dir)
	if err != nil {
		t.Fatal(err)
	}
	// A database that recorded a CA, though a start died before the
	// provisioning service's settings were written.
	if _, err := st.Create(ctx, store.Doc{Kind: kindLocalCA, ID: localCAID, Body: []byte(`{"sha256":"0123456789abcdef"}`)}); err != nil {
		t.Fatal(err)
	}
	st.Close()
	if err := checkCA(ctx, o); err == nil || !strings.Contains(err.Error(), "has no local CA") {
		t.Errorf("no tls/ for a database that records a CA: %v", err)
	}
	if err := pki.Ensure(pki.FilesIn(o.dir), []string{"localhost"}); err != nil {
		t.Fatal(err)
	}
	if err := checkCA(ctx, o); err == nil || !strings.Contains(err.Error(), "trust another local CA") {
		t.Errorf("another CA than the database records: %v", err)
	}

	st, err = store.Open(ctx, "", o.dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := recordCA(ctx, st, o); err == nil || !strings.Contains(err.Error(), "recorded its local CA first") {
		t.Errorf("recording another CA than the one recorded: %v", err)
	}
	o.newCA = true
	if err := recordCA(ctx, st, o); err != nil {
		t.Fatalf("--new-ca: %v", err)
	}
	ours, _ := caFingerprint(pki.FilesIn(o.dir).CACert)
	if recorded, err := recordedCA(ctx, st); err != nil || recorded != ours {
		t.Errorf("after --new-ca the database records %q (%v), want %q", recorded, err, ours)
	}
	st.Close()
	o.newCA = false
	if err := checkCA(ctx, o); err != nil {
		t.Errorf("the recorded CA: %v", err)
	}
}

// A database from before schema versions has served devices too: without
// its tls/, the server refuses to start rather than make a new CA none of
// them trusts, and records nothing.
func TestLocalCAOfADatabaseFromBeforeVersions(t *testing.T) {
	o := serveOptions{dir: t.TempDir()}
	db := filepath.Join(o.dir, store.DefaultSQLiteFile)
	testutil.SQLiteBeforeVersions(t, db, [3]string{"dps.settings", "service", `{"idScope":"0ne00000001"}`})
	before, _ := os.ReadFile(db)
	if err := checkCA(context.Background(), o); err == nil || !strings.Contains(err.Error(), "has no local CA") {
		t.Fatalf("no tls/ for a database from before schema versions: %v", err)
	}
	if _, err := os.Stat(filepath.Dir(pki.FilesIn(o.dir).CACert)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("tls/ was made: %v", err)
	}
	if after, _ := os.ReadFile(db); string(after) != string(before) {
		t.Error("the database was changed")
	}
}
