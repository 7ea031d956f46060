package tpm

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/iotest"

	"github.com/hatchery/hatchery/internal/testutil"
)

func TestParseTCTI(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want tcti
	}{
		{"", tcti{kind: "device", path: "/dev/tpmrm0"}},
		{"device", tcti{kind: "device", path: "/dev/tpmrm0"}},
		{"device:", tcti{kind: "device", path: "/dev/tpmrm0"}},
		{"device:/dev/tpm0", tcti{kind: "device", path: "/dev/tpm0"}},
		{"swtpm", tcti{kind: "swtpm", host: "localhost", port: 2321}},
		{"swtpm:", tcti{kind: "swtpm", host: "localhost", port: 2321}},
		{"swtpm:port=2400", tcti{kind: "swtpm", host: "localhost", port: 2400}},
		{"swtpm:host=127.0.0.1,port=2400", tcti{kind: "swtpm", host: "127.0.0.1", port: 2400}},
		{"mssim:port=1,host=::1", tcti{kind: "mssim", host: "::1", port: 1}},
	} {
		got, err := parseTCTI(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("parseTCTI(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
		}
	}
}

func TestOpenErrors(t *testing.T) {
	notDevice := filepath.Join(t.TempDir(), "tpm0")
	os.WriteFile(notDevice, nil, 0o600)
	refused, refused1 := testutil.ListenPair(t)
	refused.Close()
	refused1.Close()
	port := refused.Addr().(*net.TCPAddr).Port

	for _, tc := range []struct{ tcti, want string }{
		{"tabrmd", `unknown TCTI "tabrmd"; accepted forms: "device"`},
		{":2321", "missing TCTI name"},
		{"swtpm:host=", "empty host"},
		{"swtpm:port=0", `port "0" is not a number from 1 to 65534`},
		{"mssim:port=65535", "port"},
		{"swtpm:port=x", "port"},
		{"swtpm:bindaddr=1.2.3.4", `unknown setting "bindaddr=1.2.3.4" (want host=H,port=P)`},
		{"swtpm:127.0.0.1:2321", "unknown setting"},
		{"device:/nonexistent/tpmrm0", "TPM device /nonexistent/tpmrm0: no such device"},
		{"device:" + notDevice, "not a character device"},
		{fmt.Sprintf("swtpm:host=127.0.0.1,port=%d", port), fmt.Sprintf("swtpm at 127.0.0.1:%d: connection refused: is the simulator running with its command port on %d and its control port on %d?", port+1, port, port+1)},
		{fmt.Sprintf("mssim:host=127.0.0.1,port=%d", port), fmt.Sprintf("mssim at 127.0.0.1:%d: connection refused: is the simulator running with its command port on %d and its platform port on %d?", port, port, port+1)},
	} {
		d, err := Open(tc.tcti)
		if err == nil {
			d.Close()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Open(%q): got error %v, want one containing %q", tc.tcti, err, tc.want)
		}
	}

	// Root opens any device file, so the message is checked directly; it
	// says who may open the device now and which rules files may decide.
	dir := t.TempDir()
	device, rules := filepath.Join(dir, "tpmrm0"), filepath.Join(dir, "tpmaccess.rules")
	for f, body := range map[string]string{device: "", rules: `KERNEL=="tpmrm0", SUBSYSTEM=="tpmrm", OWNER="iotedge", MODE="0600"`} {
		if err := os.WriteFile(f, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	udevRulesDir = dir
	defer func() { udevRulesDir = "/etc/udev/rules.d" }()
	err := deviceError(device, &fs.PathError{Op: "open", Path: device, Err: fs.ErrPermission})
	for _, want := range []string{"permission denied (it is -rw------- root:root)", "aziottpm", `KERNEL=="tpmrm0", SUBSYSTEM=="tpmrm", OWNER="aziottpm", MODE="0660"`,
		"/etc/udev/rules.d/tpmaccess.rules", "udevadm trigger --subsystem-match=tpm --subsystem-match=tpmrm", "the last rule to set its owner or mode wins: " + rules} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("permission error %q lacks %q", err, want)
		}
	}
	// The raw device's rule is its own.
	raw := filepath.Join(dir, "tpm0")
	if err := deviceError(raw, &fs.PathError{Op: "open", Path: raw, Err: fs.ErrPermission}); !strings.Contains(err.Error(), `KERNEL=="tpm0", SUBSYSTEM=="tpm", OWNER="aziottpm"`) {
		t.Errorf("permission error of tpm0: %v", err)
	}
	busy := deviceError("/dev/tpm0", &fs.PathError{Op: "open", Path: "/dev/tpm0", Err: syscall.EBUSY})
	if want := "TPM device /dev/tpm0: busy: another program (tpm2-abrmd?) holds it open, and it admits one at a time: " +
		"use the kernel's resource manager, /dev/tpmrm0, which programs share"; !strings.Contains(busy.Error(), want) {
		t.Errorf("busy error: %v, want %q", busy, want)
	}
}

