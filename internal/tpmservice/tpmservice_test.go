package tpmservice

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/provisioning"
	"github.com/hatchery/hatchery/internal/starthint"
	"github.com/hatchery/hatchery/internal/testutil"
	"github.com/hatchery/hatchery/internal/tpm"
)

var (
	_ provisioning.TPM = (*Client)(nil)
	_ TPM              = (*tpm.Device)(nil)
)

const identity = 0x81000100 // tpm.IdentityHandle(tpm.DefaultAuthKeyIndex)

// serve runs the service for dev on a socket in a temp dir, owned by the
// test's own group, and returns the socket's path and a function that
// stops the service and waits for it.
func serve(t *testing.T, dev TPM) (string, func()) {
	t.Helper()
	return serveFor(t, dev, nil)
}

// serveFor is serve with the identity key for signers alone (nil: anyone).
func serveFor(t *testing.T, dev TPM, signers []uint32) (string, func()) {
	t.Helper()
	g, err := user.LookupGroupId(strconv.Itoa(os.Getgid()))
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "tpmd.sock")
	l, err := Listen(sock, g.Name)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	srv := NewServer(dev, tpm.DefaultAuthKeyIndex)
	srv.Signers = signers
	go func() { done <- ServeListener(ctx, l, srv) }()
	stop := sync.OnceFunc(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("ServeListener: %v", err)
		}
	})
	t.Cleanup(stop)
	return sock, stop
}

// raw sends one request to the socket and returns the status and body.
func raw(t *testing.T, sock, method, path, body string) (int, []byte) {
	t.Helper()
	c := http.Client{Transport: &http.Transport{DialContext: func(context.Context, string, string) (net.Conn, error) {
		return net.Dial("unix", sock)
	}}}
	req, _ := http.NewRequest(method, "http://x"+path, strings.NewReader(body))
	rsp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer rsp.Body.Close()
	b, _ := io.ReadAll(rsp.Body)
	if ct := rsp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s %s: Content-Type %q", method, path, ct)
	}
	return rsp.StatusCode, b
}

// wantStatus checks that err is the service's answer with status.
func wantStatus(t *testing.T, what string, err error, status int) {
	t.Helper()
	if e, ok := errors.AsType[*Error](err); !ok || e.Status != status {
		t.Errorf("%s: got %v, want an HTTP %d answer", what, err, status)
	}
}

func hmacSHA256(key, data []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(data)
	return m.Sum(nil)
}

