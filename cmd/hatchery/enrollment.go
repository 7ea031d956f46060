package main

import (
	"bytes"
	"cmp"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/certtext"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/sas"
)

// enrollmentFlags are the flags create and update share.
type enrollmentFlags struct {
	attType, ek, srk, deviceID, tags, props, status, primary, secondary, hub string
	certPath, secondaryCertPath, caName, secondaryCAName                     string
	policy, webhook, webhookAPI, repro                                       string
	hubs                                                                     []string
	edge, individual                                                         bool
}

// shared are the fields individual enrollments and groups have in common.
type shared struct {
	att                 *dps.Attestation
	caps                **dps.Capabilities
	twin                **dps.InitialTwin
	status, hub, policy *string
	hubs                *[]string
	custom              **dps.CustomAllocationDefinition
	repro               **dps.ReprovisionPolicy
}

func enrollmentShared(e *dps.Enrollment) shared {
	return shared{&e.Attestation, &e.Capabilities, &e.InitialTwin, &e.ProvisioningStatus, &e.IoTHubHostName,
		&e.AllocationPolicy, &e.IoTHubs, &e.CustomAllocationDefinition, &e.ReprovisionPolicy}
}

func groupShared(g *dps.EnrollmentGroup) shared {
	return shared{&g.Attestation, &g.Capabilities, &g.InitialTwin, &g.ProvisioningStatus, &g.IoTHubHostName,
		&g.AllocationPolicy, &g.IoTHubs, &g.CustomAllocationDefinition, &g.ReprovisionPolicy}
}

// reprovisionPolicies are the CLI's names for reprovisionPolicy settings, as az's.
var reprovisionPolicies = map[string]dps.ReprovisionPolicy{
	"reprovisionandmigratedata": {UpdateHubAssignment: true, MigrateDeviceData: true},
	"reprovisionandresetdata":   {UpdateHubAssignment: true, MigrateDeviceData: false},
	"never":                     {UpdateHubAssignment: false, MigrateDeviceData: false},
}

func (f *enrollmentFlags) register(cmd *cobra.Command, individual, update bool) {
	f.individual = individual
	fl := cmd.Flags()
	fl.StringVar(&f.attType, "attestation-type", "", "tpm, symmetrickey or x509")
	what := "the device's certificate (PEM)"
	if !individual {
		what = "the CA certificate (PEM) that signs the devices' certificates"
		fl.StringVar(&f.caName, "ca-name", "", "x509: a verified CA certificate uploaded with 'hatchery certificate create', instead of --certificate-path")
		fl.StringVar(&f.secondaryCAName, "secondary-ca-name", "", "x509: a second verified CA certificate")
	}
	fl.StringVar(&f.certPath, "certificate-path", "", "x509: "+what)
	fl.StringVar(&f.secondaryCertPath, "secondary-certificate-path", "", "x509: a second certificate, to roll over to")
	if individual {
		fl.StringVar(&f.ek, "endorsement-key", "", "TPM endorsement key (base64 TPM2B_PUBLIC, from 'iotedge tpm provision-info')")
		fl.StringVar(&f.srk, "storage-root-key", "", "TPM storage root key (optional)")
		fl.StringVar(&f.deviceID, "device-id", "", "device ID in the hub (default: the registration ID)")
	}
	fl.BoolVar(&f.edge, "edge-enabled", false, "the device is an IoT Edge device")
	fl.StringVar(&f.tags, "initial-twin-tags", "", `initial twin tags as JSON, e.g. '{"environment":"prod"}'`)
	fl.StringVar(&f.props, "initial-twin-properties", "", "initial desired properties as JSON")
	fl.StringVar(&f.status, "provisioning-status", "", "enabled or disabled")
	keyDefault := "(default: generated)"
	if update {
		keyDefault = "(default: kept; rotate-keys makes a new one)"
	}
	fl.StringVar(&f.primary, "primary-key", "", "symmetric primary key "+keyDefault)
	fl.StringVar(&f.secondary, "secondary-key", "", "symmetric secondary key "+keyDefault)
	fl.StringVar(&f.hub, "iot-hub-host-name", "", "assign to this linked hub (static allocation)")
	fl.StringVar(&f.policy, "allocation-policy", "", "hashed, static, geoLatency or custom")
	fl.StringSliceVar(&f.hubs, "iot-hubs", nil, "the linked hubs to allocate among (default: those that apply allocation policies)")
	fl.StringVar(&f.webhook, "webhook-url", "", "custom allocation: the webhook asked which hub to use")
	fl.StringVar(&f.webhookAPI, "api-version", "2021-10-01", "custom allocation: the API version sent to the webhook")
	fl.StringVar(&f.repro, "reprovision-policy", "", "when a device registers again: reprovisionandmigratedata, reprovisionandresetdata or never")
}

