package server

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/hubdevice"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/softtpm"
	"github.com/hatchery/hatchery/internal/testutil"
	"github.com/hatchery/hatchery/internal/tpm"
)

// Hatchery's own device-side TPM client provisions against the service on
// a real TPM (swtpm): challenge, activation, signed registration, hub key.
func TestTPMRegistrationWithGoClient(t *testing.T) {
	e := newEnv(t)
	dev, err := tpm.Open(testutil.StartSWTPM(t))
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	ek, err := dev.EndorsementKey()
	if err != nil {
		t.Fatal(err)
	}
	regID := attest.RegistrationID(ek)
	e.putEnrollment(&dps.Enrollment{RegistrationID: regID, DeviceID: "tpm-edge-1",
		Attestation:  dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EndorsementKey: base64.StdEncoding.EncodeToString(ek)}},
		Capabilities: &dps.Capabilities{IoTEdge: true},
		InitialTwin:  &dps.InitialTwin{Tags: json.RawMessage(`{"environment":"prod"}`)}})

	handle := tpm.IdentityHandle(tpm.DefaultAuthKeyIndex)
	res, err := e.device(regID).RegisterTPM(ctx, dev, handle)
	if err != nil {
		t.Fatal(err)
	}
	if res.Status != "assigned" || res.DeviceID != "tpm-edge-1" || res.AssignedHub != host {
		t.Fatalf("result %+v", res)
	}
	// The hub key now lives in the TPM: a token it signs is accepted for
	// this device, and the hub holds the same key.
	sign := func(data []byte) ([]byte, error) { return dev.HMAC(handle, data) }
	tok, err := sas.BuildSigned(sign, host+"/devices/tpm-edge-1", "", time.Now().Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if st, body := e.raw("POST", "/devices/tpm-edge-1/messages/events?api-version=2020-09-30", tok, `{"hello":"tpm"}`); st != 204 {
		t.Fatalf("TPM-signed telemetry: %d %v", st, body)
	}
	var d hub.Device
	if err := e.hubAPI.Do(ctx, "GET", "/devices/tpm-edge-1", "", nil, &d); err != nil {
		t.Fatal(err)
	}
	if !d.Capabilities.IoTEdge {
		t.Fatal("device is not edge-enabled")
	}
	// The service API never returns the activation blob.
	reg, err := e.dps.GetRegistration(ctx, regID)
	if err != nil || reg.TPM != nil || reg.Status != "assigned" {
		t.Fatalf("registration record %+v %v", reg, err)
	}
	// A second registration issues a new hub key; the old token stops working.
	if _, err := e.device(regID).RegisterTPM(ctx, dev, handle); err != nil {
		t.Fatal(err)
	}
	if st, _ := e.raw("POST", "/devices/tpm-edge-1/messages/events?api-version=2020-09-30", tok, `{}`); st != 401 {
		t.Fatalf("old hub key still accepted: %d", st)
	}
}

// A TPM whose EK is not the enrolled one gets no challenge.
func TestTPMWrongEndorsementKey(t *testing.T) {
	e := newEnv(t)
	dev, err := tpm.Open(testutil.StartSWTPM(t))
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	e.putEnrollment(&dps.Enrollment{RegistrationID: "tpm-x",
		Attestation: dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EndorsementKey: testEK(t)}}})
	before := e.counts()
	_, err = e.device("tpm-x").RegisterTPM(ctx, dev, tpm.IdentityHandle(tpm.DefaultAuthKeyIndex))
	if err == nil {
		t.Fatal("registered with another EK")
	}
	if after := e.counts(); after["dps.challenge"] != before["dps.challenge"] {
		t.Fatal("a challenge was stored for a foreign EK")
	}
}

