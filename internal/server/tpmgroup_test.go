package server

import (
	"bytes"
	"context"
	"crypto"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/hubdevice"
	"github.com/hatchery/hatchery/internal/provisioning"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/softtpm"
	"github.com/hatchery/hatchery/internal/store"
	"github.com/hatchery/hatchery/internal/testutil"
	"github.com/hatchery/hatchery/internal/tpm"
)

// certifiedTPM is a new software TPM with an EK certificate from signer
// (none if nil).
func certifiedTPM(t *testing.T, signer *tls.Certificate) *softtpm.TPM {
	t.Helper()
	keys, err := softtpm.NewKeys()
	if err != nil {
		t.Fatal(err)
	}
	if signer != nil {
		if err := keys.Certify(signer.Leaf, signer.PrivateKey.(crypto.Signer)); err != nil {
			t.Fatal(err)
		}
	}
	return softtpm.New(keys)
}

// putTPMGroup creates a TPM group trusting the CA certificates of pem.
func (e *env) putTPMGroup(id, pem string) error {
	return e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/"+id, "", &dps.EnrollmentGroup{
		Attestation: dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EKCertificateAuthorities: &dps.X509Certificates{
			Primary: &dps.X509CertificateWithInfo{Certificate: pem}}}}}, nil)
}

// A TPM group trusts a manufacturer's CA: a TPM whose EK certificate it
// signed registers under the ID its EK determines, with no enrollment.
func TestTPMGroupByEKCertificate(t *testing.T) {
	e := newEnv(t)
	ca := testutil.NewCert(t, "Acme TPM CA", true, nil) // the TPM maker's CA, which signs EK certificates
	var g dps.EnrollmentGroup
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/acme-tpms", "", &dps.EnrollmentGroup{
		Attestation: dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EKCertificateAuthorities: &dps.X509Certificates{
			Primary: &dps.X509CertificateWithInfo{Certificate: certPEM(ca)}}}},
		Capabilities: &dps.Capabilities{IoTEdge: true}, InitialTwin: &dps.InitialTwin{Tags: []byte(`{"maker":"acme"}`)}}, &g); err != nil {
		t.Fatal(err)
	}
	newTPM := func(signer *tls.Certificate) (*softtpm.TPM, string) {
		dev := certifiedTPM(t, signer)
		ek, _ := dev.EndorsementKey()
		return dev, attest.RegistrationID(ek)
	}
	handle := tpm.IdentityHandle(tpm.DefaultAuthKeyIndex)

	dev, regID := newTPM(&ca)
	res, err := e.device(regID).RegisterTPM(ctx, dev, handle)
	if err != nil {
		t.Fatal(err)
	}
	if res.Status != "assigned" || res.DeviceID != regID || res.EnrollmentGroupID != "acme-tpms" {
		t.Fatalf("result %+v", res)
	}
	if tw := mustTwin(t, e, regID, ""); string(tw.Tags) != `{"maker":"acme"}` || !tw.Capabilities.IoTEdge {
		t.Fatalf("twin %s %+v", tw.Tags, tw.Capabilities)
	}
	// The hub key arrived inside the TPM: the device's token works on the hub.
	addr := e.startMQTT()
	tlsConf := e.tls.Clone()
	tlsConf.ServerName = "example.com"
	c, err := hubdevice.Dial(ctx, hubdevice.Options{Host: host, Addr: addr, DeviceID: regID, TLS: tlsConf,
		Sign: func(aud string, exp time.Time) (string, error) {
			return sas.BuildSigned(func(data []byte) ([]byte, error) { return dev.HMAC(handle, data) }, aud, "", exp)
		}})
	if err != nil {
		t.Fatalf("hub connection: %v", err)
	}
	c.Close()

	// Refused: another maker's certificate, no certificate, an ID the EK does not determine.
	other := testutil.NewCert(t, "Other TPM CA", true, nil)
	before := e.counts()
	log := captureLog(t)
	for what, tc := range map[string]struct {
		signer *tls.Certificate
		id     string
		want   string
	}{
		"another maker's CA": {&other, "", "does not chain to the CA of any TPM enrollment group"},
		"no EK certificate":  {nil, "", "sent no EK certificate"},
		"a chosen ID":        {&ca, "my-favourite-id", "registers as the ID its EK determines"},
	} {
		d, id := newTPM(tc.signer)
		if tc.id != "" {
			id = tc.id
		}
		// The device learns why only when the request itself shows it;
		// the rest is in the log (TestRefusalsDoNotRevealWhoExists).
		_, err := e.device(id).RegisterTPM(ctx, d, handle)
		if err == nil || !strings.Contains(err.Error()+log.String(), tc.want) {
			t.Errorf("%s: %v", what, err)
		}
	}
	if after := e.counts(); after["dps.registration"] != before["dps.registration"] || after["hub.device"] != before["hub.device"] {
		t.Fatalf("refused TPMs changed the store: %v → %v", before, after)
	}
	// A TPM group without CA certificates is refused.
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/bad", "", &dps.EnrollmentGroup{Attestation: dps.Attestation{Type: dps.AttestationTPM}}, nil); err == nil ||
		!strings.Contains(err.Error(), "ekCertificateAuthorities") {
		t.Fatalf("TPM group without CAs: %v", err)
	}
}

