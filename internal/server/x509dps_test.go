package server

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"maps"
	"net/http"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/dpsapi"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/provisioning"
	"github.com/hatchery/hatchery/internal/testutil"
)

func certPEM(c tls.Certificate) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Leaf.Raw}))
}

// withChain returns leaf presenting the given intermediates after it.
func withChain(leaf tls.Certificate, inter ...tls.Certificate) tls.Certificate {
	for _, c := range inter {
		leaf.Certificate = append(leaf.Certificate, c.Leaf.Raw)
	}
	return leaf
}

// x509Device is a registration client presenting cert over TLS.
func (e *env) x509Device(regID string, cert tls.Certificate) *provisioning.Client {
	conf := e.tls.Clone()
	conf.Certificates = []tls.Certificate{cert}
	c := e.device(regID)
	c.HTTP = &http.Client{Transport: &http.Transport{TLSClientConfig: conf}}
	return c
}

func TestX509IndividualEnrollment(t *testing.T) {
	e := newEnv(t)
	addr := e.startMQTT()
	cert := testutil.NewCert(t, "cam-01", false, nil)
	en := e.putEnrollment(&dps.Enrollment{RegistrationID: "cam-01", Capabilities: &dps.Capabilities{IoTEdge: true},
		Attestation: dps.Attestation{Type: dps.AttestationX509, X509: &dps.X509Attestation{
			ClientCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: certPEM(cert)}}}}})
	info := en.Attestation.X509.ClientCertificates.Primary.Info
	if info == nil || info.SubjectName != "CN=cam-01" || len(info.SHA256Thumbprint) != 64 {
		t.Fatalf("certificate info %+v", info)
	}

	res, err := e.x509Device("cam-01", cert).RegisterX509(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.Status != "assigned" || res.DeviceID != "cam-01" || res.X509 == nil || res.X509.CertificateInfo.SHA256Thumbprint != info.SHA256Thumbprint {
		t.Fatalf("result %+v", res)
	}
	// The hub knows the device by this certificate, and it connects with it.
	var d hub.Device
	if err := e.hubAPI.Do(ctx, "GET", "/devices/cam-01", "", nil, &d); err != nil {
		t.Fatal(err)
	}
	if d.Authentication.Type != "selfSigned" || d.Authentication.X509Thumbprint.PrimaryThumbprint == nil || !d.Capabilities.IoTEdge {
		t.Fatalf("hub device %+v", d)
	}
	hc, err := e.dialCert(addr, "cam-01", "", cert)
	if err != nil {
		t.Fatalf("hub connection with the enrolled certificate: %v", err)
	}
	hc.Close()

	// Another key under the same name, a certificate for another name, no
	// certificate at all: all refused, and nothing stored.
	before := e.counts()
	for _, tc := range []struct {
		what, regID string
		cert        tls.Certificate
		want        string
	}{
		{"another certificate with the same CN", "cam-01", testutil.NewCert(t, "cam-01", false, nil), "check its credentials"},
		{"registration ID other than the CN", "cam-01", testutil.NewCert(t, "cam-02", false, nil), "must be the client certificate's subject CN \"cam-02\""},
		{"no enrollment", "cam-09", testutil.NewCert(t, "cam-09", false, nil), "check its credentials"},
	} {
		_, err := e.x509Device(tc.regID, tc.cert).RegisterX509(ctx)
		var pe *provisioning.Error
		if !errors.As(err, &pe) || pe.Status != 401 || !strings.Contains(pe.Message, tc.want) {
			t.Errorf("%s: %v", tc.what, err)
		}
	}
	if _, err := e.device("cam-01").RegisterX509(ctx); err == nil {
		t.Error("registered with no certificate")
	}
	if after := e.counts(); !maps.Equal(before, after) {
		t.Fatalf("refused registrations changed the store: %v → %v", before, after)
	}
}

