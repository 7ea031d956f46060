package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/testutil"
)

// cli runs the built binary the way an operator does.
type cli struct {
	t                   *testing.T
	bin                 string
	dataDir             string
	httpsPort, mqttPort int
	serverPID           int                  // the last server serve started
	serverLog           *testutil.SyncBuffer // its output
}

func (c *cli) run(args ...string) (string, error) {
	c.t.Helper()
	cmd := exec.Command(c.bin, append(args, "--data-dir", c.dataDir)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

func (c *cli) ok(args ...string) string {
	c.t.Helper()
	out, err := c.run(args...)
	if err != nil {
		c.t.Fatalf("hatchery %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func startServe(t *testing.T) *cli { return startServeOn(t) }

func (c *cli) build() {
	if out, err := exec.Command("go", "build", "-o", c.bin, ".").CombinedOutput(); err != nil {
		c.t.Fatalf("build: %v\n%s", err, out)
	}
}

// serve starts `hatchery serve` on c's data directory with free ports and
// waits for it; it returns the HTTPS port.
func (c *cli) serve(extra ...string) int {
	t := c.t
	t.Helper()
	port := testutil.FreePort(t)
	c.mqttPort = testutil.FreePort(t)
	log := &testutil.SyncBuffer{}
	args := append([]string{"serve", "--data-dir", c.dataDir, "--hostname", "localhost", "--https-port", strconv.Itoa(port),
		"--mqtt-port", strconv.Itoa(c.mqttPort)}, extra...)
	srv := exec.Command(c.bin, args...)
	srv.Stdout, srv.Stderr = log, log
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	c.serverPID, c.serverLog = srv.Process.Pid, log
	t.Cleanup(func() {
		_ = srv.Process.Signal(syscall.SIGTERM)
		_ = srv.Wait()
		if t.Failed() {
			t.Logf("server log:\n%s", log.String())
		}
	})
	for deadline := time.Now().Add(20 * time.Second); ; {
		if conn, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port)); err == nil {
			conn.Close()
			if _, err := os.Stat(filepath.Join(c.dataDir, endpointFile)); err == nil {
				return port
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("server did not start:\n%s", log.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestOperatorCLI(t *testing.T) {
	c := startServe(t)
	var info siteInfo
	if err := json.Unmarshal([]byte(c.ok("info", "--output", "json")), &info); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(info.IDScope, "0ne") || info.HubHostName != "localhost" || !strings.Contains(info.ProvisioningServiceConnectionString, "SharedAccessKeyName=provisioningserviceowner") ||
		!strings.Contains(info.HubConnectionString, "SharedAccessKeyName=iothubowner") || !strings.HasPrefix(info.ProvisioningHost, "https://localhost:") ||
		info.HubMQTTPort != c.mqttPort {
		t.Fatalf("info %+v", info)
	}
	if _, err := os.Stat(info.CACertificate); err != nil {
		t.Fatalf("CA certificate: %v", err)
	}
	// A typo fails, as a script needs it to, with the command meant.
	for _, args := range [][]string{{"enrollment", "crate", "--registration-id", "x"}, {"hub", "lnk", "--hostname", "x"}} {
		if out, err := c.run(args...); err == nil || !strings.Contains(out, fmt.Sprintf("unknown command %q", args[1])) || !strings.Contains(out, "did you mean") {
			t.Errorf("hatchery %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	if out, err := c.run("enrollment", "list", "-o", "yaml"); err == nil || !strings.Contains(out, `--output "yaml": use table or json`) {
		t.Errorf("an output format there is none of: %v\n%s", err, out)
	}
	// A second server on the same data directory is refused, and leaves the
	// first one's endpoint.json alone.
	endpointBefore, _ := os.ReadFile(filepath.Join(c.dataDir, endpointFile))
	second := exec.Command(c.bin, "serve", "--data-dir", c.dataDir, "--https-port", strconv.Itoa(testutil.FreePort(t)), "--mqtt-port", strconv.Itoa(testutil.FreePort(t)))
	if out, err := second.CombinedOutput(); err == nil || !strings.Contains(string(out), "another hatchery serve (pid "+strconv.Itoa(c.serverPID)+")") {
		t.Fatalf("a second server on the data directory: %v\n%s", err, out)
	}
	if after, _ := os.ReadFile(filepath.Join(c.dataDir, endpointFile)); !bytes.Equal(after, endpointBefore) {
		t.Fatal("the refused server rewrote endpoint.json")
	}
	// A command run while the server is starting (it holds the data
	// directory, endpoint.json not yet written) waits for it.
	endpoint := filepath.Join(c.dataDir, endpointFile)
	if err := os.Rename(endpoint, endpoint+".away"); err != nil {
		t.Fatal(err)
	}
	early := exec.Command(c.bin, "info", "--data-dir", c.dataDir)
	var earlyOut testutil.SyncBuffer
	early.Stdout, early.Stderr = &earlyOut, &earlyOut
	if err := early.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() { waited <- early.Wait() }()
	select {
	case err := <-waited:
		t.Fatalf("info before the server wrote endpoint.json did not wait: %v\n%s", err, earlyOut.String())
	case <-time.After(700 * time.Millisecond):
	}
	if err := os.Rename(endpoint+".away", endpoint); err != nil {
		t.Fatal(err)
	}
	if err := <-waited; err != nil || !strings.Contains(earlyOut.String(), "waiting for the server starting in "+c.dataDir) || !strings.Contains(earlyOut.String(), "ID scope:") {
		t.Errorf("info while the server starts: %v\n%s", err, earlyOut.String())
	}
	// Help never shows the database URL of the environment: it has the password.
	help := exec.Command(c.bin, "info", "--help")
	help.Env = append(os.Environ(), "HATCHERY_DATABASE=postgres://u:s3cretpw@db/hatchery")
	if out, err := help.CombinedOutput(); err != nil || strings.Contains(string(out), "s3cretpw") {
		t.Fatalf("help with HATCHERY_DATABASE set: %v\n%s", err, out)
	}

	out := c.ok("enrollment", "create", "--attestation-type", "symmetrickey", "--registration-id", "Dev-1",
		"--device-id", "edge-1", "--edge-enabled", "--initial-twin-tags", `{"environment":"prod"}`)
	for _, want := range []string{"dev-1", "edge-1", "symmetricKey", `{"environment":"prod"}`, "unassigned"} {
		if !strings.Contains(out, want) {
			t.Errorf("create output lacks %q:\n%s", want, out)
		}
	}
	if len(grepLines(out, "IoT Edge:", "true")) != 1 {
		t.Errorf("create output lacks IoT Edge: true:\n%s", out)
	}
	if out := c.ok("enrollment", "update", "--registration-id", "dev-1", "--provisioning-status", "disabled"); !strings.Contains(out, "disabled") {
		t.Errorf("update: %s", out)
	}
	list := c.ok("enrollment", "list")
	if !strings.Contains(list, "REGISTRATION ID") || !strings.Contains(list, "dev-1") {
		t.Errorf("list: %s", list)
	}
	var listed []map[string]any
	if err := json.Unmarshal([]byte(c.ok("enrollment", "list", "-o", "json")), &listed); err != nil || len(listed) != 1 {
		t.Fatalf("list json: %v %v", listed, err)
	}
	if out := c.ok("enrollment-group", "create", "--group-id", "line-3", "--initial-twin-tags", `{"line":3}`); !strings.Contains(out, "symmetricKey") || len(grepLines(out, "Initial twin tags", `{"line":3}`)) != 1 {
		t.Errorf("group create: %s", out)
	}
	if out := c.ok("enrollment-group", "list"); !strings.Contains(out, "line-3") {
		t.Errorf("group list: %s", out)
	}
	if out := c.ok("enrollment-group", "show", "--group-id", "line-3"); len(grepLines(out, "Group ID", "line-3")) != 1 {
		t.Errorf("group show: %s", out)
	}
	c.ok("enrollment-group", "delete", "--group-id", "line-3")
	if out, err := c.run("enrollment-group", "show", "--group-id", "line-3"); err == nil {
		t.Errorf("a deleted group is shown: %s", out)
	}
	if out := c.ok("registration", "list"); !strings.Contains(out, "REGISTRATION ID") {
		t.Errorf("registration list: %s", out)
	}

	// X.509: a device certificate individually, a CA inline or by name for a group.
	ca := testutil.NewCert(t, "Fleet CA", true, nil)
	dev := testutil.NewCert(t, "cam-1", false, &ca)
	dir := t.TempDir()
	caPath, devPath := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "dev.pem")
	testutil.WritePEM(t, ca, caPath, "")
	testutil.WritePEM(t, dev, devPath, "")
	// The registration ID is the certificate's CN: by default, and never another.
	if out, err := c.run("enrollment", "create", "--registration-id", "cam-2", "--attestation-type", "x509", "--certificate-path", devPath); err == nil || !strings.Contains(out, `enroll it as "cam-1"`) {
		t.Errorf("x509 enrollment under another registration ID: %v %s", err, out)
	}
	if out := c.ok("enrollment", "create", "--attestation-type", "x509", "--certificate-path", devPath); !strings.Contains(out, "CN=cam-1 (SHA-256 ") || !strings.Contains(out, "Registration ID:") || !strings.Contains(out, "cam-1") {
		t.Errorf("x509 enrollment: %s", out)
	}
	// A DER file, as Windows and some makers export certificates, does too.
	cam3 := testutil.NewCert(t, "cam-3", false, &ca)
	derPath := filepath.Join(dir, "cam-3.der")
	_ = os.WriteFile(derPath, cam3.Leaf.Raw, 0o644)
	if out := c.ok("enrollment", "create", "--attestation-type", "x509", "--certificate-path", derPath); !strings.Contains(out, "CN=cam-3 (SHA-256 ") {
		t.Errorf("x509 enrollment from a DER file: %s", out)
	}
	if out := c.ok("enrollment-group", "create", "--group-id", "tpms", "--attestation-type", "tpm", "--certificate-path", caPath); !strings.Contains(out, "CN=Fleet CA") {
		t.Errorf("TPM group by its makers' CA: %s", out)
	}
	if out := c.ok("enrollment-group", "create", "--group-id", "cams", "--attestation-type", "x509", "--certificate-path", caPath); !strings.Contains(out, "CN=Fleet CA") {
		t.Errorf("x509 group: %s", out)
	}
	c.ok("certificate", "create", "--name", "fleet-ca", "--path", caPath, "--verified")
	if out := c.ok("certificate", "show", "--name", "fleet-ca"); !strings.Contains(out, "CN=Fleet CA") {
		t.Errorf("certificate show: %s", out)
	}
	c.ok("certificate", "create", "--name", "pending-ca", "--path", caPath)
	if out := c.ok("certificate", "list"); len(grepLines(out, "fleet-ca", "CN=Fleet CA", "true")) != 1 || len(grepLines(out, "pending-ca", "false")) != 1 {
		t.Errorf("certificate list: %s", out)
	}
	if out := c.ok("enrollment-group", "create", "--group-id", "cams-2", "--attestation-type", "x509", "--ca-name", "fleet-ca"); !strings.Contains(out, "fleet-ca") {
		t.Errorf("x509 group by CA name: %s", out)
	}

	// Linked hubs: the server's own is linked; its settings change in place.
	if out := c.ok("hub", "link", "--hostname", "localhost", "--allocation-weight", "3", "--latency", "10.0.0.0/8=20"); !strings.Contains(out, "10.0.0.0/8=20ms") {
		t.Errorf("hub link: %s", out)
	}
	if out := c.ok("hub", "list"); len(grepLines(out, "localhost", "3", "true", "10.0.0.0/8=20ms")) != 1 {
		t.Errorf("hub list: %s", out)
	}
	// Linking checks the hub takes its connection string, and warns when not.
	var site siteInfo
	_ = json.Unmarshal([]byte(c.ok("info", "-o", "json")), &site)
	if out := c.ok("hub", "link", "--hostname", "localhost", "--connection-string", site.HubConnectionString,
		"--endpoint", site.ServiceEndpoint, "--ca-cert", site.CACertificate); strings.Contains(out, "warning") {
		t.Errorf("linking a working hub warned: %s", out)
	}
	if out := c.ok("hub", "list"); len(grepLines(out, "localhost", "3", "true", "10.0.0.0/8=20ms")) != 1 {
		t.Errorf("a new connection string reset the hub's other settings: %s", out)
	}
	if out := c.ok("hub", "link", "--hostname", "localhost", "--clear-latency"); len(grepLines(out, "localhost", "3", "true", "-")) != 1 {
		t.Errorf("hub link --clear-latency: %s", out)
	}
	bogus := "HostName=bogus.example;SharedAccessKeyName=iothubowner;SharedAccessKey=" + base64.StdEncoding.EncodeToString(make([]byte, 32))
	if out := c.ok("hub", "link", "--hostname", "bogus.example", "--connection-string", bogus, "--endpoint", "https://127.0.0.1:1",
		"--apply-allocation-policy=false"); !strings.Contains(out, "warning: from this machine, hub bogus.example does not take its connection string") {
		t.Errorf("linking an unreachable hub: %s", out)
	}
	c.ok("hub", "unlink", "--hostname", "bogus.example")
	if out := c.ok("enrollment", "create", "--registration-id", "pinned", "--attestation-type", "symmetrickey", "--allocation-policy", "static",
		"--iot-hub-host-name", "localhost", "--reprovision-policy", "never", "-o", "json"); !strings.Contains(out, `"updateHubAssignment": false`) {
		t.Errorf("enrollment with allocation flags: %s", out)
	}
	if out := c.ok("enrollment", "show", "--registration-id", "pinned"); !strings.Contains(out, "static to localhost") {
		t.Errorf("a static enrollment: %s", out)
	}
	// Another policy unpins it: iotHubHostName would go on pinning hashed allocation.
	if out := c.ok("enrollment", "update", "--registration-id", "pinned", "--allocation-policy", "hashed"); !strings.Contains(out, "hashed among the linked hubs") {
		t.Errorf("a static enrollment made hashed: %s", out)
	}

	// Key rotation replaces one key and keeps the other.
	keys := func(args ...string) (string, string) {
		var e struct {
			Attestation struct {
				SymmetricKey struct{ PrimaryKey, SecondaryKey string } `json:"symmetricKey"`
			} `json:"attestation"`
		}
		if err := json.Unmarshal([]byte(c.ok(append(args, "-o", "json")...)), &e); err != nil {
			t.Fatal(err)
		}
		return e.Attestation.SymmetricKey.PrimaryKey, e.Attestation.SymmetricKey.SecondaryKey
	}
	p1, s1 := keys("enrollment", "show", "--registration-id", "pinned", "--show-keys")
	p2, s2 := keys("enrollment", "rotate-keys", "--registration-id", "pinned", "--key", "secondary")
	if p2 != p1 || s2 == s1 || s2 == "" {
		t.Errorf("rotating the secondary key: %s %s → %s %s", p1, s1, p2, s2)
	}
	gp1, gs1 := keys("enrollment-group", "create", "--group-id", "rot")
	gp2, gs2 := keys("enrollment-group", "rotate-keys", "--group-id", "rot", "--key", "primary")
	if gp2 == gp1 || gp2 == "" || gs2 != gs1 {
		t.Errorf("rotating the group's primary key: %s %s → %s %s", gp1, gs1, gp2, gs2)
	}

	// Import: readable rows go in; the others are listed with their line.
	csvPath := filepath.Join(dir, "fleet.csv")
	_ = os.WriteFile(csvPath, []byte("registrationId,attestation,iotEdge,tags\n"+
		"imp-1,symmetricKey,true,\"{\"\"site\"\":\"\"b7\"\"}\"\n"+
		"imp-2,,false,\n"+
		"imp-3,fingerprint,,\n"+
		"cam-1,symmetricKey,,\n"+
		"imp-4,symmetricKey,maybe,\n"+
		"IMP-1,symmetricKey,false,\n"+
		"imp-9\n"+
		",symmetricKey,,\n"+
		",symmetricKey,,\n"), 0o644)
	// Rows that cannot be read make the file import nothing, unless asked.
	out, err := c.run("enrollment", "import", "--file", csvPath)
	if err == nil || !strings.Contains(out, "imported 0 of 9") || !strings.Contains(out, "nothing was imported: 6 of 9 rows cannot be imported as they are") {
		t.Errorf("import of a file with unreadable rows: %v\n%s", err, out)
	}
	if _, err := c.run("enrollment", "show", "--registration-id", "imp-1"); err == nil {
		t.Error("a file with unreadable rows imported some")
	}
	out, err = c.run("enrollment", "import", "--file", csvPath, "--skip-invalid")
	last := -1
	for _, want := range []string{"imported 2 of 9", "line 4: attestation \"fingerprint\"", "line 5 (cam-1): enrollment cam-1 exists already",
		"line 6: iotEdge \"maybe\"", "line 7 (IMP-1): repeats line 2", "line 8: has 1 field where the header names 4 columns",
		"line 9: no registrationId", "line 10: no registrationId"} {
		i := strings.Index(out, want)
		if err == nil || i < last {
			t.Errorf("import output lacks %q, or not in the file's order (err %v):\n%s", want, err, out)
		}
		last = i
	}
	if out := c.ok("enrollment", "show", "--registration-id", "imp-1"); !strings.Contains(out, `{"site":"b7"}`) {
		t.Errorf("imported enrollment: %s", out)
	}
	// -o json reports for scripts.
	_ = os.WriteFile(csvPath, []byte("registrationId\nimp-1\nimp-10\n"), 0o644)
	out, err = c.run("enrollment", "import", "--file", csvPath, "-o", "json")
	var rep importReport
	if jerr := json.NewDecoder(strings.NewReader(out[strings.Index(out, "{"):])).Decode(&rep); err == nil || jerr != nil || rep.Imported != 1 || rep.Total != 2 ||
		len(rep.Failures) != 1 || rep.Failures[0].At != "line 2" || rep.Failures[0].RegistrationID != "imp-1" || !strings.Contains(rep.Failures[0].Error, "exists already") {
		t.Errorf("import -o json: %v %v\n%s", err, jerr, out)
	}
	jsonPath := filepath.Join(dir, "fleet.json")
	// As the hosted service exports them, with its optionalDeviceInformation.
	_ = os.WriteFile(jsonPath, []byte(`[{"registrationId":"imp-1","attestation":{"type":"symmetricKey"},"optionalDeviceInformation":null},`+
		`{"registrationId":"imp-5","attestation":{"type":"symmetricKey"},"optionalDeviceInformation":{"model":"x1"}}]`), 0o644)
	// Off a terminal (here, a buffer) there is no progress bar.
	if out := c.ok("enrollment", "import", "--file", jsonPath, "--mode", "update", "--batch", "1"); !strings.Contains(out, "imported 2 of 2") || strings.Contains(out, "\r") {
		t.Errorf("JSON import: %s", out)
	}
	if out := c.ok("enrollment", "show", "--registration-id", "imp-5", "-o", "json"); !strings.Contains(out, `"model": "x1"`) {
		t.Errorf("an imported enrollment's optionalDeviceInformation: %s", out)
	}

	// A misspelt field is reported, not left out unseen; a spreadsheet's byte order mark is no column.
	_ = os.WriteFile(jsonPath, []byte(`[{"registrationId":"imp-6","attestation":{"type":"symmetricKey"},"iotHubHostNmae":"x"}]`), 0o644)
	if out, err := c.run("enrollment", "import", "--file", jsonPath); err == nil || !strings.Contains(out, `element 1: not an enrollment: json: unknown field "iotHubHostNmae"`) {
		t.Errorf("JSON import with a misspelt field: %v %s", err, out)
	}
	bomCSV := filepath.Join(dir, "bom.csv")
	_ = os.WriteFile(bomCSV, []byte("\ufeffregistrationId,attestation\nimp-8,symmetricKey\n"), 0o644)
	if out := c.ok("enrollment", "import", "--file", bomCSV); !strings.Contains(out, "imported 1 of 1") {
		t.Errorf("CSV with a byte order mark: %s", out)
	}
	twiceCSV := filepath.Join(dir, "twice.csv")
	_ = os.WriteFile(twiceCSV, []byte("registrationId,deviceId,RegistrationID\nimp-11,d,imp-12\n"), 0o644)
	if out, err := c.run("enrollment", "import", "--file", twiceCSV); err == nil || !strings.Contains(out, `CSV column "RegistrationID" appears twice (columns 1 and 3): keep one`) {
		t.Errorf("import of a CSV naming a column twice: %v\n%s", err, out)
	}
	badCSV := filepath.Join(dir, "bad.csv")
	_ = os.WriteFile(badCSV, []byte("registrationId,attestation\nimp-6,symmetricKey\n\"imp-7,symmetricKey\nimp-13,symmetricKey\nimp-14\n"), 0o644)
	if out, err := c.run("enrollment", "import", "--file", badCSV, "--skip-invalid"); err == nil || !strings.Contains(out, "imported 1 of 2") ||
		!strings.Contains(out, "line 3: a quoted field opened on this line is still open at line 5") {
		t.Errorf("import of a CSV with a broken quote: %v\n%s", err, out)
	}
	for _, tc := range []struct{ name, file, want string }{
		{"extra.csv", "registrationId,attestation\nimp-15,symmetricKey,extra\n", "line 2: has 3 fields where the header names 2 columns"},
		{"one.json", `{"registrationId":"imp-16","attestation":{"type":"symmetricKey"}}`, "holds one object, not an array of enrollments: put the enrollments between [ and ]"},
		{"comma.json", "[\n  {\"registrationId\":\"imp-17\"},\n  ,\n]", "not valid JSON at line 3, column 3"},
		{"type.json", `[{"registrationId":"imp-18","attestation":{"type":"symmetricKey"},"capabilities":{"iotEdge":"yes"}}]`,
			"element 1: not an enrollment: capabilities.iotEdge is a JSON string where the field takes a boolean (true or false)"},
	} {
		path := filepath.Join(dir, tc.name)
		_ = os.WriteFile(path, []byte(tc.file), 0o644)
		if out, err := c.run("enrollment", "import", "--file", path); err == nil || !strings.Contains(out, tc.want) {
			t.Errorf("import of %s: %v, want %q in\n%s", tc.name, err, tc.want, out)
		}
	}

	// Mistakes get errors that say what to do, and exit non-zero.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"enrollment", "show", "--registration-id", "ghost"}, "no enrollment with registration ID"},
		{[]string{"enrollment", "create", "--registration-id", "x", "--attestation-type", "symmetrickey", "--initial-twin-tags", "{bad"}, "not valid JSON"},
		{[]string{"enrollment", "create", "--registration-id", "x"}, "--attestation-type is required"},
		{[]string{"enrollment", "create", "--registration-id", "x", "--attestation-type", "tpm", "--endorsement-key", "AAAA"}, "endorsementKey is not a TPM2B_PUBLIC"},
		{[]string{"enrollment-group", "create", "--group-id", "g", "--attestation-type", "tpm"}, "a TPM group needs --certificate-path"},
		{[]string{"enrollment", "create", "--registration-id", "x", "--attestation-type", "x509"}, "needs --certificate-path"},
		{[]string{"enrollment-group", "create", "--group-id", "g", "--attestation-type", "x509"}, "or --ca-name"},
		{[]string{"enrollment", "create", "--registration-id", "x", "--attestation-type", "symmetrickey", "--certificate-path", devPath}, "need --attestation-type x509"},
		{[]string{"enrollment", "create", "--registration-id", "x", "--attestation-type", "x509", "--certificate-path", caPath + ".missing"}, "no such file"},
		{[]string{"enrollment", "create", "--attestation-type", "tpm", "--endorsement-key", "AAAA"}, "--registration-id is required"},
		{[]string{"enrollment-group", "create", "--group-id", "g", "--attestation-type", "x509", "--certificate-path", devPath}, "not a CA certificate"},
		{[]string{"enrollment-group", "create", "--group-id", "g", "--attestation-type", "x509", "--ca-name", "ghost"}, "no certificate \"ghost\""},
		{[]string{"hub", "unlink", "--hostname", "ghost.example"}, "no linked hub"},
		{[]string{"enrollment", "rotate-keys", "--registration-id", "cam-1", "--key", "primary"}, "only symmetric keys rotate"},
		{[]string{"enrollment", "rotate-keys", "--registration-id", "pinned", "--key", "both"}, "use primary or secondary"},
		{[]string{"enrollment", "create", "--registration-id", "pinned", "--attestation-type", "symmetrickey"}, "exists already: to replace it, send its etag in If-Match (or \"*\" for any version) (HTTP 409); the update command changes it"},
		{[]string{"hub", "link", "--hostname", "ghost.example", "--allocation-weight", "2"}, "is not linked"},
		{[]string{"hub", "link", "--hostname", "localhost", "--latency", "10.0.0.0=5"}, "CIDR"},
		{[]string{"enrollment", "create", "--registration-id", "x", "--attestation-type", "symmetrickey", "--reprovision-policy", "sometimes"}, "use reprovisionandmigratedata"},
		{[]string{"enrollment", "create", "--registration-id", "x", "--attestation-type", "symmetrickey", "--allocation-policy", "custom"}, "needs customAllocationDefinition.webhookUrl"},
	} {
		out, err := c.run(tc.args...)
		if err == nil || !strings.Contains(out, tc.want) {
			t.Errorf("hatchery %s: err=%v, output %q; want an error containing %q", strings.Join(tc.args, " "), err, out, tc.want)
		}
	}
	c.ok("enrollment", "delete", "--registration-id", "dev-1")
	empty := &cli{t: t, bin: c.bin, dataDir: t.TempDir()}
	if out, err := empty.run("info"); err == nil || !strings.Contains(out, "hatchery serve") {
		t.Errorf("info without an installation: %v %s", err, out)
	}
}

func TestHubCLI(t *testing.T) {
	c := startServe(t)
	if out := c.ok("device", "create", "--device-id", "edge-1", "--edge-enabled"); !strings.Contains(out, "IoT Edge:          true") {
		t.Errorf("device create: %s", out)
	}
	// Numbers past 2^53 keep every digit, there and back.
	c.ok("twin", "update", "--device-id", "edge-1", "--tags", `{"environment":"prod","serial":12345678901234567890}`)
	if out := c.ok("twin", "show", "--device-id", "edge-1"); !strings.Contains(out, `"environment": "prod"`) || !strings.Contains(out, `"serial": 12345678901234567890`) {
		t.Errorf("twin show: %s", out)
	}
	if out := c.ok("query", "-q", "SELECT tags.serial FROM devices WHERE tags.serial > 0"); !strings.Contains(out, `"serial": 12345678901234567890`) {
		t.Errorf("query of a big number: %s", out)
	}
	c.ok("device", "create", "--device-id", "other")
	// The connection string `iotedge config mp -c` and the device SDKs take.
	var other struct {
		Authentication struct {
			SymmetricKey struct{ PrimaryKey, SecondaryKey string }
		}
	}
	if err := json.Unmarshal([]byte(c.ok("device", "show", "--device-id", "other", "-o", "json")), &other); err != nil {
		t.Fatal(err)
	}
	keys := other.Authentication.SymmetricKey
	if out := c.ok("device", "connection-string", "--device-id", "other"); out != "HostName=localhost;DeviceId=other;SharedAccessKey="+keys.PrimaryKey+"\n" {
		t.Errorf("device connection-string: %q", out)
	}
	if out := c.ok("device", "connection-string", "--device-id", "other", "--key", "secondary", "-o", "json"); !strings.Contains(out, `"connectionString": "HostName=localhost;DeviceId=other;SharedAccessKey=`+keys.SecondaryKey+`"`) {
		t.Errorf("device connection-string --key secondary -o json: %q", out)
	}
	if out, err := c.run("device", "connection-string", "--device-id", "other", "--key", "both"); err == nil || !strings.Contains(out, `--key "both": use primary or secondary`) {
		t.Errorf("device connection-string --key both: %v %s", err, out)
	}
	var twins []struct{ DeviceID string }
	if err := json.Unmarshal([]byte(c.ok("query", "-q", "SELECT * FROM devices WHERE tags.environment = 'prod'")), &twins); err != nil ||
		len(twins) != 1 || twins[0].DeviceID != "edge-1" {
		t.Errorf("query by tag: %v %+v", err, twins)
	}
	if out := c.ok("query", "-q", "SELECT COUNT() AS n FROM devices"); !strings.Contains(out, `"n": 2`) {
		t.Errorf("count query: %s", out)
	}
	if out, err := c.run("query", "-q", "SELECT * FROM nowhere"); err == nil || !strings.Contains(out, "nowhere") {
		t.Errorf("a query of no collection: %v %s", err, out)
	}
	manifest := "../../docs/examples/deployment.json" // the README's example
	out := c.ok("deployment", "create", "--deployment-id", "prod-sensor", "--content", manifest,
		"--target-condition", "tags.environment='prod'", "--priority", "10")
	if !strings.Contains(out, "Targeted:             1") || !strings.Contains(out, "Applied:              1") {
		t.Errorf("deployment create: %s", out)
	}
	if out := c.ok("deployment", "list"); !strings.Contains(out, "prod-sensor") {
		t.Errorf("deployment list: %s", out)
	}
	if out := c.ok("twin", "show", "--device-id", "edge-1", "--module-id", "$edgeAgent"); !strings.Contains(out, "registry.local/sensor:1.0") {
		t.Errorf("$edgeAgent twin: %s", out)
	}
	c.ok("edge", "set-modules", "--device-id", "edge-1", "--content", manifest)
	if out := c.ok("device", "disable", "--device-id", "edge-1"); !strings.Contains(out, "disabled") {
		t.Errorf("disable: %s", out)
	}
	if out := c.ok("device", "list"); !strings.Contains(out, "edge-1") || !strings.Contains(out, "disabled") {
		t.Errorf("device list: %s", out)
	}
	if out := c.ok("c2d", "send", "--device-id", "edge-1", "--data", `{"hello":1}`, "--props", "a=1"); !strings.Contains(out, "Message ID") {
		t.Errorf("c2d send: %s", out)
	}
	if out := c.ok("c2d", "send", "--device-id", "edge-1", "--ttl", "10m", "--data", "hello"); !strings.Contains(out, "Message ID") {
		t.Errorf("c2d send of text, with --ttl: %s", out)
	}
	if out, err := c.run("c2d", "send", "--device-id", "edge-1", "--ttl", "100h"); err == nil || !strings.Contains(out, "must be in the next 48 hours") {
		t.Errorf("c2d send with too long a ttl: %v %s", err, out)
	}
	if out := c.ok("c2d", "purge", "--device-id", "edge-1"); !regexp.MustCompile(`Messages purged:\s+2\b`).MatchString(out) {
		t.Errorf("c2d purge: %s", out)
	}
	c.ok("events", "tail")
	c.ok("events", "tail", "--device-id", "edge-1")
	c.ok("events", "tail", "--device", "edge-1") // as first spelt
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"twin", "update", "--device-id", "edge-1", "--tags", "[1]"}, "not a JSON object"},
		{[]string{"deployment", "create", "--deployment-id", "x", "--content", manifest, "--target-condition", "tags.a ="}, "targetCondition"},
		{[]string{"deployment", "create", "--deployment-id", "x", "--content", "/nonexistent.json", "--target-condition", "*"}, "no such file"},
		{[]string{"method", "invoke", "--device-id", "edge-1", "--method-name", "ping"}, "not connected"},
		{[]string{"device", "show", "--device-id", "ghost"}, "not registered"},
		{[]string{"device", "create", "--device-id", "x", "--auth-method", "x509_thumbprint", "--primary-thumbprint", "nothex"}, "not a SHA-1 or SHA-256"},
		{[]string{"device", "create", "--device-id", "x", "--auth-method", "password"}, "--auth-method"},
		{[]string{"certificate", "create", "--name", "c", "--path", manifest}, "not a PEM"},
	} {
		out, err := c.run(tc.args...)
		if err == nil || !strings.Contains(out, tc.want) {
			t.Errorf("hatchery %s: err=%v, output %q; want an error containing %q", strings.Join(tc.args, " "), err, out, tc.want)
		}
	}
	if out := c.ok("device", "create", "--device-id", "x509-1", "--auth-method", "x509_thumbprint",
		"--primary-thumbprint", strings.Repeat("ab", 32)); !strings.Contains(out, "selfSigned") || strings.Contains(out, "Primary key") ||
		len(grepLines(out, "Primary thumbprint", strings.Repeat("ab", 32))) != 1 {
		t.Errorf("x509 device: %s", out)
	}
	if out := c.ok("device", "connection-string", "--device-id", "x509-1"); out != "HostName=localhost;DeviceId=x509-1;x509=true\n" {
		t.Errorf("an X.509 device's connection string: %q", out)
	}
	if out, err := c.run("device", "connection-string", "--device-id", "x509-1", "--key", "secondary"); err == nil || !strings.Contains(out, "leave out --key") {
		t.Errorf("an X.509 device's connection string with --key: %v %s", err, out)
	}
	c.ok("deployment", "delete", "--deployment-id", "prod-sensor")
	c.ok("device", "delete", "--device-id", "edge-1")
}

// grepLines returns the lines of out holding every word.
func grepLines(out string, words ...string) []string {
	var found []string
	for _, l := range strings.Split(out, "\n") {
		all := true
		for _, w := range words {
			all = all && strings.Contains(l, w)
		}
		if all {
			found = append(found, l)
		}
	}
	return found
}

// The fleet simulator enrolls, provisions and connects simulated devices of
// both kinds against the running server, and says so.
func TestFleetSimulate(t *testing.T) {
	c := startServe(t)
	run := func(args ...string) map[string]any {
		t.Helper()
		var r map[string]any
		out := c.ok(append([]string{"fleet", "simulate", "-o", "json", "--concurrency", "4"}, args...)...)
		if err := json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &r); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		return r
	}
	if help := c.ok("fleet", "simulate", "--help"); !strings.Contains(help, "sim-0-0") || strings.Contains(help, "(default 8883)") {
		t.Errorf("help:\n%s", help)
	}
	r := run("--devices", "30", "--rate", "200", "--probe", "20ms")
	if r["provisioned"] != float64(30) || len(r["errors"].(map[string]any)) != 0 || r["serverCpuMsPerRegistration"] == nil ||
		r["throttled"] != float64(0) || r["serverCpuNote"] != nil {
		t.Fatalf("symmetric-key fleet: %v", r)
	}
	// The operator's request timed while the devices registered (30 at
	// 200/s take 150 ms: a few, each answered).
	if p, _ := r["probe"].(map[string]any); p == nil || p["count"].(float64) < 1 || r["probeErrors"] != nil {
		t.Fatalf("probe: %v", r)
	}
	if r := run("--devices", "30", "--skip-enroll"); r["provisioned"] != float64(30) || r["enrolledBefore"] != float64(30) {
		t.Fatalf("the same fleet again: %v", r)
	}
	if out := c.ok("registration", "show", "--registration-id", "sim-0-7"); len(grepLines(out, "Status", "assigned")) != 1 {
		t.Errorf("registration show: %s", out)
	}
	c.ok("registration", "delete", "--registration-id", "sim-0-7")
	if out, err := c.run("registration", "show", "--registration-id", "sim-0-7"); err == nil || !strings.Contains(out, "has not registered") {
		t.Errorf("a deleted registration record: %v %s", err, out)
	}
	r = run("--devices", "4", "--attestation", "tpm", "--key-pool", "2", "--prefix", "tpm-", "--connect", "--mqtt-port", strconv.Itoa(c.mqttPort))
	if r["provisioned"] != float64(4) || r["connected"] != float64(4) {
		t.Fatalf("TPM fleet: %v", r)
	}
	// Runs split between replicas (here the same server twice) count and
	// measure only once all have enrolled: 30 + 4 + 40 enrollments. They
	// report the whole fleet's rate, not a run's.
	url := "https://127.0.0.1:" + strconv.Itoa(c.httpsPort)
	if r := run("--devices", "40", "--prefix", "rep-", "--replicas", url+","+url, "--rate", "400"); r["provisioned"] != float64(40) ||
		r["enrolledBefore"] != float64(74) || r["rate"] != float64(400) || r["enrollmentsPerSecond"] == nil {
		t.Fatalf("fleet split between replicas: %v", r)
	}
	// Devices nobody enrolled fail, by kind.
	out, err := c.run("fleet", "simulate", "--devices", "3", "--skip-enroll", "--prefix", "ghost-")
	if err == nil || !strings.Contains(out, "Failed: HTTP 401 (errorCode 401002):") {
		t.Fatalf("unenrolled fleet: %v\n%s", err, out)
	}
	// Devices provisioned but not connected fail as hub failures.
	out, err = c.run("fleet", "simulate", "--devices", "2", "--prefix", "nohub-", "--connect", "--mqtt-port", strconv.Itoa(testutil.FreePort(t)))
	if err == nil || !strings.Contains(out, "Failed: hub: connection refused or reset:") || !strings.Contains(out, "2 provisioned devices did not connect") {
		t.Fatalf("fleet without a hub: %v\n%s", err, out)
	}

	// Interrupted, it reports what it measured until then, and fails.
	registered := func() int {
		var regs []json.RawMessage
		_ = json.Unmarshal([]byte(c.ok("registration", "list", "-o", "json")), &regs)
		return len(regs)
	}
	before := registered()
	var stdout bytes.Buffer
	sim := exec.Command(c.bin, "fleet", "simulate", "--data-dir", c.dataDir, "--devices", "1000", "--rate", "50",
		"--prefix", "stop-", "--replicas", url+","+url, "-o", "json")
	sim.Stdout = &stdout
	if err := sim.Start(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); registered() < before+5; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the fleet did not start registering")
		}
	}
	if err := sim.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	err = sim.Wait()
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		t.Fatalf("%v\n%s", err, stdout.String())
	}
	if err == nil || r["interrupted"] != true || r["provisioned"].(float64) < 5 || r["provisioned"].(float64) >= 1000 {
		t.Fatalf("interrupted fleet: %v %v", err, r)
	}
}

// A command whose server is down says what to start.
func TestCLIServerNotRunning(t *testing.T) {
	c := startServe(t)
	if err := syscall.Kill(c.serverPID, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		conn, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(c.httpsPort))
		if err != nil {
			break // stopped
		}
		conn.Close()
		if time.Now().After(deadline) {
			t.Fatal("the server did not stop")
		}
	}
	out, err := c.run("enrollment", "list")
	if err == nil || !strings.Contains(out, "is unreachable") || !strings.Contains(out, "is the server running? (hatchery serve --data-dir "+c.dataDir) {
		t.Fatalf("a command with the server down: %v\n%s", err, out)
	}
}
