// Package moby runs edge modules as containers on the Moby (Docker) engine,
// through the Docker Engine API on the engine's unix socket.
//
// It is a small client over net/http for the dozen endpoints the agent
// uses, rather than github.com/moby/moby/client: that module brings 19
// more modules (OpenTelemetry among them) into a daemon that runs on small
// devices, for what is here a few hundred lines.
package moby

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
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/starthint"
)

// Labels that mark the containers of an agent. The owner label's value is
// Engine.Owner, so that two agents (or test runs) on one engine keep to
// their own containers.
const (
	OwnerLabel      = "net.hatchery.edge.owner"
	ModuleLabel     = "net.hatchery.edge.module"
	ConfigHashLabel = "net.hatchery.edge.config-hash"
	VersionLabel    = "net.hatchery.edge.module-version"
)

// Defaults of config.toml's [moby_runtime] and of the owner label.
const (
	DefaultURI     = "unix:///var/run/docker.sock"
	DefaultNetwork = "azure-iot-edge"
	DefaultOwner   = "agent"
)

// API versions: 1.41 is Docker 20.10 (Debian 12's docker.io), the oldest
// engine supported. Requests use the engine's version up to maxAPI; the
// requests made here mean the same from 1.41 to 1.44, and 1.44 is the
// oldest version the newest engines (Docker 29) still accept.
const (
	minAPI = "1.41"
	maxAPI = "1.44"
)

// ErrNotFound is matched (errors.Is) by errors for a container, image or
// network the engine does not have.
var ErrNotFound = errors.New("not found")

// ErrForeign is matched by errors for a container that exists but does not
// carry this agent's owner label: the agent never touches those.
var ErrForeign = errors.New("not a module of this agent")

// APIError is an error answer of the engine.
type APIError struct {
	Status  int
	Message string
}

func (e *APIError) Error() string { return e.Message }

// Is lets errors.Is(err, ErrNotFound) match a 404 answer.
func (e *APIError) Is(target error) bool {
	return target == ErrNotFound && e.Status == http.StatusNotFound
}

// Engine is a client of one Moby engine.
type Engine struct {
	// Owner is the value of the owner label on the containers this agent
	// creates; List, Start, Stop, Remove and Logs see only those.
	Owner string

	uri string
	hc  *http.Client

	mu      sync.Mutex
	version string // negotiated API version, "" until the first answer
}

// New returns a client for the engine at uri, the [moby_runtime] uri of
// config.toml, e.g. "unix:///var/run/docker.sock". It does not connect.
func New(uri string) (*Engine, error) {
	u, err := url.Parse(uri)
	if err != nil {
		return nil, fmt.Errorf("moby_runtime uri %q: %v", uri, err)
	}
	if u.Scheme != "unix" {
		return nil, fmt.Errorf("moby_runtime uri %q: only unix sockets are supported, e.g. %s", uri, DefaultURI)
	}
	if u.Path == "" || u.Host != "" {
		return nil, fmt.Errorf("moby_runtime uri %q: want unix:// and an absolute socket path, e.g. %s", uri, DefaultURI)
	}
	sock := u.Path
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
		MaxIdleConns:    4,
		IdleConnTimeout: 30 * time.Second,
	}
	// No client timeout: log streams and pulls run as long as their context.
	return &Engine{Owner: DefaultOwner, uri: uri, hc: &http.Client{Transport: tr}}, nil
}

// Ping checks that the engine answers and speaks a supported API version.
func (e *Engine) Ping(ctx context.Context) error {
	_, err := e.negotiate(ctx)
	return err
}

// negotiate returns the API version to use, asking the engine once.
func (e *Engine) negotiate(ctx context.Context) (string, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.version != "" {
		return e.version, nil
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker/_ping", nil)
	if err != nil {
		return "", err
	}
	rsp, err := e.hc.Do(req)
	if err != nil {
		return "", e.transportError(ctx, err)
	}
	io.Copy(io.Discard, rsp.Body)
	rsp.Body.Close()
	if rsp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("container engine at %s answered its health check with %s", e.uri, rsp.Status)
	}
	v := rsp.Header.Get("Api-Version")
	switch {
	case v == "":
		return "", fmt.Errorf("container engine at %s did not say its API version: is it a Docker engine?", e.uri)
	case versionLess(v, minAPI):
		return "", fmt.Errorf("container engine at %s speaks Engine API %s; Hatchery needs %s or newer (Docker 20.10 or newer)", e.uri, v, minAPI)
	case versionLess(maxAPI, v):
		v = maxAPI
	}
	e.version = v
	return v, nil
}