// response is a TPM response of n bytes: a header whose size field says n.
func response(n int) []byte {
	b := make([]byte, n)
	b[0], b[1] = 0x80, 0x01
	binary.BigEndian.PutUint32(b[2:], uint32(n))
	return b
}

func TestReadResponse(t *testing.T) {
	for _, n := range []int{10, 20, 4096, 5000} {
		want := response(n)
		// One byte per read: the header, then the rest, must be read in full.
		got, err := readResponse(iotest.OneByteReader(bytes.NewReader(want)))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%d-byte response: got %d bytes, %v", n, len(got), err)
		}
	}
	for _, tc := range []struct {
		name string
		in   []byte
	}{
		{"short header", response(10)[:9]},
		{"truncated body", response(20)[:15]},
		{"size below header", response(10)[:6]},
		{"huge size", func() []byte { b := response(10); b[2] = 0xff; return b }()},
		{"more than the size says", append(response(10), 0)},
	} {
		if _, err := readResponse(bytes.NewReader(tc.in)); err == nil {
			t.Errorf("%s: no error", tc.name)
		}
	}
}

// TestMSSim drives a Device through the mssim TCTI. swtpm's data port also
// understands the simulator's framing, so a stand-in platform port and a
// relay to swtpm make a simulator.
func TestMSSim(t *testing.T) {
	swtpm, err := parseTCTI(testutil.StartSWTPM(t))
	if err != nil {
		t.Fatal(err)
	}
	cmdL, platL := testutil.ListenPair(t)
	var mu sync.Mutex
	var signals []uint32
	serve := func(l net.Listener, handle func(net.Conn)) {
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				go func() { defer c.Close(); handle(c) }()
			}
		}()
	}
	serve(platL, func(c net.Conn) {
		var b [4]byte
		for {
			if _, err := io.ReadFull(c, b[:]); err != nil {
				return
			}
			mu.Lock()
			signals = append(signals, binary.BigEndian.Uint32(b[:]))
			mu.Unlock()
			if _, err := c.Write(make([]byte, 4)); err != nil { // success
				return
			}
		}
	})
	serve(cmdL, func(c net.Conn) {
		u, err := net.Dial("tcp", swtpm.addr(swtpm.port))
		if err != nil {
			return
		}
		defer u.Close()
		go func() { io.Copy(u, c); u.Close() }()
		io.Copy(c, u)
	})

	d, err := Open(fmt.Sprintf("mssim:host=127.0.0.1,port=%d", cmdL.Addr().(*net.TCPAddr).Port))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	mu.Lock()
	if fmt.Sprint(signals) != "[1 11]" {
		t.Errorf("platform signals %v, want [1 11] (power on, NV on)", signals)
	}
	mu.Unlock()
	ek, err := d.EndorsementKey()
	if err != nil {
		t.Fatal(err)
	}
	if len(ek) != 316 {
		t.Errorf("EK of %d bytes, want 316", len(ek))
	}
}

func FuzzParseTCTI(f *testing.F) {
	for _, s := range []string{"", "device", "device:/dev/tpm0", "swtpm:host=127.0.0.1,port=2321", "mssim:port=2321", "swtpm:port=,host", ":", "x:y=z"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		c, err := parseTCTI(s)
		if err != nil {
			return
		}
		switch {
		case c.kind == "device" && c.path == "":
			t.Errorf("%q: empty device path", s)
		case c.kind != "device" && (c.host == "" || c.port < 1 || c.port > 65534):
			t.Errorf("%q: parsed as %+v", s, c)
		}
	})
}