func TestX509GroupEnrollment(t *testing.T) {
	e := newEnv(t)
	addr := e.startDPSMQTT()
	root := testutil.NewCert(t, "Fleet Root", true, nil)
	inter := testutil.NewCert(t, "Fleet Intermediate", true, &root)
	var g dps.EnrollmentGroup
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/fleet", "", &dps.EnrollmentGroup{
		Attestation: dps.Attestation{Type: dps.AttestationX509, X509: &dps.X509Attestation{
			SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: certPEM(root)}}}},
		InitialTwin: &dps.InitialTwin{Tags: []byte(`{"fleet":"x509"}`)}}, &g); err != nil {
		t.Fatal(err)
	}

	// A device whose certificate the intermediate signed, sending the chain.
	leaf := withChain(testutil.NewCert(t, "node-7", false, &inter), inter)
	res, err := e.x509Device("node-7", leaf).RegisterX509(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.EnrollmentGroupID != "fleet" || res.X509 == nil || res.X509.EnrollmentGroupID != "fleet" ||
		res.X509.SigningCertificateInfo == nil || res.X509.SigningCertificateInfo.SubjectName != "CN=Fleet Root" {
		t.Fatalf("result %+v %+v", res, res.X509)
	}
	if tw := mustTwin(t, e, "node-7", ""); string(tw.Tags) != `{"fleet":"x509"}` {
		t.Fatalf("twin tags %s", tw.Tags)
	}
	hc, err := e.dialCert(addr, "node-7", "", leaf)
	if err != nil {
		t.Fatalf("hub connection of the group device: %v", err)
	}
	hc.Close()

	// Over MQTT too, as the Python and Embedded C SDKs register.
	mqttLeaf := withChain(testutil.NewCert(t, "node-8", false, &inter), inter)
	if st := e.registerOverMQTT(t, addr, "node-8", nil, &mqttLeaf, `null`); st["deviceId"] != "node-8" || st["status"] != "assigned" {
		t.Fatalf("MQTT registration state %v", st)
	}

	// Without the intermediate in the chain, or from another CA: refused.
	other := testutil.NewCert(t, "Other CA", true, nil)
	for what, c := range map[string]tls.Certificate{
		"chain without the intermediate": testutil.NewCert(t, "node-9", false, &inter),
		"another CA":                     testutil.NewCert(t, "node-9", false, &other),
	} {
		if _, err := e.x509Device("node-9", c).RegisterX509(ctx); azerrStatus(err) != 401 {
			t.Errorf("%s: %v", what, err)
		}
	}
	// Another group's certificate for the same name does not take node-7 over.
	otherRoot := testutil.NewCert(t, "Other Root", true, nil)
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/other-fleet", "", &dps.EnrollmentGroup{
		Attestation: dps.Attestation{Type: dps.AttestationX509, X509: &dps.X509Attestation{
			SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: certPEM(otherRoot)}}}}}, nil); err != nil {
		t.Fatal(err)
	}
	_, err = e.x509Device("node-7", testutil.NewCert(t, "node-7", false, &otherRoot)).RegisterX509(ctx)
	if pe := (*provisioning.Error)(nil); !errors.As(err, &pe) || pe.Status != 401 || !strings.Contains(pe.Message, "provisioned through enrollment group fleet") {
		t.Fatalf("takeover by another group: %v", err)
	}
	// A disabled group refuses its devices.
	g.ProvisioningStatus = "disabled"
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/fleet", "", &g, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := e.x509Device("node-7", leaf).RegisterX509(ctx); azerrStatus(err) != 401 {
		t.Errorf("disabled group: %v", err)
	}
}