// reportsEK is a TPM that reports its EK's public area as ek: the same key
// in another encoding, which the TPM activates credentials for all the same.
type reportsEK struct {
	*softtpm.TPM
	ek []byte
}

func (r reportsEK) EndorsementKey() ([]byte, error) { return r.ek, nil }

// A TPM group's device registers under one registration ID, whatever
// encodings of its EK and spellings of the ID it tries, until its
// registration record is deleted.
func TestTPMGroupOneIDPerTPM(t *testing.T) {
	e := newEnv(t)
	ca := testutil.NewCert(t, "Acme TPM CA", true, nil)
	if err := e.putTPMGroup("acme-tpms", certPEM(ca)); err != nil {
		t.Fatal(err)
	}
	dev := certifiedTPM(t, &ca)
	ek, _ := dev.EndorsementKey()
	handle := tpm.IdentityHandle(tpm.DefaultAuthKeyIndex)
	register := func(ek []byte, id string) error {
		t.Helper()
		_, err := e.device(id).RegisterTPM(ctx, reportsEK{dev, ek}, handle)
		return err
	}
	hexID, base32ID := attest.RegistrationID(ek), attest.LegacyRegistrationID(ek)
	if err := register(ek, hexID); err != nil {
		t.Fatal(err)
	}
	// Offsets in the EK's TPM2B_PUBLIC: attributes 6, exponent 54.
	explicitExponent := bytes.Clone(ek)
	binary.BigEndian.PutUint32(explicitExponent[54:], 65537)
	noDA := bytes.Clone(ek)
	binary.BigEndian.PutUint32(noDA[6:], binary.BigEndian.Uint32(noDA[6:])|0x400)
	before := e.counts()
	for what, tc := range map[string]struct {
		ek []byte
		id string
	}{
		"the base32 ID":         {ek, base32ID},
		"exponent 65537":        {explicitExponent, attest.RegistrationID(explicitExponent)},
		"another attribute set": {noDA, attest.LegacyRegistrationID(noDA)},
	} {
		if err := register(tc.ek, tc.id); err == nil || !strings.Contains(err.Error(), "this TPM registered as "+hexID+" already") {
			t.Errorf("%s: %v", what, err)
		}
	}
	if after := e.counts(); after["dps.registration"] != before["dps.registration"] || after["hub.device"] != before["hub.device"] {
		t.Fatalf("refused registrations changed the store: %v → %v", before, after)
	}
	// Registering again as itself still works; deleting its record frees the TPM.
	if err := register(ek, hexID); err != nil {
		t.Fatal(err)
	}
	if err := e.dpsAPI.Do(ctx, "DELETE", "/registrations/"+hexID, "", nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := register(ek, base32ID); err != nil {
		t.Fatalf("after its registration record was deleted: %v", err)
	}
	if err := register(ek, hexID); err == nil || !strings.Contains(err.Error(), "this TPM registered as "+base32ID+" already") {
		t.Errorf("the first ID, after the TPM moved to the second: %v", err)
	}
}

// groupTPM creates g as TPM group acme-tpms, trusting a new CA, and a TPM
// with an EK certificate from that CA: it returns the EK and a function
// that registers the TPM as id.
func (e *env) groupTPM(t *testing.T, g *dps.EnrollmentGroup) (ek []byte, register func(id string) error) {
	ca := testutil.NewCert(t, "Acme TPM CA", true, nil)
	g.Attestation = dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EKCertificateAuthorities: &dps.X509Certificates{
		Primary: &dps.X509CertificateWithInfo{Certificate: certPEM(ca)}}}}
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/acme-tpms", "", g, nil); err != nil {
		t.Fatal(err)
	}
	dev := certifiedTPM(t, &ca)
	ek, _ = dev.EndorsementKey()
	return ek, func(id string) error {
		_, err := e.device(id).RegisterTPM(ctx, dev, tpm.IdentityHandle(tpm.DefaultAuthKeyIndex))
		return err
	}
}

