// Package config reads and writes the device-side configuration of the edge
// runtime: /etc/aziot/config.toml as Azure IoT Edge 1.4 and 1.5 define it,
// and, for migration, /etc/iotedge/config.yaml of IoT Edge 1.1.
//
// Parsing is strict. A misspelt or misplaced key in an Azure config is
// silently ignored and the device then fails to provision far from the cause,
// so here every key must be one the runtime uses, and every error names the
// file, the line and what to write instead. Settings of Azure IoT Edge that
// Hatchery accepts but does not act on produce warnings.
package config

import (
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
)

// Config is a device's edge runtime configuration. Parse, ParseLegacyYAML and
// FromConnectionString return it validated and with defaults filled in.
//
// The toml tags give the config.toml names; "inline" marks tables written as
// { key = value }, and comment tags are what TOML writes above a key or table.
type Config struct {
	Hostname       string `toml:"hostname"`
	ParentHostname string `toml:"parent_hostname"`
	// TrustBundleCert is a file:// URI or absolute path (see FilePath).
	TrustBundleCert        string             `toml:"trust_bundle_cert" comment:"CA certificates that modules and the runtime trust (file:// URI)"`
	AutoReprovisioningMode ReprovisioningMode `toml:"auto_reprovisioning_mode" comment:"When to provision again: Dynamic, AlwaysOnStartup or OnErrorOnly"`
	Homedir                string             `toml:"homedir"`
	// AllowElevatedDockerPermissions false has modules' containers made
	// without createOptions' HostConfig.Privileged and HostConfig.CapAdd.
	AllowElevatedDockerPermissions bool `toml:"allow_elevated_docker_permissions" comment:"false: modules' containers are made without createOptions' HostConfig.Privileged and CapAdd"`

	Provisioning Provisioning `toml:"provisioning" comment:"How the device gets its IoT hub identity"`
	TPM          TPM          `toml:"tpm" comment:"The TPM that holds the device's keys"`
	Agent        Agent        `toml:"agent" comment:"The edge agent module"`
	Connect      Connect      `toml:"connect" comment:"Where modules reach the runtime's APIs"`
	Listen       Listen       `toml:"listen" comment:"Where the runtime serves its APIs"`
	MobyRuntime  MobyRuntime  `toml:"moby_runtime" comment:"The container engine"`
}

// ReprovisioningMode says when a DPS-provisioned device provisions again.
type ReprovisioningMode string

const (
	// Dynamic reprovisions when the hub rejects the device's credentials
	// (it may have been moved to another hub), and on errors.
	Dynamic ReprovisioningMode = "Dynamic"
	// AlwaysOnStartup reprovisions whenever the runtime starts.
	AlwaysOnStartup ReprovisioningMode = "AlwaysOnStartup"
	// OnErrorOnly provisions only when there is no identity backup to use
	// (or its TPM key is gone).
	OnErrorOnly ReprovisioningMode = "OnErrorOnly"
)

// Source is where the device's identity comes from.
type Source string

const (
	SourceDPS    Source = "dps"
	SourceManual Source = "manual"
	SourceNone   Source = "none"
)

// Method is an attestation method (tpm, symmetric_key, x509) or a manual
// authentication method (sas, x509).
type Method string

const (
	MethodTPM          Method = "tpm"
	MethodSymmetricKey Method = "symmetric_key"
	MethodX509         Method = "x509"
	MethodSAS          Method = "sas"
)

// Provisioning is [provisioning]. DPS uses GlobalEndpoint, IDScope, Payload
// and Attestation; manual provisioning uses either ConnectionString or
// IoTHubHostname, DeviceID and Authentication.
type Provisioning struct {
	Source           Source         `toml:"source"`
	GlobalEndpoint   string         `toml:"global_endpoint"`
	IDScope          string         `toml:"id_scope"`
	Payload          Payload        `toml:"payload,inline"`
	Attestation      Attestation    `toml:"attestation"`
	ConnectionString string         `toml:"connection_string"`
	IoTHubHostname   string         `toml:"iothub_hostname"`
	DeviceID         string         `toml:"device_id"`
	Authentication   Authentication `toml:"authentication"`
}