func TestService(t *testing.T) {
	tcti := testutil.StartSWTPM(t)
	dev, err := tpm.Open(tcti)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Close() })
	sock, stop := serve(t, dev)
	var c provisioning.TPM = Dial(sock)

	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o660 || fi.Sys().(*syscall.Stat_t).Gid != uint32(os.Getgid()) {
		t.Errorf("socket mode %v gid %d, want 0660 and %d", fi.Mode().Perm(), fi.Sys().(*syscall.Stat_t).Gid, os.Getgid())
	}

	ek, err := c.EndorsementKey()
	if err != nil {
		t.Fatal(err)
	}
	srk, err := c.StorageRootKey()
	if err != nil {
		t.Fatal(err)
	}
	// A second Device reads the same TPM directly.
	direct, err := tpm.Open(tcti)
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	if want, _ := direct.EndorsementKey(); !bytes.Equal(ek, want) {
		t.Error("EK through the service differs from the direct read")
	}
	if want, _ := direct.StorageRootKey(); !bytes.Equal(srk, want) {
		t.Error("SRK through the service differs from the direct read")
	}
	status, body := raw(t, sock, "GET", "/endorsement-key", "")
	var rsp endorsementKeyResponse
	if status != 200 || json.Unmarshal(body, &rsp) != nil || rsp.RegistrationID != attest.RegistrationID(ek) || !bytes.Equal(rsp.EndorsementKey, ek) {
		t.Errorf("GET /endorsement-key: %d %s", status, body)
	}

	_, err = c.HMAC(identity, []byte("x"))
	wantStatus(t, "HMAC before any import", err, http.StatusConflict)
	if !errors.Is(err, tpm.ErrNoIdentityKey) {
		t.Errorf("HMAC before any import: %v, want tpm.ErrNoIdentityKey, which makes the runtime provision again", err)
	}
	if _, err := direct.HMAC(identity, []byte("x")); !errors.Is(err, tpm.ErrNoIdentityKey) {
		t.Errorf("HMAC before any import, direct: %v, want tpm.ErrNoIdentityKey", err)
	}

	data := []byte("myscope%2fregistrations%2fdevice-1\n1700000000")
	long := bytes.Repeat([]byte("0123456789"), 300) // beyond one TPM buffer
	for _, key := range [][]byte{[]byte("the DPS challenge key 0123456789"), []byte("the hub key, imported over the first")} {
		blob, err := attest.ActivationBlob(ek, srk, key, rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.ImportActivationBlob(blob, identity); err != nil {
			t.Fatal(err)
		}
		for _, d := range [][]byte{data, long, nil} {
			got, err := c.HMAC(identity, d)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, hmacSHA256(key, d)) {
				t.Errorf("HMAC of %d bytes through the service differs from HMAC-SHA256", len(d))
			}
		}
	}

	// Callers cannot reach other handles: not the SRK, not another key.
	blob, _ := attest.ActivationBlob(ek, srk, []byte("k"), rand.Reader)
	for _, h := range []uint32{tpm.SRKHandle, identity + 1} {
		wantStatus(t, fmt.Sprintf("import at 0x%x", h), c.ImportActivationBlob(blob, h), http.StatusForbidden)
		_, err := c.HMAC(h, data)
		wantStatus(t, fmt.Sprintf("HMAC at 0x%x", h), err, http.StatusForbidden)
	}
	_, err = c.HMAC(identity, make([]byte, maxBody))
	wantStatus(t, "HMAC of an oversized body", err, http.StatusRequestEntityTooLarge)
	wantStatus(t, "import of a truncated blob", c.ImportActivationBlob(blob[:len(blob)-3], identity), http.StatusBadRequest)
	// A blob made for another EK: the TPM refuses it.
	other, _ := attest.ActivationBlob(srk, srk, []byte("k"), rand.Reader)
	err = c.ImportActivationBlob(other, identity)
	wantStatus(t, "import of a blob for another TPM", err, http.StatusUnprocessableEntity)
	if err != nil && !strings.Contains(err.Error(), "ActivateCredential") {
		t.Errorf("refused blob: %v, want the TPM's reason", err)
	}
	// The last good key is still there.
	if got, _ := c.HMAC(identity, data); !bytes.Equal(got, hmacSHA256([]byte("the hub key, imported over the first"), data)) {
		t.Error("a refused import changed the identity key")
	}

	for _, r := range []struct {
		method, path, body string
		status             int
	}{
		{"POST", "/endorsement-key", "", http.StatusMethodNotAllowed},
		{"GET", "/sign", "", http.StatusMethodNotAllowed},
		{"GET", "/private-key", "", http.StatusNotFound},
		{"POST", "/sign", "{", http.StatusBadRequest},
		{"POST", "/sign", `{"data": "not base64!"}`, http.StatusBadRequest},
		{"POST", "/import", `{}`, http.StatusBadRequest},
		{"POST", "/sign", `{"data": "aGk="}`, http.StatusOK}, // the handle is optional
	} {
		status, body := raw(t, sock, r.method, r.path, r.body)
		var e errorResponse
		if status != r.status || (status != 200 && (json.Unmarshal(body, &e) != nil || e.Message == "")) {
			t.Errorf("%s %s %s: %d %s, want %d", r.method, r.path, r.body, status, body, r.status)
		}
	}

	stop()
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind after shutdown: %v", err)
	}
	_, err = c.EndorsementKey()
	if err == nil || !strings.Contains(err.Error(), "aziot-tpmd is not running") || !strings.Contains(err.Error(), sock) {
		t.Errorf("service down: %v", err)
	}
}

func TestClientNotRunning(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.sock")
	// A stale socket: bound once, nobody listening now.
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	for _, sock := range []string{missing, stale} {
		_, err := Dial(sock).StorageRootKey()
		want := "aziot-tpmd is not running: " + starthint.Service("aziot-tpmd", "aziot-tpmd") + " (socket " + sock + ")"
		if err == nil || err.Error() != want {
			t.Errorf("%s: got %v, want %q", filepath.Base(sock), err, want)
		}
	}
}