// A DELETE of a TPM group device's registration record while the device
// registers again frees the TPM's claim, and the registration writes the
// record back: it claims the ID again, so that the TPM does not register
// under its other ID as well.
func TestTPMGroupClaimOutlivesRacingDelete(t *testing.T) {
	e := newEnv(t)
	// While hold is set, the webhook's next call waits for release.
	var hold atomic.Bool
	waiting, release := make(chan struct{}), make(chan struct{})
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if hold.CompareAndSwap(true, false) {
			close(waiting)
			<-release
		}
		_, _ = io.WriteString(w, `{"iotHubHostName":"`+host+`"}`)
	}))
	t.Cleanup(hook.Close)
	ek, register := e.groupTPM(t, &dps.EnrollmentGroup{AllocationPolicy: dps.PolicyCustom,
		CustomAllocationDefinition: &dps.CustomAllocationDefinition{WebhookURL: hook.URL, APIVersion: "2021-10-01"}})
	hexID, base32ID := attest.RegistrationID(ek), attest.LegacyRegistrationID(ek)
	if err := register(hexID); err != nil {
		t.Fatal(err)
	}
	hold.Store(true)
	done := make(chan error)
	go func() { done <- register(hexID) }()
	<-waiting
	if err := e.dpsAPI.Do(ctx, "DELETE", "/registrations/"+hexID, "", nil, nil); err != nil {
		t.Fatal(err)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := register(base32ID); err == nil || !strings.Contains(err.Error(), "this TPM registered as "+hexID+" already") {
		t.Fatalf("the TPM's other ID, after its record was deleted during a registration and written back: %v", err)
	}
}

// replicaDeleting is another DPS replica on e's store that calls
// register(id) before its first deletion of a document of kind.
func (e *env) replicaDeleting(t *testing.T, kind string, register func(id string) error, id string) *dps.Service {
	t.Helper()
	replica := e.replica(t, &storeHook{Store: e.st, kind: kind, op: "delete", f: func() {
		if err := register(id); err != nil {
			t.Error(err)
		}
	}}, e.pool())
	return replica
}

// registerIndividually registers the TPM of ek as id through an individual
// enrollment, deleted then: its record names no claim.
func (e *env) registerIndividually(t *testing.T, ek []byte, register func(id string) error, id string) {
	t.Helper()
	e.putEnrollment(&dps.Enrollment{RegistrationID: id, Attestation: dps.Attestation{Type: dps.AttestationTPM,
		TPM: &dps.TPMAttestation{EndorsementKey: base64.StdEncoding.EncodeToString(ek)}}})
	if err := register(id); err != nil {
		t.Fatal(err)
	}
	if err := e.dpsAPI.Do(ctx, "DELETE", "/enrollments/"+id, "", nil, nil); err != nil {
		t.Fatal(err)
	}
}

