// Package dps is the Device Provisioning Service: enrollments, device
// attestation (TPM, symmetric key), allocation to a linked hub and the
// registration records. It knows nothing of HTTP; internal/server maps its
// calls and errors onto the Azure DPS REST API.
package dps

import (
	"encoding/json"
	"time"
)

// Attestation types, as spelled on the wire.
const (
	AttestationTPM          = "tpm"
	AttestationSymmetricKey = "symmetricKey"
	AttestationX509         = "x509"
)

// Registration states.
const (
	StatusUnassigned = "unassigned"
	StatusAssigning  = "assigning"
	StatusAssigned   = "assigned"
	StatusFailed     = "failed"
	StatusDisabled   = "disabled"
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
	X509         json.RawMessage          `json:"x509,omitempty"`
	SymmetricKey *SymmetricKeyAttestation `json:"symmetricKey,omitempty"`
}

// TPMAttestation holds base64 TPM2B_PUBLIC encodings.
type TPMAttestation struct {
	EndorsementKey string `json:"endorsementKey"`
	StorageRootKey string `json:"storageRootKey,omitempty"`
}

// SymmetricKeyAttestation holds base64 keys.
type SymmetricKeyAttestation struct {
	PrimaryKey   string `json:"primaryKey"`
	SecondaryKey string `json:"secondaryKey"`
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

// CustomAllocationDefinition names an allocation webhook.
type CustomAllocationDefinition struct {
	WebhookURL string `json:"webhookUrl"`
	APIVersion string `json:"apiVersion"`
}

// RegistrationState is the record of a device's latest registration.
type RegistrationState struct {
	RegistrationID         string          `json:"registrationId"`
	CreatedDateTimeUtc     *time.Time      `json:"createdDateTimeUtc,omitempty"`
	AssignedHub            string          `json:"assignedHub,omitempty"`
	DeviceID               string          `json:"deviceId,omitempty"`
	Status                 string          `json:"status"`
	Substatus              string          `json:"substatus,omitempty"`
	ErrorCode              int             `json:"errorCode,omitempty"`
	ErrorMessage           string          `json:"errorMessage,omitempty"`
	LastUpdatedDateTimeUtc *time.Time      `json:"lastUpdatedDateTimeUtc,omitempty"`
	ETag                   string          `json:"etag,omitempty"`
	GenerationID           string          `json:"generationId,omitempty"`
	EnrollmentGroupID      string          `json:"enrollmentGroupId,omitempty"`
	Payload                json.RawMessage `json:"payload,omitempty"`
	TPM                    *TPMResult      `json:"tpm,omitempty"`
	SymmetricKey           *SymKeyResult   `json:"symmetricKey,omitempty"`
}

// TPMResult carries the activation blob that wraps the device's hub key.
type TPMResult struct {
	AuthenticationKey string `json:"authenticationKey"`
}

// SymKeyResult names what the device authenticated against.
type SymKeyResult struct {
	RegistrationID    string `json:"registrationId"`
	EnrollmentGroupID string `json:"enrollmentGroupId,omitempty"`
}

// Operation is an asynchronous registration, polled by the device.
type Operation struct {
	OperationID       string             `json:"operationId"`
	Status            string             `json:"status"`
	RegistrationState *RegistrationState `json:"registrationState,omitempty"`
}

// Challenge is the 401 answer to a TPM device's first request.
type Challenge struct {
	Message           string `json:"message"`
	AuthenticationKey string `json:"authenticationKey"`
	KeyName           string `json:"keyName"`
}

// LinkedHub is an IoT hub the service allocates devices to, reached
// through its registry REST API.
type LinkedHub struct {
	HostName         string `json:"hostName"`
	ConnectionString string `json:"connectionString"`
	// Endpoint overrides https://HostName for the registry API (another port).
	Endpoint              string `json:"endpoint,omitempty"`
	AllocationWeight      int    `json:"allocationWeight,omitempty"`
	ApplyAllocationPolicy bool   `json:"applyAllocationPolicy"`
}

// HubDevice is what assignment writes into a hub.
type HubDevice struct {
	DeviceID     string
	PrimaryKey   string // base64
	SecondaryKey string // base64
	IoTEdge      bool
	Tags         json.RawMessage
	Desired      json.RawMessage
}
