package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/edge/config"
	"github.com/hatchery/hatchery/internal/testutil"
	"github.com/hatchery/hatchery/internal/tpmservice"
)

// TestMain runs the daemon itself when a test re-executes the test binary
// with AZIOT_TPMD_MAIN=1: a privilege drop must not hit the test process.
func TestMain(m *testing.M) {
	if os.Getenv("AZIOT_TPMD_MAIN") == "1" {
		os.Args = append([]string{"aziot-tpmd"}, os.Args[1:]...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func writeConfig(t *testing.T, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestParseArgs(t *testing.T) {
	full := writeConfig(t, `hostname = "edge-1"
[provisioning]
source = "dps"
[tpm]
tcti = "swtpm:host=127.0.0.1,port=2321"
auth_key_index = 0x101
`)
	str := writeConfig(t, "[tpm]\nauth_key_index = \"0x00_01_02\"\n")
	for _, tc := range []struct {
		name  string
		args  []string
		tcti  string
		index uint32
	}{
		{"defaults, no config file", []string{"--config", filepath.Join(t.TempDir(), "absent.toml")}, "device", 0x100},
		{"config", []string{"--config", full}, "swtpm:host=127.0.0.1,port=2321", 0x101},
		{"flags override the config", []string{"--config", full, "--tcti", "device:/dev/tpm0", "--auth-key-index", "0x105"}, "device:/dev/tpm0", 0x105},
		{"index as Azure's docs write it", []string{"--config", str}, "device", 0x102},
		{"decimal flag", []string{"--config", "", "--auth-key-index", "257"}, "device", 257},
	} {
		s, err := parseArgs(tc.args, io.Discard)
		if err != nil || s.tcti != tc.tcti || s.authKeyIndex != tc.index {
			t.Errorf("%s: tcti %q index 0x%x (%v), want %q 0x%x", tc.name, s.tcti, s.authKeyIndex, err, tc.tcti, tc.index)
		}
	}

	// A device provisioned without the TPM leaves aziot-tpmd nothing to do:
	// it exits cleanly instead of failing on a TPM it does not need.
	manual := writeConfig(t, "[provisioning]\nsource = \"manual\"\nconnection_string = \"HostName=h;DeviceId=d;SharedAccessKey=a2V5\"\n")
	dpsTPM := writeConfig(t, "[provisioning]\nsource = \"dps\"\n[provisioning.attestation]\nmethod = \"tpm\"\n")
	for _, tc := range []struct {
		args   []string
		unused bool
	}{
		{[]string{"--config", manual}, true},
		{[]string{"--config", dpsTPM}, false},
		{[]string{"--config", manual, "--tcti", "device"}, false},
		{[]string{"--config", str}, false}, // not provisioned yet
		{[]string{"--config", writeConfig(t, "[provisioning]\nsource = \"none\"\n")}, false},
	} {
		if s, err := parseArgs(tc.args, io.Discard); err != nil || (s.unused != "") != tc.unused {
			t.Errorf("%q: unused %q (%v), want unused %v", tc.args, s.unused, err, tc.unused)
		}
	}
	var logs bytes.Buffer
	if err := run(context.Background(), []string{"--config", manual, "--tcti", "device:/nonexistent"}, &logs); err == nil {
		t.Error("an explicit --tcti that cannot be opened did not fail")
	}
	logs.Reset()
	if err := run(context.Background(), []string{"--config", manual, "--socket", filepath.Join(t.TempDir(), "s")}, &logs); err != nil || !strings.Contains(logs.String(), "nothing to serve") {
		t.Errorf("run with a manual configuration: %v\n%s", err, logs.String())
	}

	bad := writeConfig(t, "[tpm]\ntcti = \"device\"\nauth_key_index = = 3\n")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--config", bad}, bad + ":3:"},
		{[]string{"--config", writeConfig(t, "[tpm]\nauth_key_index = \"many\"\n")}, `"many" is not a number`},
		{[]string{"--config", "", "--auth-key-index", "0x800000"}, "want 0 to 0x7fffff"},
		{[]string{"--config", "", "--auth-key-index", "1"}, "the SRK"},
		{[]string{"--config", "", "extra"}, "unexpected arguments"},
	} {
		if _, err := parseArgs(tc.args, io.Discard); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want an error with %q", tc.args, err, tc.want)
		}
	}
}

// What `iotedge config apply` writes for aziot-tpmd (the packaged unit's
// --config) sets it up as config.toml itself would, without the keys
// config.toml may hold.
func TestSettingsFromConfigApply(t *testing.T) {
	for _, text := range []string{
		"[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"https://edge-lab\"\nid_scope = \"0ne5A1F09C2\"\n" +
			"[provisioning.attestation]\nmethod = \"tpm\"\nregistration_id = \"3f2b9c0d\"\n" +
			"[tpm]\ntcti = \"swtpm:host=127.0.0.1,port=2321\"\nauth_key_index = \"0x00_01_02\"\n",
		"[provisioning]\nsource = \"dps\"\nid_scope = \"0ne5A1F09C2\"\n" +
			"[provisioning.attestation]\nmethod = \"symmetric_key\"\nregistration_id = \"sym-1\"\nsymmetric_key = { value = \"c2VjcmV0a2V5MTIzNDU2Nzg=\" }\n",
		"[provisioning]\nsource = \"manual\"\nconnection_string = \"HostName=h;DeviceId=d;SharedAccessKey=c2VjcmV0a2V5MTIzNDU2Nzg=\"\n",
		"[tpm]\ntcti = \"device:/dev/tpm0\"\n", // not provisioned yet
	} {
		full := writeConfig(t, text)
		cfg, _, err := config.Load(full)
		if err != nil {
			t.Fatal(err)
		}
		applied := writeConfig(t, string(cfg.TPMDConfig(full)))
		want, werr := parseArgs([]string{"--config", full}, io.Discard)
		got, err := parseArgs([]string{"--config", applied}, io.Discard)
		if err != nil || werr != nil || got.tcti != want.tcti || got.authKeyIndex != want.authKeyIndex || (got.unused == "") != (want.unused == "") {
			t.Errorf("from config.toml\n%s: tcti %q index 0x%x unused %q (%v); from what config apply writes: tcti %q index 0x%x unused %q (%v)",
				text, want.tcti, want.authKeyIndex, want.unused, werr, got.tcti, got.authKeyIndex, got.unused, err)
		}
		if b, _ := os.ReadFile(applied); bytes.Contains(b, []byte("c2VjcmV0a2V5MTIzNDU2Nzg=")) {
			t.Errorf("what config apply writes for aziot-tpmd holds the device's key:\n%s", b)
		}
	}
}

// waitReady polls the service until it answers with the EK.
func waitReady(t *testing.T, sock string, exited <-chan error) []byte {
	t.Helper()
	c := tpmservice.Dial(sock)
	deadline := time.Now().Add(20 * time.Second)
	for {
		ek, err := c.EndorsementKey()
		if err == nil {
			return ek
		}
		select {
		case err := <-exited:
			t.Fatalf("aziot-tpmd exited: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("aziot-tpmd did not answer: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestRun(t *testing.T) {
	tcti := testutil.StartSWTPM(t)
	sock := filepath.Join(t.TempDir(), "tpmd.sock")
	config := writeConfig(t, "[tpm]\ntcti = \""+tcti+"\"\n")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var logs bytes.Buffer
	exited := make(chan error, 1)
	go func() { exited <- run(ctx, []string{"--config", config, "--socket", sock, "--group", ""}, &logs) }()
	ek := waitReady(t, sock, exited)
	cancel()
	if err := <-exited; err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "registrationId="+attest.RegistrationID(ek)) || !strings.Contains(logs.String(), "identityHandle=0x81000100") {
		t.Errorf("startup log:\n%s", logs.String())
	}
	if _, err := os.Stat(sock); err == nil {
		t.Error("socket left after shutdown")
	}
}

// TestDropPrivileges starts the daemon as root with --user nobody and
// checks that it serves as nobody, and stops cleanly on SIGTERM.
func TestDropPrivileges(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	nobody, err := user.Lookup("nobody")
	if err != nil {
		t.Skip("no user nobody")
	}
	tcti := testutil.StartSWTPM(t)
	sock := filepath.Join(t.TempDir(), "tpmd.sock")
	cmd := exec.Command(os.Args[0], "--tcti", tcti, "--config", "", "--socket", sock, "--group", "", "--user", "nobody")
	cmd.Env = append(os.Environ(), "AZIOT_TPMD_MAIN=1")
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		if t.Failed() {
			t.Logf("aziot-tpmd said:\n%s", logs.String())
		}
	}()
	waitReady(t, sock, exited)

	status, err := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) == 5 && (f[0] == "Uid:" || f[0] == "Gid:") {
			want := nobody.Uid
			if f[0] == "Gid:" {
				want = nobody.Gid
			}
			if f[1] != want || f[2] != want || f[3] != want || f[4] != want {
				t.Errorf("%s, want all %s", line, want)
			}
		}
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("exit after SIGTERM: %v", err)
		}
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		t.Fatal("aziot-tpmd did not stop on SIGTERM")
	}
}