// A DELETE that read a registration record without a TPM's claim, while a
// registration through a TPM group added one, frees that claim: the TPM
// may register under its other ID.
func TestTPMGroupDeleteFreesClaimAddedMeanwhile(t *testing.T) {
	e := newEnv(t)
	ek, register := e.groupTPM(t, &dps.EnrollmentGroup{})
	hexID, base32ID := attest.RegistrationID(ek), attest.LegacyRegistrationID(ek)
	e.registerIndividually(t, ek, register, hexID)
	// (The challenge the enrollment gave is pending still; the group's
	// device is given one of its own.)
	// Another replica deletes the record, which the group's registration
	// changes between that replica's read and its delete.
	replica := e.replicaDeleting(t, "dps.registration", register, hexID)
	if err := replica.DeleteRegistration(ctx, hexID, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := e.dps.GetRegistration(ctx, hexID); azerr.As(err).Status() != 404 {
		t.Fatalf("the record after DELETE: %v", err)
	}
	if err := register(base32ID); err != nil {
		t.Fatalf("the TPM's other ID, after its record was deleted: %v", err)
	}
}

// A registration that writes the record back after a DELETE removed it,
// and finds its claim still there before the DELETE frees it, keeps its
// ID: the DELETE sees the record back and claims the ID for it again.
func TestTPMGroupDeleteReclaimsRecordWrittenBack(t *testing.T) {
	e := newEnv(t)
	ek, register := e.groupTPM(t, &dps.EnrollmentGroup{})
	hexID, base32ID := attest.RegistrationID(ek), attest.LegacyRegistrationID(ek)
	if err := register(hexID); err != nil {
		t.Fatal(err)
	}
	replica := e.replicaDeleting(t, "dps.tpmKey", register, hexID)
	if err := replica.DeleteRegistration(ctx, hexID, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := e.dps.GetRegistration(ctx, hexID); err != nil {
		t.Fatalf("the record the registration wrote back: %v", err)
	}
	if err := register(base32ID); err == nil || !strings.Contains(err.Error(), "this TPM registered as "+hexID+" already") {
		t.Fatalf("the TPM's other ID, while the record of %s lives: %v", hexID, err)
	}
}

// unlisted is a store that refuses to list documents of kind.
type unlisted struct {
	store.Store
	kind string
}

func (u unlisted) List(ctx context.Context, kind, after string, limit int) ([]store.Doc, error) {
	if kind == u.kind {
		return nil, errors.New("listed " + kind)
	}
	return u.Store.List(ctx, kind, after, limit)
}

// A claim whose registration record is gone (a registration that failed
// before recording itself leaves one) is freed by deleting that
// registration, as the refusal of the TPM's other ID advises; found by
// the ID, not by reading every claim.
func TestTPMGroupDeleteFreesClaimWithoutRecord(t *testing.T) {
	e := newEnv(t)
	ek, register := e.groupTPM(t, &dps.EnrollmentGroup{})
	hexID, base32ID := attest.RegistrationID(ek), attest.LegacyRegistrationID(ek)
	if err := register(hexID); err != nil {
		t.Fatal(err)
	}
	if err := e.st.Delete(ctx, "dps.registration", hexID, ""); err != nil {
		t.Fatal(err)
	}
	advice := "DELETE /registrations/" + hexID
	if err := register(base32ID); err == nil || !strings.Contains(err.Error(), advice) {
		t.Fatalf("the TPM's other ID: %v", err)
	}
	replica := e.replica(t, unlisted{e.st, "dps.tpmKey"}, e.pool())
	// A DELETE with If-Match is for a record: there is none to match.
	for _, etag := range []string{`"AAAA"`, "*"} {
		if err := replica.DeleteRegistration(ctx, hexID, etag); azerr.As(err).Status() != 404 {
			t.Fatalf("%s with If-Match %s, with no record but the claim: %v", advice, etag, err)
		}
	}
	if err := register(base32ID); err == nil || !strings.Contains(err.Error(), advice) {
		t.Fatalf("the TPM's other ID, after a DELETE with If-Match: %v", err)
	}
	if err := replica.DeleteRegistration(ctx, hexID, ""); err != nil {
		t.Fatalf("%s, with no record but the claim: %v", advice, err)
	}
	if err := register(base32ID); err != nil {
		t.Fatalf("after %s: %v", advice, err)
	}
	if err := replica.DeleteRegistration(ctx, hexID, ""); azerr.As(err).Status() != 404 {
		t.Fatalf("%s once the TPM claimed another ID: %v", advice, err)
	}
}

// A record written through an individual enrollment, while a registration
// through a TPM group claimed the ID and failed before recording itself,
// has no claim to name: deleting it frees the claim all the same.
func TestTPMGroupDeleteFreesClaimRecordDoesNotName(t *testing.T) {
	e := newEnv(t)
	ek, register := e.groupTPM(t, &dps.EnrollmentGroup{})
	hexID, base32ID := attest.RegistrationID(ek), attest.LegacyRegistrationID(ek)
	e.registerIndividually(t, ek, register, hexID)
	individual, err := e.st.Get(ctx, "dps.registration", hexID)
	if err != nil {
		t.Fatal(err)
	}
	if err := register(hexID); err != nil { // through the group, which claims the ID
		t.Fatal(err)
	}
	if _, err := e.st.Put(ctx, individual, ""); err != nil { // as if that registration had failed
		t.Fatal(err)
	}
	if err := e.dpsAPI.Do(ctx, "DELETE", "/registrations/"+hexID, "", nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := register(base32ID); err != nil {
		t.Fatalf("the TPM's other ID, after its record was deleted: %v", err)
	}
}

// TPM makers issue EK certificates from intermediate CAs that devices do
// not send: a TPM group's PEM carries them after the CA it trusts, and one
// that does not chain to that CA is refused.
func TestTPMGroupIntermediates(t *testing.T) {
	e := newEnv(t)
	root := testutil.NewCert(t, "Acme Root", true, nil)
	inter := testutil.NewCert(t, "Acme TPM Intermediate", true, &root)
	stranger := testutil.NewCert(t, "Someone Else", true, nil)
	leaf := testutil.NewCert(t, "not a CA", false, &root)
	for what, tc := range map[string]struct{ pem, want string }{
		"intermediate first":   {certPEM(inter) + certPEM(root), `"CN=Acme Root" does not chain to the first certificate`},
		"unrelated CA":         {certPEM(root) + certPEM(stranger), `"CN=Someone Else" does not chain`},
		"a device certificate": {certPEM(root) + certPEM(leaf), `"CN=not a CA" is not a CA certificate`},
	} {
		if err := e.putTPMGroup("acme", tc.pem); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v", what, err)
		}
	}
	if n := e.counts()["dps.enrollmentGroup"]; n != 0 {
		t.Fatalf("refused groups stored: %d", n)
	}

	if err := e.putTPMGroup("acme", certPEM(root)+certPEM(inter)); err != nil {
		t.Fatal(err)
	}
	dev := certifiedTPM(t, &inter)
	ek, _ := dev.EndorsementKey()
	res, err := e.device(attest.RegistrationID(ek)).RegisterTPM(ctx, dev, tpm.IdentityHandle(tpm.DefaultAuthKeyIndex))
	if err != nil || res.EnrollmentGroupID != "acme" {
		t.Fatalf("TPM certified by the intermediate: %+v, %v", res, err)
	}
}

// Someone who knows a TPM's EK (it is public) and replays the device's
// request for a challenge does not void the challenge the device is
// answering, however often.
func TestChallengeNotVoidedByAStranger(t *testing.T) {
	e := newEnv(t)
	dev, regID, body := e.enrollSoftTPM()
	path := "/" + e.dps.IDScope() + "/registrations/" + regID + "/register?api-version=2021-06-01"
	st, mine := e.raw("PUT", path, "", body)
	if st != 401 {
		t.Fatalf("challenge: %d %v", st, mine)
	}
	for range 10 { // the stranger's, more than the pending challenges kept
		if st, _ := e.raw("PUT", path, "", body); st != 401 {
			t.Fatalf("stranger's challenge: %d", st)
		}
	}
	blob, _ := base64.StdEncoding.DecodeString(mine["authenticationKey"].(string))
	handle := tpm.IdentityHandle(tpm.DefaultAuthKeyIndex)
	if err := dev.ImportActivationBlob(blob, handle); err != nil {
		t.Fatal(err)
	}
	tok, _ := sas.BuildSigned(func(d []byte) ([]byte, error) { return dev.HMAC(handle, d) },
		e.dps.IDScope()+"/registrations/"+regID, "registration", time.Now().Add(time.Minute))
	if st, b := e.raw("PUT", path, tok, `{"registrationId":"`+regID+`"}`); st != 202 {
		t.Fatalf("answering the first challenge after a second one: %d %v", st, b)
	}
}

// enrollSoftTPM enrolls a new software TPM individually; it returns the
// TPM, its registration ID and the body of its registration PUT.
func (e *env) enrollSoftTPM() (dev *softtpm.TPM, regID, body string) {
	keys, err := softtpm.NewKeys()
	if err != nil {
		e.t.Fatal(err)
	}
	dev = softtpm.New(keys)
	ek, _ := dev.EndorsementKey()
	srk, _ := dev.StorageRootKey()
	regID = attest.RegistrationID(ek)
	e.putEnrollment(&dps.Enrollment{RegistrationID: regID, Attestation: dps.Attestation{Type: dps.AttestationTPM,
		TPM: &dps.TPMAttestation{EndorsementKey: base64.StdEncoding.EncodeToString(ek)}}})
	body = `{"registrationId":"` + regID + `","tpm":{"endorsementKey":"` + base64.StdEncoding.EncodeToString(ek) +
		`","storageRootKey":"` + base64.StdEncoding.EncodeToString(srk) + `"}}`
	return dev, regID, body
}

// An enrollment that names the device's SRK gives challenges for that SRK
// only: nobody who knows the public EK can crowd the device's challenge out
// with others.
func TestEnrolledSRKPinsChallenges(t *testing.T) {
	e := newEnv(t)
	dev, regID, body := e.enrollSoftTPM()
	path := "/" + e.dps.IDScope() + "/registrations/" + regID + "/register?api-version=2021-06-01"
	keys, err := softtpm.NewKeys()
	if err != nil {
		t.Fatal(err)
	}
	otherSRK, _ := softtpm.New(keys).StorageRootKey()
	ek, _ := dev.EndorsementKey()
	srk, _ := dev.StorageRootKey()
	enroll := func(srk []byte, ifMatch string) {
		t.Helper()
		en := &dps.Enrollment{RegistrationID: regID, Attestation: dps.Attestation{Type: dps.AttestationTPM,
			TPM: &dps.TPMAttestation{EndorsementKey: base64.StdEncoding.EncodeToString(ek), StorageRootKey: base64.StdEncoding.EncodeToString(srk)}}}
		if err := e.dpsAPI.Do(ctx, "PUT", "/enrollments/"+regID, ifMatch, en, nil); err != nil {
			t.Fatal(err)
		}
	}
	enroll(otherSRK, "*")
	log := captureLog(t)
	if st, b := e.raw("PUT", path, "", body); st != 401 || b["authenticationKey"] != nil || !strings.Contains(log.String(), "storage root key differs") {
		t.Fatalf("challenge for an SRK other than the enrolled one: %d %v", st, b)
	}
	enroll(srk, "*")
	if st, b := e.raw("PUT", path, "", body); st != 401 || b["authenticationKey"] == nil {
		t.Fatalf("challenge for the enrolled SRK: %d %v", st, b)
	}
}

// Once a TPM has registered, requests for challenges with other SRKs (which
// anyone who knows its public EK can make) cannot push out the challenge
// for the SRK it registered with.
func TestRegisteredSRKKeepsItsChallenge(t *testing.T) {
	e := newEnv(t)
	dev, regID, body := e.enrollSoftTPM()
	path := "/" + e.dps.IDScope() + "/registrations/" + regID + "/register?api-version=2021-06-01"
	handle := tpm.IdentityHandle(tpm.DefaultAuthKeyIndex)
	ek, _ := dev.EndorsementKey()
	strangerBody := func() string {
		keys, err := softtpm.NewKeys()
		if err != nil {
			t.Fatal(err)
		}
		srk, _ := softtpm.New(keys).StorageRootKey()
		return `{"registrationId":"` + regID + `","tpm":{"endorsementKey":"` + base64.StdEncoding.EncodeToString(ek) +
			`","storageRootKey":"` + base64.StdEncoding.EncodeToString(srk) + `"}}`
	}
	strangers := make([]string, 2*4)
	for i := range strangers {
		strangers[i] = strangerBody()
	}
	register := func(flood []string) int {
		t.Helper()
		st, mine := e.raw("PUT", path, "", body)
		if st != 401 {
			t.Fatalf("challenge: %d %v", st, mine)
		}
		for _, b := range flood {
			if st, _ := e.raw("PUT", path, "", b); st != 401 {
				t.Fatalf("stranger's challenge: %d", st)
			}
		}
		blob, _ := base64.StdEncoding.DecodeString(mine["authenticationKey"].(string))
		if err := dev.ImportActivationBlob(blob, handle); err != nil {
			t.Fatal(err)
		}
		tok, _ := sas.BuildSigned(func(d []byte) ([]byte, error) { return dev.HMAC(handle, d) },
			e.dps.IDScope()+"/registrations/"+regID, "registration", time.Now().Add(time.Minute))
		st, _ = e.raw("PUT", path, tok, body)
		return st
	}
	if st := register(nil); st != 202 {
		t.Fatalf("first registration: %d", st)
	}
	if st := register(strangers); st != 202 {
		t.Fatalf("registering again while strangers asked for challenges with %d other SRKs: %d", len(strangers), st)
	}
}

// movingGroupTPM is a TPM group whose custom allocation puts a device on
// this hub, then, at its second registration, on hub2.test (which it
// returns), calling moving with the registration ID first; and a TPM of the
// group, registered once, as the ID its EK determines (hexID; base32ID is
// its other spelling). register registers the TPM as id through the
// service at url.
type movingGroupTPM struct {
	hub2            *azclient.Client
	hexID, base32ID string
	register        func(url string, cl *http.Client, id string) error
}

func (e *env) movingGroupTPM(t *testing.T, moving func(regID string)) *movingGroupTPM {
	t.Helper()
	m := &movingGroupTPM{hub2: e.secondHub(t, "hub2.test")}
	var calls atomic.Int32
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		target := host
		if calls.Add(1) == 2 {
			target = "hub2.test"
			var body struct {
				DeviceRuntimeContext struct {
					RegistrationID string `json:"registrationId"`
				} `json:"deviceRuntimeContext"`
			}
			_ = json.NewDecoder(r.Body).Decode(&body)
			moving(body.DeviceRuntimeContext.RegistrationID)
		}
		_, _ = io.WriteString(w, `{"iotHubHostName":"`+target+`"}`)
	}))
	t.Cleanup(hook.Close)
	ca := testutil.NewCert(t, "Acme TPM CA", true, nil)
	g := &dps.EnrollmentGroup{AllocationPolicy: dps.PolicyCustom, IoTHubs: []string{host, "hub2.test"},
		CustomAllocationDefinition: &dps.CustomAllocationDefinition{WebhookURL: hook.URL, APIVersion: "2021-10-01"},
		Attestation: dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EKCertificateAuthorities: &dps.X509Certificates{
			Primary: &dps.X509CertificateWithInfo{Certificate: certPEM(ca)}}}}}
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/acme-tpms", "", g, nil); err != nil {
		t.Fatal(err)
	}
	dev := certifiedTPM(t, &ca)
	ek, _ := dev.EndorsementKey()
	m.hexID, m.base32ID = attest.RegistrationID(ek), attest.LegacyRegistrationID(ek)
	m.register = func(url string, cl *http.Client, id string) error {
		c := &provisioning.Client{Endpoint: url, IDScope: e.dps.IDScope(), RegistrationID: id, HTTP: cl, MaxPolls: 5}
		_, err := c.RegisterTPM(ctx, dev, tpm.IdentityHandle(tpm.DefaultAuthKeyIndex))
		return err
	}
	if err := m.register(e.ts.URL, e.ts.Client(), m.hexID); err != nil {
		t.Fatal(err)
	}
	return m
}

