package main

import (
	"testing"
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
