// Package mgmt is the edge daemon's management API, served on a Unix
// socket only root and the iotedge group can open, and its client, which
// the iotedge CLI uses.
package mgmt

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
	"net/url"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/starthint"
)

// DefaultSocket is where the daemon listens unless told otherwise.
const DefaultSocket = "/var/run/iotedge/mgmt.sock"

// Status is the daemon's state as `iotedge system status` and `check` show it.
type Status struct {
	State        string       `json:"state"` // running, not configured, config error, provisioning failed, ...
	Since        time.Time    `json:"since"`
	ConfigPath   string       `json:"configPath"`
	ConfigError  string       `json:"configError,omitempty"`
	Warnings     []string     `json:"warnings,omitempty"`
	Provisioning Provisioning `json:"provisioning"`
	Hub          Connection   `json:"hub"`
	HubAddress   string       `json:"hubAddress,omitempty"` // host:port of the hub's MQTT endpoint
	Engine       Connection   `json:"engine"`
	TPM          Connection   `json:"tpm"`
	Services     []Service    `json:"services"`
	Deployment   Deployment   `json:"deployment"`
}

// Provisioning is the device's identity and how it was obtained.
type Provisioning struct {
	Source      string    `json:"source"`
	Method      string    `json:"method,omitempty"`
	HubHostName string    `json:"hubHostName,omitempty"`
	DeviceID    string    `json:"deviceId,omitempty"`
	FromBackup  bool      `json:"fromBackup,omitempty"`
	Provisioned time.Time `json:"provisioned,omitempty"`
	Error       string    `json:"error,omitempty"`
}

// Connection is the state of a dependency.
type Connection struct {
	OK    bool      `json:"ok"`
	Error string    `json:"error,omitempty"`
	Since time.Time `json:"since,omitempty"`
}

// Service is one of the runtime's processes.
type Service struct {
	Name   string `json:"name"`
	Status string `json:"status"`
}

// Deployment is what the agent last applied.
type Deployment struct {
	Version     int64  `json:"lastDesiredVersion"`
	Code        int    `json:"code"`
	Description string `json:"description,omitempty"`
}

// Module is a row of `iotedge list`.
type Module struct {
	Name        string `json:"name"`
	Status      string `json:"status"`
	Description string `json:"description"`
	Config      string `json:"config"` // the image
}

// Client calls the daemon.
type Client struct {
	http *http.Client
	base string
}

// NewClient connects to the management socket given as a path or unix:// URI.
func NewClient(uri string) (*Client, error) {
	path := strings.TrimPrefix(uri, "unix://")
	if strings.Contains(path, "://") {
		return nil, fmt.Errorf("management URI %q: only unix:// sockets are supported", uri)
	}
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}
	return &Client{http: &http.Client{Transport: tr}, base: "http://iotedged"}, nil
}

// dialError says what to do when the daemon's socket cannot be reached.
func dialError(err error) error {
	var op *net.OpError
	switch {
	case !errors.As(err, &op):
		return err
	case errors.Is(op.Err, fs.ErrPermission):
		return fmt.Errorf("this user may not talk to the IoT Edge daemon (%v): run the command with sudo, "+
			"or join the group that may with `sudo usermod -aG iotedge $USER` and log in again", op.Err)
	}
	return fmt.Errorf("%w (%v): %s", ErrNotRunning, op.Err, starthint.Service("iotedged", "iotedged"))
}

// ErrNotRunning says the daemon is not listening.
var ErrNotRunning = errors.New("the IoT Edge daemon is not running")

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	resp, err := c.stream(ctx, method, path, in)
	if err != nil {
		return err
	}
	defer resp.Close()
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp).Decode(out)
}

func (c *Client) stream(ctx context.Context, method, path string, in any) (io.ReadCloser, error) {
	var body io.Reader
	if in != nil {
		b, _ := json.Marshal(in)
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, dialError(err)
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		var e struct{ Message string }
		_ = json.NewDecoder(resp.Body).Decode(&e)
		return nil, errors.New(e.Message)
	}
	return resp.Body, nil
}

// Status reads the daemon's status.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	s := &Status{}
	return s, c.do(ctx, "GET", "/status", nil, s)
}

// Modules lists the modules.
func (c *Client) Modules(ctx context.Context) ([]Module, error) {
	var ms []Module
	return ms, c.do(ctx, "GET", "/modules", nil, &ms)
}

// Restart restarts a module.
func (c *Client) Restart(ctx context.Context, module string) error {
	return c.do(ctx, "POST", "/modules/"+url.PathEscape(module)+"/restart", nil, nil)
}

// Reload makes the daemon read its configuration again.
func (c *Client) Reload(ctx context.Context) error { return c.do(ctx, "POST", "/reload", nil, nil) }

// Reprovision makes the daemon provision again.
func (c *Client) Reprovision(ctx context.Context) error {
	return c.do(ctx, "POST", "/reprovision", nil, nil)
}

// Stop stops the daemon's modules and the daemon.
func (c *Client) Stop(ctx context.Context) error { return c.do(ctx, "POST", "/stop", nil, nil) }

// SetLogLevel changes the daemon's log level.
func (c *Client) SetLogLevel(ctx context.Context, level string) error {
	return c.do(ctx, "PUT", "/log-level", map[string]string{"level": level}, nil)
}

// ModuleLogs streams a module's logs; until "" is to now.
func (c *Client) ModuleLogs(ctx context.Context, module, tail, since, until string, follow bool) (io.ReadCloser, error) {
	q := url.Values{"tail": {tail}, "since": {since}}
	if until != "" {
		q.Set("until", until)
	}
	if follow {
		q.Set("follow", "true")
	}
	return c.stream(ctx, "GET", "/modules/"+url.PathEscape(module)+"/logs?"+q.Encode(), nil)
}

// Logs streams the daemon's own recent log lines.
func (c *Client) Logs(ctx context.Context, tail string, follow bool) (io.ReadCloser, error) {
	q := url.Values{"tail": {tail}}
	if follow {
		q.Set("follow", "true")
	}
	return c.stream(ctx, "GET", "/logs?"+q.Encode(), nil)
}
