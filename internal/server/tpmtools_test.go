package server

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/testutil"
)

// An independent TPM client — tpm2-tools on swtpm, driven step by step over
// plain HTTPS — completes a registration: it activates the 401 challenge,
// signs the SAS in the TPM, polls to "assigned", imports the hub key the
// same way, and the hub accepts a token signed with it.
func TestTPMRegistrationWithTPM2Tools(t *testing.T) {
	e := newEnv(t)
	tools := testutil.NewTPM2Tools(t, testutil.StartSWTPM(t))
	ek, srk := tools.CreateKeys()
	sum := sha256.Sum256(ek)
	regID := hex.EncodeToString(sum[:]) // the seed script's registration ID
	e.putEnrollment(&dps.Enrollment{RegistrationID: regID, DeviceID: "tools-device",
		Attestation:  dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EndorsementKey: base64.StdEncoding.EncodeToString(ek)}},
		Capabilities: &dps.Capabilities{IoTEdge: true}})
	scope := e.dps.IDScope()
	base := "/" + scope + "/registrations/" + regID

	body := `{"registrationId":"` + regID + `","tpm":{"endorsementKey":"` + base64.StdEncoding.EncodeToString(ek) +
		`","storageRootKey":"` + base64.StdEncoding.EncodeToString(srk) + `"}}`
	st, ch := e.raw("PUT", base+"/register?api-version=2021-06-01", "", body)
	if st != 401 || ch["keyName"] != "registration" {
		t.Fatalf("challenge: %d %v", st, ch)
	}
	blob, err := base64.StdEncoding.DecodeString(ch["authenticationKey"].(string))
	if err != nil {
		t.Fatal(err)
	}
	challengeKey := tools.Activate(blob)
	tpmSign := func(ctx string) func([]byte) ([]byte, error) {
		return func(data []byte) ([]byte, error) { return tools.HMAC(ctx, data), nil }
	}
	tok, err := sas.BuildSigned(tpmSign(challengeKey), scope+"/registrations/"+regID, "registration", time.Now().Add(30*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	// The Identity Service sends no tpm object on its authenticated PUT.
	st, op := e.raw("PUT", base+"/register?api-version=2021-06-01", tok, `{"registrationId":"`+regID+`"}`)
	if st != 202 || op["status"] != "assigning" || op["operationId"] == "" {
		t.Fatalf("register: %d %v", st, op)
	}
	st, res := e.raw("GET", base+"/operations/"+op["operationId"].(string)+"?api-version=2021-06-01", tok, "")
	if st != 200 || res["status"] != "assigned" {
		t.Fatalf("poll: %d %v", st, res)
	}
	state := res["registrationState"].(map[string]any)
	if state["deviceId"] != "tools-device" || state["assignedHub"] != host {
		t.Fatalf("registration state %v", state)
	}
	hubBlob, err := base64.StdEncoding.DecodeString(state["tpm"].(map[string]any)["authenticationKey"].(string))
	if err != nil {
		t.Fatal(err)
	}
	hubKey := tools.Activate(hubBlob)
	hubTok, err := sas.BuildSigned(tpmSign(hubKey), host+"/devices/tools-device", "", time.Now().Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if st, b := e.raw("POST", "/devices/tools-device/messages/events?api-version=2020-09-30", hubTok, `{"signed":"in the TPM"}`); st != 204 {
		t.Fatalf("hub refused the TPM-signed token: %d %v", st, b)
	}
	// The challenge key is not a hub key.
	wrongTok, _ := sas.BuildSigned(tpmSign(challengeKey), host+"/devices/tools-device", "", time.Now().Add(time.Minute))
	if st, _ := e.raw("POST", "/devices/tools-device/messages/events?api-version=2020-09-30", wrongTok, `{}`); st != 401 {
		t.Fatalf("challenge key accepted by the hub: %d", st)
	}
	// Status lookup with the registration token.
	if st, r := e.raw("POST", base+"?api-version=2021-06-01", tok, ""); st != 200 || r["status"] != "assigned" || !strings.EqualFold(r["registrationId"].(string), regID) {
		t.Fatalf("status lookup: %d %v", st, r)
	}
}
