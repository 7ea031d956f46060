package main

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// Azure's iotedge spells these flags so; scripts written for it work here.
func TestAzureSpellings(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "config.toml")
	legacy, err := filepath.Abs("../../internal/edge/config/testdata/yaml/manual.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(out, []byte("# old\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"config", "import", "-c", legacy, "-o", out, "-f"},
		{"config", "import", "-i", legacy, "-o", out, "--force"}, // this CLI's own spelling still works
		{"config", "mp", "-c", "HostName=hub.example;DeviceId=d1;SharedAccessKey=c2VjcmV0a2V5MTIzNDU2Nzg=", "-o", out, "-f"},
	} {
		if msg, err := iotedge(t, args...); err != nil {
			t.Errorf("iotedge %s: %v\n%s", strings.Join(args, " "), err, msg)
		}
	}
	if b, _ := os.ReadFile(out); !strings.Contains(string(b), "DeviceId=d1") {
		t.Errorf("config mp -f did not overwrite %s:\n%s", out, b)
	}

	t.Setenv("IOTEDGE_CONFIG", filepath.Join(dir, "none.toml"))
	t.Setenv("IOTEDGE_TPM_SOCKET", filepath.Join(dir, "tpmd.sock"))
	d := startFakeDaemon(t)
	if _, err := iotedge(t, "check", "--verbose"); err != nil && strings.Contains(err.Error(), "unknown flag") {
		t.Errorf("check --verbose: %v", err)
	}
	if msg, err := iotedge(t, "support-bundle", "--since", "6h", "-o", filepath.Join(dir, "b.zip")); err != nil {
		t.Errorf("support-bundle --since: %v\n%s", err, msg)
	}
	if !slices.Contains(d.got(), "GET /modules/sensor/logs?since=6h&tail=1000") {
		t.Errorf("support-bundle --since 6h asked the daemon %q", d.got())
	}
	if msg, err := iotedge(t, "logs", "sensor", "--since", "2h", "--until", "1h"); err != nil {
		t.Errorf("logs --until: %v\n%s", err, msg)
	}
	if !slices.Contains(d.got(), "GET /modules/sensor/logs?since=2h&tail=all&until=1h") {
		t.Errorf("logs --until 1h asked the daemon %q", d.got())
	}
	if msg, err := iotedge(t, "system", "set-log-level", "trace"); err != nil || !slices.Contains(d.got(), "PUT /log-level") {
		t.Errorf("system set-log-level trace: %v\n%s", err, msg)
	}
}
