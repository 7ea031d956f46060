package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/edge/config"
)

// TestReadableBy: config apply names the file the service user cannot
// read, or the directory it cannot pass, with the command that fixes it.
func TestReadableBy(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give files to other users")
	}
	const uid, gid = 4242, 4243
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} { // the test's own directories let anyone through
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	file := func(name string, mode os.FileMode, owner, group int) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, nil, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, owner, group); err != nil {
			t.Fatal(err)
		}
		return p
	}
	ok := []string{file("own.pem", 0o400, uid, 0), file("group.pem", 0o640, 0, gid), file("world.pem", 0o644, 0, 0)}
	for _, p := range ok {
		if err := readableBy(p, uid, []int{gid}, false); err != nil {
			t.Errorf("%s: %v", p, err)
		}
	}
	closed := file("root-only.pem", 0o600, 0, 0)
	if err := readableBy(closed, uid, []int{gid}, false); err == nil || !strings.Contains(err.Error(), "sudo chgrp iotedge "+closed+" && sudo chmod g+r "+closed) {
		t.Errorf("root-only file: %v", err)
	}
	// A key goes to the user alone, not to the group of operators.
	if err := readableBy(closed, uid, []int{gid}, true); err == nil || !strings.Contains(err.Error(), "sudo chown iotedge "+closed+" && sudo chmod 0600 "+closed) {
		t.Errorf("root-only key: %v", err)
	}
	if err := readableBy(filepath.Join(dir, "absent.json"), uid, []int{gid}, false); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("absent file: %v", err)
	}
	sub := filepath.Join(dir, "private")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	inside := filepath.Join(sub, "payload.json")
	if err := os.WriteFile(inside, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := readableBy(inside, uid, []int{gid}, false); err == nil || !strings.Contains(err.Error(), "is in "+sub) || !strings.Contains(err.Error(), "chmod g+x "+sub) {
		t.Errorf("file in a closed directory: %v", err)
	}
}

// config apply warns of a key file others than its owner can read: they
// could connect as the device.
func TestExposedKeys(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give files to groups")
	}
	dir := t.TempDir()
	key := func(name string, mode os.FileMode, gid int) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("a2V5"), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, 4242, gid); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cert := key("dev.pem", 0o644, 0)
	for _, tc := range []struct {
		path   string
		warned bool
	}{
		{key("own.key", 0o600, 4244), false},
		{key("root-group.key", 0o640, 0), false},
		{key("group.key", 0o640, 4244), true},
		{key("world.key", 0o604, 0), true},
	} {
		var c config.Config
		c.Provisioning.Attestation.SymmetricKey.URI = "file://" + tc.path
		c.Provisioning.Attestation.IdentityCert = cert // public: never warned of
		ws := exposedKeys(&c)
		if warned := len(ws) == 1 && strings.Contains(ws[0], "sudo chown iotedge "+tc.path+" && sudo chmod 0600 "+tc.path); warned != tc.warned || len(ws) > 1 {
			t.Errorf("%s: %q, want a warning: %v", tc.path, ws, tc.warned)
		}
	}
}
