package tpm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/hatchery/hatchery/internal/fileowner"
)

// tctiForms lists what Open accepts, for error messages.
const tctiForms = `"device" (/dev/tpmrm0), "device:/dev/tpm0", "swtpm:host=127.0.0.1,port=2321" or "mssim:host=127.0.0.1,port=2321"`

const (
	defaultDevice = "/dev/tpmrm0"
	defaultHost   = "localhost" // tpm2-tss defaults for swtpm and mssim
	defaultPort   = 2321

	// maxResponse bounds what we accept as one TPM response; TPMs answer at
	// most a few KiB, so a larger size field means a broken stream.
	maxResponse = 1 << 16
	// netTimeout bounds one command to a simulator. swtpm serves a single
	// connection at a time, so a client that holds it makes us wait here.
	netTimeout = time.Minute
)

// tcti is a parsed tpm2-tss TCTI configuration string.
type tcti struct {
	kind string // "device", "swtpm" or "mssim"
	path string // device file
	host string
	port int // command port; the control (swtpm) or platform (mssim) port is port+1
}

func (c tcti) addr(port int) string { return net.JoinHostPort(c.host, strconv.Itoa(port)) }

// CheckTCTI reports whether s is a TCTI string Open accepts, with an error
// that lists the accepted forms.
func CheckTCTI(s string) error {
	_, err := parseTCTI(s)
	return err
}

// parseTCTI parses the TCTI strings that tpm2-tools accept via -T or
// TPM2TOOLS_TCTI, with tpm2-tss's defaults for missing fields.
func parseTCTI(s string) (tcti, error) {
	bad := func(why string) (tcti, error) {
		return tcti{}, fmt.Errorf("TCTI %q: %s; accepted forms: %s", s, why, tctiForms)
	}
	name, conf, _ := strings.Cut(s, ":")
	switch name {
	case "device":
		if conf == "" {
			conf = defaultDevice
		}
		return tcti{kind: name, path: conf}, nil
	case "":
		if s != "" {
			return bad("missing TCTI name before ':'")
		}
		return tcti{kind: "device", path: defaultDevice}, nil
	case "swtpm", "mssim":
	default:
		return bad(fmt.Sprintf("unknown TCTI %q", name))
	}
	c := tcti{kind: name, host: defaultHost, port: defaultPort}
	if conf == "" {
		return c, nil
	}
	for kv := range strings.SplitSeq(conf, ",") {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "host":
			if v == "" {
				return bad("empty host")
			}
			c.host = v
		case "port":
			// port+1 must be a port too.
			p, err := strconv.ParseUint(v, 10, 16)
			if err != nil || p == 0 || p == 65535 {
				return bad(fmt.Sprintf("port %q is not a number from 1 to 65534", v))
			}
			c.port = int(p)
		default:
			return bad(fmt.Sprintf("unknown setting %q (want host=H,port=P)", kv))
		}
	}
	return c, nil
}

// open connects the transport the TCTI names.
func (c tcti) open() (transport.TPMCloser, error) {
	var t transport.TPMCloser
	var err error
	switch c.kind {
	case "device":
		t, err = openDevice(c.path)
	case "swtpm":
		t, err = openSWTPM(c)
	default:
		t, err = openMSSim(c)
	}
	if err != nil {
		return nil, err
	}
	return retrying{t}, nil
}

// retrying sends a command again when the TPM answers with a warning that
// asks for it (TPM_RC_RETRY, TPM_RC_YIELDED, TPM_RC_TESTING), as tpm2-tss
// does: a busy TPM answers so, and the same command then succeeds.
type retrying struct{ transport.TPMCloser }

func (r retrying) Send(cmd []byte) ([]byte, error) {
	for attempt := 0; ; attempt++ {
		rsp, err := r.TPMCloser.Send(cmd)
		if err != nil || len(rsp) < 10 || attempt == 20 {
			return rsp, err
		}
		switch binary.BigEndian.Uint32(rsp[6:10]) {
		case 0x922, 0x908, 0x90a: // RETRY, YIELDED, TESTING
			time.Sleep(time.Duration(attempt+1) * 10 * time.Millisecond)
		default:
			return rsp, nil
		}
	}
}

func openDevice(path string) (transport.TPMCloser, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, deviceError(path, err)
	}
	if fi, err := f.Stat(); err != nil || fi.Mode()&fs.ModeCharDevice == 0 {
		f.Close()
		return nil, fmt.Errorf("TPM device %s: not a character device", path)
	}
	return fileTPM{f}, nil
}

