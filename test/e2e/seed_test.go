package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/moby/mobytest"
	"github.com/hatchery/hatchery/internal/hubdevice"
)

// TestSeedFlow is the seed documents' walkthrough with Hatchery in place
// of the cloud: read the TPM's registration information with the seed's
// script, enroll it, fill config.toml from the template, apply it, and
// watch the device provision, connect and run what a deployment targeting
// its tags asks for.
func TestSeedFlow(t *testing.T) {
	requireTools(t)
	engine := mobytest.New(t)
	image := engine.Image("")
	s := startSite(t)
	d := newDevice(t, s)

	// 1. The TPM's registration ID and endorsement key, with the seed's script.
	regID, ek := provisionInfo(t, d.tcti)

	// 2. The individual enrollment, as `az iot dps enrollment create`.
	out := s.hatchery("enrollment", "create", "--attestation-type", "tpm", "--registration-id", regID,
		"--endorsement-key", ek, "--device-id", "seed-device", "--edge-enabled", "--initial-twin-tags", `{"environment":"prod"}`)
	if !strings.Contains(out, "unassigned") {
		t.Fatalf("new enrollment:\n%s", out)
	}

	// 3. The runtime, config.toml from the template, `iotedge config apply`.
	// aziot-tpmd then starts as its packaged unit does: with the settings
	// config apply wrote for it, as config.toml is not its to read.
	d.startDaemon()
	d.writeConfig(d.configFromTemplate(regID))
	if out := d.mustIotedge("config", "apply"); !strings.Contains(out, "Done") {
		t.Fatalf("config apply:\n%s", out)
	}
	d.startTPMD("--config", d.tpmdConfigPath())
	eventually(t, 60*time.Second, func() string {
		out, _ := d.iotedge("system", "status")
		if !strings.Contains(out, "Hub:          connected") {
			return "system status says:\n" + out
		}
		return ""
	})
	status := d.mustIotedge("system", "status")
	for _, want := range []string{"iotedged", "Running", "seed-device on hub localhost, provisioned by dps/tpm"} {
		if !strings.Contains(status, want) {
			t.Errorf("system status lacks %q:\n%s", want, status)
		}
	}
	// The seed's check that the runtime runs: edgeAgent in `iotedge list`.
	if out := d.mustIotedge("list"); len(grep(out, "edgeAgent", "running")) != 1 {
		t.Errorf("iotedge list before any deployment:\n%s", out)
	}

	// 4. The enrollment shows "assigned" and the device ID.
	out = s.hatchery("enrollment", "show", "--registration-id", regID)
	if !strings.Contains(out, "assigned") || !strings.Contains(out, "seed-device") || strings.Contains(out, "unassigned") {
		t.Fatalf("enrollment after provisioning:\n%s", out)
	}

	// 5. A deployment targeting the device's tags puts a module on it.
	manifest := filepath.Join(t.TempDir(), "deployment.json")
	writeManifest(t, manifest, map[string]any{"sensor": module(image, "always", "-print", "sensor started")})
	s.hatchery("deployment", "create", "--deployment-id", "prod-sensors", "--content", manifest,
		"--target-condition", "tags.environment='prod'", "--priority", "10")
	eventually(t, 60*time.Second, func() string {
		out, _ := d.iotedge("list")
		if len(grep(out, "sensor", "running", image)) == 0 {
			return "iotedge list says:\n" + out
		}
		return ""
	})
	eventually(t, 30*time.Second, func() string {
		out := s.hatchery("deployment", "show", "--deployment-id", "prod-sensors", "--output", "json")
		var c struct {
			SystemMetrics struct{ Results map[string]int } `json:"systemMetrics"`
		}
		_ = json.Unmarshal([]byte(out), &c)
		if c.SystemMetrics.Results["reportedSuccessfulCount"] != 1 {
			return "deployment metrics: " + out
		}
		return ""
	})
	if out := d.mustIotedge("logs", "sensor"); !strings.Contains(out, "sensor started") {
		t.Errorf("iotedge logs sensor:\n%s", out)
	}
	if out := d.mustIotedge("system", "logs"); !strings.Contains(out, "connected to the hub") {
		t.Errorf("iotedge system logs:\n%s", out)
	}
	if out, err := d.iotedge("check"); err != nil {
		t.Errorf("iotedge check: %v\n%s", err, out)
	}

	// 6. After the agent renewed its hub token (connecting again), a new
	// deployment still reaches it.
	eventually(t, 2*hubTokenLifetime, func() string {
		if out := d.mustIotedge("system", "logs"); !strings.Contains(out, "connecting to the hub again with a new token") {
			return "no token renewal in the system logs:\n" + out
		}
		return ""
	})
	writeManifest(t, manifest, map[string]any{"sensor": module(image, "always", "-print", "sensor v2")})
	s.hatchery("deployment", "create", "--deployment-id", "prod-sensors-v2", "--content", manifest,
		"--target-condition", "tags.environment='prod'", "--priority", "20")
	eventually(t, 60*time.Second, func() string {
		if out, _ := d.iotedge("logs", "sensor"); !strings.Contains(out, "sensor v2") {
			return "iotedge logs sensor:\n" + out
		}
		return ""
	})
}

