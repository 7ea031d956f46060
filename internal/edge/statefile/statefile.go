// Package statefile writes the edge runtime's state files (the identity
// backup, the last deployment, the modules stopped at shutdown) so that a
// power loss leaves the old file or the new, never a torn one.
package statefile

import (
	"os"
	"path/filepath"
)

// Replace replaces the file at path with one holding b, mode 0600, making
// its directory (0700) if need be: it is written next to it, synced and
// renamed over it, and the directory is synced, for the rename itself to
// last.
func Replace(path string, b []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name()) // after a failure; gone after the rename
	_, err = f.Write(b)
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