// A TPM device provisioned through DPS connects over MQTT with tokens its
// TPM signs, and is refused once the operator disables it.
func TestTPMDeviceConnectsOverMQTT(t *testing.T) {
	e := newEnv(t)
	addr := e.startMQTT()
	dev, err := tpm.Open(testutil.StartSWTPM(t))
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	ek, err := dev.EndorsementKey()
	if err != nil {
		t.Fatal(err)
	}
	regID := attest.RegistrationID(ek)
	e.putEnrollment(&dps.Enrollment{RegistrationID: regID, DeviceID: "tpm-mqtt",
		Attestation: dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EndorsementKey: base64.StdEncoding.EncodeToString(ek)}}})
	handle := tpm.IdentityHandle(tpm.DefaultAuthKeyIndex)
	if _, err := e.device(regID).RegisterTPM(ctx, dev, handle); err != nil {
		t.Fatal(err)
	}
	tlsConf := e.tls.Clone()
	tlsConf.ServerName = "example.com"
	opts := hubdevice.Options{Host: host, Addr: addr, DeviceID: "tpm-mqtt", TLS: tlsConf,
		Sign: func(aud string, exp time.Time) (string, error) {
			return sas.BuildSigned(func(data []byte) ([]byte, error) { return dev.HMAC(handle, data) }, aud, "", exp)
		}}
	c, err := hubdevice.Dial(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SendEvent(ctx, []byte(`{"from":"tpm"}`), nil); err != nil {
		t.Fatal(err)
	}
	c.Close()
	var d hub.Device
	if err := e.hubAPI.Do(ctx, "GET", "/devices/tpm-mqtt", "", nil, &d); err != nil {
		t.Fatal(err)
	}
	d.Status = "disabled"
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/tpm-mqtt", "*", d, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := hubdevice.Dial(ctx, opts); !errors.Is(err, hubdevice.ErrNotAuthorized) {
		t.Fatalf("disabled TPM device: %v", err)
	}
}

// A challenge answered after the operator enrolled another TPM under the
// registration ID admits nothing: the replaced TPM gets no hub key.
func TestTPMChallengeOfAReplacedTPM(t *testing.T) {
	e := newEnv(t)
	newTPM := func() (*softtpm.TPM, string, string) {
		k, err := softtpm.NewKeys()
		if err != nil {
			t.Fatal(err)
		}
		d := softtpm.New(k)
		ek, _ := d.EndorsementKey()
		srk, _ := d.StorageRootKey()
		return d, base64.StdEncoding.EncodeToString(ek), base64.StdEncoding.EncodeToString(srk)
	}
	replaced, ek1, srk1 := newTPM()
	_, ek2, _ := newTPM()
	const regID = "device-42"
	e.putEnrollment(&dps.Enrollment{RegistrationID: regID, Attestation: dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EndorsementKey: ek1}}})
	path := "/" + e.dps.IDScope() + "/registrations/" + regID + "/register?api-version=2021-06-01"
	st, ch := e.raw("PUT", path, "", `{"registrationId":"`+regID+`","tpm":{"endorsementKey":"`+ek1+`","storageRootKey":"`+srk1+`"}}`)
	if st != 401 || ch["authenticationKey"] == nil {
		t.Fatalf("challenge: %d %v", st, ch)
	}
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollments/"+regID, "*", &dps.Enrollment{RegistrationID: regID,
		Attestation: dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EndorsementKey: ek2}}}, nil); err != nil {
		t.Fatal(err)
	}
	blob, _ := base64.StdEncoding.DecodeString(ch["authenticationKey"].(string))
	h := tpm.IdentityHandle(tpm.DefaultAuthKeyIndex)
	if err := replaced.ImportActivationBlob(blob, h); err != nil {
		t.Fatal(err)
	}
	tok, err := sas.BuildSigned(func(d []byte) ([]byte, error) { return replaced.HMAC(h, d) }, e.dps.IDScope()+"/registrations/"+regID, "registration", time.Now().Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	before := e.counts()
	st, body := e.raw("PUT", path, tok, `{"registrationId":"`+regID+`"}`)
	wantError(t, st, body, 401, "not authorized")
	if after := e.counts(); after["dps.registration"] != before["dps.registration"] || after["hub.device"] != before["hub.device"] {
		t.Fatalf("a refused registration was stored: %v → %v", before, after)
	}
}
