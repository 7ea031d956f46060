package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/testutil"
)

// FuzzReadImport feeds arbitrary files to the import readers: they must not
// panic, and every row they return must carry an enrollment to send or the
// error to report for its line, never neither.
func FuzzReadImport(f *testing.F) {
	for _, seed := range []string{
		"registrationId,attestation,endorsementKey\ncam-1,tpm,AToAAQALAAMAsgAg\n",
		"registrationId,attestation,primaryKey,iotEdge,tags\ncam-2,symmetricKey,a2V5,true,\"{\"\"env\"\":\"\"prod\"\"}\"\n",
		"registrationId,attestation,certificate\ncam-3,x509,missing.pem\ncam-4,x509,-----BEGIN\n",
		"registrationId,attestation\n\"cam-5,tpm\ncam-6\n",
		"registrationId,colour\ncam-7,red\n",
		`[{"registrationId":"cam-8","attestation":{"type":"tpm","tpm":{"endorsementKey":"AA=="}}}, 7, null]`,
		`[{"registrationId":`,
	} {
		f.Add([]byte(seed))
	}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		for name, read := range map[string]func([]byte) ([]importRow, error){
			"CSV":  func(b []byte) ([]importRow, error) { return readImportCSV(b, dir) },
			"JSON": readImportJSON,
		} {
			rows, err := read(data)
			if err != nil {
				if rows != nil {
					t.Fatalf("%s: rows %v beside the file's error %v", name, rows, err)
				}
				continue
			}
			for _, r := range rows {
				if r.e == nil && r.err == nil {
					t.Fatalf("%s: %s has neither an enrollment nor an error", name, r.at)
				}
			}
		}
	})
}

// Ctrl-C during an import ends it with the report of what it did and where
// to go on from.
func TestImportInterrupted(t *testing.T) {
	c := startServe(t)
	var rows strings.Builder
	rows.WriteString("registrationId\n")
	const n = 30000
	for i := range n {
		fmt.Fprintf(&rows, "int-%d\n", i)
	}
	file := filepath.Join(t.TempDir(), "many.csv")
	if err := os.WriteFile(file, []byte(rows.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(c.bin, "enrollment", "import", "--file", file, "--batch", "10", "--data-dir", c.dataDir)
	var stdout, stderr testutil.SyncBuffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Off a terminal there is no progress bar: the first enrollment in says it has started.
	started := func() bool { _, err := c.run("enrollment", "show", "--registration-id", "int-0"); return err == nil }
	for deadline := time.Now().Add(30 * time.Second); !started(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the import has not started after 30 s:\n%s", stderr.String())
		}
	}
	_ = cmd.Process.Signal(os.Interrupt)
	err := cmd.Wait()
	m := regexp.MustCompile(`imported (\d+) of 30000 enrollments`).FindStringSubmatch(stdout.String())
	if err == nil || m == nil || m[1] == "30000" || !strings.Contains(stderr.String(), "interrupted (those of the rows before it are in") ||
		!strings.Contains(stderr.String(), "import the file again with --mode update") {
		t.Fatalf("interrupted import: %v\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}
}

// A CSV row sets every setting the enrollment flags do: the initial twin's
// desired properties, linked hubs, a webhook and a reprovision policy.
func TestImportCSVSettings(t *testing.T) {
	rows, err := readImportCSV([]byte("registrationId,allocationPolicy,iotHubs,webhookUrl,webhookApiVersion,reprovisionPolicy,tags,desired\n"+
		`cam-1,custom,hub-a.example;hub-b.example,https://alloc.example/api,2019-03-31,never,"{""site"":""a""}","{""interval"":10}"`+"\n"+
		"cam-2,,,,,sometimes,,\n"+
		`cam-3,,,,,,,"[1]"`+"\n"), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	e := rows[0].e
	if rows[0].err != nil || e.AllocationPolicy != "custom" || strings.Join(e.IoTHubs, ",") != "hub-a.example,hub-b.example" ||
		e.CustomAllocationDefinition == nil || e.CustomAllocationDefinition.WebhookURL != "https://alloc.example/api" ||
		e.CustomAllocationDefinition.APIVersion != "2019-03-31" ||
		e.ReprovisionPolicy == nil || e.ReprovisionPolicy.UpdateHubAssignment || e.InitialTwin == nil ||
		string(e.InitialTwin.Tags) != `{"site":"a"}` || e.InitialTwin.Properties == nil || string(e.InitialTwin.Properties.Desired) != `{"interval":10}` {
		t.Fatalf("row 1: %+v %v", e, rows[0].err)
	}
	if err := rows[1].err; err == nil || !strings.Contains(err.Error(), `reprovisionPolicy "sometimes": use reprovisionandmigratedata, reprovisionandresetdata or never`) {
		t.Errorf("row 2: %v", err)
	}
	if err := rows[2].err; err == nil || !strings.Contains(err.Error(), `desired "[1]" is not a JSON object`) {
		t.Errorf("row 3: %v", err)
	}
}
