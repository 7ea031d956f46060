package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base32"
	"encoding/base64"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/testutil"
	"github.com/hatchery/hatchery/internal/tpm"
	"github.com/hatchery/hatchery/internal/tpmservice"
)

// iotedge runs the CLI in-process and returns its standard output.
func iotedge(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	cmd := newRootCmd()
	cmd.SetArgs(args)
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	err := cmd.Execute()
	return out.String(), err
}

func runProvisionInfo(t *testing.T, tcti string, flags ...string) string {
	t.Helper()
	out, err := iotedge(t, append([]string{"tpm", "provision-info", "--tcti", tcti}, flags...)...)
	if err != nil {
		t.Fatalf("iotedge tpm provision-info: %v\n%s", err, out)
	}
	return out
}

// seedScript runs shared/seeds/tpm-provision-info.sh against tcti in a
// scratch directory (it writes ek.pub there) and returns its output.
func seedScript(t *testing.T, tcti string) string {
	t.Helper()
	testutil.Require(t, "tpm2_createek", "tpm2-tools")
	cmd := exec.Command("sh", filepath.Join(testutil.SeedsDir(t), "tpm-provision-info.sh"))
	cmd.Dir = t.TempDir()
	// USER=root keeps the script from calling sudo: swtpm needs no privilege.
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI="+tcti, "USER=root")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	// The script's last command, `rm ek.pub srk.ctx`, fails when the EK
	// existed (no srk.ctx): its exit status says nothing, its output does.
	if _, exited := err.(*exec.ExitError); err != nil && !exited || len(out) == 0 {
		t.Fatalf("seed script: %v\n%s", err, stderr.Bytes())
	}
	return string(out)
}

func TestProvisionInfoMatchesSeedScript(t *testing.T) {
	t.Run("native first", func(t *testing.T) {
		tcti := testutil.StartSWTPM(t)
		native := runProvisionInfo(t, tcti) // creates the EK and SRK
		if script := seedScript(t, tcti); script != native {
			t.Errorf("seed script printed\n%s\nafter iotedge printed\n%s", script, native)
		}
		if !strings.HasPrefix(native, "Gathering the registration information...\n\nRegistration Id:\n") {
			t.Errorf("unexpected output:\n%s", native)
		}
		checkFormats(t, tcti, native)
	})
	t.Run("script first", func(t *testing.T) {
		tcti := testutil.StartSWTPM(t)
		script := seedScript(t, tcti) // creates the EK with tpm2_createek
		if native := runProvisionInfo(t, tcti); native != script {
			t.Errorf("iotedge printed\n%s\nafter the seed script printed\n%s", native, script)
		}
	})
}

// checkFormats checks --output json and --legacy-registration-id against
// the text output.
func checkFormats(t *testing.T, tcti, text string) {
	lines := strings.Split(text, "\n")
	id, key := lines[3], lines[6]
	ek, err := base64.StdEncoding.DecodeString(key)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(ek)
	legacy := strings.ToLower(strings.TrimRight(base32.StdEncoding.EncodeToString(sum[:]), "="))
	if len(legacy) != 52 || len(id) != 64 {
		t.Errorf("IDs %q and %q: want 64 and 52 characters", id, legacy)
	}
	if got := strings.Split(runProvisionInfo(t, tcti, "--legacy-registration-id"), "\n")[3]; got != legacy {
		t.Errorf("legacy registration ID %q, want %q", got, legacy)
	}

	var info map[string]string
	out := runProvisionInfo(t, tcti, "--output", "json")
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("--output json: %v\n%s", err, out)
	}
	if len(info) != 2 || info["registrationId"] != id || info["endorsementKey"] != key {
		t.Errorf("--output json printed %s", out)
	}
}