// apply copies the flags the user set onto the enrollment's fields.
func (f *enrollmentFlags) apply(cmd *cobra.Command, sh shared, deviceID *string) error {
	changed := cmd.Flags().Changed
	att, caps, twin := sh.att, sh.caps, sh.twin
	if changed("attestation-type") {
		switch strings.ToLower(f.attType) {
		case "tpm":
			*att = dps.Attestation{Type: dps.AttestationTPM, TPM: &dps.TPMAttestation{}}
		case "symmetrickey":
			*att = dps.Attestation{Type: dps.AttestationSymmetricKey, SymmetricKey: &dps.SymmetricKeyAttestation{}}
		case "x509":
			*att = dps.Attestation{Type: dps.AttestationX509, X509: &dps.X509Attestation{}}
		default:
			return fmt.Errorf("--attestation-type %q: use tpm, symmetrickey or x509", f.attType)
		}
	}
	if err := f.applyX509(changed, att); err != nil {
		return err
	}
	if changed("endorsement-key") || changed("storage-root-key") {
		if att.TPM == nil {
			return fmt.Errorf("--endorsement-key needs --attestation-type tpm")
		}
		if changed("endorsement-key") {
			att.TPM.EndorsementKey = f.ek
		}
		if changed("storage-root-key") {
			att.TPM.StorageRootKey = f.srk
		}
	}
	if changed("primary-key") || changed("secondary-key") {
		if att.SymmetricKey == nil {
			return fmt.Errorf("--primary-key and --secondary-key need --attestation-type symmetrickey")
		}
		if changed("primary-key") {
			att.SymmetricKey.PrimaryKey = f.primary
		}
		if changed("secondary-key") {
			att.SymmetricKey.SecondaryKey = f.secondary
		}
	}
	if changed("device-id") {
		*deviceID = f.deviceID
	}
	if changed("edge-enabled") {
		*caps = &dps.Capabilities{IoTEdge: f.edge}
	}
	if changed("initial-twin-tags") || changed("initial-twin-properties") {
		if *twin == nil {
			*twin = &dps.InitialTwin{}
		}
		if changed("initial-twin-tags") {
			if !json.Valid([]byte(f.tags)) {
				return fmt.Errorf("--initial-twin-tags is not valid JSON: write an object such as '{\"environment\":\"prod\"}'")
			}
			(*twin).Tags = json.RawMessage(f.tags)
		}
		if changed("initial-twin-properties") {
			if !json.Valid([]byte(f.props)) {
				return fmt.Errorf("--initial-twin-properties is not valid JSON")
			}
			(*twin).Properties = &dps.InitialTwinDesired{Desired: json.RawMessage(f.props)}
		}
	}
	if changed("provisioning-status") {
		*sh.status = f.status
	}
	if changed("iot-hub-host-name") {
		*sh.hub = f.hub
	}
	if changed("allocation-policy") {
		*sh.policy = f.policy
		// The older iotHubHostName would go on pinning the device under
		// hashed allocation: choosing another policy than static ends it.
		if !strings.EqualFold(f.policy, dps.PolicyStatic) && !changed("iot-hub-host-name") {
			*sh.hub = ""
		}
	}
	if changed("iot-hubs") {
		*sh.hubs = f.hubs
	}
	if changed("webhook-url") || changed("api-version") {
		*sh.custom = &dps.CustomAllocationDefinition{WebhookURL: f.webhook, APIVersion: f.webhookAPI}
	}
	if changed("reprovision-policy") {
		p, ok := reprovisionPolicies[strings.ToLower(f.repro)]
		if !ok {
			return fmt.Errorf("--reprovision-policy %q: use reprovisionandmigratedata, reprovisionandresetdata or never", f.repro)
		}
		*sh.repro = &p
	}
	return nil
}

