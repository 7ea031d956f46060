package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/moby/mobytest"
)

// provisioned is a device enrolled, configured from the template and
// connected; mode sets auto_reprovisioning_mode when not empty.
func provisioned(t testing.TB, mode string) (*site, *device, string) {
	requireTools(t)
	s := startSite(t)
	d := newDevice(t, s)
	regID, ek := provisionInfo(t, d.tcti)
	s.hatchery("enrollment", "create", "--attestation-type", "tpm", "--registration-id", regID,
		"--endorsement-key", ek, "--device-id", "edge-1", "--edge-enabled", "--initial-twin-tags", `{"environment":"prod"}`)
	d.startServices()
	cfg := d.configFromTemplate(regID)
	if mode != "" {
		cfg = `auto_reprovisioning_mode = "` + mode + "\"\n" + cfg
	}
	d.writeConfig(cfg)
	d.mustIotedge("config", "apply")
	d.waitStatus("Hub:          connected")
	return s, d, regID
}

func (d *device) waitStatus(want string) {
	d.t.Helper()
	eventually(d.t, 60*time.Second, func() string {
		out, _ := d.iotedge("system", "status")
		if !strings.Contains(out, want) {
			return "system status lacks " + want + ":\n" + out
		}
		return ""
	})
}

func (d *device) waitModule(words ...string) {
	d.t.Helper()
	eventually(d.t, 60*time.Second, func() string {
		out, _ := d.iotedge("list")
		if len(grep(out, words...)) == 0 {
			return "iotedge list has no line with " + strings.Join(words, ", ") + ":\n" + out
		}
		return ""
	})
}

func deploy(t testing.TB, s *site, id string, priority string, modules map[string]any) {
	manifest := filepath.Join(t.TempDir(), id+".json")
	writeManifest(t, manifest, modules)
	s.hatchery("deployment", "create", "--deployment-id", id, "--content", manifest,
		"--target-condition", "tags.environment='prod'", "--priority", priority)
}

// Disabled in the hub, the device is cut off, provisions again, keeps its
// modules running, and comes back when enabled.
func TestReprovisionAfterDisable(t *testing.T) {
	image := mobytest.New(t).Image("")
	s, d, _ := provisioned(t, "")
	deploy(t, s, "base", "10", map[string]any{"sensor": module(image, "always")})
	d.waitModule("sensor", "running")

	s.hatchery("device", "disable", "--device-id", "edge-1")
	d.waitStatus("not authorized")
	eventually(t, 30*time.Second, func() string {
		out, _ := d.iotedge("system", "logs")
		if !strings.Contains(out, "provisioning again") {
			return "system logs do not show the reprovisioning:\n" + out
		}
		return ""
	})
	d.waitModule("sensor", "running") // what ran keeps running

	s.hatchery("device", "enable", "--device-id", "edge-1")
	d.waitStatus("Hub:          connected")
	d.waitModule("sensor", "running")

	// Asked to, it provisions again at once.
	before := strings.Count(d.mustIotedge("system", "logs", "--tail", "100000"), "msg=provisioned")
	if out := d.mustIotedge("system", "reprovision"); !strings.Contains(out, "Provisioning the device again") {
		t.Errorf("system reprovision: %s", out)
	}
	eventually(t, 30*time.Second, func() string {
		if n := strings.Count(d.mustIotedge("system", "logs", "--tail", "100000"), "msg=provisioned"); n <= before {
			return fmt.Sprintf("system logs show %d provisionings, as before the request", n)
		}
		return ""
	})
	d.waitStatus("Hub:          connected")
}

