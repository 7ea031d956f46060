package testutil

import (
	"bytes"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
)

// TPM2Tools drives tpm2-tools, the independent TPM client of the tests,
// against one TPM, doing with an activation blob what devices do with it
// (PROTOCOL.md §1).
type TPM2Tools struct {
	t    testing.TB
	tcti string
	dir  string
	keys int // loaded keys so far, for unique context file names
}

// NewTPM2Tools uses the TPM at tcti, keeping its files in a temp dir.
func NewTPM2Tools(t testing.TB, tcti string) *TPM2Tools {
	Require(t, "tpm2_createek", "tpm2-tools")
	return &TPM2Tools{t: t, tcti: tcti, dir: t.TempDir()}
}

// Path names a file in the tools' directory.
func (x *TPM2Tools) Path(name string) string { return filepath.Join(x.dir, name) }

// Run runs one tool and returns its standard output.
func (x *TPM2Tools) Run(args ...string) []byte {
	x.t.Helper()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI="+x.tcti)
	cmd.Dir = x.dir
	return Run(x.t, cmd)
}

func (x *TPM2Tools) write(name string, b ...[]byte) {
	if err := os.WriteFile(x.Path(name), bytes.Join(b, nil), 0o600); err != nil {
		x.t.Fatal(err)
	}
}

func (x *TPM2Tools) read(name string) []byte {
	b, err := os.ReadFile(x.Path(name))
	if err != nil {
		x.t.Fatal(err)
	}
	return b
}

// CreateKeys makes the EK at 0x81010001 and the SRK at 0x81000001 and
// returns their TPM2B_PUBLIC bytes.
func (x *TPM2Tools) CreateKeys() (ek, srk []byte) {
	x.Run("tpm2_createek", "-c", "0x81010001", "-G", "rsa", "-u", "ek.pub")
	x.Run("tpm2_createprimary", "-Q", "-C", "o", "-c", "srk.ctx",
		"-a", "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda")
	x.Run("tpm2_evictcontrol", "-Q", "-C", "o", "-c", "srk.ctx", "0x81000001")
	x.Run("tpm2_flushcontext", "-t")
	x.Run("tpm2_readpublic", "-Q", "-c", "0x81000001", "-o", "srk.pub")
	return x.read("ek.pub"), x.read("srk.pub")
}

// BlobParts splits an activation blob into its TPM2B parts, size prefixes kept.
func BlobParts(t testing.TB, blob []byte) [][]byte {
	var p [][]byte
	for rest := blob; len(rest) > 0; {
		if len(rest) < 2 || 2+int(binary.BigEndian.Uint16(rest)) > len(rest) {
			t.Fatalf("activation blob: truncated part %c", 'A'+len(p))
		}
		n := 2 + int(binary.BigEndian.Uint16(rest))
		p, rest = append(p, rest[:n]), rest[n:]
	}
	return p
}

// Activate activates the credential of blob with the EK, imports the
// wrapped key under the SRK, loads it and returns its context file (a new
// one each time, so earlier keys stay usable).
func (x *TPM2Tools) Activate(blob []byte) string {
	x.t.Helper()
	p := BlobParts(x.t, blob)
	if len(p) < 5 {
		x.t.Fatalf("activation blob has %d parts, want A to F", len(p))
	}
	// tpm2_makecredential's file format: magic, version, A, B.
	x.write("cred", []byte{0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1}, p[0], p[1])
	x.write("dup", p[2])
	x.write("seed", p[3])
	x.write("key.pub", p[4])
	x.Run("tpm2_startauthsession", "--policy-session", "-S", "session.ctx")
	x.Run("tpm2_policysecret", "-Q", "-S", "session.ctx", "-c", "e")
	x.Run("tpm2_activatecredential", "-Q", "-c", "0x81000001", "-C", "0x81010001",
		"-i", "cred", "-o", "inner", "-P", "session:session.ctx")
	x.Run("tpm2_flushcontext", "session.ctx")
	x.Run("tpm2_import", "-Q", "-C", "0x81000001", "-u", "key.pub", "-i", "dup",
		"-s", "seed", "-k", "inner", "-r", "key.priv")
	x.keys++
	ctx := "key" + strconv.Itoa(x.keys) + ".ctx"
	x.Run("tpm2_load", "-Q", "-C", "0x81000001", "-u", "key.pub", "-r", "key.priv", "-c", ctx)
	x.Run("tpm2_flushcontext", "-t")
	return ctx
}

// HMAC has the TPM compute HMAC-SHA-256 of data with a loaded key.
func (x *TPM2Tools) HMAC(keyCtx string, data []byte) []byte {
	x.t.Helper()
	x.write("data", data)
	x.Run("tpm2_hmac", "-c", keyCtx, "-g", "sha256", "-o", "hmac", "data")
	x.Run("tpm2_flushcontext", "-t")
	return x.read("hmac")
}
