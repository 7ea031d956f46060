package testutil

import (
	"fmt"
	"net"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2/transport"
)

// recorder is a testing.TB that records Skipf and Fatalf instead of
// stopping the test.
type recorder struct {
	testing.TB
	skipped, failed string
}

func (r *recorder) Helper()                        {}
func (r *recorder) Skipf(format string, a ...any)  { r.skipped = fmt.Sprintf(format, a...) }
func (r *recorder) Fatalf(format string, a ...any) { r.failed = fmt.Sprintf(format, a...) }

func TestRequire(t *testing.T) {
	for _, ci := range []string{"", "true"} {
		t.Setenv("CI", ci)
		r := &recorder{TB: t}
		Require(r, "sh", "dash")
		if r.skipped != "" || r.failed != "" {
			t.Errorf("CI=%q: sh is on PATH, but got %+v", ci, r)
		}
		Require(r, "no-such-command-here", "no-such-package")
		got := r.skipped
		if ci == "true" {
			got = r.failed
		}
		if !strings.Contains(got, "no-such-command-here is not on PATH: install the Debian package no-such-package") {
			t.Errorf("CI=%q: got %+v", ci, r)
		}
	}
}

func TestSeedsDir(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("HATCHERY_SEEDS", dir)
	if got := SeedsDir(t); got != dir {
		t.Errorf("SeedsDir = %s, want %s", got, dir)
	}
	t.Setenv("CI", "true")
	t.Setenv("HATCHERY_SEEDS", dir+"/missing")
	r := &recorder{TB: t}
	SeedsDir(r)
	if !strings.Contains(r.failed, "HATCHERY_SEEDS") {
		t.Errorf("missing seeds under CI: got %+v", r)
	}
}

func TestStartSWTPM(t *testing.T) {
	var addr string
	t.Run("running", func(t *testing.T) {
		tcti := StartSWTPM(t)
		var port int
		if _, err := fmt.Sscanf(tcti, "swtpm:host=127.0.0.1,port=%d", &port); err != nil {
			t.Fatalf("TCTI %q: %v", tcti, err)
		}
		addr = fmt.Sprintf("127.0.0.1:%d", port)
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		// TPM2_GetRandom(8) answers TPM_RC_SUCCESS: swtpm has run Startup.
		rsp, err := transport.FromReadWriter(conn).Send([]byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8})
		if err != nil || len(rsp) != 20 || string(rsp[6:10]) != "\x00\x00\x00\x00" {
			t.Fatalf("GetRandom: %x, %v", rsp, err)
		}
	})
	if conn, err := net.Dial("tcp", addr); err == nil {
		conn.Close()
		t.Errorf("swtpm still answers on %s after the test", addr)
	}
}
