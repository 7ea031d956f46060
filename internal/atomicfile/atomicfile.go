// Package atomicfile writes files that a crash, a full disk or a power loss
// leaves as they were or as meant, never torn or empty.
package atomicfile

import (
	"os"
	"path/filepath"
)

// Write replaces the file at path with one holding b, mode perm: it is
// written next to it, synced and renamed over it, and the directory is
// synced, for the rename itself to last. A write that fails leaves path as
// it was and nothing beside it.
func Write(path string, b []byte, perm os.FileMode) error {
	return WriteOwned(path, b, perm, -1, -1)
}

// WritePrivate is Write of a file only its owner may read (0600), in a
// directory made (0700) if need be: a state file, such as the edge
// runtime's identity backup.
func WritePrivate(path string, b []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return Write(path, b, 0o600)
}

// WriteOwned is Write of a file owned by uid and gid (-1 keeps the
// writer's): owner and mode are set before b is written, so that no one
// else ever reads b from it.
func WriteOwned(path string, b []byte, perm os.FileMode, uid, gid int) error {
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name()) // after a failure; gone after the rename
	if uid != -1 || gid != -1 {
		err = f.Chown(uid, gid)
	}
	if err == nil {
		err = f.Chmod(perm)
	}
	if err == nil {
		_, err = f.Write(b)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err == nil {
		if d, derr := os.Open(filepath.Dir(path)); derr == nil {
			err = d.Sync()
			d.Close()
		}
	}
	return err
}
