package fileowner

import (
	"os"
	"path/filepath"
	"testing"
)

func TestDescribe(t *testing.T) {
	f := filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(f, nil, 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(f, 0, 0); err != nil {
		t.Skip("needs root to give the file to root:root: ", err)
	}
	fi, _ := os.Stat(f)
	if got := Describe(fi); got != "-rw-r----- root:root" {
		t.Fatalf("Describe = %q", got)
	}
}
