package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
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
		if err := readableBy(p, uid, []int{gid}); err != nil {
			t.Errorf("%s: %v", p, err)
		}
	}
	closed := file("root-only.pem", 0o600, 0, 0)
	if err := readableBy(closed, uid, []int{gid}); err == nil || !strings.Contains(err.Error(), "sudo chgrp iotedge "+closed+" && sudo chmod g+r "+closed) {
		t.Errorf("root-only file: %v", err)
	}
	if err := readableBy(filepath.Join(dir, "absent.json"), uid, []int{gid}); err == nil || !strings.Contains(err.Error(), "does not exist") {
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
	if err := readableBy(inside, uid, []int{gid}); err == nil || !strings.Contains(err.Error(), "is in "+sub) || !strings.Contains(err.Error(), "chmod g+x "+sub) {
		t.Errorf("file in a closed directory: %v", err)
	}
}
