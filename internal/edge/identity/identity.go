// Package identity gives the edge runtime its IoT hub identity: it
// provisions through DPS (TPM, symmetric key or X.509) or takes a manual
// one, keeps the result as a backup so the device starts when DPS is
// unreachable, and signs hub tokens — inside the TPM for TPM devices —
// or hands out the X.509 device's client certificate.
package identity

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/atomicfile"
	"github.com/hatchery/hatchery/internal/edge/config"
	"github.com/hatchery/hatchery/internal/provisioning"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/tpm"
)

// Device is a provisioned identity.
type Device struct {
	HubHostName string `json:"hubHostName"`
	DeviceID    string `json:"deviceId"`
	Method      string `json:"method"`        // tpm, sas or x509
	Key         string `json:"key,omitempty"` // base64 hub key of sas devices; TPM keys stay in the TPM
	// HubKeyBlob is a TPM device's hub key as the provisioning service
	// wrapped it for this TPM (base64), which only the TPM can open: a
	// registration that fails after its challenge was imported into the
	// identity handle puts the hub key back from it.
	HubKeyBlob string `json:"hubKeyBlob,omitempty"`
	// CertFile and KeyFile are an x509 device's certificate and key (PEM
	// files, named by identity_cert and identity_pk).
	CertFile    string    `json:"certFile,omitempty"`
	KeyFile     string    `json:"keyFile,omitempty"`
	Provisioned time.Time `json:"provisioned"`
	// ConfigHash ties the backup to the provisioning settings it came from.
	ConfigHash string `json:"configHash"`
}

// Manager provisions and remembers the device's identity.
type Manager struct {
	Config   *config.Config
	StateDir string           // the backup lives here
	TPM      provisioning.TPM // the TPM (or the aziot-tpmd client) for tpm attestation
	HTTP     *http.Client     // trusts the provisioning service's CA
}

const backupFile = "device_info.json"