func TestListen(t *testing.T) {
	dir := t.TempDir()
	other := t.TempDir()
	made, err := Listen(filepath.Join(other, "new", "tpmd.sock"), "")
	if err != nil {
		t.Fatalf("a socket in a directory not made yet: %v", err)
	}
	made.Close()
	os.WriteFile(filepath.Join(other, "notdir"), nil, 0o600)
	if _, err := Listen(filepath.Join(other, "notdir", "tpmd.sock"), ""); err == nil || !strings.Contains(err.Error(), "socket directory") {
		t.Errorf("a file where the directory goes: %v", err)
	}
	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o600)
	if _, err := Listen(file, ""); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("regular file in the way: %v", err)
	}
	if _, err := os.Stat(file); err != nil {
		t.Errorf("Listen removed a regular file: %v", err)
	}

	sock := filepath.Join(dir, "tpmd.sock")
	stale, _ := net.Listen("unix", sock)
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()
	l, err := Listen(sock, "no-such-group-hopefully")
	if err != nil {
		t.Fatalf("over a stale socket, with an unknown group: %v", err)
	}
	if _, err := Listen(sock, ""); err == nil || !strings.Contains(err.Error(), "already serving") {
		t.Errorf("second service on a live socket: %v", err)
	}
	l.Close()
	if entries, _ := os.ReadDir(dir); len(entries) != 1 { // only "file"
		t.Errorf("left in the directory: %v", entries)
	}
}

// fake is a TPM whose answers the test sets, and that records how many
// calls overlap.
type fake struct {
	err           error
	active, worst atomic.Int32
}

func (f *fake) call() error {
	if n := f.active.Add(1); n > f.worst.Load() {
		f.worst.Store(n)
	}
	time.Sleep(time.Millisecond)
	f.active.Add(-1)
	return f.err
}

func (f *fake) EndorsementKey() ([]byte, error)           { return []byte{0, 1, 2}, f.call() }
func (f *fake) StorageRootKey() ([]byte, error)           { return []byte{0, 1, 3}, f.call() }
func (f *fake) ImportActivationBlob([]byte, uint32) error { return f.call() }
func (f *fake) HMAC(uint32, []byte) ([]byte, error)       { return make([]byte, 32), f.call() }

func TestSerialized(t *testing.T) {
	f := &fake{}
	sock, _ := serve(t, f)
	c := Dial(sock)
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			if _, err := c.HMAC(identity, []byte("x")); err != nil {
				t.Error(err)
			}
		})
		wg.Go(func() { c.EndorsementKey() })
	}
	wg.Wait()
	if f.worst.Load() != 1 {
		t.Errorf("%d TPM operations overlapped", f.worst.Load())
	}
}

func TestTPMErrorStatus(t *testing.T) {
	f := &fake{}
	sock, _ := serve(t, f)
	c := Dial(sock)
	for _, tc := range []struct {
		err    error
		status int
	}{
		{fmt.Errorf("signing: the TPM is in dictionary-attack lockout: %w", tpm2.TPMRCLockout), http.StatusServiceUnavailable},
		{fmt.Errorf("swtpm: %w", syscall.ECONNREFUSED), http.StatusInternalServerError},
		{fmt.Errorf("TPM2_HMAC: %w", tpm2.TPMRCValue), http.StatusInternalServerError},
	} {
		f.err = tc.err
		_, err := c.HMAC(identity, nil)
		wantStatus(t, tc.err.Error(), err, tc.status)
		if err == nil || err.Error() != "aziot-tpmd: "+tc.err.Error() {
			t.Errorf("got %v, want the TPM's message %q", err, tc.err)
		}
	}
}

// The identity key serves its signers alone, as the kernel names the
// connecting process's user; anyone who reaches the socket (its group, which
// CLI users join) reads the public keys.
func TestIdentityKeyForSignersOnly(t *testing.T) {
	me := uint32(os.Getuid())
	sock, _ := serveFor(t, &fake{}, []uint32{me + 1})
	c := Dial(sock)
	if _, err := c.EndorsementKey(); err != nil {
		t.Fatalf("the EK for anyone: %v", err)
	}
	_, err := c.HMAC(identity, []byte("hub/devices/d1\n1900000000"))
	wantStatus(t, "signing as another user", err, http.StatusForbidden)
	wantStatus(t, "importing as another user", c.ImportActivationBlob([]byte{0, 1}, identity), http.StatusForbidden)

	sock, _ = serveFor(t, &fake{}, []uint32{me})
	if _, err := Dial(sock).HMAC(identity, []byte("x")); err != nil {
		t.Fatalf("signing as a signer: %v", err)
	}
}
