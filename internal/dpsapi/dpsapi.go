// Package dpsapi holds the types of the DPS device registration API that
// both the service and device-side clients use.
package dpsapi

import (
	"encoding/json"
	"time"
)

// Registration states.
const (
	StatusUnassigned = "unassigned"
	StatusAssigning  = "assigning"
	StatusAssigned   = "assigned"
	StatusFailed     = "failed"
	StatusDisabled   = "disabled"
)

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
	X509                   *X509Result     `json:"x509,omitempty"`
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

// X509Result describes the certificate a device authenticated with and,
// for group members, the CA it chained to.
type X509Result struct {
	CertificateInfo        *X509CertificateInfo `json:"certificateInfo,omitempty"`
	EnrollmentGroupID      string               `json:"enrollmentGroupId,omitempty"`
	SigningCertificateInfo *X509CertificateInfo `json:"signingCertificateInfo,omitempty"`
}

// X509CertificateInfo describes a certificate, in the service API's shape.
type X509CertificateInfo struct {
	SubjectName      string    `json:"subjectName"`
	SHA1Thumbprint   string    `json:"sha1Thumbprint"`
	SHA256Thumbprint string    `json:"sha256Thumbprint"`
	IssuerName       string    `json:"issuerName"`
	NotBeforeUtc     time.Time `json:"notBeforeUtc"`
	NotAfterUtc      time.Time `json:"notAfterUtc"`
	SerialNumber     string    `json:"serialNumber"`
	Version          int       `json:"version"`
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