// Payload is a JSON file sent to DPS with the registration, for custom
// allocation.
type Payload struct {
	URI string `toml:"uri"`
}

// Attestation is [provisioning.attestation]: how the device proves its
// identity to DPS.
type Attestation struct {
	Method Method `toml:"method"`
	// RegistrationID is required for tpm and symmetric_key; x509 takes it
	// from the certificate's common name when empty.
	RegistrationID string       `toml:"registration_id"`
	SymmetricKey   SymmetricKey `toml:"symmetric_key,inline"`
	IdentityCert   string       `toml:"identity_cert"`
	IdentityPK     string       `toml:"identity_pk"`
}

// Authentication is [provisioning.authentication] of manual provisioning.
type Authentication struct {
	Method       Method       `toml:"method"`
	DeviceIDPK   SymmetricKey `toml:"device_id_pk,inline"`
	IdentityCert string       `toml:"identity_cert"`
	IdentityPK   string       `toml:"identity_pk"`
}

// SymmetricKey is a key given inline (Value, base64) or in a file (URI).
type SymmetricKey struct {
	Value string `toml:"value"`
	URI   string `toml:"uri"`
}

// TPM is [tpm].
type TPM struct {
	// TCTI is a tpm2-tss TCTI string: "device", "device:/dev/tpm0",
	// "swtpm:host=H,port=P" or "mssim:host=H,port=P".
	TCTI         string   `toml:"tcti"`
	AuthKeyIndex KeyIndex `toml:"auth_key_index"`
}

// KeyIndex is where in the TPM the DPS authentication key persists, as an
// offset from 0x81000000. config.toml may give it as an integer (0x100) or,
// as Azure's documentation does, as a string ("0x00_01_00").
type KeyIndex uint32

// UnmarshalText parses the string form.
func (k *KeyIndex) UnmarshalText(b []byte) error {
	n, err := strconv.ParseUint(string(b), 0, 32)
	if err != nil {
		return fmt.Errorf("%q is not a number", b)
	}
	*k = KeyIndex(n)
	return nil
}

// Agent is [agent], the edge agent module the runtime starts first.
type Agent struct {
	Name            string            `toml:"name" yaml:"name"`
	Type            string            `toml:"type" yaml:"type"`
	ImagePullPolicy string            `toml:"imagePullPolicy" yaml:"imagePullPolicy"`
	Config          AgentConfig       `toml:"config" yaml:"config"`
	Env             map[string]string `toml:"env" yaml:"env"`
}

// AgentConfig is [agent.config].
type AgentConfig struct {
	Image string `toml:"image" yaml:"image"`
	// CreateOptions are Docker's container create options, as a table.
	CreateOptions map[string]any `toml:"createOptions" yaml:"createOptions"`
	Auth          RegistryAuth   `toml:"auth" yaml:"auth"`
}

// RegistryAuth is [agent.config.auth], the credentials to pull the agent image.
type RegistryAuth struct {
	ServerAddress string `toml:"serveraddress" yaml:"serveraddress"`
	Username      string `toml:"username" yaml:"username"`
	Password      string `toml:"password" yaml:"password"`
}

// Connect is [connect].
type Connect struct {
	WorkloadURI   string `toml:"workload_uri" yaml:"workload_uri"`
	ManagementURI string `toml:"management_uri" yaml:"management_uri"`
}

// Listen is [listen].
type Listen struct {
	WorkloadURI   string `toml:"workload_uri" yaml:"workload_uri"`
	ManagementURI string `toml:"management_uri" yaml:"management_uri"`
	MinTLSVersion string `toml:"min_tls_version" yaml:"min_tls_version"`
}

// MobyRuntime is [moby_runtime].
type MobyRuntime struct {
	URI     string      `toml:"uri" yaml:"uri"`
	Network MobyNetwork `toml:"network,inline" yaml:"network"`
}

// MobyNetwork is moby_runtime.network: the name of the modules' network,
// written as a string or, as Azure documents for an IPv6 network, as a
// table of name, ipv6 and ipam.
type MobyNetwork struct {
	Name string `toml:"name" yaml:"name"`
	IPv6 bool   `toml:"ipv6" yaml:"ipv6"`
	IPAM any    `toml:"ipam" yaml:"ipam"` // only checked for: see validate
}