// deviceError says what to do when the TPM device cannot be opened.
func deviceError(path string, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("TPM device %s: no such device: is a TPM 2.0 present and its kernel driver loaded? (for a simulator use swtpm:host=H,port=P)", path)
	case errors.Is(err, fs.ErrPermission):
		// The rule for the device named: tpmrm0's subsystem is tpmrm, tpm0's tpm.
		name := filepath.Base(path)
		subsystem := strings.TrimRight(name, "0123456789")
		return fmt.Errorf("TPM device %s: permission denied%s: the TPM is user aziottpm's, under which aziot-tpmd runs "+
			"(a command run by hand reads it through aziot-tpmd, or with sudo); the package's rule gives tpmrm devices to that user, "+
			`and for this one install 'KERNEL=="%s", SUBSYSTEM=="%s", OWNER="aziottpm", MODE="0660"' `+
			"in /etc/udev/rules.d/tpmaccess.rules and run 'udevadm trigger --subsystem-match=tpm --subsystem-match=tpmrm'%s",
			path, describeDevice(path), name, subsystem, otherRules())
	case errors.Is(err, syscall.EBUSY):
		msg := "TPM device " + path + ": busy: another program (tpm2-abrmd?) holds it open"
		// /dev/tpmN admits one process at a time; /dev/tpmrmN is shared.
		if n, ok := strings.CutPrefix(filepath.Base(path), "tpm"); ok && !strings.HasPrefix(n, "rm") {
			msg += ", and it admits one at a time: use the kernel's resource manager, /dev/tpmrm" + n + ", which programs share"
		}
		return fmt.Errorf("%s (%w)", msg, err)
	default:
		return fmt.Errorf("TPM device %s: %w", path, err)
	}
}

// describeDevice says who may open the device file now, as " (it is MODE
// OWNER:GROUP)".
func describeDevice(path string) string {
	fi, err := os.Stat(path)
	if err != nil {
		return ""
	}
	return " (it is " + fileowner.Describe(fi) + ")"
}

// udevRulesDir holds administrators' udev rules, which run after the
// packaged ones: one setting the TPM's owner or mode there (the IoT Edge
// 1.1 documents' OWNER="iotedge", MODE="0600") decides who may open it.
var udevRulesDir = "/etc/udev/rules.d"

// otherRules names the rules files there that mention the TPM.
func otherRules() string {
	files, _ := filepath.Glob(filepath.Join(udevRulesDir, "*.rules"))
	var tpm []string
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil && bytes.Contains(bytes.ToLower(b), []byte("tpm")) {
			tpm = append(tpm, f)
		}
	}
	if len(tpm) == 0 {
		return ""
	}
	return "; these rules files also set up the TPM, and the last rule to set its owner or mode wins: " + strings.Join(tpm, ", ")
}

// fileTPM is a kernel TPM device: write a command, read its response.
type fileTPM struct{ f *os.File }

func (t fileTPM) Send(cmd []byte) ([]byte, error) {
	if _, err := t.f.Write(cmd); err != nil {
		return nil, fmt.Errorf("TPM device %s: %w", t.f.Name(), err)
	}
	return readResponse(t.f)
}

func (t fileTPM) Close() error { return t.f.Close() }

// swtpm's data port takes raw TPM commands. Like tpm2-tss's swtpm TCTI, we
// open one connection per command: swtpm serves one connection at a time, so
// holding it would lock out every other client (tpm2-tools included).
type swtpm struct{ c tcti }

func openSWTPM(c tcti) (transport.TPMCloser, error) {
	s := swtpm{c}
	// Reset the locality through the control channel, as tpm2-tss does; this
	// also checks both ports answer.
	ctrl, err := s.dial(c.port + 1)
	if err != nil {
		return nil, err
	}
	defer ctrl.Close()
	const cmdSetLocality = 5
	var req [5]byte
	binary.BigEndian.PutUint32(req[:], cmdSetLocality)
	if err := exchange(ctrl, req[:], 0); err != nil {
		return nil, fmt.Errorf("swtpm control port %s: %w", c.addr(c.port+1), err)
	}
	data, err := s.dial(c.port)
	if err != nil {
		return nil, err
	}
	data.Close()
	return s, nil
}

func (s swtpm) dial(port int) (net.Conn, error) { return dial(s.c, port) }

func (s swtpm) Send(cmd []byte) ([]byte, error) {
	conn, err := s.dial(s.c.port)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	if _, err := conn.Write(cmd); err != nil {
		return nil, fmt.Errorf("swtpm %s: %w", s.c.addr(s.c.port), err)
	}
	rsp, err := readResponse(conn)
	if err != nil {
		return nil, fmt.Errorf("swtpm %s: %w", s.c.addr(s.c.port), err)
	}
	return rsp, nil
}

func (swtpm) Close() error { return nil }

// mssim speaks the Microsoft TPM simulator protocol: commands framed on
// port P, power and NV signals on platform port P+1. Unlike swtpm, the
// connections are kept for the Device's lifetime, as tpm2-tss does.
type mssim struct {
	c         tcti
	cmd, plat net.Conn
}