func TestProvisionInfoTCTIFromEnvironment(t *testing.T) {
	tcti := testutil.StartSWTPM(t)
	want := runProvisionInfo(t, tcti)
	t.Setenv("TPM2TOOLS_TCTI", tcti)
	if got, err := iotedge(t, "tpm", "provision-info"); err != nil || got != want {
		t.Errorf("with TPM2TOOLS_TCTI: %v\n%s", err, got)
	}
	// Errors say where the TCTI came from.
	for _, bad := range []string{"swtpm:port=x", "device:/nonexistent"} {
		t.Setenv("TPM2TOOLS_TCTI", bad)
		if _, err := iotedge(t, "tpm", "provision-info"); err == nil || !strings.HasPrefix(err.Error(), "$TPM2TOOLS_TCTI: ") {
			t.Errorf("with TPM2TOOLS_TCTI=%s: %v, want an error naming the variable", bad, err)
		}
	}
	// The flag wins over the environment.
	if _, err := iotedge(t, "tpm", "provision-info", "--tcti", "device:/nonexistent"); err == nil ||
		!strings.Contains(err.Error(), "/nonexistent: no such device") {
		t.Errorf("--tcti did not override TPM2TOOLS_TCTI: %v", err)
	}
}

func TestProvisionInfoErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--output", "yaml"}, `--output "yaml": want text or json`},
		{[]string{"--tcti", "tabrmd"}, "accepted forms"},
		{[]string{"extra"}, "unknown command"},
	} {
		_, err := iotedge(t, append([]string{"tpm", "provision-info"}, tc.args...)...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: got %v, want an error containing %q", tc.args, err, tc.want)
		}
	}
}

// Without --tcti or $TPM2TOOLS_TCTI, provision-info reads the runtime's
// TPM: through aziot-tpmd when it runs, else config.toml's [tpm] tcti. A
// TPM the user names wins over aziot-tpmd.
func TestProvisionInfoUsesTheRuntimesTPM(t *testing.T) {
	configured, served := testutil.StartSWTPM(t), testutil.StartSWTPM(t)
	want := map[string]string{configured: runProvisionInfo(t, configured), served: runProvisionInfo(t, served)}
	if want[configured] == want[served] {
		t.Fatal("two swtpm instances have the same EK")
	}
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfg, []byte("[tpm]\ntcti = \""+configured+"\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("IOTEDGE_CONFIG", cfg)
	t.Setenv("TPM2TOOLS_TCTI", "")
	t.Setenv("IOTEDGE_TPM_SOCKET", filepath.Join(dir, "tpmd.sock")) // nobody listens yet
	if got, err := iotedge(t, "tpm", "provision-info"); err != nil || got != want[configured] {
		t.Errorf("without aziot-tpmd: %v\n%s\nwant the TPM of config.toml's tcti:\n%s", err, got, want[configured])
	}

	dev, err := tpm.Open(served)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	l, err := tpmservice.Listen(filepath.Join(dir, "tpmd.sock"), "")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- tpmservice.ServeListener(ctx, l, tpmservice.NewServer(dev, tpm.DefaultAuthKeyIndex)) }()
	defer func() { cancel(); <-done }()
	if got, err := iotedge(t, "tpm", "provision-info"); err != nil || got != want[served] {
		t.Errorf("with aziot-tpmd: %v\n%s\nwant the TPM aziot-tpmd serves:\n%s", err, got, want[served])
	}
	t.Setenv("TPM2TOOLS_TCTI", configured)
	if got, err := iotedge(t, "tpm", "provision-info"); err != nil || got != want[configured] {
		t.Errorf("with aziot-tpmd and TPM2TOOLS_TCTI: %v\n%s\nwant the TPM of TPM2TOOLS_TCTI:\n%s", err, got, want[configured])
	}
	// tpm2-abrmd's TCTI, which this tool cannot open: aziot-tpmd's TPM.
	t.Setenv("TPM2TOOLS_TCTI", "tabrmd")
	if got, err := iotedge(t, "tpm", "provision-info"); err != nil || !strings.HasSuffix(got, want[served]) ||
		!strings.HasPrefix(got, `$TPM2TOOLS_TCTI is "tabrmd", a TCTI this tool cannot open`) {
		t.Errorf("with aziot-tpmd and TPM2TOOLS_TCTI=tabrmd: %v\n%s\nwant a note, then the TPM aziot-tpmd serves:\n%s", err, got, want[served])
	}
	// The flag wins over both.
	if got := runProvisionInfo(t, configured); got != want[configured] {
		t.Errorf("with aziot-tpmd, TPM2TOOLS_TCTI=tabrmd and --tcti:\n%s\nwant the TPM of --tcti:\n%s", got, want[configured])
	}
}