// UnmarshalText reads the string form, network = "<name>".
func (n *MobyNetwork) UnmarshalText(b []byte) error {
	n.Name = string(b)
	return nil
}

// MarshalText writes the string form: a valid configuration has no other
// settings.
func (n MobyNetwork) MarshalText() ([]byte, error) { return []byte(n.Name), nil }

// Defaults that Azure IoT Edge applies when a key is left out.
const (
	DefaultGlobalEndpoint          = "https://global.azure-devices-provisioning.net"
	DefaultTCTI                    = "device"
	DefaultAuthKeyIndex   KeyIndex = 0x100
	DefaultMobyURI                 = "unix:///var/run/docker.sock"
	DefaultMobyNetwork             = "azure-iot-edge"
)

// Default returns the configuration of an empty config.toml. (The global
// endpoint is filled in only when source is "dps".)
func Default() *Config {
	return &Config{
		AutoReprovisioningMode: Dynamic,
		// As Azure IoT Edge: createOptions may ask for elevated rights
		// unless the device's owner says otherwise.
		AllowElevatedDockerPermissions: true,
		Provisioning:                   Provisioning{Source: SourceNone},
		TPM:                            TPM{TCTI: DefaultTCTI, AuthKeyIndex: DefaultAuthKeyIndex},
		MobyRuntime:                    MobyRuntime{URI: DefaultMobyURI, Network: MobyNetwork{Name: DefaultMobyNetwork}},
	}
}

// Pos is a place in a configuration file. Line and Column count from 1; zero
// means unknown.
type Pos struct {
	File         string
	Line, Column int
}

func (p Pos) String() string {
	switch {
	case p.Line > 0 && p.Column > 0:
		return fmt.Sprintf("%s:%d:%d", p.File, p.Line, p.Column)
	case p.Line > 0:
		return fmt.Sprintf("%s:%d", p.File, p.Line)
	}
	return p.File
}

func prefixed(p Pos, msg string) string {
	if s := p.String(); s != "" {
		return s + ": " + msg
	}
	return msg
}

// Error is a problem that makes a configuration unusable. Parse joins all it
// finds with errors.Join; errors.As finds the first.
type Error struct {
	Pos
	Msg string
}

func (e *Error) Error() string { return prefixed(e.Pos, e.Msg) }

// Warning is a problem that does not stop the configuration from being used.
type Warning struct {
	Pos
	Msg string
}

func (w Warning) String() string { return prefixed(w.Pos, w.Msg) }

// LegacyPath is where IoT Edge 1.1 kept its configuration.
var LegacyPath = "/etc/iotedge/config.yaml"

// Load reads and parses a config.toml.
func Load(path string) (*Config, []Warning, error) {
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if _, err := os.Stat(LegacyPath); err == nil {
			return nil, nil, fmt.Errorf("%s does not exist, but %s of IoT Edge 1.1 does: convert it with 'sudo iotedge config import', "+
				"then run 'sudo iotedge config apply'", path, LegacyPath)
		}
		template := filepath.Join(filepath.Dir(path), "config.toml.edge.template")
		if _, err := os.Stat(template); err != nil { // not installed from the package
			return nil, nil, fmt.Errorf("%s does not exist: create it from packaging/config.toml.edge.template of the source tree "+
				"(the package installs it as %s), then edit it", path, template)
		}
		return nil, nil, fmt.Errorf("%s does not exist: create it from the template with 'sudo cp %s %s', then edit it", path, template, path)
	case errors.Is(err, fs.ErrPermission):
		return nil, nil, fmt.Errorf("%s: %w: it may hold the device's keys, which only root and the runtime's service user may read: run as root (sudo)",
			path, fs.ErrPermission)
	case err != nil:
		return nil, nil, err
	}
	return Parse(path, data)
}

// FilePath returns the local path of a file reference (a file:// URI or a
// path) as the configuration gives it.
func FilePath(ref string) string {
	if u, err := url.Parse(ref); err == nil && u.Scheme == "file" {
		return u.Path
	}
	return ref
}