// A device certificate names one device: its subject CN, or its first DNS
// name only when it has no CN (as the C# SDK derives the registration ID),
// not any name it lists; refusals of others name it.
func TestX509RegistrationIDIsTheCN(t *testing.T) {
	e := newEnv(t)
	ca := testutil.NewCert(t, "Fleet CA", true, nil)
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/fleet", "", &dps.EnrollmentGroup{
		Attestation: dps.Attestation{Type: dps.AttestationX509, X509: &dps.X509Attestation{
			SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: certPEM(ca)}}}}}, nil); err != nil {
		t.Fatal(err)
	}
	cert := testutil.NewCertNames(t, "cam-01", []string{"cam-01.plant.local", "gateway", "localhost"}, false, &ca)
	if _, err := e.x509Device("cam-01", cert).RegisterX509(ctx); err != nil {
		t.Errorf("as cam-01: %v", err)
	}
	names := `subject CN "cam-01"`
	before := e.counts()
	for _, id := range []string{"cam-01.plant.local", "gateway", "localhost"} {
		_, err := e.x509Device(id, cert).RegisterX509(ctx)
		if pe := (*provisioning.Error)(nil); !errors.As(err, &pe) || pe.Status != 401 || !strings.Contains(pe.Message, names) {
			t.Errorf("as %s, a DNS name of a certificate with a CN: %v", id, err)
		}
	}
	// Nor is it enrolled under another.
	err := e.dpsAPI.Do(ctx, "PUT", "/enrollments/gateway", "", &dps.Enrollment{Attestation: dps.Attestation{Type: dps.AttestationX509,
		X509: &dps.X509Attestation{ClientCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: certPEM(cert)}}}}}, nil)
	if azerr.As(err).Status() != 400 || !strings.Contains(err.Error(), names) || !strings.Contains(err.Error(), `enroll it as "cam-01"`) || strings.Contains(err.Error(), "plant.local") {
		t.Errorf("enrolled as a DNS name of a certificate with a CN: %v", err)
	}
	// A certificate with no CN names its DNS name alone.
	noCN := testutil.NewCertNames(t, "", []string{"cam-02.plant.local"}, false, &ca)
	if _, err := e.x509Device("gateway", noCN).RegisterX509(ctx); err == nil || !strings.Contains(err.Error(), `certificate's first DNS name "cam-02.plant.local"`) {
		t.Errorf("a certificate with no CN, as another ID: %v", err)
	}
	err = e.dpsAPI.Do(ctx, "PUT", "/enrollments/gateway", "", &dps.Enrollment{Attestation: dps.Attestation{Type: dps.AttestationX509,
		X509: &dps.X509Attestation{ClientCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: certPEM(noCN)}}}}}, nil)
	if azerr.As(err).Status() != 400 || !strings.Contains(err.Error(), `enroll it as "cam-02.plant.local"`) || strings.Contains(err.Error(), `""`) {
		t.Errorf("a certificate with no CN, enrolled as another ID: %v", err)
	}
	// One with neither names no ID at all.
	nameless := testutil.NewCertNames(t, "", nil, false, &ca)
	if _, err := e.x509Device("gateway", nameless).RegisterX509(ctx); err == nil || !strings.Contains(err.Error(), "names no registration ID") {
		t.Errorf("a certificate with neither CN nor DNS name: %v", err)
	}
	err = e.dpsAPI.Do(ctx, "PUT", "/enrollments/gateway", "", &dps.Enrollment{Attestation: dps.Attestation{Type: dps.AttestationX509,
		X509: &dps.X509Attestation{ClientCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: certPEM(nameless)}}}}}, nil)
	if azerr.As(err).Status() != 400 || !strings.Contains(err.Error(), "names no registration ID") || !strings.Contains(err.Error(), "CN=gateway") {
		t.Errorf("a certificate with neither CN nor DNS name, enrolled: %v", err)
	}
	if after := e.counts(); !maps.Equal(before, after) {
		t.Fatalf("refused registrations changed the store: %v → %v", before, after)
	}
}

// A group for an intermediate CA comes before one for its root, whatever
// their IDs, as in the hosted service: disabling it blocks that
// intermediate's devices (the way to revoke it), and enabling it moves them
// to it, since the root's group trusts their certificates too.
func TestX509GroupOfTheNearestCA(t *testing.T) {
	e := newEnv(t)
	root := testutil.NewCert(t, "Fleet Root", true, nil)
	inter := testutil.NewCert(t, "Fleet Intermediate", true, &root)
	putGroup := func(id string, ca tls.Certificate, status, ifMatch string) {
		t.Helper()
		if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/"+id, ifMatch, &dps.EnrollmentGroup{ProvisioningStatus: status,
			Attestation: dps.Attestation{Type: dps.AttestationX509, X509: &dps.X509Attestation{
				SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: certPEM(ca)}}}}}, nil); err != nil {
			t.Fatal(err)
		}
	}
	register := func() (*dpsapi.RegistrationState, error) {
		return e.x509Device("node-1", withChain(testutil.NewCert(t, "node-1", false, &inter), inter)).RegisterX509(ctx)
	}
	putGroup("a-root", root, "enabled", "")
	if res, err := register(); err != nil || res.EnrollmentGroupID != "a-root" {
		t.Fatalf("through the root's group: %+v %v", res, err)
	}
	putGroup("z-intermediate", inter, "disabled", "")
	if _, err := register(); azerrStatus(err) != 401 || !strings.Contains(err.Error(), "z-intermediate") {
		t.Fatalf("the intermediate's group disabled: %v", err)
	}
	putGroup("z-intermediate", inter, "enabled", "*")
	if res, err := register(); err != nil || res.EnrollmentGroupID != "z-intermediate" {
		t.Fatalf("through the intermediate's group: %+v %v", res, err)
	}
}

