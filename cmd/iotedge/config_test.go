package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/hatchery/hatchery/internal/edge/config"
	"github.com/hatchery/hatchery/internal/testutil"
)

// TestMain runs the CLI itself when a test re-executes the test binary
// with IOTEDGE_CLI_AS=UID:GID: as that user, in that group alone.
func TestMain(m *testing.M) {
	if as := os.Getenv("IOTEDGE_CLI_AS"); as != "" {
		var uid, gid int
		if _, err := fmt.Sscanf(as, "%d:%d", &uid, &gid); err != nil {
			fmt.Fprintln(os.Stderr, "IOTEDGE_CLI_AS:", err)
			os.Exit(2)
		}
		// Groups first: once the uid is not root, they cannot change.
		for _, err := range []error{syscall.Setgroups([]int{gid}), syscall.Setgid(gid), syscall.Setuid(uid)} {
			if err != nil {
				fmt.Fprintln(os.Stderr, "IOTEDGE_CLI_AS:", err)
				os.Exit(2)
			}
		}
		os.Args = append([]string{"iotedge"}, os.Args[1:]...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// The users of these tests: iotedged's, and an operator in group iotedge.
const (
	serviceUID, operatorUID, iotedgeGID = 4242, 4243, 4244
)

// fakeServiceUser is a user lookup that knows the service user only.
func fakeServiceUser(name string) (*user.User, error) {
	if name != serviceUser {
		return nil, user.UnknownUserError(name)
	}
	return &user.User{Username: name, Uid: strconv.Itoa(serviceUID), Gid: strconv.Itoa(iotedgeGID)}, nil
}

// openDirs lets anyone through dir and the test's directories above it,
// so that only a file's own mode keeps other users out.
func openDirs(t *testing.T, dir string) {
	t.Helper()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

// keyConfig is a configuration holding the device's key, the file it is
// parsed from, and the key.
func keyConfig(t *testing.T, dir string) (cfg *config.Config, data []byte, key string) {
	t.Helper()
	key = "c2VjcmV0a2V5MTIzNDU2Nzg="
	data = []byte(`[provisioning]
source = "dps"
global_endpoint = "https://edge-lab"
id_scope = "0ne5A1F09C2"

[provisioning.attestation]
method = "symmetric_key"
registration_id = "sym-1"
symmetric_key = { value = "` + key + `" }

[tpm]
tcti = "swtpm:host=127.0.0.1,port=2321"
auth_key_index = 0x101
`)
	cfg, _, err := config.Parse(filepath.Join(dir, "config.toml"), data)
	if err != nil {
		t.Fatal(err)
	}
	return cfg, data, key
}

// config apply gives config.toml to iotedged's user alone, where members
// of group iotedge cannot read the keys in it, also through the file as
// they opened it before, and aziot-tpmd its settings without them.
func TestInstallConfig(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give files to other users")
	}
	dir := t.TempDir()
	openDirs(t, dir)
	cfg, data, key := keyConfig(t, dir)
	target := filepath.Join(dir, "config.toml")
	// As the package left it before: readable by group iotedge.
	if err := os.WriteFile(target, []byte("# before\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(target, 0, iotedgeGID); err != nil {
		t.Fatal(err)
	}
	opened, err := os.Open(target)
	if err != nil {
		t.Fatal(err)
	}
	defer opened.Close()

	if err := installConfig(target, data, cfg, fakeServiceUser); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(target)
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); fi.Mode().Perm() != 0o600 || st.Uid != serviceUID || st.Gid != 0 {
		t.Errorf("config.toml is %v %d:%d, want 0600 owned by the service user (%d) and group root", fi.Mode().Perm(), st.Uid, st.Gid, serviceUID)
	}
	if err := readableBy(target, serviceUID, []int{iotedgeGID}, false); err != nil {
		t.Errorf("iotedged's user: %v", err)
	}
	if readableBy(target, operatorUID, []int{iotedgeGID}, false) == nil {
		t.Error("a member of group iotedge may read config.toml")
	}
	if got, _ := os.ReadFile(target); !bytes.Equal(got, data) {
		t.Errorf("config.toml holds:\n%s", got)
	}
	if old, _ := io.ReadAll(opened); string(old) != "# before\n" {
		t.Errorf("the file as opened before config apply now reads:\n%s", old)
	}

	tpmd := filepath.Join(dir, "tpmd", "config.toml")
	fi, err = os.Stat(tpmd)
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); fi.Mode().Perm() != 0o644 || st.Uid != 0 {
		t.Errorf("aziot-tpmd's settings are %v owned by %d, want 0644 root's", fi.Mode().Perm(), st.Uid)
	}
	if got, _ := os.ReadFile(tpmd); !bytes.Equal(got, cfg.TPMDConfig(target)) || bytes.Contains(got, []byte(key)) {
		t.Errorf("aziot-tpmd's settings:\n%s", got)
	}
	if err := readableBy(tpmd, operatorUID, nil, false); err != nil {
		t.Errorf("aziot-tpmd's settings: %v", err)
	}

	// Without service users root runs everything, and reads it alone.
	none := func(name string) (*user.User, error) { return nil, user.UnknownUserError(name) }
	if err := installConfig(target, data, cfg, none); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(target); fi.Mode().Perm() != 0o600 || fi.Sys().(*syscall.Stat_t).Uid != 0 {
		t.Errorf("without a service user config.toml is %s", fi.Mode().Perm())
	}
}

// `config apply` of a device's connection string installs it where only
// root and iotedged read it, with aziot-tpmd told it has nothing to do.
func TestConfigApplyKeepsKeysToTheDaemon(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("config apply needs root")
	}
	t.Setenv("IOTEDGE_NO_SYSTEMD", "1")
	startFakeDaemon(t)
	src, target := manualConfig(t)
	if out, err := iotedge(t, "config", "apply", "-c", src); err != nil {
		t.Fatalf("config apply: %v\n%s", err, out)
	}
	fi, err := os.Stat(target)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("config.toml is %s, want 0600", fi.Mode().Perm())
	}
	owner := 0
	if u, err := user.Lookup(serviceUser); err == nil {
		owner, _ = strconv.Atoi(u.Uid)
	}
	if uid := fi.Sys().(*syscall.Stat_t).Uid; int(uid) != owner {
		t.Errorf("config.toml is user %d's, want %d's", uid, owner)
	}
	tpmd, err := os.ReadFile(filepath.Join(filepath.Dir(target), "tpmd", "config.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(tpmd), `source = "manual"`) || strings.Contains(string(tpmd), "SharedAccessKey") {
		t.Errorf("aziot-tpmd's settings:\n%s", tpmd)
	}
}

// An operator, in group iotedge but not root, still runs the CLI's
// commands that read config.toml: told what needs root, given what does
// not.
func TestOperatorCannotReadConfig(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run the CLI as another user")
	}
	tcti := testutil.StartSWTPM(t)
	dir := t.TempDir()
	openDirs(t, dir)
	target := filepath.Join(dir, "config.toml")
	cfg, data, _ := keyConfig(t, dir)
	cfg.TPM.TCTI = tcti
	data = bytes.Replace(data, []byte("swtpm:host=127.0.0.1,port=2321"), []byte(tcti), 1)
	if err := installConfig(target, data, cfg, fakeServiceUser); err != nil {
		t.Fatal(err)
	}
	t.Setenv("IOTEDGE_CONFIG", target)
	t.Setenv("IOTEDGE_NO_SYSTEMD", "1")
	t.Setenv("IOTEDGE_TPM_SOCKET", filepath.Join(dir, "tpmd.sock")) // aziot-tpmd does not run
	t.Setenv("TPM2TOOLS_TCTI", "")
	startFakeDaemon(t)
	// The management socket is the group's, as iotedged makes it.
	sock := strings.TrimPrefix(os.Getenv("IOTEDGE_HOST"), "unix://")
	if err := errors.Join(os.Chmod(filepath.Dir(sock), 0o755), os.Chown(sock, serviceUID, iotedgeGID), os.Chmod(sock, 0o660)); err != nil {
		t.Fatal(err)
	}
	asOperator := func(args ...string) (string, error) {
		cmd := exec.Command(os.Args[0], args...)
		cmd.Env = append(os.Environ(), fmt.Sprintf("IOTEDGE_CLI_AS=%d:%d", operatorUID, iotedgeGID))
		out, err := cmd.CombinedOutput()
		return string(out), err
	}

	out, err := asOperator("check")
	if err != nil || !strings.Contains(out, "config.toml is well-formed - skipped") || !strings.Contains(out, "run 'sudo iotedge check'") {
		t.Errorf("check as an operator: %v\n%s", err, out)
	}
	if out, err := asOperator("system", "status"); err != nil || !strings.Contains(out, "iotedged      Running") {
		t.Errorf("system status as an operator: %v\n%s", err, out)
	}
	// Without aziot-tpmd, the TPM config apply told it to use.
	want := runProvisionInfo(t, tcti)
	if out, err := asOperator("tpm", "provision-info"); err != nil || out != want {
		t.Errorf("tpm provision-info as an operator: %v\n%s\nwant:\n%s", err, out, want)
	}
}

// A config.toml that is a symlink keeps its link: the file it names is
// replaced, 0600, so that the key is not left readable there; a generated
// one written over an existing file of another mode is 0600 too.
func TestConfigThroughSymlinkAndForce(t *testing.T) {
	cfg, data, key := keyConfig(t, t.TempDir())
	dir := t.TempDir()
	real, link := filepath.Join(dir, "persist.toml"), filepath.Join(dir, "config.toml")
	if err := os.WriteFile(real, []byte("# before\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	if err := installConfig(link, data, cfg, fakeServiceUser); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("the link was replaced: %v %v", fi.Mode(), err)
	}
	b, _ := os.ReadFile(real)
	if fi, _ := os.Stat(real); fi.Mode().Perm() != 0o600 || !strings.Contains(string(b), key) {
		t.Errorf("the file the link names: mode %v, holds the key: %v", fi.Mode().Perm(), strings.Contains(string(b), key))
	}

	generated := filepath.Join(dir, "mp.toml")
	if err := os.WriteFile(generated, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := writeNew(generated, cfg, true); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(generated); fi.Mode().Perm() != 0o600 {
		t.Errorf("a generated config.toml written over a 0644 file is %v", fi.Mode().Perm())
	}
}