// A cleared TPM (its owner reset it) has lost the identity key with its
// storage hierarchy, so the identity backup is of no use: the runtime
// provisions again, whatever auto_reprovisioning_mode says, and reconnects.
func TestReprovisionAfterTPMClear(t *testing.T) {
	_, d, _ := provisioned(t, "OnErrorOnly")
	d.daemon.stop()
	d.tpmd.stop()
	must(t, nil, "tpm2_clear", "--tcti", d.tcti, "-c", "p")
	for _, sock := range []string{"tpmd.sock", "run/mgmt.sock"} {
		_ = os.Remove(filepath.Join(d.dir, sock))
	}
	d.startServices()
	eventually(t, 30*time.Second, func() string {
		out, _ := d.iotedge("system", "logs", "--tail", "100000")
		if !strings.Contains(out, "no longer holds the device's identity key") || !strings.Contains(out, "msg=provisioned") {
			return "system logs do not show provisioning again for the cleared TPM:\n" + out
		}
		return ""
	})
	d.waitStatus("Hub:          connected")
}

// With DPS and the hub down at a restart, the device starts from its
// identity backup and runs its last deployment; it reconnects when they
// come back.
func TestStartsFromBackupWhenDPSIsDown(t *testing.T) {
	image := mobytest.New(t).Image("")
	s, d, _ := provisioned(t, "AlwaysOnStartup")
	deploy(t, s, "base", "10", map[string]any{"sensor": module(image, "always")})
	d.waitModule("sensor", "running")

	s.proc.stop()
	d.daemon.stop()
	_ = os.Remove(filepath.Join(d.dir, "run", "mgmt.sock"))
	d.startDaemon()
	d.waitStatus("from the identity backup")
	d.waitModule("sensor", "running")

	s.start()
	d.waitStatus("Hub:          connected")
}

// A crashing module restarts with backoff; a module left out of the
// deployment is removed.
func TestModuleRestartAndRemoval(t *testing.T) {
	image := mobytest.New(t).Image("")
	s, d, _ := provisioned(t, "")
	deploy(t, s, "base", "10", map[string]any{
		"steady":  module(image, "always"),
		"crasher": module(image, "on-failure", "-exit", "3", "-after", "200ms"),
	})
	d.waitModule("steady", "running")
	eventually(t, 60*time.Second, func() string {
		out := s.hatchery("twin", "show", "--device-id", "edge-1", "--module-id", "$edgeAgent")
		var tw struct {
			Properties struct {
				Reported struct {
					Modules map[string]struct {
						RestartCount int `json:"restartCount"`
						ExitCode     int `json:"exitCode"`
					} `json:"modules"`
				} `json:"reported"`
			} `json:"properties"`
		}
		_ = json.Unmarshal([]byte(out), &tw)
		if m := tw.Properties.Reported.Modules["crasher"]; m.RestartCount < 1 || m.ExitCode != 3 {
			return "crasher has not been restarted after exiting with 3"
		}
		return ""
	})
	deploy(t, s, "without-crasher", "20", map[string]any{"steady": module(image, "always")})
	eventually(t, 60*time.Second, func() string {
		out, _ := d.iotedge("list")
		if strings.Contains(out, "crasher") {
			return "crasher is still listed:\n" + out
		}
		if out, _ := run(t, nil, "docker", "ps", "-a", "--filter", "name=^crasher$", "--format", "{{.Names}}"); strings.TrimSpace(out) != "" {
			return "the crasher container still exists"
		}
		return ""
	})
}

// A 1.1 config.yaml, imported, provisions the same way.
func TestLegacyConfigImport(t *testing.T) {
	requireTools(t)
	s := startSite(t)
	d := newDevice(t, s)
	regID, ek := provisionInfo(t, d.tcti)
	s.hatchery("enrollment", "create", "--attestation-type", "tpm", "--registration-id", regID,
		"--endorsement-key", ek, "--device-id", "legacy-1", "--edge-enabled")
	yaml := filepath.Join(d.dir, "config.yaml")
	if err := os.WriteFile(yaml, []byte(`provisioning:
  source: "dps"
  global_endpoint: "`+s.Endpoint+`"
  scope_id: "`+s.IDScope+`"
  attestation:
    method: "tpm"
    registration_id: "`+regID+`"
  always_reprovision_on_startup: true
  dynamic_reprovisioning: false
`), 0o644); err != nil {
		t.Fatal(err)
	}
	d.mustIotedge("config", "import", "-i", yaml, "-o", d.configPath)
	if out, err := d.iotedge("config", "import", "-i", yaml, "-o", d.configPath); err == nil || !strings.Contains(out, "--force") {
		t.Fatalf("import over an existing config.toml: %v\n%s", err, out)
	}
	imported, _ := os.ReadFile(d.configPath)
	if !strings.Contains(string(imported), `auto_reprovisioning_mode = "AlwaysOnStartup"`) {
		t.Fatalf("imported config:\n%s", imported)
	}
	// What 1.1 did not have: the CA to trust and the TPM to use.
	d.writeConfig(`trust_bundle_cert = "file://` + s.CA + "\"\n" + string(imported) + "\n[tpm]\ntcti = \"" + d.tcti + "\"\n")
	d.startServices()
	d.mustIotedge("config", "apply")
	d.waitStatus("legacy-1 on hub localhost")
}

