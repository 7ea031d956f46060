package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/pki"
	"github.com/hatchery/hatchery/internal/store"
)

// A backup taken while the server runs holds what was just written (still
// in SQLite's write-ahead log) and the CA; a server started on it has both.
func TestBackupWhileServing(t *testing.T) {
	c := startServe(t)
	c.ok("enrollment", "create", "--attestation-type", "symmetrickey", "--registration-id", "kept-1")
	to := filepath.Join(t.TempDir(), "backup")
	c.ok("backup", "--to", to)
	if out, err := c.run("backup", "--to", to); err == nil || !strings.Contains(out, "exists") {
		t.Fatalf("a second backup into the same directory: %v\n%s", err, out)
	}
	for _, f := range []string{store.DefaultSQLiteFile, "tls/ca-key.pem", "tls/server-key.pem"} {
		fi, err := os.Stat(filepath.Join(to, f))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v in the backup, want 0600", f, fi.Mode().Perm())
		}
	}
	was, _ := os.ReadFile(pki.FilesIn(c.dataDir).CAKey)
	if now, _ := os.ReadFile(pki.FilesIn(to).CAKey); !bytes.Equal(was, now) {
		t.Fatal("the backup's CA key differs")
	}

	// A restore without tls/ is refused: a new CA would be one no device
	// trusts.
	noTLS := filepath.Join(t.TempDir(), "no-tls")
	if out, err := exec.Command("cp", "-a", to, noTLS).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	_ = os.RemoveAll(filepath.Join(noTLS, "tls"))
	out, err := exec.Command(c.bin, "serve", "--data-dir", noTLS, "--https-port", "0", "--mqtt-port", "0").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "has no local CA") || !strings.Contains(string(out), "--new-ca") {
		t.Fatalf("serving a restore without tls/: %v\n%s", err, out)
	}
	// So is one whose tls/ holds another CA (as a replica's own, made at
	// its first start, would); --new-ca makes that CA the database's.
	otherCA := &cli{t: t, bin: c.bin, dataDir: noTLS}
	if err := pki.Ensure(pki.FilesIn(noTLS), []string{"localhost"}); err != nil {
		t.Fatal(err)
	}
	out, err = exec.Command(c.bin, "serve", "--data-dir", noTLS, "--https-port", "0", "--mqtt-port", "0").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "trust another local CA") || !strings.Contains(string(out), "--new-ca") {
		t.Fatalf("serving a restore with another CA: %v\n%s", err, out)
	}
	otherCA.serve("--new-ca")
	if out := otherCA.ok("enrollment", "list"); !strings.Contains(out, "kept-1") {
		t.Fatalf("the database served with --new-ca:\n%s", out)
	}

	// A backup that fails halfway leaves nothing that could pass for one.
	broken := &cli{t: t, bin: c.bin, dataDir: filepath.Join(t.TempDir(), "broken")}
	if out, err := exec.Command("cp", "-a", to, broken.dataDir).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	_ = os.WriteFile(filepath.Join(broken.dataDir, endpointFile), []byte(`{}`), 0o600)
	serverCert := pki.FilesIn(broken.dataDir).ServerCert
	if err := errors.Join(os.Remove(serverCert), os.Mkdir(serverCert, 0o700)); err != nil {
		t.Fatal(err)
	}
	half := filepath.Join(t.TempDir(), "half")
	if out, err := broken.run("backup", "--to", half); err == nil || !strings.Contains(out, "nothing was kept") {
		t.Fatalf("a backup that cannot read a file: %v\n%s", err, out)
	}
	if _, err := os.Stat(half); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a failed backup left %s: %v", half, err)
	}

	// Served from a directory others may read, with a CA key others may
	// read (a careless copy), the server says so.
	if err := errors.Join(os.Chmod(to, 0o755), os.Chmod(pki.FilesIn(to).CAKey, 0o644)); err != nil {
		t.Fatal(err)
	}
	restored := &cli{t: t, bin: c.bin, dataDir: to}
	restored.serve()
	for _, want := range []string{"the data directory holds the CA key", "the local CA's key may be read by others"} {
		if !strings.Contains(restored.serverLog.String(), want) {
			t.Errorf("the server's log does not warn %q:\n%s", want, restored.serverLog.String())
		}
	}
	if out := restored.ok("enrollment", "list"); !strings.Contains(out, "kept-1") {
		t.Fatalf("the restored server's enrollments:\n%s", out)
	}
	if now, _ := os.ReadFile(pki.FilesIn(to).CAKey); !bytes.Equal(was, now) {
		t.Fatal("the restored server made a CA of its own")
	}
}

// With the operator's certificate and its CA, the CLI and info trust that
// CA, and no local CA is made.
func TestOperatorCertificate(t *testing.T) {
	op := pki.FilesIn(t.TempDir())
	if err := pki.Ensure(op, []string{"localhost", "127.0.0.1"}); err != nil {
		t.Fatal(err)
	}
	c := &cli{t: t, bin: filepath.Join(t.TempDir(), "hatchery"), dataDir: t.TempDir()}
	c.build()
	if out, err := c.run("serve", "--tls-ca", op.CACert); err == nil || !strings.Contains(out, "--tls-ca goes with --tls-cert") {
		t.Fatalf("--tls-ca alone: %v\n%s", err, out)
	}
	c.httpsPort = c.serve("--tls-cert", op.ServerCert, "--tls-key", op.ServerKey, "--tls-ca", op.CACert)
	var info siteInfo
	if err := json.Unmarshal([]byte(c.ok("info", "-o", "json")), &info); err != nil {
		t.Fatal(err)
	}
	if info.CACertificate != op.CACert {
		t.Fatalf("info's CA certificate %q, want the operator's %q", info.CACertificate, op.CACert)
	}
	c.ok("enrollment", "list")
	if _, err := os.Stat(pki.FilesIn(c.dataDir).CAKey); err == nil {
		t.Fatal("a local CA was made beside the operator's certificate")
	}
	if out := c.ok("backup", "--to", filepath.Join(t.TempDir(), "backup")); !strings.Contains(out, "serve the backup with the same --tls-cert") {
		t.Errorf("a backup without a local CA does not say how to serve it: %s", out)
	}
}