// applyX509 sets the certificates an X.509 enrollment trusts: the device's
// own for an individual enrollment, CA certificates (inline or by name)
// for a group.
func (f *enrollmentFlags) applyX509(changed func(string) bool, att *dps.Attestation) error {
	paths, names := changed("certificate-path") || changed("secondary-certificate-path"), changed("ca-name") || changed("secondary-ca-name")
	if !paths && !names {
		if changed("attestation-type") && att.Type == dps.AttestationTPM && !f.individual {
			return fmt.Errorf("a TPM group needs --certificate-path, its TPM makers' CA certificates (root and intermediates) that EK certificates chain to")
		}
		if changed("attestation-type") && att.Type == dps.AttestationX509 {
			if f.individual {
				return fmt.Errorf("--attestation-type x509 needs --certificate-path, the device's certificate")
			}
			return fmt.Errorf("--attestation-type x509 needs --certificate-path (the CA's certificate) or --ca-name (one uploaded with `hatchery certificate create`)")
		}
		return nil
	}
	if att.Type == dps.AttestationTPM && !f.individual && paths && !names {
		// A TPM group: the manufacturers' CA certificates.
		certs, err := f.readCertificates()
		if err != nil {
			return err
		}
		att.TPM = &dps.TPMAttestation{EKCertificateAuthorities: certs}
		return nil
	}
	if att.Type != dps.AttestationX509 || att.X509 == nil {
		return fmt.Errorf("--certificate-path and --ca-name need --attestation-type x509 (or tpm, for a group of TPMs with EK certificates)")
	}
	if names {
		if paths {
			return fmt.Errorf("give --certificate-path or --ca-name, not both")
		}
		att.X509.SigningCertificates = nil
		att.X509.CAReferences = &dps.X509CAReferences{Primary: f.caName, Secondary: f.secondaryCAName}
		return nil
	}
	certs, err := f.readCertificates()
	if err != nil {
		return err
	}
	if f.individual {
		att.X509.ClientCertificates = certs
	} else {
		att.X509.SigningCertificates, att.X509.CAReferences = certs, nil
	}
	return nil
}

// certificateCN is the subject CN of the certificate at path, which an
// X.509 device uses as its registration ID.
func certificateCN(path string) (string, error) {
	if path == "" {
		return "", errors.New("--registration-id is required (with --certificate-path, it defaults to the certificate's CN)")
	}
	pem, err := readCertificateFile(path)
	if err != nil {
		return "", err
	}
	c, err := certtext.Parse(pem)
	if err != nil {
		return "", fmt.Errorf("--certificate-path %s: %w", path, err)
	}
	if c.Subject.CommonName == "" {
		return "", fmt.Errorf("--certificate-path %s has no subject CN: give --registration-id", path)
	}
	return c.Subject.CommonName, nil
}

// readCertificateFile reads a certificate file as PEM text: a PEM file (or
// bundle) as it is, a DER file (as Windows and some makers export them)
// encoded.
func readCertificateFile(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	if !bytes.Contains(data, []byte("-----BEGIN")) {
		if c, err := x509.ParseCertificate(data); err == nil {
			return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})), nil
		}
	}
	return string(data), nil
}

// readCertificates reads --certificate-path and --secondary-certificate-path.
func (f *enrollmentFlags) readCertificates() (*dps.X509Certificates, error) {
	certs := &dps.X509Certificates{}
	for _, p := range []struct {
		path string
		to   **dps.X509CertificateWithInfo
	}{{f.certPath, &certs.Primary}, {f.secondaryCertPath, &certs.Secondary}} {
		if p.path == "" {
			continue
		}
		pem, err := readCertificateFile(p.path)
		if err != nil {
			return nil, err
		}
		*p.to = &dps.X509CertificateWithInfo{Certificate: pem}
	}
	return certs, nil
}

func enrollmentCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "enrollment", Short: "Manage individual enrollments (as `az iot dps enrollment`)"}
	var regID string
	idFlag := func(c *cobra.Command) {
		c.Flags().StringVar(&regID, "registration-id", "", "the device's registration ID")
		_ = c.MarkFlagRequired("registration-id")
	}
	enrollment := resource{svc: dpsClient, path: func() string { return "/enrollments/" + url.PathEscape(regID) }, flags: idFlag}
	put := func(use, short string, update bool) *cobra.Command {
		var f enrollmentFlags
		c := &cobra.Command{Use: use, Short: short, RunE: func(cmd *cobra.Command, _ []string) error {
			if regID == "" { // create: an X.509 device registers as its certificate's CN
				cn, err := certificateCN(f.certPath)
				if err != nil {
					return err
				}
				regID = strings.ToLower(cn)
			}
			out, err := putEnrollment(cmd, enrollment.path(), update, &dps.Enrollment{RegistrationID: regID},
				func(e *dps.Enrollment) string { return e.ETag },
				func(e *dps.Enrollment) error {
					if update {
						e.RegistrationState = nil // read-only
					} else if !cmd.Flags().Changed("attestation-type") {
						return fmt.Errorf("--attestation-type is required: tpm, symmetrickey or x509")
					}
					return f.apply(cmd, enrollmentShared(e), &e.DeviceID)
				})
			if err != nil {
				return err
			}
			return showWrittenEnrollment(cmd, out)
		}}
		if update {
			idFlag(c)
		} else {
			c.Flags().StringVar(&regID, "registration-id", "", "the device's registration ID (x509: default the certificate's CN)")
		}
		f.register(c, true, update)
		return c
	}
	show := showWithKeys(enrollment, "Show an enrollment and its registration state", func(e *dps.Enrollment) *dps.Attestation { return &e.Attestation }, showEnrollment)
	del := enrollment.deleteCmd("Delete an enrollment")
	listCmd := &cobra.Command{Use: "list", Short: "List enrollments", RunE: func(cmd *cobra.Command, _ []string) error {
		all, err := queryAll[dps.Enrollment](cmd, dpsClient, "/enrollments/query", "*")
		if err != nil {
			return err
		}
		rows := make([][]string, 0, len(all))
		for _, e := range all {
			rows = append(rows, []string{e.RegistrationID, orDash(e.DeviceID), e.Attestation.Type, strconv.FormatBool(e.Capabilities != nil && e.Capabilities.IoTEdge), e.ProvisioningStatus})
		}
		return renderTable(cmd, all, []string{"REGISTRATION ID", "DEVICE ID", "ATTESTATION", "EDGE", "STATUS"}, rows)
	}}
	cmd.AddCommand(put("create", "Create an individual enrollment", false), put("update", "Change an individual enrollment", true), show, del, listCmd, importCmd(),
		rotateCmd(idFlag, func(cmd *cobra.Command, which string) error {
			out, err := putEnrollment(cmd, enrollment.path(), true, &dps.Enrollment{},
				func(e *dps.Enrollment) string { return e.ETag },
				func(e *dps.Enrollment) error { e.RegistrationState = nil; return regenerate(&e.Attestation, which) })
			if err != nil {
				return err
			}
			return showWrittenEnrollment(cmd, out)
		}))
	return cmd
}

