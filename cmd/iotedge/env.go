package main

import (
	"cmp"
	"os"
	"os/exec"

	"github.com/hatchery/hatchery/internal/edge/mgmt"
	"github.com/hatchery/hatchery/internal/tpmservice"
)

// Paths of an installed runtime; the environment overrides them, which is
// how tests and non-standard installs point the CLI elsewhere.
func configPath() string {
	return cmp.Or(os.Getenv("IOTEDGE_CONFIG"), "/etc/aziot/config.toml")
}

func tpmSocket() string { return cmp.Or(os.Getenv("IOTEDGE_TPM_SOCKET"), tpmservice.DefaultSocket) }

func mgmtURI() string { return cmp.Or(os.Getenv("IOTEDGE_HOST"), "unix://"+mgmt.DefaultSocket) }

func mgmtClient() (*mgmt.Client, error) { return mgmt.NewClient(mgmtURI()) }

// services are the runtime's systemd units.
var services = []string{"aziot-tpmd", "iotedged"}

// underSystemd reports whether the runtime is installed as systemd units
// on a running systemd; otherwise the CLI talks to the daemon directly.
func underSystemd() bool {
	if os.Getenv("IOTEDGE_NO_SYSTEMD") != "" {
		return false
	}
	if _, err := os.Stat(cmp.Or(os.Getenv("IOTEDGE_SYSTEMD_DIR"), "/run/systemd/system")); err != nil {
		return false
	}
	return exec.Command("systemctl", "cat", "iotedged.service").Run() == nil
}

func systemctl(args ...string) error {
	cmd := exec.Command("systemctl", args...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	return cmd.Run()
}
