// Package dps is the Device Provisioning Service: enrollments and
// enrollment groups, device attestation (TPM, symmetric key, X.509, TPM
// groups by EK certificate), allocation to a linked hub, reprovisioning
// and the registration records. It knows nothing of HTTP; internal/server maps its
// calls and errors onto the Azure DPS REST API.
package dps

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/dpsapi"
)

// The registration API's types are shared with device-side clients, which
// must not pull in the service.
type (
	RegistrationState   = dpsapi.RegistrationState
	TPMResult           = dpsapi.TPMResult
	SymKeyResult        = dpsapi.SymKeyResult
	Operation           = dpsapi.Operation
	Challenge           = dpsapi.Challenge
	X509Result          = dpsapi.X509Result
	X509CertificateInfo = dpsapi.X509CertificateInfo
)

// Registration states.
const (
	StatusUnassigned = dpsapi.StatusUnassigned
	StatusAssigning  = dpsapi.StatusAssigning
	StatusAssigned   = dpsapi.StatusAssigned
	StatusFailed     = dpsapi.StatusFailed
	StatusDisabled   = dpsapi.StatusDisabled
)

// Polling intervals suggested to devices (Retry-After, in seconds). A
// registration is assigned before its PUT is answered, so the device may
// ask for the result at once; an operation still assigning is asked again
// a second later.
const (
	PollNow   = 0
	PollLater = 1
)

// Attestation types, as spelled on the wire.
const (
	AttestationTPM          = "tpm"
	AttestationSymmetricKey = "symmetricKey"
	AttestationX509         = "x509"
)

// Enrollment is an individual enrollment, in the service API's JSON shape.
type Enrollment struct {
	RegistrationID             string                      `json:"registrationId"`
	DeviceID                   string                      `json:"deviceId,omitempty"`
	Attestation                Attestation                 `json:"attestation"`
	Capabilities               *Capabilities               `json:"capabilities,omitempty"`
	IoTHubHostName             string                      `json:"iotHubHostName,omitempty"`
	InitialTwin                *InitialTwin                `json:"initialTwin,omitempty"`
	ETag                       string                      `json:"etag,omitempty"`
	ProvisioningStatus         string                      `json:"provisioningStatus,omitempty"`
	ReprovisionPolicy          *ReprovisionPolicy          `json:"reprovisionPolicy,omitempty"`
	AllocationPolicy           string                      `json:"allocationPolicy,omitempty"`
	IoTHubs                    []string                    `json:"iotHubs,omitempty"`
	CustomAllocationDefinition *CustomAllocationDefinition `json:"customAllocationDefinition,omitempty"`
	RegistrationState          *RegistrationState          `json:"registrationState,omitempty"`
	CreatedDateTimeUtc         *time.Time                  `json:"createdDateTimeUtc,omitempty"`
	LastUpdatedDateTimeUtc     *time.Time                  `json:"lastUpdatedDateTimeUtc,omitempty"`
	// OptionalDeviceInformation is what the hosted service keeps about the
	// device (API 2021-10-01): a JSON object, kept and given back as sent,
	// so that an export from it imports as it is.
	OptionalDeviceInformation json.RawMessage `json:"optionalDeviceInformation,omitempty"`
}

// EnrollmentGroup is an enrollment group; devices derive their keys from it.
type EnrollmentGroup struct {
	EnrollmentGroupID          string                      `json:"enrollmentGroupId"`
	Attestation                Attestation                 `json:"attestation"`
	Capabilities               *Capabilities               `json:"capabilities,omitempty"`
	IoTHubHostName             string                      `json:"iotHubHostName,omitempty"`
	InitialTwin                *InitialTwin                `json:"initialTwin,omitempty"`
	ETag                       string                      `json:"etag,omitempty"`
	ProvisioningStatus         string                      `json:"provisioningStatus,omitempty"`
	ReprovisionPolicy          *ReprovisionPolicy          `json:"reprovisionPolicy,omitempty"`
	AllocationPolicy           string                      `json:"allocationPolicy,omitempty"`
	IoTHubs                    []string                    `json:"iotHubs,omitempty"`
	CustomAllocationDefinition *CustomAllocationDefinition `json:"customAllocationDefinition,omitempty"`
	CreatedDateTimeUtc         *time.Time                  `json:"createdDateTimeUtc,omitempty"`
	LastUpdatedDateTimeUtc     *time.Time                  `json:"lastUpdatedDateTimeUtc,omitempty"`
}

// Attestation is the mechanism a device proves its identity with.
type Attestation struct {
	Type         string                   `json:"type"`
	TPM          *TPMAttestation          `json:"tpm,omitempty"`
	X509         *X509Attestation         `json:"x509,omitempty"`
	SymmetricKey *SymmetricKeyAttestation `json:"symmetricKey,omitempty"`
}

// TPMAttestation holds base64 TPM2B_PUBLIC encodings (individual
// enrollments) or the CA certificates of TPM manufacturers (groups).
type TPMAttestation struct {
	EndorsementKey           string            `json:"endorsementKey,omitempty"`
	StorageRootKey           string            `json:"storageRootKey,omitempty"`
	EKCertificateAuthorities *X509Certificates `json:"ekCertificateAuthorities,omitempty"`
}