// A SQLite database named with --database is one server's too, whatever
// data directory the second one is given.
func TestSQLiteDatabaseLocked(t *testing.T) {
	db := filepath.Join(t.TempDir(), "shared.db")
	c := &cli{t: t, bin: filepath.Join(t.TempDir(), "hatchery"), dataDir: t.TempDir()}
	c.build()
	c.serve("--database", db)
	out, err := exec.Command(c.bin, "serve", "--data-dir", t.TempDir(), "--database", db, "--https-port", "0", "--mqtt-port", "0").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "another hatchery serve (pid "+strconv.Itoa(c.serverPID)+") uses the database "+db) {
		t.Fatalf("a second server on the database: %v\n%s", err, out)
	}
	// The same for the database in a server's data directory.
	d := &cli{t: t, bin: c.bin, dataDir: t.TempDir()}
	d.serve()
	own := filepath.Join(d.dataDir, store.DefaultSQLiteFile)
	out, err = exec.Command(c.bin, "serve", "--data-dir", t.TempDir(), "--database", own, "--https-port", "0", "--mqtt-port", "0").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "uses the database "+own) {
		t.Fatalf("a second server on another's own database: %v\n%s", err, out)
	}
}

// A symlink to a server's database names that database: a second server
// given the link is refused as if given the file.
func TestSQLiteDatabaseLockedThroughSymlink(t *testing.T) {
	dir := t.TempDir()
	db := filepath.Join(dir, store.DefaultSQLiteFile)
	if err := os.WriteFile(db, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	unlock, err := lockDatabase("", dir)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	link := filepath.Join(t.TempDir(), "link.db")
	if err := os.Symlink(db, link); err != nil {
		t.Fatal(err)
	}
	for _, dsn := range []string{link, "sqlite:" + link} {
		if unlock, err := lockDatabase(dsn, t.TempDir()); err == nil || !strings.Contains(err.Error(), "uses the database "+db) {
			if err == nil {
				unlock()
			}
			t.Errorf("a second server on %s, a link to %s: %v", dsn, db, err)
		}
	}
}

// The installation of a server on PostgreSQL, backed up without
// --database, is refused, not backed up as the empty SQLite file that
// opening its data directory would make.
func TestBackupNeedsTheServersDatabase(t *testing.T) {
	empty := &cli{t: t, bin: filepath.Join(t.TempDir(), "hatchery"), dataDir: t.TempDir()}
	empty.build()
	if err := os.WriteFile(filepath.Join(empty.dataDir, endpointFile), []byte(`{"externalDatabase":true}`), 0o600); err != nil {
		t.Fatal(err)
	}
	to := filepath.Join(t.TempDir(), "backup")
	if out, err := empty.run("backup", "--to", to); err == nil || !strings.Contains(out, "PostgreSQL") {
		t.Fatalf("backup without --database of a server on PostgreSQL: %v\n%s", err, out)
	}
	if _, err := os.Stat(to); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused backup made %s: %v", to, err)
	}
}

// --tls-name adds names and addresses to the local CA's certificate, such
// as the LAN address devices use (pki.Ensure issues it again when a name
// is added to a running installation's).
func TestLocalCertificateNames(t *testing.T) {
	c := &cli{t: t, bin: filepath.Join(t.TempDir(), "hatchery"), dataDir: t.TempDir()}
	c.build()
	if out, err := c.run("serve", "--tls-name", "gw.lan", "--tls-cert", "x.pem", "--tls-key", "x-key.pem"); err == nil || !strings.Contains(out, "--tls-name is for the local CA") {
		t.Fatalf("--tls-name with --tls-cert: %v\n%s", err, out)
	}
	leaf := func() *x509.Certificate {
		pair, err := tls.LoadX509KeyPair(pki.FilesIn(c.dataDir).ServerCert, pki.FilesIn(c.dataDir).ServerKey)
		if err != nil {
			t.Fatal(err)
		}
		return pair.Leaf
	}
	c.serve("--tls-name", "192.0.2.10,gw.lan", "--tls-name", "gw2.lan")
	for _, name := range []string{"localhost", "192.0.2.10", "gw.lan", "gw2.lan"} {
		if err := leaf().VerifyHostname(name); err != nil {
			t.Errorf("the server certificate does not name %s: %v", name, err)
		}
	}
	// info shows what the server presents.
	want := "gw.lan, gw2.lan, 127.0.0.1, ::1, 192.0.2.10; expires " + leaf().NotAfter.UTC().Format("2006-01-02")
	if out := c.ok("info"); len(grepLines(out, "Server certificate:", "localhost, ", want)) != 1 {
		t.Errorf("info does not show the served certificate's names and expiry (%s):\n%s", want, out)
	}
}
