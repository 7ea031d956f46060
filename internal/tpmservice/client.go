package tpmservice

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"time"
)

// Client reaches the TPM through aziot-tpmd. It has the method set of
// *tpm.Device, so it serves as a provisioning.TPM.
type Client struct {
	socket string
	http   *http.Client
}

// Dial returns a client of the service at socketPath. It connects per
// request, so a service started later is found then.
func Dial(socketPath string) *Client {
	d := net.Dialer{Timeout: 5 * time.Second}
	return &Client{
		socket: socketPath,
		http: &http.Client{
			Transport: &http.Transport{
				DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
					return d.DialContext(ctx, "unix", socketPath)
				},
				MaxIdleConns: 1,
			},
			// Above the service's own bound on one TPM operation.
			Timeout: 150 * time.Second,
		},
	}
}

// Error is a request the service answered with an error.
type Error struct {
	Status  int // HTTP status
	Message string
}

func (e *Error) Error() string { return "aziot-tpmd: " + e.Message }

// EndorsementKey returns the EK's TPM2B_PUBLIC.
func (c *Client) EndorsementKey() ([]byte, error) {
	var rsp endorsementKeyResponse
	err := c.do(http.MethodGet, "/endorsement-key", nil, &rsp)
	return rsp.EndorsementKey, err
}

// StorageRootKey returns the SRK's TPM2B_PUBLIC.
func (c *Client) StorageRootKey() ([]byte, error) {
	var rsp storageRootKeyResponse
	err := c.do(http.MethodGet, "/storage-root-key", nil, &rsp)
	return rsp.StorageRootKey, err
}

// ImportActivationBlob has the service activate blob into its identity
// key; handle must be the service's identity handle.
func (c *Client) ImportActivationBlob(blob []byte, handle uint32) error {
	return c.do(http.MethodPost, "/import", importRequest{Blob: blob, Handle: &handle}, &struct{}{})
}

// HMAC returns HMAC-SHA256 of data with the service's identity key;
// handle must be the service's identity handle.
func (c *Client) HMAC(handle uint32, data []byte) ([]byte, error) {
	var rsp signResponse
	if err := c.do(http.MethodPost, "/sign", signRequest{Data: data, Handle: &handle}, &rsp); err != nil {
		return nil, err
	}
	return rsp.Digest, nil
}

func (c *Client) do(method, path string, body, out any) error {
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		r = bytes.NewReader(b)
	}
	// The host is ignored: the transport dials the socket.
	req, err := http.NewRequest(method, "http://aziot-tpmd"+path, r)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	rsp, err := c.http.Do(req)
	switch {
	case err != nil && isNotRunning(err):
		return fmt.Errorf("aziot-tpmd is not running: start it with `systemctl start aziot-tpmd` (socket %s)", c.socket)
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("aziot-tpmd socket %s: permission denied: only the service's user and the socket's group (iotedge by default) may connect", c.socket)
	case err != nil:
		return fmt.Errorf("aziot-tpmd (socket %s): %w", c.socket, err)
	}
	defer rsp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(rsp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("aziot-tpmd (socket %s): reading the answer to %s: %w", c.socket, path, err)
	}
	if rsp.StatusCode != http.StatusOK {
		var e errorResponse
		if json.Unmarshal(b, &e) != nil || e.Message == "" {
			return fmt.Errorf("aziot-tpmd (socket %s): %s %s: unexpected answer HTTP %d", c.socket, method, path, rsp.StatusCode)
		}
		return &Error{Status: rsp.StatusCode, Message: e.Message}
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("aziot-tpmd (socket %s): %s %s: bad answer: %w", c.socket, method, path, err)
	}
	return nil
}
