// Package hub is the IoT hub: the device and module registry, twins and
// their queries, the device-to-cloud event stream, cloud-to-device
// messages, direct methods, jobs, configurations (automatic device
// management and IoT Edge deployments), and the relay that lets replicas
// reach each other's devices. It knows nothing of HTTP or MQTT; the
// protocol front ends in internal/server call it.
package hub

import (
	"encoding/json"
	"time"

	"github.com/hatchery/hatchery/internal/sas"
)

// Device is a device identity, in the registry API's JSON shape; a module
// identity has the same shape with moduleId set.
type Device struct {
	DeviceID                   string         `json:"deviceId"`
	ModuleID                   string         `json:"moduleId,omitempty"`
	ManagedBy                  string         `json:"managedBy,omitempty"`
	GenerationID               string         `json:"generationId"`
	ETag                       string         `json:"etag"`
	ConnectionState            string         `json:"connectionState"`
	Status                     string         `json:"status"`
	StatusReason               *string        `json:"statusReason"`
	ConnectionStateUpdatedTime time.Time      `json:"connectionStateUpdatedTime"`
	StatusUpdatedTime          time.Time      `json:"statusUpdatedTime"`
	LastActivityTime           time.Time      `json:"lastActivityTime"`
	CloudToDeviceMessageCount  int            `json:"cloudToDeviceMessageCount"`
	Authentication             Authentication `json:"authentication"`
	Capabilities               Capabilities   `json:"capabilities"`
}

// Authentication is how a device proves itself to the hub.
type Authentication struct {
	Type           string         `json:"type"`
	SymmetricKey   SymmetricKey   `json:"symmetricKey"`
	X509Thumbprint X509Thumbprint `json:"x509Thumbprint"`
}

// sasKeys are the keys SAS tokens for a may be signed with: none unless
// it is of type sas, whatever keys it holds.
func (a Authentication) sasKeys() [][]byte {
	if a.Type != "sas" {
		return nil
	}
	return sas.Keys(a.SymmetricKey.PrimaryKey, a.SymmetricKey.SecondaryKey)
}

// SymmetricKey holds base64 device keys.
type SymmetricKey struct {
	PrimaryKey   string `json:"primaryKey"`
	SecondaryKey string `json:"secondaryKey"`
}

// MarshalJSON writes a key there is none of as null, as the hosted hub
// does for X.509 and CA-signed devices ("" reads as an empty key).
func (k SymmetricKey) MarshalJSON() ([]byte, error) {
	orNull := func(s string) *string {
		if s == "" {
			return nil
		}
		return &s
	}
	return json.Marshal(struct {
		PrimaryKey   *string `json:"primaryKey"`
		SecondaryKey *string `json:"secondaryKey"`
	}{orNull(k.PrimaryKey), orNull(k.SecondaryKey)})
}

// X509Thumbprint holds certificate thumbprints (hex SHA-1 or SHA-256).
type X509Thumbprint struct {
	PrimaryThumbprint   *string `json:"primaryThumbprint"`
	SecondaryThumbprint *string `json:"secondaryThumbprint"`
}

// Capabilities of a device.
type Capabilities struct {
	IoTEdge bool `json:"iotEdge"`
}

// Twin is a device twin in the twin API's JSON shape.
type Twin struct {
	DeviceID                  string          `json:"deviceId"`
	ModuleID                  string          `json:"moduleId,omitempty"`
	ModelID                   string          `json:"modelId"` // its Plug and Play model, "" if it announced none
	ETag                      string          `json:"etag"`
	DeviceETag                string          `json:"deviceEtag"`
	Status                    string          `json:"status"`
	StatusUpdateTime          time.Time       `json:"statusUpdateTime"`
	ConnectionState           string          `json:"connectionState"`
	LastActivityTime          time.Time       `json:"lastActivityTime"`
	CloudToDeviceMessageCount int             `json:"cloudToDeviceMessageCount"`
	AuthenticationType        string          `json:"authenticationType"`
	X509Thumbprint            X509Thumbprint  `json:"x509Thumbprint"`
	Version                   int64           `json:"version"`
	Tags                      json.RawMessage `json:"tags"`
	Properties                TwinProperties  `json:"properties"`
	Capabilities              Capabilities    `json:"capabilities"`
	// Configurations says which deployments target or apply to the device.
	Configurations map[string]ConfigStatus `json:"configurations,omitempty"`
}

// TwinProperties are the desired and reported property documents, each
// with its $version and $metadata.
type TwinProperties struct {
	Desired  json.RawMessage `json:"desired"`
	Reported json.RawMessage `json:"reported"`
}

// TwinPatch is a PATCH or PUT body of the twin API.
type TwinPatch struct {
	Tags       map[string]any `json:"tags"`
	Properties *DesiredPatch  `json:"properties"`
}

// DesiredPatch holds desired properties to merge or set.
type DesiredPatch struct {
	Desired map[string]any `json:"desired"`
}

// record is how a device is stored: identity and twin in one document so
// that they change together. It is read with twindoc.Unmarshal, for the
// twin's numbers to keep every digit.
type record struct {
	Device          Device         `json:"device"`
	DeviceETag      string         `json:"deviceEtag"`
	TwinETag        string         `json:"twinEtag"`
	TwinVersion     int64          `json:"twinVersion"`
	Tags            map[string]any `json:"tags"`
	Desired         map[string]any `json:"desired"`
	DesiredVersion  int64          `json:"desiredVersion"`
	DesiredUpdated  time.Time      `json:"desiredUpdated"`
	Reported        map[string]any `json:"reported"`
	ReportedVersion int64          `json:"reportedVersion"`
	ReportedUpdated time.Time      `json:"reportedUpdated"`
	// Configurations are the deployments targeting the device.
	Configurations map[string]ConfigStatus `json:"configurations,omitempty"`
	// Connection names the device's latest connection (on any replica), so
	// that an older one closing does not mark it disconnected.
	Connection string `json:"connection,omitempty"`
	// ModelID is the Plug and Play model the device last announced.
	ModelID string `json:"modelId,omitempty"`
	// Session is what the identity subscribed to in its persistent
	// session (MQTT's CleanSession 0), kept across its connections.
	Session []Subscription `json:"session,omitempty"`
}

// DesiredVersion reads $version from the desired document.
func (p TwinProperties) DesiredVersion() int64 {
	var v struct {
		Version int64 `json:"$version"`
	}
	_ = json.Unmarshal(p.Desired, &v)
	return v.Version
}