// configHash identifies the provisioning settings: a change means the
// backup no longer applies.
func configHash(c *config.Config) string {
	b, _ := json.Marshal(struct {
		P config.Provisioning
		K config.KeyIndex
	}{c.Provisioning, c.TPM.AuthKeyIndex})
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// Backup returns the cached identity if it belongs to the current settings.
func (m *Manager) Backup() (*Device, error) {
	b, err := os.ReadFile(filepath.Join(m.StateDir, backupFile))
	if err != nil {
		return nil, err
	}
	d := &Device{}
	if err := json.Unmarshal(b, d); err != nil {
		return nil, fmt.Errorf("the identity backup %s is corrupt: %w", filepath.Join(m.StateDir, backupFile), err)
	}
	if d.ConfigHash != configHash(m.Config) {
		return nil, errors.New("the provisioning settings changed since the backup was made")
	}
	return d, nil
}

func (m *Manager) save(d *Device) error {
	b, _ := json.MarshalIndent(d, "", "  ")
	return atomicfile.WritePrivate(filepath.Join(m.StateDir, backupFile), b)
}

// Start returns the identity to run with at startup, following
// auto_reprovisioning_mode: AlwaysOnStartup provisions every time (falling
// back to the backup when DPS is unreachable); the other modes use the
// backup when there is one.
func (m *Manager) Start(ctx context.Context) (*Device, error) {
	if m.Config.AutoReprovisioningMode != config.AlwaysOnStartup {
		return m.Resume(ctx)
	}
	backup, backupErr := m.Backup()
	d, err := m.Provision(ctx)
	if err != nil && backupErr == nil {
		return backup, fmt.Errorf("provisioning failed, running from the identity backup: %w", err)
	}
	return d, err
}

// Resume returns the backup when it belongs to the current settings, and
// provisions otherwise: for a runtime that reloads rather than starts, as
// Azure's does when only its agent restarts.
func (m *Manager) Resume(ctx context.Context) (*Device, error) {
	if backup, err := m.Backup(); err == nil {
		return backup, nil
	}
	return m.Provision(ctx)
}

// Provision obtains a fresh identity and saves it as the backup.
func (m *Manager) Provision(ctx context.Context) (*Device, error) {
	p := m.Config.Provisioning
	d := &Device{Provisioned: time.Now().UTC(), ConfigHash: configHash(m.Config)}
	switch p.Source {
	case config.SourceManual:
		if err := m.manual(d); err != nil {
			return nil, err
		}
	case config.SourceDPS:
		if err := m.dps(ctx, d); err != nil {
			return nil, err
		}
	default:
		return nil, errors.New("provisioning is not configured: set [provisioning] in /etc/aziot/config.toml and run `iotedge config apply`")
	}
	return d, m.save(d)
}

func (m *Manager) manual(d *Device) error {
	p := m.Config.Provisioning
	if p.ConnectionString != "" {
		cs, err := sas.ParseConnectionString(p.ConnectionString)
		if err != nil {
			return fmt.Errorf("provisioning.connection_string: %w", err)
		}
		d.HubHostName, d.DeviceID, d.Method, d.Key = cs.HostName, cs.DeviceID, "sas", base64.StdEncoding.EncodeToString(cs.Key)
		return nil
	}
	if p.Authentication.Method == config.MethodX509 {
		if _, err := d.useCertificate(p.Authentication.IdentityCert, p.Authentication.IdentityPK, "provisioning.authentication"); err != nil {
			return err
		}
		d.HubHostName, d.DeviceID = p.IoTHubHostname, p.DeviceID
		return nil
	}
	key, err := readKey(p.Authentication.DeviceIDPK)
	if err != nil {
		return fmt.Errorf("provisioning.authentication.device_id_pk: %w", err)
	}
	d.HubHostName, d.DeviceID, d.Method, d.Key = p.IoTHubHostname, p.DeviceID, "sas", base64.StdEncoding.EncodeToString(key)
	return nil
}

func readKey(k config.SymmetricKey) ([]byte, error) {
	v := k.Value
	if k.URI != "" {
		b, err := os.ReadFile(config.FilePath(k.URI))
		if err != nil {
			return nil, err
		}
		v = string(b)
	}
	key, err := base64.StdEncoding.DecodeString(strings.TrimSpace(v))
	if err != nil {
		return nil, fmt.Errorf("the key is not base64: %w", err)
	}
	return key, nil
}

func (m *Manager) dps(ctx context.Context, d *Device) error {
	p := m.Config.Provisioning
	client := &provisioning.Client{Endpoint: p.GlobalEndpoint, IDScope: p.IDScope,
		RegistrationID: p.Attestation.RegistrationID, HTTP: m.HTTP}
	if p.Payload.URI != "" {
		b, err := os.ReadFile(config.FilePath(p.Payload.URI))
		if err != nil {
			return fmt.Errorf("provisioning.payload: %w", err)
		}
		if !json.Valid(b) {
			return fmt.Errorf("provisioning.payload: %s is not JSON", p.Payload.URI)
		}
		client.Payload = b
	}
	switch p.Attestation.Method {
	case config.MethodTPM:
		if m.TPM == nil {
			return errors.New("TPM attestation needs the TPM service (aziot-tpmd)")
		}
		handle := tpm.IdentityHandle(uint32(m.Config.TPM.AuthKeyIndex))
		rs, err := client.RegisterTPM(ctx, m.TPM, handle)
		if provisioning.ChallengeImported(err) {
			return m.restoreHubKey(handle, err)
		}
		if err != nil {
			return err
		}
		d.HubHostName, d.DeviceID, d.Method, d.HubKeyBlob = rs.AssignedHub, rs.DeviceID, "tpm", rs.TPM.AuthenticationKey
	case config.MethodSymmetricKey:
		key, err := readKey(p.Attestation.SymmetricKey)
		if err != nil {
			return fmt.Errorf("provisioning.attestation.symmetric_key: %w", err)
		}
		rs, err := client.RegisterSymmetricKey(ctx, key)
		if err != nil {
			return err
		}
		d.HubHostName, d.DeviceID, d.Method, d.Key = rs.AssignedHub, rs.DeviceID, "sas", base64.StdEncoding.EncodeToString(key)
	case config.MethodX509:
		cert, err := d.useCertificate(p.Attestation.IdentityCert, p.Attestation.IdentityPK, "provisioning.attestation")
		if err != nil {
			return err
		}
		if client.RegistrationID == "" {
			client.RegistrationID = cert.Leaf.Subject.CommonName
		}
		client.HTTP = withCertificate(m.HTTP, cert)
		rs, err := client.RegisterX509(ctx)
		if err != nil {
			return err
		}
		d.HubHostName, d.DeviceID = rs.AssignedHub, rs.DeviceID
	default:
		return fmt.Errorf("DPS attestation %q is not supported: use tpm, symmetric_key or x509", p.Attestation.Method)
	}
	return nil
}

// restoreHubKey puts the backup's hub key back at handle after a TPM
// registration failed: the challenge it imported there replaced it, and
// the backup the device falls back on signs at handle. It returns failed,
// saying so when the hub key could not be restored.
func (m *Manager) restoreHubKey(handle uint32, failed error) error {
	backup, err := m.Backup()
	if err != nil || backup.Method != "tpm" || backup.HubKeyBlob == "" {
		return failed
	}
	blob, err := base64.StdEncoding.DecodeString(backup.HubKeyBlob)
	if err == nil {
		err = m.TPM.ImportActivationBlob(blob, handle)
	}
	if err != nil {
		return fmt.Errorf("%w (and the identity backup's hub key could not be put back in the TPM: %v; the device needs a registration to succeed)", failed, err)
	}
	return failed
}

// useCertificate makes d an x509 device with the certificate and key the
// configuration names (at is the table, for errors), checking they load.
func (d *Device) useCertificate(certURI, keyURI, at string) (*tls.Certificate, error) {
	d.Method, d.CertFile, d.KeyFile = "x509", config.FilePath(certURI), config.FilePath(keyURI)
	cert, err := d.ClientCertificate()
	if err != nil {
		return nil, fmt.Errorf("%s.identity_cert and identity_pk: %w", at, err)
	}
	return cert, nil
}

// ClientCertificate loads an x509 device's certificate and key. It is read
// at each use, so that a renewed certificate is picked up.
func (d *Device) ClientCertificate() (*tls.Certificate, error) {
	if d.Method != "x509" {
		return nil, fmt.Errorf("device %s authenticates with %s, not a certificate", d.DeviceID, d.Method)
	}
	cert, err := tls.LoadX509KeyPair(d.CertFile, d.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("loading the identity certificate %s and key %s: %w", d.CertFile, d.KeyFile, err)
	}
	return &cert, nil
}

// withCertificate returns a copy of c that presents cert to servers.
func withCertificate(c *http.Client, cert *tls.Certificate) *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	out := &http.Client{Timeout: time.Minute}
	if c != nil {
		if t, ok := c.Transport.(*http.Transport); ok {
			tr = t.Clone()
		}
		out.Timeout = c.Timeout
	}
	conf := &tls.Config{MinVersion: tls.VersionTLS12}
	if tr.TLSClientConfig != nil {
		conf = tr.TLSClientConfig.Clone()
	}
	conf.Certificates = []tls.Certificate{*cert}
	tr.TLSClientConfig = conf
	out.Transport = tr
	return out
}

// Signer signs hub tokens for d: in the TPM for TPM devices, with the key
// of sas devices; x509 devices have no key and sign nothing.
func (m *Manager) Signer(d *Device) func(data []byte) ([]byte, error) {
	switch d.Method {
	case "x509":
		return func([]byte) ([]byte, error) {
			return nil, fmt.Errorf("device %s authenticates with its certificate and has no key to sign with", d.DeviceID)
		}
	case "tpm":
		handle := tpm.IdentityHandle(uint32(m.Config.TPM.AuthKeyIndex))
		return func(data []byte) ([]byte, error) { return m.TPM.HMAC(handle, data) }
	}
	key, _ := base64.StdEncoding.DecodeString(d.Key)
	return func(data []byte) ([]byte, error) {
		mac := hmac.New(sha256.New, key)
		mac.Write(data)
		return mac.Sum(nil), nil
	}
}

// Token signs a SAS token for audience.
func (m *Manager) Token(d *Device, audience string, expiry time.Time) (string, error) {
	return sas.BuildSigned(m.Signer(d), audience, "", expiry)
}