// replicaOn serves another DPS replica over st and registry.
func (e *env) replicaOn(t *testing.T, st store.Store, registry dps.Registry) *httptest.Server {
	t.Helper()
	replica := e.replica(t, st, registry)
	replica.CAs = e.hub
	ts := httptest.NewTLSServer(New(replica, e.hub, nil))
	t.Cleanup(ts.Close)
	return ts
}

// A TPM group's device whose record is deleted while it registers (moving
// hubs), and whose TPM registers under its other ID meanwhile, keeps one
// ID: the registration that finds the claim taken is undone, record and hub
// device, rather than answered "assigned".
func TestTPMGroupRegistrationUndoneWhenTheTPMTookAnotherID(t *testing.T) {
	for _, during := range []string{"placing", "leaving"} {
		t.Run(during, func(t *testing.T) {
			e := newEnv(t)
			m := e.movingGroupTPM(t, func(regID string) { // the operator deletes the record meanwhile
				if err := e.dps.DeleteRegistration(ctx, regID, ""); err != nil {
					t.Error(err)
				}
			})
			// Another replica moves the device to hub2; while it does, the
			// TPM registers as its other ID.
			var otherErr error
			ts2 := e.replicaOn(t, e.st, &hookedRegistry{Registry: e.pool(), onUpsert: during == "placing",
				f: func() { otherErr = m.register(e.ts.URL, e.ts.Client(), m.base32ID) }})
			movErr := m.register(ts2.URL, ts2.Client(), m.hexID)
			a, errA := e.dps.GetRegistration(ctx, m.hexID)
			b, errB := e.dps.GetRegistration(ctx, m.base32ID)
			refused := func(err error) bool {
				pe, ok := errors.AsType[*provisioning.Error](err)
				return ok && pe.Status == 401
			}
			switch during {
			case "placing": // the other ID is claimed first: the move is undone
				if !refused(movErr) || otherErr != nil || azerr.As(errA).Status() != 404 || errB != nil || b.Status != "assigned" {
					t.Fatalf("the move: %v, record %+v %v; the other ID: %v, record %+v %v; want the move refused and taken back",
						movErr, a, errA, otherErr, b, errB)
				}
				if err := m.hub2.Do(ctx, "GET", "/devices/"+m.hexID, "", nil, &hub.Device{}); azerr.As(err).Status() != 404 {
					t.Fatalf("the undone registration's hub device stays: %v", err)
				}
			case "leaving": // the move claimed its ID again before leaving
				if movErr != nil || errA != nil || a.AssignedHub != "hub2.test" || !refused(otherErr) || azerr.As(errB).Status() != 404 {
					t.Fatalf("the move: %v, record %+v %v; the other ID: %v, record %+v %v; want the move done and the other ID refused",
						movErr, a, errA, otherErr, b, errB)
				}
			}
		})
	}
}