// module is a deployment manifest entry running the test image.
func module(image, restartPolicy string, args ...string) map[string]any {
	opts, _ := json.Marshal(map[string]any{"Cmd": args})
	return map[string]any{"type": "docker", "status": "running", "restartPolicy": restartPolicy, "version": "1.0",
		"settings": map[string]any{"image": image, "createOptions": string(opts)}}
}

func writeManifest(t testing.TB, path string, modules map[string]any) {
	m := map[string]any{"modulesContent": map[string]any{
		"$edgeAgent": map[string]any{"properties.desired": map[string]any{
			"schemaVersion": "1.1",
			"runtime":       map[string]any{"type": "docker", "settings": map[string]any{"minDockerVersion": "v1.25"}},
			"systemModules": map[string]any{
				"edgeAgent": map[string]any{"type": "docker", "settings": map[string]any{"image": "mcr.microsoft.com/azureiotedge-agent:1.5"}},
				"edgeHub": map[string]any{"type": "docker", "status": "running", "restartPolicy": "always",
					"settings": map[string]any{"image": "mcr.microsoft.com/azureiotedge-hub:1.5"}},
			},
			"modules": modules,
		}},
		"$edgeHub": map[string]any{"properties.desired": map[string]any{"schemaVersion": "1.1", "routes": map[string]any{},
			"storeAndForwardConfiguration": map[string]any{"timeToLiveSecs": 7200}}},
	}}
	b, _ := json.MarshalIndent(m, "", "  ")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// Modules get the environment the Azure IoT SDKs read, and a workload
// socket of their own that signs tokens for their identity only; the hub
// accepts those tokens.
func TestModuleIdentityThroughWorkloadAPI(t *testing.T) {
	image := mobytest.New(t).Image("")
	s, d, _ := provisioned(t, "")
	deploy(t, s, "base", "10", map[string]any{
		"reader": module(image, "always", "-env", "IOTEDGE_DEVICEID,IOTEDGE_MODULEID,IOTEDGE_IOTHUBHOSTNAME,IOTEDGE_WORKLOADURI,IOTEDGE_AUTHSCHEME"),
	})
	d.waitModule("reader", "running")
	out := d.mustIotedge("logs", "reader")
	for _, want := range []string{"IOTEDGE_DEVICEID=edge-1", "IOTEDGE_MODULEID=reader", "IOTEDGE_IOTHUBHOSTNAME=localhost",
		"IOTEDGE_WORKLOADURI=unix:///var/run/iotedge/workload.sock", "IOTEDGE_AUTHSCHEME=sasToken"} {
		if !strings.Contains(out, want) {
			t.Errorf("module environment lacks %s:\n%s", want, out)
		}
	}

	if st, _ := d.workloadToken("reader", "reader", "localhost/devices/edge-1/modules/other"); st != http.StatusForbidden {
		t.Fatalf("signing another module's token: HTTP %d", st)
	}
	if st, _ := d.workloadToken("reader", "other", "localhost/devices/edge-1/modules/other"); st != http.StatusForbidden {
		t.Fatalf("asking the reader's socket for another module: HTTP %d", st)
	}
	st, token := d.workloadToken("reader", "reader", "localhost/devices/edge-1/modules/reader")
	if st != http.StatusOK {
		t.Fatalf("signing the module's own token: HTTP %d", st)
	}
	s.sendAsModule("edge-1", "reader", token)
}

// workloadToken does what ModuleClient.fromEnvironment does: it asks the
// workload socket of socketOf to sign "{resource}\n{expiry}" for module. It
// returns the HTTP status and the token.
func (d *device) workloadToken(socketOf, module, resource string) (int, string) {
	t := d.t
	socket := filepath.Join(d.dir, "run", "workload", socketOf, "workload.sock")
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", socket)
	}}}
	se := strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10)
	sr := url.QueryEscape(resource)
	body, _ := json.Marshal(map[string]string{"keyId": "primary", "algo": "HMACSHA256", "data": base64.StdEncoding.EncodeToString([]byte(sr + "\n" + se))})
	resp, err := client.Post("http://workload/modules/"+module+"/genid/1/sign?api-version=2019-01-30", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var r struct{ Digest string }
	_ = json.NewDecoder(resp.Body).Decode(&r)
	return resp.StatusCode, "SharedAccessSignature sr=" + sr + "&sig=" + url.QueryEscape(r.Digest) + "&se=" + se
}

// sendAsModule connects to the hub as a module with token and sends a message.
func (s *site) sendAsModule(device, module, token string) {
	t := s.t
	t.Helper()
	ca, _ := os.ReadFile(s.CA)
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(ca)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := hubdevice.Dial(ctx, hubdevice.Options{Host: "localhost", Port: s.mqtt, DeviceID: device, ModuleID: module,
		TLS:  &tls.Config{RootCAs: roots},
		Sign: func(string, time.Time) (string, error) { return token, nil }})
	if err != nil {
		t.Fatalf("the hub refused the module's token: %v", err)
	}
	defer c.Close()
	if err := c.SendEvent(ctx, []byte(`{"from":"`+module+`"}`), nil); err != nil {
		t.Fatal(err)
	}
}