// showWrittenEnrollment shows an enrollment as a write answered it. That
// answer has no registration state, so the table reads it, as a read of
// the enrollment would have it; JSON stays the API's answer.
func showWrittenEnrollment(cmd *cobra.Command, e *dps.Enrollment) error {
	if !jsonOutput(cmd) {
		r, err := call[dps.RegistrationState](cmd, dpsClient, "GET", "/registrations/"+url.PathEscape(e.RegistrationID), "", nil)
		switch {
		case err == nil:
			e.RegistrationState = r
		case !azerr.HasStatus(err, http.StatusNotFound): // not registered: unassigned
			// The enrollment is written: failing now would have a retry
			// told it exists.
			fmt.Fprintf(cmd.ErrOrStderr(), "warning: enrollment %s is written, but its registration could not be read (%v): "+
				"see it with `hatchery enrollment show --registration-id %s`\n", e.RegistrationID, err, e.RegistrationID)
			return render(cmd, e, enrollmentRows(e))
		}
	}
	return showEnrollment(cmd, e)
}

// enrollmentRows are what an enrollment says, without its registration.
func enrollmentRows(e *dps.Enrollment) [][2]string {
	rows := [][2]string{
		{"Registration ID", e.RegistrationID},
		{"Device ID", orDash(e.DeviceID)},
		{"Attestation", e.Attestation.Type},
	}
	rows = append(rows, credentialRows(e.Attestation)...)
	return append(rows, settingRows(enrollmentShared(e))...)
}

func showEnrollment(cmd *cobra.Command, e *dps.Enrollment) error {
	reg := &dps.RegistrationState{Status: dps.StatusUnassigned}
	if e.RegistrationState != nil {
		reg = e.RegistrationState
	}
	return render(cmd, e, append(enrollmentRows(e), [][2]string{
		{"Registration status", reg.Status},
		{"Substatus", orDash(reg.Substatus)},
		{"Assigned device ID", orDash(reg.DeviceID)},
		{"Assigned hub", orDash(reg.AssignedHub)},
		{"Error", orDash(reg.ErrorMessage)},
	}...))
}

// settingRows shows the settings enrollments and groups share, each one
// the create and update flags set.
func settingRows(sh shared) [][2]string {
	custom := "-"
	if c := *sh.custom; c != nil && c.WebhookURL != "" {
		custom = c.WebhookURL + " (API " + c.APIVersion + ")"
	}
	return [][2]string{
		{"IoT Edge", strconv.FormatBool(*sh.caps != nil && (*sh.caps).IoTEdge)},
		{"Provisioning status", *sh.status},
		{"Initial twin tags", initialTags(*sh.twin)},
		{"Initial desired properties", initialDesired(*sh.twin)},
		{"Allocation", allocationText(*sh.policy, *sh.hub, *sh.hubs)},
		{"Webhook URL", custom},
		{"Reprovision policy", reprovisionName(*sh.repro)},
	}
}

// initialTags is the tags an enrollment's initial twin gives, as JSON.
func initialTags(t *dps.InitialTwin) string {
	if t == nil || len(t.Tags) == 0 {
		return "{}"
	}
	return compactJSON(t.Tags)
}

// initialDesired is the desired properties an initial twin gives, as JSON.
func initialDesired(t *dps.InitialTwin) string {
	if t == nil || t.Properties == nil || len(t.Properties.Desired) == 0 {
		return "{}"
	}
	return compactJSON(t.Properties.Desired)
}

// compactJSON is raw on one line, as a table row needs it.
func compactJSON(raw json.RawMessage) string {
	var b bytes.Buffer
	if json.Compact(&b, raw) != nil {
		return string(raw)
	}
	return b.String()
}

// reprovisionName is the CLI's name for p (reprovisionPolicies).
func reprovisionName(p *dps.ReprovisionPolicy) string {
	switch {
	case p == nil:
		return "-"
	case !p.UpdateHubAssignment: // the device stays: its data has nowhere to migrate
		return "never"
	case p.MigrateDeviceData:
		return "reprovisionandmigratedata"
	}
	return "reprovisionandresetdata"
}

