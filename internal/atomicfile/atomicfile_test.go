package atomicfile

import (
	"os"
	"path/filepath"
	"testing"
)

// A private file, and the directory made for it, are their owner's alone;
// writing it again replaces it whole.
func TestWritePrivate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state", "edge")
	path := filepath.Join(dir, "backup.json")
	for _, body := range []string{`{"a":1}`, `{"b":2}`} {
		if err := WritePrivate(path, []byte(body)); err != nil {
			t.Fatal(err)
		}
		if got, err := os.ReadFile(path); err != nil || string(got) != body {
			t.Fatalf("read back %q, %v; want %q", got, err, body)
		}
	}
	for p, want := range map[string]os.FileMode{path: 0o600, dir: 0o700 | os.ModeDir} {
		if fi, err := os.Stat(p); err != nil || fi.Mode() != want {
			t.Errorf("%s: mode %v, %v; want %v", p, fi.Mode(), err, want)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*.tmp")); len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}
}
