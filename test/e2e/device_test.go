package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/moby"
	"github.com/hatchery/hatchery/internal/edge/moby/mobytest"
	"github.com/hatchery/hatchery/internal/testutil"
)

// device is an edge device: a TPM (swtpm), aziot-tpmd and iotedged, run
// without systemd, with the CLI pointed at them.
type device struct {
	t          testing.TB
	tcti       string
	dir        string
	configPath string
	env        []string // for the iotedge CLI
	tpmd       *proc
	daemon     *proc
	site       *site
	owner      string // the label of this device's containers on the shared engine
}

// removeContainers removes what the device's runtime left on the engine.
func (d *device) removeContainers() {
	out, _ := run(d.t, nil, "docker", "ps", "-aq", "--filter", "label="+moby.OwnerLabel+"="+d.owner)
	if ids := strings.Fields(out); len(ids) > 0 {
		_, _ = run(d.t, nil, append([]string{"docker", "rm", "-f"}, ids...)...)
	}
}

func newDevice(t testing.TB, s *site) *device {
	d := &device{t: t, tcti: testutil.StartSWTPM(t), dir: t.TempDir(), site: s, owner: "e2e-" + mobytest.ID()}
	t.Cleanup(d.removeContainers)
	d.configPath = filepath.Join(d.dir, "etc", "config.toml")
	_ = os.MkdirAll(filepath.Dir(d.configPath), 0o755)
	d.env = []string{"IOTEDGE_CONFIG=" + d.configPath, "IOTEDGE_HOST=unix://" + filepath.Join(d.dir, "run", "mgmt.sock"), "IOTEDGE_NO_SYSTEMD=1",
		"IOTEDGE_TPM_SOCKET=" + filepath.Join(d.dir, "tpmd.sock")}
	return d
}

// startServices starts the TPM service and the daemon, as the packaged
// systemd units would; the daemon waits for a configuration.
func (d *device) startServices() {
	d.startTPMD("--tcti", d.tcti, "--config", d.configPath)
	d.startDaemon()
}

// tpmdConfigPath is where `iotedge config apply` writes aziot-tpmd's
// settings: beside config.toml, as /etc/aziot/tpmd/config.toml.
func (d *device) tpmdConfigPath() string {
	return filepath.Join(filepath.Dir(d.configPath), "tpmd", "config.toml")
}

// startTPMD starts aziot-tpmd with args and waits for its socket.
func (d *device) startTPMD(args ...string) {
	t := d.t
	socket := filepath.Join(d.dir, "tpmd.sock")
	d.tpmd = start(t, "aziot-tpmd", nil, append([]string{bin(t, "aziot-tpmd"), "--socket", socket}, args...)...)
	eventually(t, 10*time.Second, func() string {
		if _, err := os.Stat(socket); err != nil {
			return "aziot-tpmd has not created its socket"
		}
		return ""
	})
}

// hubTokenLifetime is the devices' hub token lifetime: a renewal every 9 s.
const hubTokenLifetime = 12 * time.Second

// startDaemon starts iotedged and waits for its management socket.
func (d *device) startDaemon() {
	t := d.t
	d.daemon = start(t, "iotedged", nil, bin(t, "iotedged"), "--config", d.configPath, "--engine-owner", d.owner,
		"--state-dir", filepath.Join(d.dir, "state"), "--run-dir", filepath.Join(d.dir, "run"),
		"--tpm-socket", filepath.Join(d.dir, "tpmd.sock"), "--hub-port", strconv.Itoa(d.site.mqtt), "--hub-https-port", strconv.Itoa(d.site.https),
		// Short-lived hub tokens, so that the tests see the agent through
		// renewals (the hub ends a connection whose token expired).
		"--hub-token-lifetime", hubTokenLifetime.String())
	eventually(t, 10*time.Second, func() string {
		if _, err := os.Stat(filepath.Join(d.dir, "run", "mgmt.sock")); err != nil {
			return "iotedged has not created its management socket"
		}
		return ""
	})
}

func (d *device) iotedge(args ...string) (string, error) {
	return run(d.t, d.env, append([]string{bin(d.t, "iotedge")}, args...)...)
}

func (d *device) mustIotedge(args ...string) string {
	d.t.Helper()
	return must(d.t, d.env, append([]string{bin(d.t, "iotedge")}, args...)...)
}

// configFromTemplate edits the shipped template as the seed documents tell
// a user to: uncomment the DPS-TPM block and fill in its values, point
// trust_bundle_cert at the service's CA and [tpm] at the TPM.
func (d *device) configFromTemplate(regID string) string {
	t := d.t
	tmpl, err := os.ReadFile("../../packaging/config.toml.edge.template")
	if err != nil {
		t.Fatal(err)
	}
	text := string(tmpl)
	replace := func(from, to string, after string) {
		t.Helper()
		start := strings.Index(text, after)
		i := strings.Index(text[start:], from)
		if start < 0 || i < 0 {
			t.Fatalf("the template has no %q after %q", from, after)
		}
		text = text[:start+i] + to + text[start+i+len(from):]
	}
	replace(`# trust_bundle_cert = "file:///etc/aziot/trust-bundle.pem"`, `trust_bundle_cert = "file://`+d.site.CA+`"`, "")
	block := "## DPS provisioning with TPM"
	replace("# [provisioning]\n", "[provisioning]\n", block)
	replace(`# source = "dps"`, `source = "dps"`, block)
	replace(`# global_endpoint = "https://global.azure-devices-provisioning.net"`, `global_endpoint = "`+d.site.Endpoint+`"`, block)
	replace(`# id_scope = "DPS_ID_SCOPE_HERE"`, `id_scope = "`+d.site.IDScope+`"`, block)
	replace("# [provisioning.attestation]\n", "[provisioning.attestation]\n", block)
	replace(`# method = "tpm"`, `method = "tpm"`, block)
	replace(`# registration_id = "REGISTRATION_ID_HERE"`, `registration_id = "`+regID+`"`, block)
	replace("# [tpm]\n", "[tpm]\n", "")
	replace(`# tcti = "device"`, `tcti = "`+d.tcti+`"`, "\n[tpm]\n")
	return text
}

// dpsConfig is a config.toml provisioning through the site's DPS with the
// given [provisioning.attestation] lines.
func (d *device) dpsConfig(attestation string) string {
	return `trust_bundle_cert = "file://` + d.site.CA + `"

[provisioning]
source = "dps"
global_endpoint = "` + d.site.Endpoint + `"
id_scope = "` + d.site.IDScope + `"

[provisioning.attestation]
` + attestation + "\n"
}

func (d *device) writeConfig(text string) {
	if err := os.WriteFile(d.configPath, []byte(text), 0o600); err != nil {
		d.t.Fatal(err)
	}
}