func openMSSim(c tcti) (_ transport.TPMCloser, err error) {
	m := &mssim{c: c}
	defer func() {
		if err != nil {
			m.Close()
		}
	}()
	if m.cmd, err = dial(c, c.port); err != nil {
		return nil, err
	}
	if m.plat, err = dial(c, c.port+1); err != nil {
		return nil, err
	}
	const powerOn, nvOn = 1, 11
	for _, signal := range []uint32{powerOn, nvOn} {
		req := binary.BigEndian.AppendUint32(nil, signal)
		m.plat.SetDeadline(time.Now().Add(netTimeout))
		if err := exchange(m.plat, req, 0); err != nil {
			return nil, fmt.Errorf("mssim platform port %s: %w", c.addr(c.port+1), err)
		}
	}
	// A freshly powered simulator needs Startup; one that runs already says
	// TPM_RC_INITIALIZE, which is fine.
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(m); err != nil && !errors.Is(err, tpm2.TPMRCInitialize) {
		return nil, fmt.Errorf("mssim %s: TPM2_Startup: %w", c.addr(c.port), err)
	}
	return m, nil
}

func (m *mssim) Send(cmd []byte) ([]byte, error) {
	const sendCommand = 8
	frame := binary.BigEndian.AppendUint32(make([]byte, 0, 9+len(cmd)), sendCommand)
	frame = append(frame, 0) // locality
	frame = binary.BigEndian.AppendUint32(frame, uint32(len(cmd)))
	frame = append(frame, cmd...)
	m.cmd.SetDeadline(time.Now().Add(netTimeout))
	rsp, err := func() ([]byte, error) {
		if _, err := m.cmd.Write(frame); err != nil {
			return nil, err
		}
		var n [4]byte
		if _, err := io.ReadFull(m.cmd, n[:]); err != nil {
			return nil, err
		}
		// The frame length bounds the read, so the trailing status word
		// stays in the stream.
		rsp, err := readResponse(io.LimitReader(m.cmd, int64(binary.BigEndian.Uint32(n[:]))))
		if err != nil {
			return nil, err
		}
		return rsp, exchange(m.cmd, nil, 0)
	}()
	if err != nil {
		return nil, fmt.Errorf("mssim %s: %w", m.c.addr(m.c.port), err)
	}
	return rsp, nil
}

func (m *mssim) Close() error {
	var errs []error
	for _, c := range []net.Conn{m.cmd, m.plat} {
		if c != nil {
			errs = append(errs, c.Close())
		}
	}
	return errors.Join(errs...)
}

// dial connects to a simulator port and names the usual cause of failure.
func dial(c tcti, port int) (net.Conn, error) {
	conn, err := net.DialTimeout("tcp", c.addr(port), 10*time.Second)
	if errors.Is(err, syscall.ECONNREFUSED) {
		return nil, fmt.Errorf("%s at %s: connection refused: is the simulator running with its command port on %d and its %s port on %d?",
			c.kind, c.addr(port), c.port, map[string]string{"swtpm": "control", "mssim": "platform"}[c.kind], c.port+1)
	}
	if err != nil {
		return nil, fmt.Errorf("%s at %s: %w", c.kind, c.addr(port), err)
	}
	conn.SetDeadline(time.Now().Add(netTimeout))
	return conn, nil
}

// exchange writes req (if any) and reads the 32-bit status word that swtpm's
// control channel and mssim's ports answer with; it must equal want.
func exchange(conn net.Conn, req []byte, want uint32) error {
	if len(req) > 0 {
		if _, err := conn.Write(req); err != nil {
			return err
		}
	}
	var rc [4]byte
	if _, err := io.ReadFull(conn, rc[:]); err != nil {
		return err
	}
	if got := binary.BigEndian.Uint32(rc[:]); got != want {
		return fmt.Errorf("status 0x%x", got)
	}
	return nil
}

// readResponse reads one whole TPM response: at least the 10-byte header,
// then as many bytes as its size field says. The first read asks for a
// full page, because some kernel drivers drop what a short read leaves.
func readResponse(r io.Reader) ([]byte, error) {
	buf := make([]byte, 4096)
	n, err := io.ReadAtLeast(r, buf, 10)
	if err != nil {
		return nil, fmt.Errorf("reading TPM response: %w", err)
	}
	size := int(binary.BigEndian.Uint32(buf[2:6]))
	if size < 10 || size > maxResponse || n > size {
		return nil, fmt.Errorf("reading TPM response: bad size %d in header (%d bytes read)", size, n)
	}
	if size > len(buf) {
		buf = append(buf, make([]byte, size-len(buf))...)
	}
	if _, err := io.ReadFull(r, buf[n:size]); err != nil {
		return nil, fmt.Errorf("reading TPM response: %d of %d bytes: %w", n, size, err)
	}
	return buf[:size], nil
}