// failClaimReads fails reads of TPM claims once a registration record has
// been written.
type failClaimReads struct {
	store.Store
	written atomic.Bool
}

func (f *failClaimReads) Put(ctx context.Context, d store.Doc, ifMatch string) (store.Doc, error) {
	out, err := f.Store.Put(ctx, d, ifMatch)
	if d.Kind == "dps.registration" && err == nil {
		f.written.Store(true)
	}
	return out, err
}

func (f *failClaimReads) Get(ctx context.Context, kind, id string) (store.Doc, error) {
	if kind == "dps.tpmKey" && f.written.Load() {
		return store.Doc{}, errors.New("the store is out of reach")
	}
	return f.Store.Get(ctx, kind, id)
}

// A moved TPM group device whose claim cannot be checked again after its
// record names the new hub still leaves the former identity, which holds
// its TPM's key.
func TestTPMGroupMoveLeavesWhenTheClaimCannotBeChecked(t *testing.T) {
	e := newEnv(t)
	m := e.movingGroupTPM(t, func(string) {})
	ts2 := e.replicaOn(t, &failClaimReads{Store: e.st}, e.pool())
	m.register(ts2.URL, ts2.Client(), m.hexID) // fails, or not: the record is written either way
	if a, err := e.dps.GetRegistration(ctx, m.hexID); err != nil || a.AssignedHub != "hub2.test" {
		t.Fatalf("record %+v %v", a, err)
	}
	if err := e.hubAPI.Do(ctx, "GET", "/devices/"+m.hexID, "", nil, &hub.Device{}); azerr.As(err).Status() != 404 {
		t.Fatalf("the record names hub2, and the former identity on %s stays, with the TPM's key: %v", host, err)
	}
}