// A group may reference a CA certificate registered with the service, which
// must be verified to be trusted.
func TestX509GroupCAReference(t *testing.T) {
	e := newEnv(t)
	ca := testutil.NewCert(t, "Line CA", true, nil)
	put := func(verified bool) {
		if err := e.hubAPI.Do(ctx, "PUT", "/certificates/line-ca", "", &hub.Certificate{Properties: hub.CertificateProperties{
			Certificate: certPEM(ca), IsVerified: verified}}, nil); err != nil {
			t.Fatal(err)
		}
	}
	group := &dps.EnrollmentGroup{Attestation: dps.Attestation{Type: dps.AttestationX509,
		X509: &dps.X509Attestation{CAReferences: &dps.X509CAReferences{Primary: "line-ca"}}}}
	put(false)
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/line", "", group, nil); azerr.As(err).Status() != 400 || !strings.Contains(err.Error(), "not verified") {
		t.Fatalf("reference to an unverified CA: %v", err)
	}
	put(true)
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/line", "", group, nil); err != nil {
		t.Fatal(err)
	}
	dev := testutil.NewCert(t, "line-dev-1", false, &ca)
	if _, err := e.x509Device("line-dev-1", dev).RegisterX509(ctx); err != nil {
		t.Fatal(err)
	}
	// Once the CA is deleted, the reference trusts nobody.
	if err := e.hubAPI.Do(ctx, "DELETE", "/certificates/line-ca", "*", nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := e.x509Device("line-dev-1", dev).RegisterX509(ctx); azerrStatus(err) != 401 {
		t.Fatalf("CA deleted: %v", err)
	}
}

// keyPEM is c's private key as a PEM block, as it follows the certificate
// in many PEM files.
func keyPEM(t *testing.T, c tls.Certificate) string {
	der, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
}

// A device's or a group's CA certificate is the first of its PEM, whatever
// follows it: enrolled, saved again unchanged, and trusted. A TPM group's
// PEM, whose later certificates serve as intermediates, holds certificates
// only.
func TestX509CertificateFieldReadsTheFirst(t *testing.T) {
	e := newEnv(t)
	ca := testutil.NewCert(t, "Fleet CA", true, nil)
	dev := testutil.NewCert(t, "cam-01", false, &ca)
	damaged := "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
	certs := func(pemText string) *dps.X509Certificates {
		return &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: pemText}}
	}
	for what, pemText := range map[string]string{"its key": certPEM(dev) + keyPEM(t, dev), "a damaged block": certPEM(dev) + damaged} {
		en := e.putEnrollment(&dps.Enrollment{RegistrationID: "cam-01", Attestation: dps.Attestation{Type: dps.AttestationX509,
			X509: &dps.X509Attestation{ClientCertificates: certs(pemText)}}})
		if info := en.Attestation.X509.ClientCertificates.Primary.Info; info == nil || info.SubjectName != "CN=cam-01" {
			t.Fatalf("a device certificate followed by %s: %+v", what, info)
		}
		if got := en.Attestation.X509.ClientCertificates.Primary.Certificate; got != certPEM(dev) {
			t.Fatalf("a device certificate followed by %s is kept as %q, want the certificate alone", what, got)
		}
		if err := e.dpsAPI.Do(ctx, "PUT", "/enrollments/cam-01", en.ETag, en, nil); err != nil {
			t.Fatalf("saving again the enrollment of a certificate followed by %s: %v", what, err)
		}
		if _, err := e.x509Device("cam-01", dev).RegisterX509(ctx); err != nil {
			t.Fatalf("a device enrolled with a certificate followed by %s: %v", what, err)
		}
		if err := e.dpsAPI.Do(ctx, "DELETE", "/enrollments/cam-01", "*", nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	var g dps.EnrollmentGroup
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/fleet", "", &dps.EnrollmentGroup{Attestation: dps.Attestation{Type: dps.AttestationX509,
		X509: &dps.X509Attestation{SigningCertificates: certs(certPEM(ca) + keyPEM(t, ca))}}}, &g); err != nil {
		t.Fatalf("a CA certificate followed by its key: %v", err)
	}
	if stored, err := e.st.Get(ctx, "dps.enrollmentGroup", "fleet"); err != nil || strings.Contains(string(stored.Body), "PRIVATE KEY") || g.Attestation.X509.SigningCertificates.Primary.Certificate != certPEM(ca) {
		t.Fatalf("a CA's key pasted after its certificate was kept: %v", err)
	}
	if res, err := e.x509Device("cam-02", testutil.NewCert(t, "cam-02", false, &ca)).RegisterX509(ctx); err != nil || res.EnrollmentGroupID != "fleet" {
		t.Fatalf("a device of the group: %+v %v", res, err)
	}
	if err := e.putTPMGroup("acme-tpms", certPEM(ca)+keyPEM(t, ca)); azerr.As(err).Status() != 400 || !strings.Contains(err.Error(), "PEM block 2 is a PRIVATE KEY") {
		t.Fatalf("a TPM group's CA followed by its key: %v", err)
	}
}

