// Package statefile writes the edge runtime's state files (the identity
// backup, the last deployment, the modules stopped at shutdown) so that a
// power loss leaves the old file or the new, never a torn one.
package statefile

import (
	"os"
	"path/filepath"

	"github.com/hatchery/hatchery/internal/atomicfile"
)

// Replace replaces the file at path with one holding b, mode 0600, making
// its directory (0700) if need be, atomically (atomicfile.Write).
func Replace(path string, b []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return atomicfile.Write(path, b, 0o600)
}
