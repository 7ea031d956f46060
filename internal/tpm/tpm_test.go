package tpm

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/testutil"
)

// open returns a Device on a fresh swtpm, with TPM2TOOLS_TCTI set so that
// tpm2-tools reach the same TPM.
func open(t *testing.T) *Device {
	tcti := testutil.StartSWTPM(t)
	t.Setenv("TPM2TOOLS_TCTI", tcti)
	d, err := Open(tcti)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// tool runs a tpm2-tools command and returns its standard output.
func tool(t *testing.T, args ...string) []byte {
	t.Helper()
	testutil.Require(t, args[0], "tpm2-tools")
	return testutil.Run(t, exec.Command(args[0], args[1:]...))
}

// readPublic is what `tpm2_readpublic -o` writes for handle.
func readPublic(t *testing.T, handle string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "key.pub")
	tool(t, "tpm2_readpublic", "-Q", "-c", handle, "-o", out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestKeys(t *testing.T) {
	d := open(t)
	ek, err := d.EndorsementKey()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ek, readPublic(t, "0x81010001")) {
		t.Error("EndorsementKey differs from tpm2_readpublic's ek.pub")
	}
	// The EK was created with the SRK, as the seed script does.
	srk := readPublic(t, "0x81000001")
	if got, err := d.StorageRootKey(); err != nil || !bytes.Equal(got, srk) {
		t.Errorf("StorageRootKey differs from tpm2_readpublic's (%v)", err)
	}
	if again, err := d.EndorsementKey(); err != nil || !bytes.Equal(again, ek) {
		t.Errorf("second EndorsementKey differs (%v)", err)
	}

	// Our EK template is tpm2_createek's: the same seed gives the same key.
	out := filepath.Join(t.TempDir(), "ek.pub")
	tool(t, "tpm2_createek", "-c", "0x81010002", "-G", "rsa", "-u", out)
	if createek, _ := os.ReadFile(out); !bytes.Equal(createek, ek) {
		t.Errorf("EK differs from tpm2_createek's:\n%x\n%x", ek, createek)
	}

	for name, key := range map[string][]byte{"EK": ek, "SRK": srk} {
		if _, err := attest.ParsePublic(key); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	// Attributes (PROTOCOL.md §1) sit after the size, type and nameAlg.
	if a := binary.BigEndian.Uint32(ek[6:]); a != 0x000300b2 {
		t.Errorf("EK attributes 0x%08x", a)
	}
	if a := binary.BigEndian.Uint32(srk[6:]); a != 0x00030472 {
		t.Errorf("SRK attributes 0x%08x", a)
	}
}

func TestStorageRootKeyAlone(t *testing.T) {
	d := open(t)
	srk, err := d.StorageRootKey()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(srk, readPublic(t, "0x81000001")) {
		t.Error("StorageRootKey differs from tpm2_readpublic's")
	}
}

func hmacSHA256(key, data []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(data)
	return m.Sum(nil)
}

// keysOf is d's EK and SRK, made if they are not there.
func keysOf(t *testing.T, d *Device) (ek, srk []byte) {
	t.Helper()
	ek, err := d.EndorsementKey()
	if err != nil {
		t.Fatal(err)
	}
	srk, err = d.StorageRootKey()
	if err != nil {
		t.Fatal(err)
	}
	return ek, srk
}

func TestImportActivationBlob(t *testing.T) {
	d := open(t)
	ek, srk := keysOf(t, d)
	handle := IdentityHandle(DefaultAuthKeyIndex)
	short := []byte("example.azure-devices-provisioning.net/registrations/dev1\n1700000000")
	long := bytes.Repeat([]byte("0123456789"), 300) // three TPM buffers

	for i, key := range [][]byte{[]byte("first key, thirty-two bytes long"), []byte("second key, also 32 bytes long!!")} {
		blob, err := attest.ActivationBlob(ek, srk, key, rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		if i == 1 {
			blob = blob[:len(blob)-2] // a service that leaves out F
		}
		// The second import replaces the first key at the same handle.
		if err := d.ImportActivationBlob(blob, handle); err != nil {
			t.Fatalf("key %d: %v", i, err)
		}
		for _, data := range [][]byte{short, long, nil} {
			got, err := d.HMAC(handle, data)
			if err != nil {
				t.Fatalf("key %d, %d bytes: %v", i, len(data), err)
			}
			if want := hmacSHA256(key, data); !bytes.Equal(got, want) {
				t.Errorf("key %d, %d bytes: HMAC %x, want %x", i, len(data), got, want)
			}
		}
	}

	blob, _ := attest.ActivationBlob(ek, srk, make([]byte, 32), rand.Reader)
	for _, tc := range []struct {
		name   string
		blob   []byte
		handle uint32
		want   string
	}{
		{"EK handle", blob, EKHandle, "identity key handle 0x81010001"},
		{"SRK handle", blob, SRKHandle, "identity key handle 0x81000001"},
		{"transient handle", blob, 0x80000001, "want a persistent handle"},
		{"truncated", blob[:300], handle, "activation blob: credential secret (part B) truncated at byte 54 of 300"},
		{"trailing bytes", append(bytes.Clone(blob), 1), handle, "1 unexpected bytes"},
		{"for another SRK", func() []byte {
			b := bytes.Clone(blob)
			b[10] ^= 1 // the credential's integrity HMAC
			return b
		}(), handle, "this TPM's EK and SRK?): TPM_RC_INTEGRITY"},
	} {
		if err := d.ImportActivationBlob(tc.blob, tc.handle); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
	// A failed import leaves the last key in place.
	if got, err := d.HMAC(handle, short); err != nil || !bytes.Equal(got, hmacSHA256([]byte("second key, also 32 bytes long!!"), short)) {
		t.Errorf("after failed imports: %x, %v", got, err)
	}
	// Nothing is left loaded: swtpm, like a TPM without resource manager,
	// has only a few slots.
	for _, what := range []string{"handles-transient", "handles-loaded-session", "handles-saved-session"} {
		if out := tool(t, "tpm2_getcap", what); len(out) != 0 {
			t.Errorf("%s left: %s", what, out)
		}
	}
	if out := string(tool(t, "tpm2_getcap", "handles-persistent")); out != "- 0x81000001\n- 0x81000100\n- 0x81010001\n" {
		t.Errorf("persistent handles:\n%s", out)
	}
}

// TestLockout provokes dictionary-attack lockout with a password-protected
// key at the identity handle, and checks the error names it.
func TestLockout(t *testing.T) {
	d := open(t)
	dir := t.TempDir()
	path := func(name string) string { return filepath.Join(dir, name) }
	tool(t, "tpm2_dictionarylockout", "-s", "-n", "1", "-t", "600", "-l", "600")
	// swtpm has no resource manager: flush what each tool leaves loaded.
	tool(t, "tpm2_createprimary", "-Q", "-C", "o", "-c", path("parent.ctx"))
	tool(t, "tpm2_flushcontext", "-t")
	tool(t, "tpm2_create", "-Q", "-C", path("parent.ctx"), "-G", "hmac", "-p", "secret",
		"-a", "sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth", "-u", path("key.pub"), "-r", path("key.priv"))
	tool(t, "tpm2_flushcontext", "-t")
	tool(t, "tpm2_load", "-Q", "-C", path("parent.ctx"), "-u", path("key.pub"), "-r", path("key.priv"), "-c", path("key.ctx"))
	tool(t, "tpm2_evictcontrol", "-Q", "-C", "o", "-c", path("key.ctx"), "0x81000100")
	tool(t, "tpm2_flushcontext", "-t")

	_, err := d.HMAC(0x81000100, []byte("data"))
	if err == nil || !strings.Contains(err.Error(), "TPM_RC_AUTH_FAIL") {
		t.Fatalf("wrong password: got %v", err)
	}
	_, err = d.HMAC(0x81000100, []byte("data"))
	if err == nil || !strings.Contains(err.Error(), "dictionary-attack lockout (TPM_RC_LOCKOUT)") {
		t.Fatalf("in lockout: got %v", err)
	}
}

// Objects another program left loaded fill a TPM without a resource
// manager; the error says how to free them.
func TestObjectMemoryFull(t *testing.T) {
	d := open(t)
	ek, err := d.EndorsementKey()
	if err != nil {
		t.Fatal(err)
	}
	srk, err := d.StorageRootKey()
	if err != nil {
		t.Fatal(err)
	}
	blob, err := attest.ActivationBlob(ek, srk, []byte("the hub key"), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	testutil.Require(t, "tpm2_createprimary", "tpm2-tools")
	ctx := filepath.Join(t.TempDir(), "primary.ctx")
	for i := 0; ; i++ {
		if exec.Command("tpm2_createprimary", "-Q", "-C", "o", "-c", ctx).Run() != nil {
			break
		}
		if i == 64 {
			t.Fatal("the simulator loaded 64 primary keys without running out of room")
		}
	}
	err = d.ImportActivationBlob(blob, IdentityHandle(0))
	if err == nil || !strings.Contains(err.Error(), "tpm2_flushcontext --transient-object") {
		t.Fatalf("import with the TPM's object memory full: got %v, want the remedy", err)
	}
	tool(t, "tpm2_flushcontext", "-t")
	if err := d.ImportActivationBlob(blob, IdentityHandle(0)); err != nil {
		t.Fatalf("import after flushing: %v", err)
	}
}

func TestIdentityHandle(t *testing.T) {
	if IdentityHandle(DefaultAuthKeyIndex) != 0x81000100 {
		t.Error("IdentityHandle(DefaultAuthKeyIndex) != 0x81000100")
	}
}

// An endorsement hierarchy with a password fails the EK's policy, saying
// so, and leaves no session behind: three would fill swtpm's session
// memory, and every later activation would fail until the TPM is reset.
func TestFailedPolicyLeavesNoSession(t *testing.T) {
	d := open(t)
	ek, srk := keysOf(t, d)
	setAuth := func(old, new string) {
		t.Helper()
		_, err := tpm2.HierarchyChangeAuth{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth([]byte(old))},
			NewAuth:    tpm2.TPM2BAuth{Buffer: []byte(new)},
		}.Execute(d.tpm)
		if err != nil {
			t.Fatal(err)
		}
	}
	blob, err := attest.ActivationBlob(ek, srk, []byte("a key, thirty-two bytes long...."), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	handle := IdentityHandle(DefaultAuthKeyIndex)
	setAuth("", "epass")
	for range 5 {
		if err := d.ImportActivationBlob(blob, handle); err == nil || !strings.Contains(err.Error(), "endorsement hierarchy with a password") {
			t.Fatalf("with an endorsement password: %v", err)
		}
	}
	setAuth("epass", "")
	if err := d.ImportActivationBlob(blob, handle); err != nil {
		t.Fatalf("once the password is cleared: %v", err)
	}
}

// The EK certificate comes back as DER however its maker stored it: the
// index sized larger and padded, or the TCG header before the DER.
func TestEndorsementCertificateForms(t *testing.T) {
	d := open(t)
	if c, err := d.EndorsementCertificate(); c != nil || err != nil {
		t.Fatalf("with no index: %x, %v", c, err)
	}
	der := testutil.NewCert(t, "EK", false, nil).Leaf.Raw
	erased := bytes.Repeat([]byte{0xff}, 1024)
	for what, tc := range map[string]struct{ nv, want []byte }{
		"DER":                   {der, der},
		"padded with 00":        {append(bytes.Clone(der), make([]byte, 1024-len(der))...), der},
		"padded with FF":        {append(bytes.Clone(der), erased[len(der):]...), der},
		"behind the TCG header": {append([]byte{0x10, 0x01, 0x00, byte(len(der) >> 8), byte(len(der))}, der...), der},
		"no certificate":        {erased, erased}, // as it is, for the service to say so
	} {
		file := filepath.Join(t.TempDir(), "nv")
		if err := os.WriteFile(file, tc.nv, 0o600); err != nil {
			t.Fatal(err)
		}
		// As TPM makers define it: platform-written, readable without a password.
		tool(t, "tpm2_nvdefine", "-Q", "-C", "p", "-s", fmt.Sprint(len(tc.nv)), "-a", "ppwrite|writedefine|ppread|ownerread|authread|no_da|platformcreate", "0x01c00002")
		tool(t, "tpm2_nvwrite", "-Q", "-C", "p", "-i", file, "0x01c00002")
		if got, err := d.EndorsementCertificate(); err != nil || !bytes.Equal(got, tc.want) {
			t.Errorf("%s: %x, %v", what, got, err)
		}
		tool(t, "tpm2_nvundefine", "-Q", "-C", "p", "0x01c00002")
	}
}