// transportError explains a failure to talk to the engine at all.
func (e *Engine) transportError(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		if errors.Is(err, fs.ErrPermission) {
			return fmt.Errorf("cannot reach the container engine at %s: %w; run as root or as a member of the docker group", e.uri, op)
		}
		return fmt.Errorf("cannot reach the container engine at %s: %w; is it running? %s", e.uri, op, starthint.Service("docker", "dockerd"))
	}
	return fmt.Errorf("container engine at %s: %w", e.uri, err)
}

// request is one API call.
type request struct {
	method string
	path   string // already escaped
	query  url.Values
	body   io.Reader
	json   any // marshalled as the body when not nil
	header http.Header
}

// do sends r and returns the engine's answer; a non-2xx answer becomes an
// *APIError. The caller closes the body.
func (e *Engine) do(ctx context.Context, r request) (*http.Response, error) {
	v, err := e.negotiate(ctx)
	if err != nil {
		return nil, err
	}
	target := "http://docker/v" + v + r.path
	if len(r.query) > 0 {
		target += "?" + r.query.Encode()
	}
	body := r.body
	if r.json != nil {
		b, err := json.Marshal(r.json)
		if err != nil {
			return nil, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, r.method, target, body)
	if err != nil {
		return nil, err
	}
	for k, vs := range r.header {
		req.Header[k] = vs
	}
	if r.json != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	rsp, err := e.hc.Do(req)
	if err != nil {
		return nil, e.transportError(ctx, err)
	}
	if rsp.StatusCode/100 == 2 || rsp.StatusCode == http.StatusNotModified {
		return rsp, nil
	}
	defer rsp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(rsp.Body, 64<<10))
	var msg struct{ Message string }
	if json.Unmarshal(b, &msg) != nil || msg.Message == "" {
		msg.Message = strings.TrimSpace(string(b))
	}
	if msg.Message == "" {
		msg.Message = rsp.Status
	}
	return nil, &APIError{Status: rsp.StatusCode, Message: msg.Message}
}

// call sends r and decodes a JSON answer into out (when not nil).
func (e *Engine) call(ctx context.Context, r request, out any) error {
	rsp, err := e.do(ctx, r)
	if err != nil {
		return err
	}
	defer rsp.Body.Close()
	if out == nil || rsp.StatusCode == http.StatusNoContent || rsp.StatusCode == http.StatusNotModified {
		io.Copy(io.Discard, rsp.Body)
		return nil
	}
	if err := json.NewDecoder(rsp.Body).Decode(out); err != nil {
		return fmt.Errorf("container engine at %s: reading the answer to %s %s: %v", e.uri, r.method, r.path, err)
	}
	return nil
}

// streamError reads a stream of JSON progress messages (pull, import) and
// returns the first error one of them carries.
func streamError(r io.Reader) error {
	dec := json.NewDecoder(r)
	for {
		var m struct {
			Error       string
			ErrorDetail struct{ Message string }
		}
		if err := dec.Decode(&m); err == io.EOF {
			return nil
		} else if err != nil {
			return fmt.Errorf("reading the engine's progress messages: %v", err)
		}
		if m.Error != "" {
			return errors.New(m.Error)
		}
		if m.ErrorDetail.Message != "" {
			return errors.New(m.ErrorDetail.Message)
		}
	}
}

// versionLess compares API versions "1.41" < "1.44" numerically.
func versionLess(a, b string) bool {
	as, bs := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; i < len(as) || i < len(bs); i++ {
		var x, y int
		if i < len(as) {
			x, _ = strconv.Atoi(as[i])
		}
		if i < len(bs) {
			y, _ = strconv.Atoi(bs[i])
		}
		if x != y {
			return x < y
		}
	}
	return false
}

// pathRef escapes an image reference for a URL path, keeping its slashes:
// the engine's routes take the reference as the rest of the path.
func pathRef(ref string) string {
	parts := strings.Split(ref, "/")
	for i, p := range parts {
		parts[i] = url.PathEscape(p)
	}
	return strings.Join(parts, "/")
}