// Mistakes get clear messages, and the runtime keeps what runs.
func TestBadInputKeepsTheRuntime(t *testing.T) {
	image := mobytest.New(t).Image("")
	s, d, _ := provisioned(t, "")
	deploy(t, s, "base", "10", map[string]any{"sensor": module(image, "always")})
	d.waitModule("sensor", "running")

	// A deployment whose image cannot be pulled: the module runs on with
	// its old image, and the failure is reported; once the deployment is
	// gone, the report is a plain success again.
	deploy(t, s, "bad", "20", map[string]any{"sensor": module("127.0.0.1:1/nosuch:1.0", "always")})
	waitAgentStatus(t, s, func(code int, desc string) bool { return code == 500 && strings.Contains(desc, "nosuch") })
	if out, _ := run(t, nil, "docker", "inspect", "--format", "{{.State.Status}} {{.Config.Image}}", "sensor"); !strings.Contains(out, "running "+image) {
		t.Errorf("the sensor container after a deployment it cannot pull: %s", out)
	}
	// Also when the deployment goes while the daemon is down, so that its
	// first report after starting is the success.
	d.daemon.stop()
	s.hatchery("deployment", "delete", "--deployment-id", "bad")
	_ = os.Remove(filepath.Join(d.dir, "run", "mgmt.sock"))
	d.startDaemon()
	waitAgentStatus(t, s, func(code int, desc string) bool { return code == 200 && desc == "" })

	good, _ := os.ReadFile(d.configPath)
	d.writeConfig(strings.Replace(string(good), "\nmethod = \"tpm\"", "\nmethod = tpm", 1))
	out, err := d.iotedge("config", "apply")
	if err == nil || !strings.Contains(out, `must be quoted: method = "tpm"`) {
		t.Fatalf("apply of an unquoted enum: %v\n%s", err, out)
	}
	d.writeConfig("[provisioning]\nsource = \"dps\"\nscope_id = \"x\"\n")
	if out, err := d.iotedge("config", "apply"); err == nil || !strings.Contains(out, "id_scope") {
		t.Fatalf("apply with scope_id: %v\n%s", err, out)
	}
	d.waitStatus("Hub:          connected") // the daemon kept its configuration

	// An ID scope DPS does not know: provisioning fails, and the status
	// no longer claims the hub connection of the configuration before.
	d.writeConfig(strings.Replace(string(good), s.IDScope, "0ne00000000", 1))
	d.mustIotedge("config", "apply")
	d.waitStatus("provisioning failed")
	d.waitStatus("Hub:          not connected")
	d.writeConfig(string(good))
	d.mustIotedge("config", "apply")
	d.waitStatus("Hub:          connected")

	// The TPM service gone: check says so.
	d.tpmd.stop()
	out, err = d.iotedge("check")
	if err == nil || !strings.Contains(out, "aziot-tpmd is not running") {
		t.Fatalf("check without the TPM service: %v\n%s", err, out)
	}
}