// An enrollment or group that an earlier version stored with the key
// pasted after its certificate shows the certificate alone, to every read,
// and is stored so at its next write.
func TestStoredKeyAfterCertificateNotShown(t *testing.T) {
	e := newEnv(t)
	ca := testutil.NewCert(t, "Fleet CA", true, nil)
	dev := testutil.NewCert(t, "cam-01", false, &ca)
	certs := func(c tls.Certificate) *dps.X509Certificates {
		return &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: certPEM(c)}}
	}
	e.putEnrollment(&dps.Enrollment{RegistrationID: "cam-01", Attestation: dps.Attestation{Type: dps.AttestationX509,
		X509: &dps.X509Attestation{ClientCertificates: certs(dev)}}})
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/fleet", "", &dps.EnrollmentGroup{Attestation: dps.Attestation{Type: dps.AttestationX509,
		X509: &dps.X509Attestation{SigningCertificates: certs(ca)}}}, nil); err != nil {
		t.Fatal(err)
	}
	// As an earlier version stored them: the text as sent.
	for kind, id := range map[string]string{"dps.enrollment": "cam-01", "dps.enrollmentGroup": "fleet"} {
		d, err := e.st.Get(ctx, kind, id)
		if err != nil {
			t.Fatal(err)
		}
		c := map[string]tls.Certificate{"dps.enrollment": dev, "dps.enrollmentGroup": ca}[kind]
		d.Body = bytes.Replace(d.Body, jsonString(t, certPEM(c)), jsonString(t, certPEM(c)+keyPEM(t, c)), 1)
		if !bytes.Contains(d.Body, []byte("PRIVATE KEY")) {
			t.Fatalf("the key was not put in %s %s", kind, id)
		}
		if _, err := e.st.Put(ctx, d, d.ETag); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range []struct{ method, path string }{
		{"GET", "/enrollments/cam-01"}, {"POST", "/enrollments/cam-01/attestationmechanism"}, {"POST", "/enrollments/query"},
		{"GET", "/enrollmentGroups/fleet"}, {"POST", "/enrollmentGroups/fleet/attestationmechanism"}, {"POST", "/enrollmentGroups/query"},
	} {
		var body json.RawMessage
		if err := e.dpsAPI.Do(ctx, r.method, r.path, "", map[string]string{"query": "*"}, &body); err != nil {
			t.Fatalf("%s %s: %v", r.method, r.path, err)
		}
		if strings.Contains(string(body), "PRIVATE KEY") || !strings.Contains(string(body), "BEGIN CERTIFICATE") {
			t.Errorf("%s %s gives back the key, or no certificate", r.method, r.path)
		}
	}
	var en dps.Enrollment
	if err := e.dpsAPI.Do(ctx, "GET", "/enrollments/cam-01", "", nil, &en); err != nil {
		t.Fatal(err)
	}
	en.ProvisioningStatus = "disabled"
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollments/cam-01", en.ETag, &en, nil); err != nil {
		t.Fatal(err)
	}
	if d, err := e.st.Get(ctx, "dps.enrollment", "cam-01"); err != nil || bytes.Contains(d.Body, []byte("PRIVATE KEY")) {
		t.Fatalf("the enrollment written again keeps the key: %v", err)
	}
}