// SymmetricKeyAttestation holds base64 keys.
type SymmetricKeyAttestation struct {
	PrimaryKey   string `json:"primaryKey,omitempty"`
	SecondaryKey string `json:"secondaryKey,omitempty"`
}

// Redacted is e as reads and queries show it: without its symmetric keys,
// which only its attestation mechanism (and the answer to a write) shows,
// as in the hosted service.
func (e Enrollment) Redacted() *Enrollment {
	e.Attestation = e.Attestation.withoutKeys()
	return &e
}

// Redacted is g as reads and queries show it (Enrollment.Redacted).
func (g EnrollmentGroup) Redacted() *EnrollmentGroup {
	g.Attestation = g.Attestation.withoutKeys()
	return &g
}

func (a Attestation) withoutKeys() Attestation {
	if a.SymmetricKey != nil {
		a.SymmetricKey = &SymmetricKeyAttestation{}
	}
	return a
}

// keepKeys gives a, an update of stored, the stored symmetric keys it
// leaves out: reads do not show them, so an enrollment read, changed and
// written back keeps its keys. A new key is sent, not left out.
func (a *Attestation) keepKeys(stored Attestation) {
	if a.Type != AttestationSymmetricKey || stored.SymmetricKey == nil {
		return
	}
	if a.SymmetricKey == nil {
		a.SymmetricKey = &SymmetricKeyAttestation{}
	}
	k := a.SymmetricKey
	k.PrimaryKey = cmp.Or(k.PrimaryKey, stored.SymmetricKey.PrimaryKey)
	k.SecondaryKey = cmp.Or(k.SecondaryKey, stored.SymmetricKey.SecondaryKey)
}

// Capabilities of the device in its hub.
type Capabilities struct {
	IoTEdge bool `json:"iotEdge"`
}

// InitialTwin is applied to the device twin when the device is created.
type InitialTwin struct {
	Tags       json.RawMessage     `json:"tags,omitempty"`
	Properties *InitialTwinDesired `json:"properties,omitempty"`
}

// InitialTwinDesired holds the initial desired properties.
type InitialTwinDesired struct {
	Desired json.RawMessage `json:"desired,omitempty"`
}

// ReprovisionPolicy says what happens when a device re-registers.
type ReprovisionPolicy struct {
	UpdateHubAssignment bool `json:"updateHubAssignment"`
	MigrateDeviceData   bool `json:"migrateDeviceData"`
}

// UnmarshalJSON takes a flag the JSON leaves out as true, Azure's default,
// so {"migrateDeviceData": false} still lets the device move hubs.
func (p *ReprovisionPolicy) UnmarshalJSON(b []byte) error {
	type plain ReprovisionPolicy
	v := plain{UpdateHubAssignment: true, MigrateDeviceData: true}
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*p = ReprovisionPolicy(v)
	return nil
}

// CustomAllocationDefinition names an allocation webhook.
type CustomAllocationDefinition struct {
	WebhookURL string `json:"webhookUrl"`
	APIVersion string `json:"apiVersion"`
}

// LinkedHub is an IoT hub the service allocates devices to, reached
// through its registry REST API.
type LinkedHub struct {
	HostName         string `json:"hostName"`
	ConnectionString string `json:"connectionString"`
	// Endpoint overrides https://HostName for the registry API (another port).
	Endpoint string `json:"endpoint,omitempty"`
	// CACertificate (PEM) is trusted for this hub's TLS certificate besides
	// the system's CAs: another hatchery serve's own CA, say.
	CACertificate         string `json:"caCertificate,omitempty"`
	AllocationWeight      int    `json:"allocationWeight,omitempty"`
	ApplyAllocationPolicy bool   `json:"applyAllocationPolicy"`
	// LatencyMs is the geoLatency table: the latency from devices in each
	// network (CIDR) to this hub.
	LatencyMs map[string]int `json:"latencyMs,omitempty"`
}

// HubDevice is what assignment writes into a hub: a device authenticating
// with a key (TPM, symmetric key) or with its certificate (X.509).
type HubDevice struct {
	DeviceID     string
	PrimaryKey   string // base64
	SecondaryKey string // base64
	Thumbprint   string // hex SHA-256 of an X.509 device's certificate
	IoTEdge      bool
	Tags         json.RawMessage
	Desired      json.RawMessage
	// NoTakeover refuses to replace an existing device whose credentials
	// differ from these (ErrDeviceTaken).
	NoTakeover bool
}

// Credential is a short fingerprint of the credential the device proves
// itself with in its hub (its primary key or certificate thumbprint), by
// which a device is known to be still the one provisioned.
func (d HubDevice) Credential() string { return CredentialOf(d.PrimaryKey, d.Thumbprint) }

// CredentialOf is Credential of a device with primaryKey or thumbprint.
func CredentialOf(primaryKey, thumbprint string) string {
	sum := sha256.Sum256([]byte(primaryKey + "|" + strings.ToUpper(thumbprint)))
	return hex.EncodeToString(sum[:8])
}