// rotateCmd is `rotate-keys`: one symmetric key replaced by a fresh one
// while the other keeps working, so devices move over without downtime.
func rotateCmd(idFlag func(*cobra.Command), rotate func(cmd *cobra.Command, which string) error) *cobra.Command {
	var which string
	c := &cobra.Command{Use: "rotate-keys", Short: "Replace the primary or the secondary symmetric key with a new one",
		RunE: func(cmd *cobra.Command, _ []string) error {
			if which != "primary" && which != "secondary" {
				return fmt.Errorf("--key %q: use primary or secondary", which)
			}
			return rotate(cmd, which)
		}}
	idFlag(c)
	c.Flags().StringVar(&which, "key", "", "primary or secondary")
	_ = c.MarkFlagRequired("key")
	return c
}

// regenerate gives one key a fresh value (64 bytes, as the service makes
// them); the service keeps the other, which reads do not show.
func regenerate(a *dps.Attestation, which string) error {
	if a.SymmetricKey == nil {
		return fmt.Errorf("the enrollment uses %s attestation: only symmetric keys rotate", a.Type)
	}
	if which == "primary" {
		a.SymmetricKey.PrimaryKey = sas.NewKeyOf(64)
	} else {
		a.SymmetricKey.SecondaryKey = sas.NewKeyOf(64)
	}
	return nil
}

// allocationText describes the allocation policy and the hubs it uses,
// as the service applies them (dps.PinnedHub).
func allocationText(policy, static string, hubs []string) string {
	switch pinned := dps.PinnedHub(policy, static, hubs); {
	case pinned != "":
		return "static to " + pinned
	case len(hubs) > 0:
		return policy + " among " + strings.Join(hubs, ", ")
	}
	return policy + " among the linked hubs"
}

// credentialRows show what a device proves itself with: the symmetric
// keys (both where the answer has them, as after a rotation of either),
// or the primary certificate (a group's CA) by subject and thumbprint.
func credentialRows(a dps.Attestation) [][2]string {
	switch {
	case a.SymmetricKey != nil:
		rows := [][2]string{{"Primary key", cmp.Or(a.SymmetricKey.PrimaryKey, "(not shown: --show-keys shows it)")}}
		if a.SymmetricKey.SecondaryKey != "" {
			rows = append(rows, [2]string{"Secondary key", a.SymmetricKey.SecondaryKey})
		}
		return rows
	case a.TPM != nil && a.TPM.EKCertificateAuthorities != nil: // a TPM group
		return [][2]string{certificateRow(a.TPM.EKCertificateAuthorities)}
	case a.TPM != nil:
		return [][2]string{{"Endorsement key", a.TPM.EndorsementKey[:min(len(a.TPM.EndorsementKey), 24)] + "…"}}
	case a.X509 != nil:
		for _, cs := range []*dps.X509Certificates{a.X509.ClientCertificates, a.X509.SigningCertificates} {
			if row := certificateRow(cs); row[1] != "-" {
				return [][2]string{row}
			}
		}
		if a.X509.CAReferences != nil {
			return [][2]string{{"CA certificate", a.X509.CAReferences.Primary}}
		}
	}
	return [][2]string{{"Credential", "-"}}
}

// certificateRow shows the primary of cs by subject and thumbprint.
func certificateRow(cs *dps.X509Certificates) [2]string {
	if cs != nil && cs.Primary != nil && cs.Primary.Info != nil {
		return [2]string{"Certificate", cs.Primary.Info.SubjectName + " (SHA-256 " + cs.Primary.Info.SHA256Thumbprint + ")"}
	}
	return [2]string{"Certificate", "-"}
}

// putEnrollment creates or updates an enrollment or group at path: an update
// starts from the stored one, edit applies the flags, and the PUT carries
// the etag read, so a concurrent change is refused rather than overwritten.
func putEnrollment[T any](cmd *cobra.Command, path string, update bool, fresh *T, etag func(*T) string, edit func(*T) error) (*T, error) {
	if update {
		return modify(cmd, dpsClient, path, etag, edit)
	}
	if err := edit(fresh); err != nil {
		return nil, err
	}
	out, err := call[T](cmd, dpsClient, "PUT", path, "", fresh)
	if azerr.HasStatus(err, 409) {
		return nil, fmt.Errorf("%w; the update command changes it", err)
	}
	return out, err
}