// jsonString is s as a JSON string.
func jsonString(t *testing.T, s string) []byte {
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestX509EnrollmentBadInput(t *testing.T) {
	e := newEnv(t)
	leaf := testutil.NewCert(t, "dev", false, nil)
	ca := testutil.NewCert(t, "CA", true, nil)
	certs := func(pemText string) *dps.X509Certificates {
		return &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: pemText}}
	}
	before := e.counts()
	for _, tc := range []struct {
		what string
		path string
		body any
		want string
	}{
		{"individual with a signing certificate", "/enrollments/dev", &dps.Enrollment{Attestation: dps.Attestation{Type: "x509",
			X509: &dps.X509Attestation{SigningCertificates: certs(certPEM(ca))}}}, "takes clientCertificates"},
		{"individual without certificates", "/enrollments/dev", &dps.Enrollment{Attestation: dps.Attestation{Type: "x509"}}, "takes clientCertificates"},
		{"garbage certificate", "/enrollments/dev", &dps.Enrollment{Attestation: dps.Attestation{Type: "x509",
			X509: &dps.X509Attestation{ClientCertificates: certs("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")}}}, "does not parse"},
		{"not base64 nor PEM", "/enrollments/dev", &dps.Enrollment{Attestation: dps.Attestation{Type: "x509",
			X509: &dps.X509Attestation{ClientCertificates: certs("hello")}}}, "not a PEM certificate"},
		{"group with a leaf as CA", "/enrollmentGroups/g", &dps.EnrollmentGroup{Attestation: dps.Attestation{Type: "x509",
			X509: &dps.X509Attestation{SigningCertificates: certs(certPEM(leaf))}}}, "not a CA certificate"},
		{"group with client certificates", "/enrollmentGroups/g", &dps.EnrollmentGroup{Attestation: dps.Attestation{Type: "x509",
			X509: &dps.X509Attestation{ClientCertificates: certs(certPEM(leaf))}}}, "not clientCertificates"},
		{"group referencing an unknown CA", "/enrollmentGroups/g", &dps.EnrollmentGroup{Attestation: dps.Attestation{Type: "x509",
			X509: &dps.X509Attestation{CAReferences: &dps.X509CAReferences{Primary: "nope"}}}}, "no certificate \"nope\""},
	} {
		err := e.dpsAPI.Do(ctx, "PUT", tc.path, "", tc.body, nil)
		if azerr.As(err).Status() != 400 || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v (want 400 with %q)", tc.what, err, tc.want)
		}
	}
	if after := e.counts(); !maps.Equal(before, after) {
		t.Fatalf("refused enrollments changed the store: %v → %v", before, after)
	}
}

// azerrStatus is the HTTP status of a refused registration (0 if none).
func azerrStatus(err error) int {
	var pe *provisioning.Error
	if errors.As(err, &pe) {
		return pe.Status
	}
	return 0
}

// A group member's certificate registers under its CN only: one that also
// lists another device's ID as its DNS name cannot take that device's
// registration and hub identity.
func TestX509DNSNameDoesNotTakeAnotherDevice(t *testing.T) {
	e := newEnv(t)
	ca := testutil.NewCert(t, "Fleet CA", true, nil)
	if err := e.dpsAPI.Do(ctx, "PUT", "/enrollmentGroups/x-fleet", "", &dps.EnrollmentGroup{
		Attestation: dps.Attestation{Type: dps.AttestationX509, X509: &dps.X509Attestation{
			SigningCertificates: &dps.X509Certificates{Primary: &dps.X509CertificateWithInfo{Certificate: certPEM(ca)}}}}}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := e.x509Device("x-dev4", testutil.NewCert(t, "x-dev4", false, &ca)).RegisterX509(ctx); err != nil {
		t.Fatal(err)
	}
	var before json.RawMessage
	if err := e.dpsAPI.Do(ctx, "GET", "/registrations/x-dev4", "", nil, &before); err != nil {
		t.Fatal(err)
	}
	dev5 := testutil.NewCertNames(t, "x-dev5", []string{"x-dev4"}, false, &ca)
	_, err := e.x509Device("x-dev4", dev5).RegisterX509(ctx)
	if pe := (*provisioning.Error)(nil); !errors.As(err, &pe) || pe.Status != 401 || !strings.Contains(pe.Message, `subject CN "x-dev5"`) {
		t.Fatalf("x-dev5's certificate as x-dev4: %v", err)
	}
	var after json.RawMessage
	if err := e.dpsAPI.Do(ctx, "GET", "/registrations/x-dev4", "", nil, &after); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Errorf("x-dev4's registration changed: %s → %s", before, after)
	}
	if res, err := e.x509Device("x-dev5", dev5).RegisterX509(ctx); err != nil || res.DeviceID != "x-dev5" {
		t.Fatalf("x-dev5: %+v %v", res, err)
	}
}
