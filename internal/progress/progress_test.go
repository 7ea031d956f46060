package progress

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// Off a terminal the bar draws nothing: a log file or a pipe gets no frames.
func TestNoBarOffATerminal(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "log"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var buf bytes.Buffer
	for _, b := range []*Bar{New(f, "importing", 2), New(&buf, "importing", 2)} {
		b.Add(2)
		b.Done()
	}
	if fi, _ := f.Stat(); fi.Size() != 0 || buf.Len() != 0 {
		t.Errorf("a bar drawn off a terminal: %d bytes to a file, %q to a buffer", fi.Size(), buf.String())
	}
}