// A TPM group's device that got its challenge before its manufacturer's CA
// stopped being trusted (removed from the group, or the group re-created
// with other CAs) is refused when it answers, as a new one would be.
func TestTPMGroupChallengeRecheckedOnAnswer(t *testing.T) {
	for _, change := range []string{"CA removed", "group re-created"} {
		t.Run(change, func(t *testing.T) {
			e := newEnv(t)
			ca := testutil.NewCert(t, "Acme TPM CA", true, nil)
			other := testutil.NewCert(t, "Other TPM CA", true, nil)
			if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/acme-tpms", "", &dps.EnrollmentGroup{
				Attestation: dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{EKCertificateAuthorities: &dps.X509Certificates{
					Primary:   &dps.X509CertificateWithInfo{Certificate: certPEM(ca)},
					Secondary: &dps.X509CertificateWithInfo{Certificate: certPEM(other)}}}}}, nil); err != nil {
				t.Fatal(err)
			}
			dev := certifiedTPM(t, &ca)
			ek, _ := dev.EndorsementKey()
			srk, _ := dev.StorageRootKey()
			ekCert, _ := dev.EndorsementCertificate()
			regID := attest.RegistrationID(ek)
			path := "/" + e.dps.IDScope() + "/registrations/" + regID + "/register?api-version=2021-06-01"
			body := `{"registrationId":"` + regID + `","tpm":{"endorsementKey":"` + base64.StdEncoding.EncodeToString(ek) +
				`","storageRootKey":"` + base64.StdEncoding.EncodeToString(srk) +
				`","endorsementKeyCertificate":"` + base64.StdEncoding.EncodeToString(ekCert) + `"}}`
			st, ch := e.raw("PUT", path, "", body)
			if st != 401 || ch["authenticationKey"] == nil {
				t.Fatalf("challenge: %d %v", st, ch)
			}
			switch change {
			case "CA removed":
				var g dps.EnrollmentGroup
				if err := e.dpsAPI.Do(ctx, "GET", "/enrollmentGroups/acme-tpms", "", nil, &g); err != nil {
					t.Fatal(err)
				}
				g.Attestation.TPM.EKCertificateAuthorities.Primary.Certificate = certPEM(other)
				g.Attestation.TPM.EKCertificateAuthorities.Secondary = nil
				if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/acme-tpms", "", &g, nil); err != nil {
					t.Fatal(err)
				}
			case "group re-created":
				if err := e.dpsAPI.Do(ctx, "DELETE", "/enrollmentGroups/acme-tpms", "", nil, nil); err != nil {
					t.Fatal(err)
				}
				if err := e.putTPMGroup("acme-tpms", certPEM(other)); err != nil {
					t.Fatal(err)
				}
			}
			blob, _ := base64.StdEncoding.DecodeString(ch["authenticationKey"].(string))
			handle := tpm.IdentityHandle(tpm.DefaultAuthKeyIndex)
			if err := dev.ImportActivationBlob(blob, handle); err != nil {
				t.Fatal(err)
			}
			tok, _ := sas.BuildSigned(func(d []byte) ([]byte, error) { return dev.HMAC(handle, d) },
				e.dps.IDScope()+"/registrations/"+regID, "registration", time.Now().Add(time.Minute))
			log := captureLog(t)
			before := e.counts()
			if st, b := e.raw("PUT", path, tok, `{"registrationId":"`+regID+`"}`); st != 401 || !strings.Contains(log.String(), "does not chain to the CA of any TPM enrollment group") {
				t.Fatalf("answering a challenge after the group stopped trusting the EK's CA: %d %v\n%s", st, b, log)
			}
			if after := e.counts(); after["dps.registration"] != before["dps.registration"] || after["hub.device"] != before["hub.device"] {
				t.Fatalf("the refused registration changed the store: %v → %v", before, after)
			}
		})
	}
}
