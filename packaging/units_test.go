package packaging

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/edge/mgmt"
	"github.com/hatchery/hatchery/internal/tpmservice"
)

// unit is a systemd unit file: section -> key -> values, in order.
type unit map[string]map[string][]string

func readUnit(t *testing.T, name string) unit {
	t.Helper()
	f, err := os.Open(filepath.Join(repoRoot(t), "packaging", "systemd", name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u := unit{}
	var section string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		switch {
		case l == "" || l[0] == '#' || l[0] == ';':
		case l[0] == '[':
			section = strings.Trim(l, "[]")
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(l, "=")
			if !ok || section == "" || strings.HasSuffix(l, `\`) {
				t.Fatalf("%s: line %q", name, l)
			}
			u[section][k] = append(u[section][k], v)
		}
	}
	return u
}

// one returns the single value of key, failing when it is set 0 or 2+ times.
func (u unit) one(t *testing.T, section, key string) string {
	t.Helper()
	v := u[section][key]
	if len(v) != 1 {
		t.Fatalf("[%s] %s: %q, want one value", section, key, v)
	}
	return v[0]
}

// expect checks the [Service] settings of unit name against want.
func (u unit) expect(t *testing.T, name string, want map[string]string) {
	t.Helper()
	for k, v := range want {
		if got := u.one(t, "Service", k); got != v {
			t.Errorf("%s %s: %q, want %q", name, k, got, v)
		}
	}
}

// execFlags parses ExecStart into the binary, its subcommand (if any) and
// its --flag value pairs; $VARIABLES (from an EnvironmentFile) are left out.
func execFlags(t *testing.T, u unit) (bin, sub string, flags map[string]string) {
	t.Helper()
	var f []string
	for _, w := range strings.Fields(u.one(t, "Service", "ExecStart")) {
		if !strings.HasPrefix(w, "$") {
			f = append(f, w)
		}
	}
	i := 1
	if len(f) > 1 && !strings.HasPrefix(f[1], "-") {
		sub, i = f[1], 2
	}
	flags = map[string]string{}
	for ; i < len(f); i += 2 {
		if !strings.HasPrefix(f[i], "--") || i+1 == len(f) {
			t.Fatalf("ExecStart %q: want --flag value pairs", f)
		}
		flags[strings.TrimPrefix(f[i], "--")] = f[i+1]
	}
	return f[0], sub, flags
}

func TestTPMServiceUnit(t *testing.T) {
	u := readUnit(t, "aziot-tpmd.service")
	bin, _, flags := execFlags(t, u)
	if bin != "/usr/bin/aziot-tpmd" {
		t.Errorf("ExecStart runs %s", bin)
	}
	u.expect(t, "aziot-tpmd.service", map[string]string{
		"User":                 "aziottpm",
		"Group":                "aziottpm",
		"SupplementaryGroups":  "iotedge",
		"RuntimeDirectory":     "aziot",
		"RuntimeDirectoryMode": "0755",
		"NoNewPrivileges":      "yes",
		"ProtectSystem":        "strict",
		"ProtectHome":          "yes",
		"PrivateTmp":           "yes",
		"DevicePolicy":         "closed",
		"Restart":              "on-failure",
	})
	for _, dev := range []string{"/dev/tpmrm0 rw", "/dev/tpm0 rw"} {
		if !slices.Contains(u["Service"]["DeviceAllow"], dev) {
			t.Errorf("DeviceAllow: %q, want %q", u["Service"]["DeviceAllow"], dev)
		}
	}
	// PrivateDevices would hide the TPM; PrivateUsers would unmap group
	// iotedge, which the socket is given to.
	for _, k := range []string{"PrivateDevices", "PrivateUsers"} {
		if v := u["Service"][k]; len(v) > 0 {
			t.Errorf("%s=%s: aziot-tpmd needs the TPM and group iotedge", k, v[0])
		}
	}
	for k, want := range map[string]string{
		// Not config.toml, which may hold the device's keys: what config
		// apply writes for it.
		"config": "/etc/aziot/tpmd/config.toml",
		"socket": tpmservice.DefaultSocket,
		"group":  "iotedge",
	} {
		if flags[k] != want {
			t.Errorf("aziot-tpmd --%s %q, want %q", k, flags[k], want)
		}
	}
	if dir := filepath.Dir(flags["socket"]); dir != "/run/"+u.one(t, "Service", "RuntimeDirectory") {
		t.Errorf("--socket %s is not in RuntimeDirectory", flags["socket"])
	}
	if got := u.one(t, "Install", "WantedBy"); got != "multi-user.target" {
		t.Errorf("WantedBy=%s", got)
	}
}

func TestEdgeDaemonUnit(t *testing.T) {
	u := readUnit(t, "iotedged.service")
	if got := u.one(t, "Install", "Alias"); got != "iotedge.service" { // 1.1 documents restart "iotedge"
		t.Errorf("Alias=%s", got)
	}
	bin, _, flags := execFlags(t, u)
	if bin != "/usr/bin/iotedged" {
		t.Errorf("ExecStart runs %s", bin)
	}
	u.expect(t, "iotedged.service", map[string]string{
		"User":                 "iotedge",
		"Group":                "iotedge",
		"SupplementaryGroups":  "docker",
		"RuntimeDirectory":     "iotedge",
		"RuntimeDirectoryMode": "0755",
		// Modules that outlive a crash keep their workload bind mounts.
		"RuntimeDirectoryPreserve": "restart",
		"StateDirectory":           "aziot/edged",
		"Restart":                  "on-failure",
		"NoNewPrivileges":          "yes",
		"ProtectSystem":            "strict",
	})
	for _, k := range []string{"Wants", "After"} {
		deps := strings.Fields(strings.Join(u["Unit"][k], " "))
		for _, want := range []string{"docker.service", "aziot-tpmd.service"} {
			if !slices.Contains(deps, want) {
				t.Errorf("%s=%q, want %s", k, deps, want)
			}
		}
	}
	for k, want := range map[string]string{
		"config":     "/etc/aziot/config.toml",
		"state-dir":  "/var/lib/" + u.one(t, "Service", "StateDirectory"),
		"run-dir":    "/run/" + u.one(t, "Service", "RuntimeDirectory"),
		"tpm-socket": tpmservice.DefaultSocket,
	} {
		if flags[k] != want {
			t.Errorf("iotedged --%s %q, want %q", k, flags[k], want)
		}
	}
	// The CLI looks for /var/run/iotedge/mgmt.sock; /var/run is /run.
	if got := strings.Replace(mgmt.DefaultSocket, "/var/run/", "/run/", 1); got != flags["run-dir"]+"/mgmt.sock" {
		t.Errorf("the CLI's socket %s is not in --run-dir %s", mgmt.DefaultSocket, flags["run-dir"])
	}
}

func TestServiceUnit(t *testing.T) {
	u := readUnit(t, "hatchery.service")
	bin, sub, flags := execFlags(t, u)
	if bin != "/usr/bin/hatchery" || sub != "serve" {
		t.Errorf("ExecStart runs %s %s, want /usr/bin/hatchery serve", bin, sub)
	}
	u.expect(t, "hatchery.service", map[string]string{
		"Type":                  "notify", // serve says READY=1 (internal/sdnotify)
		"User":                  "hatchery",
		"Group":                 "hatchery",
		"StateDirectory":        "hatchery",
		"StateDirectoryMode":    "0700",
		"EnvironmentFile":       "-/etc/default/hatchery",
		"AmbientCapabilities":   "CAP_NET_BIND_SERVICE",
		"CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
		"Restart":               "on-failure",
		"NoNewPrivileges":       "yes",
		"ProtectSystem":         "strict",
		"ProtectHome":           "yes",
		"PrivateTmp":            "yes",
		"PrivateDevices":        "yes",
	})
	// The CLI's default, when root has no data directory of its own.
	if want := "/var/lib/" + u.one(t, "Service", "StateDirectory"); flags["data-dir"] != want {
		t.Errorf("hatchery serve --data-dir %q, want %q", flags["data-dir"], want)
	}
	if !strings.Contains(u.one(t, "Service", "ExecStart"), "$HATCHERY_SERVE_OPTS") {
		t.Error("ExecStart does not pass $HATCHERY_SERVE_OPTS, which /etc/default/hatchery sets")
	}
	if got := u.one(t, "Install", "WantedBy"); got != "multi-user.target" {
		t.Errorf("WantedBy=%s", got)
	}
}

// unitPackages is which package holds each unit.
var unitPackages = map[string]string{
	"hatchery.service":   "hatchery",
	"aziot-tpmd.service": "hatchery-iotedge",
	"iotedged.service":   "hatchery-iotedge",
}

// Every flag the units pass exists in the binary they run.
func TestUnitFlagsExist(t *testing.T) {
	// "  -config string" (package flag), "      --data-dir string" and
	// "  -o, --output string" (cobra).
	flagRE := regexp.MustCompile(`(?m)^\s+(?:-[a-zA-Z], )?--?([a-z][a-z-]*)`)
	for name, pkg := range unitPackages {
		dir := extracted(t, pkg)
		bin, sub, flags := execFlags(t, readUnit(t, name))
		args := []string{"-h"}
		if sub != "" {
			args = []string{sub, "-h"}
		}
		// -h prints the flags; the exit status does not matter.
		out, _ := exec.Command(filepath.Join(dir, bin), args...).CombinedOutput()
		known := map[string]bool{}
		for _, m := range flagRE.FindAllStringSubmatch(string(out), -1) {
			known[m[1]] = true
		}
		for f := range flags {
			if !known[f] {
				t.Errorf("%s passes --%s, which %s does not know:\n%s", name, f, bin, out)
			}
		}
	}
}

// systemd-analyze verify reads the units as systemd would, with ExecStart
// pointed at the packages' binaries; any message fails the test.
func TestUnitsVerify(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Skip("systemd-analyze is not on PATH (Debian package systemd): unit files not verified")
	}
	units := t.TempDir()
	var paths []string
	for name, pkg := range unitPackages {
		dir := extracted(t, pkg)
		b, err := os.ReadFile(filepath.Join(dir, "lib/systemd/system", name))
		if err != nil {
			t.Fatal(err)
		}
		b = []byte(strings.ReplaceAll(string(b), "ExecStart=/usr/bin/", "ExecStart="+dir+"/usr/bin/"))
		p := filepath.Join(units, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	cmd := exec.Command("systemd-analyze", append([]string{"verify"}, paths...)...)
	cmd.Dir = units
	out, err := cmd.CombinedOutput()
	if err != nil || len(out) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}
