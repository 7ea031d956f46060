package tpmservice

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"time"

	"github.com/hatchery/hatchery/internal/starthint"
	"github.com/hatchery/hatchery/internal/tpm"
)

// Client reaches the TPM through aziot-tpmd. It has the method set of
// *tpm.Device, so it serves as a provisioning.TPM.
type Client struct {
	socket string
}

// Dial returns a client of the service at socketPath. It connects per
// request, so a service started later is found then.
func Dial(socketPath string) *Client { return &Client{socket: socketPath} }

// callTimeout is above the service's own bound on one TPM operation.
const callTimeout = 150 * time.Second

// Error is a request the service answered with an error.
type Error struct {
	Status  int // HTTP status
	Message string
	// kind is the error the answer stands for, for errors.Is.
	kind error
}

func (e *Error) Error() string { return "aziot-tpmd: " + e.Message }

func (e *Error) Unwrap() error { return e.kind }

// EndorsementKey returns the EK's TPM2B_PUBLIC.
func (c *Client) EndorsementKey() ([]byte, error) {
	var rsp endorsementKeyResponse
	err := c.do("GET", "/endorsement-key", nil, &rsp)
	return rsp.EndorsementKey, err
}

// EndorsementCertificate returns the EK certificate (DER) the TPM's maker
// stored, nil when there is none.
func (c *Client) EndorsementCertificate() ([]byte, error) {
	var rsp endorsementCertificateResponse
	err := c.do("GET", "/endorsement-certificate", nil, &rsp)
	return rsp.Certificate, err
}

// StorageRootKey returns the SRK's TPM2B_PUBLIC.
func (c *Client) StorageRootKey() ([]byte, error) {
	var rsp storageRootKeyResponse
	err := c.do("GET", "/storage-root-key", nil, &rsp)
	return rsp.StorageRootKey, err
}

// ImportActivationBlob has the service activate blob into its identity
// key; handle must be the service's identity handle.
func (c *Client) ImportActivationBlob(blob []byte, handle uint32) error {
	return c.do("POST", "/import", importRequest{Blob: blob, Handle: &handle}, &struct{}{})
}

// HMAC returns HMAC-SHA256 of data with the service's identity key;
// handle must be the service's identity handle.
func (c *Client) HMAC(handle uint32, data []byte) ([]byte, error) {
	var rsp signResponse
	if err := c.do("POST", "/sign", signRequest{Data: data, Handle: &handle}, &rsp); err != nil {
		if e, ok := errors.AsType[*Error](err); ok && e.Status == http.StatusConflict {
			e.kind = tpm.ErrNoIdentityKey
		}
		return nil, err
	}
	return rsp.Digest, nil
}

// ErrNotRunning says nothing listens on the service's socket.
var ErrNotRunning = errors.New("aziot-tpmd is not running")

func (c *Client) do(method, path string, body, out any) error {
	var b []byte
	if body != nil {
		var err error
		if b, err = json.Marshal(body); err != nil {
			return err
		}
	}
	conn, err := net.DialTimeout("unix", c.socket, 5*time.Second)
	switch {
	case err != nil && isNotRunning(err):
		return fmt.Errorf("%w: %s (socket %s)", ErrNotRunning, starthint.Service("aziot-tpmd", "aziot-tpmd"), c.socket)
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("aziot-tpmd socket %s: permission denied: only the service's user and the socket's group (iotedge by default) may connect", c.socket)
	case err != nil:
		return fmt.Errorf("aziot-tpmd (socket %s): %w", c.socket, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(callTimeout))
	req := fmt.Appendf(nil, "%s %s HTTP/1.1\r\nHost: aziot-tpmd\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n", method, path, len(b))
	if _, err := conn.Write(append(req, b...)); err != nil {
		return fmt.Errorf("aziot-tpmd (socket %s): %w", c.socket, err)
	}
	status, answer, err := readResponse(bufio.NewReader(conn))
	if err != nil {
		return fmt.Errorf("aziot-tpmd (socket %s): reading the answer to %s: %w", c.socket, path, err)
	}
	if status != 200 {
		var e errorResponse
		if json.Unmarshal(answer, &e) != nil || e.Message == "" {
			return fmt.Errorf("aziot-tpmd (socket %s): %s %s: unexpected answer HTTP %d", c.socket, method, path, status)
		}
		return &Error{Status: status, Message: e.Message}
	}
	if err := json.Unmarshal(answer, out); err != nil {
		return fmt.Errorf("aziot-tpmd (socket %s): %s %s: bad answer: %w", c.socket, method, path, err)
	}
	return nil
}
