package main

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/pki"
	"github.com/hatchery/hatchery/internal/store"
)

// The database records which local CA its devices trust (the SHA-256 of
// its certificate), so that a server with another — a replica that made
// its own at its first start, a data directory whose tls/ was replaced —
// refuses to serve them rather than present a certificate none accepts.
const (
	kindLocalCA = "hatchery.localca"
	localCAID   = "ca"
)

type localCARecord struct {
	SHA256 string `json:"sha256"`
}

// checkCA refuses, before the database is opened (which upgrades its
// schema for good), to serve with a local CA the database's devices do
// not trust: a new one for a database that already serves devices (a
// restore that left out tls/, a data directory whose tls/ was lost), or
// one other than the CA the database records.
func checkCA(ctx context.Context, o serveOptions) error {
	if o.certFile != "" || o.newCA {
		return nil
	}
	files := pki.FilesIn(o.dir)
	// Read as it is, not upgraded: one of an older version has devices
	// too, and its record.
	st, err := store.OpenToRead(ctx, o.database, o.dir)
	switch {
	case errors.Is(err, store.ErrNotServed):
		return nil // a new installation
	case err != nil:
		return err
	}
	defer st.Close()
	recorded, err := recordedCA(ctx, st)
	if err != nil {
		return err
	}
	if files.NoCA() {
		existing, err := dps.Exists(ctx, st)
		if err != nil || !existing && recorded == "" {
			return err
		}
		return noCAError(files)
	}
	ours, err := caFingerprint(files.CACert)
	switch {
	case err != nil:
		return nil // half there, or unreadable, which pki.Ensure explains
	case recorded == "" || recorded == ours:
		return nil
	}
	return fmt.Errorf("the database's devices trust another local CA (SHA-256 %.16s…) than %s (SHA-256 %.16s…): "+
		"copy tls/ from a server of this database (another replica, the backup) into %s, or serve with --tls-cert as the others do; "+
		"--new-ca makes this CA the database's, which every device must then be given", recorded, files.CACert, ours, filepath.Dir(files.CACert))
}

func noCAError(files pki.Files) error {
	return fmt.Errorf("the database already serves devices, but %s has no local CA (ca.pem, ca-key.pem): "+
		"restore tls/ from the backup or the old data directory, or serve with --tls-cert as before; "+
		"--new-ca starts a new CA, which every device must then be given", filepath.Dir(files.CACert))
}

// recordCA records the local CA the server serves with as the one the
// database's devices trust, once the database is open: at the first start,
// or, with --new-ca, in place of the one it had. Two replicas of a new
// database starting at once agree on the first to record.
func recordCA(ctx context.Context, st store.Store, o serveOptions) error {
	if o.certFile != "" {
		return nil
	}
	files := pki.FilesIn(o.dir)
	ours, err := caFingerprint(files.CACert)
	if err != nil {
		return err
	}
	body, _ := json.Marshal(localCARecord{SHA256: ours})
	doc := store.Doc{Kind: kindLocalCA, ID: localCAID, Body: body}
	if _, err := st.Create(ctx, doc); !errors.Is(err, store.ErrExists) {
		return err
	}
	recorded, err := recordedCA(ctx, st)
	if err != nil || recorded == ours {
		return err
	}
	if o.newCA {
		slog.Warn("--new-ca: this server's local CA is now the one the database's devices trust; give every device its certificate, and serve without --new-ca from now on",
			"ca", files.CACert, "sha256", ours[:16])
		_, err := st.Put(ctx, doc, "")
		return err
	}
	return fmt.Errorf("another server of this database recorded its local CA first (SHA-256 %.16s…): copy its tls/ into %s",
		recorded, filepath.Dir(files.CACert))
}

// recordedCA is the fingerprint the database records, "" if none.
func recordedCA(ctx context.Context, st store.Store) (string, error) {
	d, err := st.Get(ctx, kindLocalCA, localCAID)
	if errors.Is(err, store.ErrNotFound) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	var r localCARecord
	if err := json.Unmarshal(d.Body, &r); err != nil {
		return "", fmt.Errorf("the database's record of its local CA is corrupt: %w", err)
	}
	return r.SHA256, nil
}

// caFingerprint is the hex SHA-256 of the CA certificate in file.
func caFingerprint(file string) (string, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return "", err
	}
	block, _ := pem.Decode(b)
	if block == nil {
		return "", fmt.Errorf("%s holds no PEM certificate", file)
	}
	if _, err := x509.ParseCertificate(block.Bytes); err != nil {
		return "", fmt.Errorf("%s: %w", file, err)
	}
	sum := sha256.Sum256(block.Bytes)
	return hex.EncodeToString(sum[:]), nil
}
