package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
)

// Each testdata file states what parsing it must give in leading comments:
// "# error: TEXT" and "# warning: TEXT" lines, each of which must be found in
// one message. A file without error lines must parse, with exactly the
// warnings listed, and round-trip through TOML.
func TestTestdata(t *testing.T) {
	for _, tc := range []struct {
		glob, name string
		parse      func(string, []byte) (*Config, []Warning, error)
	}{
		{"testdata/toml/*.toml", "config.toml", Parse},
		{"testdata/yaml/*.yaml", "config.yaml", ParseLegacyYAML},
	} {
		files, _ := filepath.Glob(tc.glob)
		for _, file := range files {
			t.Run(filepath.Base(file), func(t *testing.T) {
				data, err := os.ReadFile(file)
				if err != nil {
					t.Fatal(err)
				}
				wantErrs, wantWarns := directives(data)
				c, warns, err := tc.parse(tc.name, data)
				checkMessages(t, "warning", wantWarns, warningStrings(warns), len(wantErrs) == 0)
				if len(wantErrs) > 0 {
					if err == nil {
						t.Fatalf("parsed; want errors %q", wantErrs)
					}
					if c != nil {
						t.Error("returned a config with an error")
					}
					checkMessages(t, "error", wantErrs, strings.Split(err.Error(), "\n"), false)
					var e *Error
					if !errors.As(err, &e) || e.File != tc.name || e.Line == 0 {
						t.Errorf("error %#v does not name the file and line", e)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				checkRoundTrip(t, c)
			})
		}
	}
}

func directives(data []byte) (errs, warns []string) {
	for line := range strings.Lines(string(data)) {
		line = strings.TrimSpace(line)
		if s, ok := strings.CutPrefix(line, "# error: "); ok {
			errs = append(errs, s)
		} else if s, ok := strings.CutPrefix(line, "# warning: "); ok {
			warns = append(warns, s)
		}
	}
	return errs, warns
}

func warningStrings(ws []Warning) []string {
	var s []string
	for _, w := range ws {
		s = append(s, w.String())
	}
	return s
}

// checkMessages checks that each wanted text is in a message of its own.
func checkMessages(t *testing.T, kind string, want, got []string, exact bool) {
	t.Helper()
	if exact && len(want) != len(got) {
		t.Errorf("got %d %ss, want %d:\n%s", len(got), kind, len(want), strings.Join(got, "\n"))
	}
	used := make([]bool, len(got))
next:
	for _, w := range want {
		for i, g := range got {
			if !used[i] && strings.Contains(g, w) {
				used[i] = true
				continue next
			}
		}
		t.Errorf("no %s contains %q; got:\n%s", kind, w, strings.Join(got, "\n"))
	}
}

// checkRoundTrip checks that c's TOML parses back to c, without warnings
// that c's own parse did not have, and renders the same again.
func checkRoundTrip(t *testing.T, c *Config) {
	t.Helper()
	out := c.TOML()
	c2, _, err := Parse("rendered.toml", out)
	if err != nil {
		t.Fatalf("rendered config does not parse: %v\n%s", err, out)
	}
	if !reflect.DeepEqual(c, c2) {
		t.Errorf("round trip changed the config:\n got %#v\nwant %#v\n%s", c2, c, out)
	}
	if out2 := c2.TOML(); !bytes.Equal(out, out2) {
		t.Errorf("rendering is not stable:\n%s\n---\n%s", out, out2)
	}
}

func mustParse(t *testing.T, file string) (*Config, []Warning) {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	parse := Parse
	if strings.HasSuffix(file, ".yaml") {
		parse = ParseLegacyYAML
	}
	c, warns, err := parse(filepath.Base(file), data)
	if err != nil {
		t.Fatal(err)
	}
	return c, warns
}

func TestParseDPSTPM(t *testing.T) {
	c, warns := mustParse(t, "testdata/toml/dps-tpm.toml")
	for _, w := range warns { // hostname, [agent], [connect], [listen]
		if !strings.Contains(w.String(), "is an Azure IoT Edge setting that Hatchery does not use") {
			t.Errorf("warning: %v", w)
		}
	}
	want := &Config{
		Hostname:                       "edge-lab-01",
		TrustBundleCert:                "file:///etc/aziot/hatchery-ca.pem",
		AutoReprovisioningMode:         AlwaysOnStartup,
		AllowElevatedDockerPermissions: true,
		Provisioning: Provisioning{
			Source:         SourceDPS,
			GlobalEndpoint: "https://edge-lab",
			IDScope:        "0ne5A1F09C2",
			Payload:        Payload{URI: "file:///etc/aziot/dps-payload.json"},
			Attestation:    Attestation{Method: MethodTPM, RegistrationID: "3f2b9c0d"},
		},
		TPM: TPM{TCTI: "swtpm:host=127.0.0.1,port=2321", AuthKeyIndex: 0x101},
		Agent: Agent{
			Name: "edgeAgent", Type: "docker", ImagePullPolicy: "on-create",
			Config: AgentConfig{
				Image: "mcr.microsoft.com/azureiotedge-agent:1.5",
				CreateOptions: map[string]any{"HostConfig": map[string]any{
					"Binds": []any{"/var/edge:/data"}, "Privileged": false}},
				Auth: RegistryAuth{ServerAddress: "registry.example", Username: "edge", Password: "secret"},
			},
			Env: map[string]string{"RuntimeLogLevel": "debug", "Upstream Protocol": "AmqpWs"},
		},
		Connect: Connect{WorkloadURI: "unix:///var/run/iotedge/workload.sock", ManagementURI: "unix:///var/run/iotedge/mgmt.sock"},
		Listen: Listen{WorkloadURI: "fd://aziot-edged.workload.socket", ManagementURI: "fd://aziot-edged.mgmt.socket",
			MinTLSVersion: "tls1.2"},
		MobyRuntime: MobyRuntime{URI: DefaultMobyURI, Network: MobyNetwork{Name: "edge-net"}},
	}
	if !reflect.DeepEqual(c, want) {
		t.Errorf("got  %#v\nwant %#v", c, want)
	}
	if got := FilePath(c.TrustBundleCert); got != "/etc/aziot/hatchery-ca.pem" {
		t.Errorf("FilePath = %q", got)
	}
}

func TestDefaults(t *testing.T) {
	c, _, err := Parse("config.toml", []byte(`
[provisioning]
source = "dps"
id_scope = "0ne5A1F09C2"
[provisioning.attestation]
method = "tpm"
registration_id = "r"
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.AutoReprovisioningMode != Dynamic || c.Provisioning.GlobalEndpoint != DefaultGlobalEndpoint ||
		c.TPM.TCTI != "device" || c.TPM.AuthKeyIndex != 256 ||
		c.MobyRuntime.URI != "unix:///var/run/docker.sock" || c.MobyRuntime.Network.Name != "azure-iot-edge" {
		t.Errorf("defaults not applied: %+v", c)
	}
}

func TestMisplacedModeHonoured(t *testing.T) {
	for file, want := range map[string]ReprovisioningMode{
		"misplaced-mode-attestation.toml":  OnErrorOnly,
		"misplaced-mode-provisioning.toml": AlwaysOnStartup,
		"misplaced-mode-twice.toml":        OnErrorOnly, // the top-level one wins
	} {
		c, _ := mustParse(t, "testdata/toml/"+file)
		if c.AutoReprovisioningMode != want {
			t.Errorf("%s: auto_reprovisioning_mode = %q, want %q", file, c.AutoReprovisioningMode, want)
		}
	}
}

// Azure's table form of moby_runtime.network gives its name, and renders
// back as the plain string form.
func TestNetworkTable(t *testing.T) {
	c, _ := mustParse(t, "testdata/toml/network-table.toml")
	if c.MobyRuntime.Network.Name != "edge-net" {
		t.Errorf("network name %q, want edge-net", c.MobyRuntime.Network.Name)
	}
	if out := string(c.TOML()); !strings.Contains(out, "network = \"edge-net\"\n") {
		t.Errorf("rendered:\n%s", out)
	}
}

func TestLegacyImport(t *testing.T) {
	for file, want := range map[string]ReprovisioningMode{
		"tpm.yaml":     OnErrorOnly, // neither key set
		"dynamic.yaml": Dynamic,     // wins over always_reprovision_on_startup
		"always.yaml":  AlwaysOnStartup,
	} {
		c, _ := mustParse(t, "testdata/yaml/"+file)
		if c.AutoReprovisioningMode != want {
			t.Errorf("%s: auto_reprovisioning_mode = %q, want %q", file, c.AutoReprovisioningMode, want)
		}
		a := c.Provisioning.Attestation
		if c.Provisioning.Source != SourceDPS || c.Provisioning.IDScope != "0ne5A1F09C2" ||
			a.Method != MethodTPM || a.RegistrationID != "3f2b9c0d" {
			t.Errorf("%s: provisioning = %+v", file, c.Provisioning)
		}
	}

	c, _ := mustParse(t, "testdata/yaml/tpm.yaml")
	if c.Listen.ManagementURI != "fd://aziot-edged.mgmt.socket" || c.Listen.WorkloadURI != "fd://aziot-edged.workload.socket" {
		t.Errorf("1.1 socket units not mapped: %+v", c.Listen)
	}
	if c.Homedir != "" {
		t.Errorf("homedir imported: %q", c.Homedir)
	}

	c, _ = mustParse(t, "testdata/yaml/symmetric-key.yaml")
	wantOpts := map[string]any{"HostConfig": map[string]any{"Binds": []any{"/var/edge:/data"}, "Memory": int64(268435456)}}
	if !reflect.DeepEqual(c.Agent.Config.CreateOptions, wantOpts) || c.Provisioning.Attestation.SymmetricKey.Value != "c2VjcmV0a2V5MTIzNDU2Nzg=" {
		t.Errorf("agent or key not imported: %+v %+v", c.Agent, c.Provisioning.Attestation)
	}

	c, _ = mustParse(t, "testdata/yaml/certificates.yaml")
	if c.TrustBundleCert != "file:///var/secrets/trusted-ca.pem" || c.Provisioning.ConnectionString == "" {
		t.Errorf("trusted_ca_certs or connection string not imported: %+v", c)
	}
}

func TestRenderedTOML(t *testing.T) {
	c, _ := mustParse(t, "testdata/yaml/tpm.yaml")
	got := string(c.Used().TOML())
	want := `# Edge runtime configuration. Apply changes with: sudo iotedge config apply
# When to provision again: Dynamic, AlwaysOnStartup or OnErrorOnly
auto_reprovisioning_mode = "OnErrorOnly"

# How the device gets its IoT hub identity
[provisioning]
source = "dps"
global_endpoint = "https://edge-lab"
id_scope = "0ne5A1F09C2"

[provisioning.attestation]
method = "tpm"
registration_id = "3f2b9c0d"
`
	if got != want {
		t.Errorf("got:\n%s\nwant:\n%s", got, want)
	}
	// What it writes is a config.toml without warnings.
	if _, warns, err := Parse("config.toml", []byte(got)); err != nil || len(warns) != 0 {
		t.Errorf("the rendered config.toml: %v, warnings %v", err, warns)
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	// Without the package's template beside it, the source tree's.
	_, _, err := Load(filepath.Join(dir, "config.toml"))
	if err == nil || !strings.Contains(err.Error(), "packaging/config.toml.edge.template") {
		t.Errorf("Load of a missing file, no template: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.toml.edge.template"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err = Load(filepath.Join(dir, "config.toml"))
	want := "sudo cp " + filepath.Join(dir, "config.toml.edge.template") + " " + filepath.Join(dir, "config.toml")
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("Load of a missing file: %v; want it to say %q", err, want)
	}
	// After IoT Edge 1.1, the way forward is importing its config.yaml.
	LegacyPath = filepath.Join(dir, "config.yaml")
	defer func() { LegacyPath = "/etc/iotedge/config.yaml" }()
	if err := os.WriteFile(LegacyPath, []byte("provisioning:\n  source: manual\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Load(filepath.Join(dir, "config.toml")); err == nil || !strings.Contains(err.Error(), "sudo iotedge config import") {
		t.Errorf("Load with only a 1.1 config.yaml: %v", err)
	}
	path := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(path, []byte("auto_reprovisioning_mode = \"AlwaysOnStartup\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, warns, err := Load(path)
	if err != nil || c.AutoReprovisioningMode != "AlwaysOnStartup" || len(warns) != 1 {
		t.Errorf("Load = %+v, %v, %v", c, warns, err)
	}
}

func TestFromConnectionString(t *testing.T) {
	const cs = "HostName=edge-lab;DeviceId=edge-lab-01;SharedAccessKey=c2VjcmV0a2V5MTIzNDU2Nzg="
	c, err := FromConnectionString(cs)
	if err != nil {
		t.Fatal(err)
	}
	if c.Provisioning.Source != SourceManual || c.Provisioning.ConnectionString != cs {
		t.Errorf("provisioning = %+v", c.Provisioning)
	}
	checkRoundTrip(t, c)

	for cs, want := range map[string]string{
		"":                        "connection string has no HostName",
		"HostName=hub;DeviceId=d": "connection string has no SharedAccessKey",
		"HostName=hub;DeviceId=d;SharedAccessKey=%%%":                                           "SharedAccessKey must be a base64 key of 16 to 64 bytes",
		"HostName=hub;DeviceId=d;SharedAccessKey=c2VjcmV0":                                      "SharedAccessKey must be a base64 key of 16 to 64 bytes",
		"HostName=hub;SharedAccessKey=c2VjcmV0c2VjcmV0c2VjcmV0":                                 "names neither a SharedAccessKeyName nor a DeviceId",
		"HostName=hub;SharedAccessKeyName=iothubowner;SharedAccessKey=c2VjcmV0c2VjcmV0c2VjcmV0": "is a service connection string",
		"HostName=hub;DeviceId=d;ModuleId=m;SharedAccessKey=c2VjcmV0c2VjcmV0c2VjcmV0":           "is a module's",
		"HostName=hub/x;DeviceId=d;SharedAccessKey=c2VjcmV0c2VjcmV0c2VjcmV0":                    `HostName "hub/x" is not a host name`,
		"HostName=hub;DeviceId=d d;SharedAccessKey=c2VjcmV0c2VjcmV0c2VjcmV0":                    `DeviceId "d d" has characters IoT Hub does not allow`,
	} {
		_, err := FromConnectionString(cs)
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "expected HostName=") {
			t.Errorf("FromConnectionString(%q) = %v; want %q", cs, err, want)
		}
	}
}

func TestTooManyErrors(t *testing.T) {
	var b strings.Builder
	for i := range 2 * maxErrors {
		fmt.Fprintf(&b, "key%d = 1\n", i)
	}
	_, _, err := Parse("config.toml", []byte(b.String()))
	lines := strings.Split(err.Error(), "\n")
	if len(lines) != maxErrors+1 || lines[maxErrors] != "config.toml: too many errors" {
		t.Errorf("got %d errors, last %q", len(lines), lines[len(lines)-1])
	}
}

const templatePath = "../../../packaging/config.toml.edge.template"

// uncomment removes one level of comment from the lines of the template's
// block that starts with heading, up to the next block.
func uncomment(t *testing.T, template, heading string) string {
	t.Helper()
	start := strings.Index(template, heading+"\n")
	if start < 0 {
		t.Fatalf("template has no %q", heading)
	}
	start += len(heading) + 1
	end := start + strings.Index(template[start:], "\n\n\n")
	var b strings.Builder
	for line := range strings.Lines(template[start:end]) {
		if line == "#\n" {
			line = "\n"
		}
		b.WriteString(strings.TrimPrefix(line, "# "))
	}
	return template[:start] + b.String() + template[end:]
}

func TestTemplate(t *testing.T) {
	data, err := os.ReadFile(templatePath)
	if err != nil {
		t.Fatal(err)
	}
	template := string(data)

	c, warns, err := Parse("config.toml", data)
	if err != nil {
		t.Fatal(err)
	}
	if c.Provisioning.Source != SourceNone || len(warns) != 1 || !strings.Contains(warns[0].Msg, "no provisioning is configured") {
		t.Errorf("template as shipped: source %q, warnings %v", c.Provisioning.Source, warns)
	}

	tpm := uncomment(t, template, "## DPS provisioning with TPM")
	filled := strings.NewReplacer("DPS_ID_SCOPE_HERE", "0ne5A1F09C2", "REGISTRATION_ID_HERE", "3f2b9c0d").Replace(tpm)
	c, warns, err = Parse("config.toml", []byte(filled))
	if err != nil {
		t.Fatalf("DPS-TPM block: %v", err)
	}
	a := c.Provisioning.Attestation
	if len(warns) > 0 || c.Provisioning.Source != SourceDPS || c.Provisioning.IDScope != "0ne5A1F09C2" ||
		c.Provisioning.GlobalEndpoint != DefaultGlobalEndpoint || a.Method != MethodTPM || a.RegistrationID != "3f2b9c0d" {
		t.Errorf("DPS-TPM block: %+v, warnings %v", c.Provisioning, warns)
	}

	// The settings outside the provisioning blocks, uncommented, are valid too.
	p := strings.Index(filled, "# Provisioning\n")
	tpmSection := strings.Index(filled, "# TPM\n")
	all := uncommentSettings(filled[:p]) + filled[p:tpmSection] + uncommentSettings(filled[tpmSection:])
	c, warns, err = Parse("config.toml", []byte(all))
	if err != nil || len(warns) > 0 || c.MobyRuntime.Network.Name != "azure-iot-edge" {
		t.Errorf("template settings uncommented: %v %v\n%s", err, warns, all)
	}

	// The mistake the seed's block invites (the template leaves its line
	// out): uncommenting its last line, within [provisioning.attestation].
	if strings.Contains(filled, "# auto_reprovisioning_mode = Dynamic") {
		t.Error("the template invites the seed's mistake: its auto_reprovisioning_mode line sits in [provisioning.attestation], unquoted")
	}
	mistake := strings.Replace(filled, "\nregistration_id = \"3f2b9c0d\"", "\nregistration_id = \"3f2b9c0d\"\nauto_reprovisioning_mode = Dynamic", 1)
	if _, _, err := Parse("config.toml", []byte(mistake)); err == nil ||
		!strings.Contains(err.Error(), `the value of auto_reprovisioning_mode must be quoted: auto_reprovisioning_mode = "Dynamic"`) {
		t.Errorf("unquoted mode: %v", err)
	}
	quoted := strings.Replace(mistake, "= Dynamic", `= "OnErrorOnly"`, 1)
	c, warns, err = Parse("config.toml", []byte(quoted))
	if err != nil || c.AutoReprovisioningMode != OnErrorOnly || len(warns) != 1 || !strings.Contains(warns[0].Msg, "move it above the first [table]") {
		t.Errorf("misplaced mode: %v, %v", warns, err)
	}
}

var commentedSetting = regexp.MustCompile(`(?m)^# (\[[a-z_.]+\].*|[A-Za-z_]+ = .*)$`)

// uncommentSettings uncomments the lines of s that are a commented-out
// table header or key.
func uncommentSettings(s string) string {
	return commentedSetting.ReplaceAllString(s, "$1")
}

func TestSuggest(t *testing.T) {
	keys := fieldNames(reflect.TypeFor[Provisioning](), "toml")
	for name, want := range map[string]string{
		"scopeid":         "id_scope",
		"ID_Scope":        "id_scope",
		"idscope":         "id_scope",
		"globalendpoint":  "global_endpoint",
		"sorce":           "source",
		"atestation":      "attestation",
		"connectionstrng": "connection_string",
		"xyz":             "",
		"hostname":        "",
	} {
		if got := suggest(name, keys); got != want {
			t.Errorf("suggest(%q) = %q, want %q", name, got, want)
		}
	}
}

func FuzzParse(f *testing.F) {
	files, _ := filepath.Glob("testdata/toml/*.toml")
	files = append(files, templatePath)
	for _, file := range files {
		data, _ := os.ReadFile(file)
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, _, err := Parse("config.toml", data)
		if err != nil {
			return
		}
		// Whatever parses renders to TOML that parses and renders the same.
		out := c.TOML()
		c2, _, err := Parse("rendered.toml", out)
		if err != nil {
			t.Fatalf("rendered config does not parse: %v\n%s", err, out)
		}
		if out2 := c2.TOML(); !bytes.Equal(out, out2) {
			t.Fatalf("rendering is not stable:\n%s\n---\n%s", out, out2)
		}
	})
}

func FuzzParseLegacyYAML(f *testing.F) {
	files, _ := filepath.Glob("testdata/yaml/*.yaml")
	for _, file := range files {
		data, _ := os.ReadFile(file)
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, _, err := ParseLegacyYAML("config.yaml", data)
		if err != nil {
			return
		}
		if _, _, err := Parse("rendered.toml", c.TOML()); err != nil {
			t.Fatalf("imported config does not render to valid TOML: %v\n%s", err, c.TOML())
		}
	})
}

// symmetricKeyDPS is a config.toml's DPS symmetric-key provisioning, but
// for the key.
const symmetricKeyDPS = `[provisioning]
source = "dps"
global_endpoint = "https://edge-lab"
id_scope = "0ne5A1F09C2"

[provisioning.attestation]
method = "symmetric_key"
registration_id = "sym-1"
`

// aziot-tpmd's file holds its settings and whether the TPM is used, and
// none of the device's keys.
func TestTPMDConfig(t *testing.T) {
	c, _, err := Parse("config.toml", []byte(symmetricKeyDPS+`symmetric_key = { value = "c2VjcmV0a2V5MTIzNDU2Nzg=" }

[tpm]
tcti = "swtpm:host=127.0.0.1,port=2321"
`))
	if err != nil {
		t.Fatal(err)
	}
	want := `# aziot-tpmd's settings, from /etc/aziot/config.toml: change them there, then run sudo iotedge config apply

# How the device gets its IoT hub identity
[provisioning]
source = "dps"

[provisioning.attestation]
method = "symmetric_key"

# The TPM that holds the device's keys
[tpm]
tcti = "swtpm:host=127.0.0.1,port=2321"
auth_key_index = 0x100
`
	if got := string(c.TPMDConfig("/etc/aziot/config.toml")); got != want {
		t.Errorf("got:\n%s\nwant:\n%s", got, want)
	}
}

// A key written without quotes is named as wrong without being repeated:
// check messages travel in support bundles.
func TestUnquotedKeyNotEchoed(t *testing.T) {
	_, _, err := Parse("config.toml", []byte(symmetricKeyDPS+`
[provisioning.attestation.symmetric_key]
value = c2VjcmV0a2V5MTIzNDU2Nzg
`))
	if err == nil || !strings.Contains(err.Error(), `the value of value must be quoted: value = "..."`) || strings.Contains(err.Error(), "c2VjcmV0") {
		t.Errorf("an unquoted key: %v", err)
	}
}

// A secret of the wrong type (a number TOML parses) is not repeated either.
func TestMistypedSecretNotEchoed(t *testing.T) {
	_, _, err := Parse("config.toml", []byte(`[agent.config.auth]
serveraddress = "example.azurecr.io"
username = "u"
password = 987654321
`))
	if err == nil || !strings.Contains(err.Error(), `the value of password must be a quoted string: password = "..."`) || strings.Contains(err.Error(), "987654321") {
		t.Errorf("a mistyped password: %v", err)
	}
	_, _, err = Parse("config.toml", []byte("hostname = 12345\n"))
	if err == nil || !strings.Contains(err.Error(), `hostname = "12345"`) {
		t.Errorf("a mistyped hostname is shown quoted: %v", err)
	}
}

// allow_elevated_docker_permissions is read (true unless written false),
// kept by rendering, and a value of another type is named as wrong.
func TestAllowElevatedDockerPermissions(t *testing.T) {
	c, warns, err := Parse("config.toml", []byte("allow_elevated_docker_permissions = false\n"))
	if err != nil || len(warns) != 1 || c.AllowElevatedDockerPermissions { // the warning: no provisioning
		t.Errorf("= false: %+v, %v, %v", c, warns, err)
	}
	if !strings.Contains(string(c.TOML()), "allow_elevated_docker_permissions = false") {
		t.Errorf("rendered without it:\n%s", c.TOML())
	}
	if c, _, err = Parse("config.toml", nil); err != nil || !c.AllowElevatedDockerPermissions {
		t.Errorf("the default: %v, %v", c.AllowElevatedDockerPermissions, err)
	}
	_, _, err = Parse("config.toml", []byte("allow_elevated_docker_permissions = \"no\"\n"))
	if err == nil || !strings.Contains(err.Error(), "allow_elevated_docker_permissions must be true or false") {
		t.Errorf("a string: %v", err)
	}
}