// Symmetric-key attestation through DPS, and manual provisioning with a
// device connection string (`iotedge config mp`), bring devices up too.
func TestSymmetricKeyAndManualProvisioning(t *testing.T) {
	requireTools(t)
	s := startSite(t)
	out := s.hatchery("enrollment", "create", "--attestation-type", "symmetrickey", "--registration-id", "sym-1",
		"--edge-enabled", "--output", "json")
	var e struct {
		Attestation struct {
			SymmetricKey struct{ PrimaryKey string } `json:"symmetricKey"`
		} `json:"attestation"`
	}
	if err := json.Unmarshal([]byte(out), &e); err != nil {
		t.Fatal(err)
	}
	d := newDevice(t, s)
	d.startServices()
	d.writeConfig(d.dpsConfig(`method = "symmetric_key"
registration_id = "sym-1"
symmetric_key = { value = "` + e.Attestation.SymmetricKey.PrimaryKey + `" }`))
	d.mustIotedge("config", "apply")
	d.checkKeyKept(e.Attestation.SymmetricKey.PrimaryKey)
	d.waitStatus("sym-1 on hub localhost, provisioned by dps/sas")
	d.waitStatus("Hub:          connected")

	// Manual: a device created in the hub, its connection string.
	s.hatchery("device", "create", "--device-id", "manual-1", "--edge-enabled")
	cs := strings.TrimSpace(s.hatchery("device", "connection-string", "--device-id", "manual-1"))
	if err := os.Remove(d.configPath); err != nil {
		t.Fatal(err)
	}
	if out := d.mustIotedge("config", "mp", "-c", cs, "-o", d.configPath); !strings.Contains(out, "add trust_bundle_cert") {
		t.Errorf("config mp does not say the device trusts the system's CAs only:\n%s", out)
	}
	mp, _ := os.ReadFile(d.configPath)
	d.writeConfig(`trust_bundle_cert = "file://` + s.CA + "\"\n" + string(mp))
	d.mustIotedge("config", "apply")
	_, key, _ := strings.Cut(cs, "SharedAccessKey=")
	d.checkKeyKept(key)
	d.waitStatus("manual-1 on hub localhost, provisioned by manual/sas")
	d.waitStatus("Hub:          connected")
}

// checkKeyKept checks that the applied config.toml, which holds key, is
// for its owner alone, and that aziot-tpmd's settings, which do not, tell
// it that this device does not use the TPM.
func (d *device) checkKeyKept(key string) {
	t := d.t
	t.Helper()
	if fi, err := os.Stat(d.configPath); err != nil {
		t.Error(err)
	} else if fi.Mode().Perm() != 0o600 {
		t.Errorf("config.toml after config apply is %s, want 0600", fi.Mode().Perm())
	}
	b, err := os.ReadFile(d.tpmdConfigPath())
	if err != nil || key == "" || strings.Contains(string(b), key) {
		t.Fatalf("aziot-tpmd's settings (%v):\n%s", err, b)
	}
	out, err := run(t, nil, bin(t, "aziot-tpmd"), "--config", d.tpmdConfigPath(), "--socket", filepath.Join(d.dir, "unused.sock"))
	if err != nil || !strings.Contains(out, "nothing to serve") {
		t.Errorf("aziot-tpmd with the settings config apply wrote: %v\n%s", err, out)
	}
}

// waitAgentStatus waits for the $edgeAgent twin's reported
// lastDesiredStatus to satisfy ok.
func waitAgentStatus(t *testing.T, s *site, ok func(code int, description string) bool) {
	t.Helper()
	eventually(t, 60*time.Second, func() string {
		out := s.hatchery("twin", "show", "--device-id", "edge-1", "--module-id", "$edgeAgent")
		var tw struct {
			Properties struct {
				Reported struct {
					LastDesiredStatus struct {
						Code        int    `json:"code"`
						Description string `json:"description"`
					} `json:"lastDesiredStatus"`
				} `json:"reported"`
			} `json:"properties"`
		}
		_ = json.Unmarshal([]byte(out), &tw)
		if st := tw.Properties.Reported.LastDesiredStatus; !ok(st.Code, st.Description) {
			return fmt.Sprintf("$edgeAgent reports lastDesiredStatus %+v", st)
		}
		return ""
	})
}
