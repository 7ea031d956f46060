package moby

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
)

// ModuleSpec is what Create needs to make a module's container.
type ModuleSpec struct {
	Name  string
	Image string
	// CreateOptions is the module's createOptions: a Docker create body
	// (Env, Cmd, Entrypoint, HostConfig, Labels, ExposedPorts, ...).
	CreateOptions json.RawMessage
	// Env is the deployment's env; it replaces createOptions.Env entries
	// of the same name, as Azure IoT Edge does.
	Env map[string]string
	// Labels are added to createOptions.Labels; the agent's own labels win.
	Labels map[string]string
	// Network is attached unless createOptions sets HostConfig.NetworkMode.
	Network string
	// PullPolicy is "on-create" (EnsureImage pulls for each new
	// container) or "never" (the engine must have the image).
	PullPolicy string
	Auth       *RegistryAuth
	// ConfigHash is stored as a label so that a later change of the
	// module's configuration can be seen on the container.
	ConfigHash string
	// Version is the module's version, stored as a label of its own.
	Version string
}

// ModuleState is what the engine says about a module's container.
type ModuleState struct {
	Name        string
	ContainerID string
	Image       string
	// State is the engine's: created, running, paused, restarting,
	// removing, exited or dead.
	State    string
	ExitCode int
	// Error is the engine's reason for a failed start (e.g. the
	// entrypoint does not exist); empty otherwise.
	Error      string
	StartedAt  time.Time // zero when never started
	FinishedAt time.Time // zero when never exited
	Health     string    // healthy, unhealthy, starting, or "" without a health check
	ConfigHash string
	// Version is the module's version label; HasVersion is false for a
	// container made before versions were labelled.
	Version    string
	HasVersion bool
	// RestartCount is the engine's; the agent restarts modules itself, so
	// it is 0 unless createOptions asked the engine to restart.
	RestartCount int
}

// inspected is the part of a container inspection used here.
type inspected struct {
	ID     string `json:"Id"`
	Name   string
	Config struct {
		Image  string
		Labels map[string]string
		Tty    bool
	}
	State struct {
		Status     string
		ExitCode   int
		Error      string
		StartedAt  string
		FinishedAt string
		Health     *struct{ Status string }
	}
	RestartCount int
}

func (c *inspected) state() ModuleState {
	s := ModuleState{
		Name:         c.Config.Labels[ModuleLabel],
		ContainerID:  c.ID,
		Image:        c.Config.Image,
		State:        c.State.Status,
		ExitCode:     c.State.ExitCode,
		Error:        c.State.Error,
		StartedAt:    engineTime(c.State.StartedAt),
		FinishedAt:   engineTime(c.State.FinishedAt),
		ConfigHash:   c.Config.Labels[ConfigHashLabel],
		RestartCount: c.RestartCount,
	}
	s.Version, s.HasVersion = c.Config.Labels[VersionLabel]
	if s.Name == "" {
		s.Name = strings.TrimPrefix(c.Name, "/")
	}
	if c.State.Health != nil {
		s.Health = c.State.Health.Status
	}
	return s
}

// engineTime parses the engine's times; it says "0001-01-01T00:00:00Z"
// for never, which parses to the zero time.
func engineTime(s string) time.Time {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil || t.IsZero() {
		return time.Time{}
	}
	return t
}

func (e *Engine) inspect(ctx context.Context, name string) (*inspected, error) {
	var c inspected
	err := e.call(ctx, request{method: http.MethodGet, path: "/containers/" + url.PathEscape(name) + "/json"}, &c)
	if err != nil {
		return nil, fmt.Errorf("inspecting container %s: %w", name, err)
	}
	return &c, nil
}

// owned inspects the container name and fails unless this agent owns it.
func (e *Engine) owned(ctx context.Context, name string) (*inspected, error) {
	c, err := e.inspect(ctx, name)
	if err != nil {
		return nil, err
	}
	if c.Config.Labels[OwnerLabel] != e.Owner {
		return nil, fmt.Errorf("container %s lacks the label %s=%s: %w; leaving it alone", name, OwnerLabel, e.Owner, ErrForeign)
	}
	return c, nil
}

// List returns the state of this agent's containers, sorted by module name.
func (e *Engine) List(ctx context.Context) ([]ModuleState, error) {
	filters, _ := json.Marshal(map[string][]string{"label": {OwnerLabel + "=" + e.Owner}})
	var list []struct {
		ID string `json:"Id"`
	}
	q := url.Values{"all": {"1"}, "filters": {string(filters)}}
	if err := e.call(ctx, request{method: http.MethodGet, path: "/containers/json", query: q}, &list); err != nil {
		return nil, fmt.Errorf("listing containers: %w", err)
	}
	// The list lacks exit codes, times and health: inspect each.
	states := make([]ModuleState, 0, len(list))
	for _, c := range list {
		in, err := e.inspect(ctx, c.ID)
		if errors.Is(err, ErrNotFound) {
			continue // removed since the list
		}
		if err != nil {
			return nil, err
		}
		states = append(states, in.state())
	}
	slices.SortFunc(states, func(a, b ModuleState) int { return strings.Compare(a.Name, b.Name) })
	return states, nil
}

// Create makes the module's container (without starting it), pulling its
// image first when it is missing and the pull policy allows; EnsureImage
// before it pulls as imagePullPolicy asks.
func (e *Engine) Create(ctx context.Context, s ModuleSpec) error {
	if s.Name == "" || s.Image == "" {
		return fmt.Errorf("module %q: a container needs a name and an image", s.Name)
	}
	body, err := createBody(s, e.Owner)
	if err != nil {
		return err
	}
	if err := e.haveImage(ctx, s); err != nil {
		return err
	}
	q := url.Values{"name": {s.Name}}
	err = e.call(ctx, request{method: http.MethodPost, path: "/containers/create", query: q, json: body}, nil)
	var api *APIError
	if errors.As(err, &api) && api.Status == http.StatusConflict {
		// The runtime's own containers are listed and recreated, so the
		// name is another's: say whose and how to free it, but leave it.
		return fmt.Errorf("module %s: a container named %s exists that this runtime did not create (as Azure IoT Edge's "+
			"edgeAgent leaves its modules' containers): remove it with `docker rm -f %s` and the module is created at the next try: %w",
			s.Name, s.Name, s.Name, err)
	}
	if err != nil {
		return fmt.Errorf("module %s: creating its container: %w", s.Name, err)
	}
	return nil
}

// createBody merges the module's createOptions with its image, env, labels
// and network into a Docker create body.
func createBody(s ModuleSpec, owner string) (map[string]any, error) {
	body, err := DecodeCreateOptions(s.CreateOptions)
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", s.Name, err)
	}
	bad := func(field, want string) error {
		return fmt.Errorf("module %s: createOptions.%s must be %s", s.Name, field, want)
	}
	body["Image"] = s.Image

	// Env: the deployment's variables replace createOptions' of the same name.
	var env []string
	if v, ok := body["Env"]; ok && v != nil {
		list, ok := v.([]any)
		if !ok {
			return nil, bad("Env", `a list of "NAME=value" strings`)
		}
		for _, x := range list {
			kv, ok := x.(string)
			if !ok {
				return nil, bad("Env", `a list of "NAME=value" strings`)
			}
			if _, set := s.Env[strings.SplitN(kv, "=", 2)[0]]; !set {
				env = append(env, kv)
			}
		}
	}
	for _, k := range slices.Sorted(maps.Keys(s.Env)) {
		env = append(env, k+"="+s.Env[k])
	}
	if env != nil {
		body["Env"] = env
	}

	labels := map[string]any{}
	if v, ok := body["Labels"]; ok && v != nil {
		if labels, ok = v.(map[string]any); !ok {
			return nil, bad("Labels", "an object of strings")
		}
	}
	for k, v := range s.Labels {
		labels[k] = v
	}
	labels[OwnerLabel] = owner
	labels[ModuleLabel] = s.Name
	labels[ConfigHashLabel] = s.ConfigHash
	labels[VersionLabel] = s.Version
	body["Labels"] = labels

	hc := map[string]any{}
	if v, ok := body["HostConfig"]; ok && v != nil {
		if hc, ok = v.(map[string]any); !ok {
			return nil, bad("HostConfig", "an object")
		}
	}
	// The agent applies restartPolicy itself; an engine restart policy
	// would fight it.
	delete(hc, "RestartPolicy")
	if mode, _ := hc["NetworkMode"].(string); mode == "" && s.Network != "" {
		hc["NetworkMode"] = s.Network
	}
	body["HostConfig"] = hc
	return body, nil
}

// Start starts the module's container; starting a running one is no error.
func (e *Engine) Start(ctx context.Context, name string) error {
	c, err := e.owned(ctx, name)
	if err != nil {
		return err
	}
	err = e.call(ctx, request{method: http.MethodPost, path: "/containers/" + c.ID + "/start"}, nil)
	if err != nil {
		return fmt.Errorf("starting module %s: %w", name, err)
	}
	return nil
}

// Stop stops the module's container, killing it when it has not exited
// timeout after SIGTERM; stopping a stopped one is no error.
func (e *Engine) Stop(ctx context.Context, name string, timeout time.Duration) error {
	c, err := e.owned(ctx, name)
	if err != nil {
		return err
	}
	secs := int((timeout + time.Second - 1) / time.Second)
	q := url.Values{"t": {strconv.Itoa(max(secs, 0))}}
	err = e.call(ctx, request{method: http.MethodPost, path: "/containers/" + c.ID + "/stop", query: q}, nil)
	if err != nil {
		return fmt.Errorf("stopping module %s: %w", name, err)
	}
	return nil
}

// Remove removes the module's container, running or not, with its
// anonymous volumes (named volumes stay).
func (e *Engine) Remove(ctx context.Context, name string) error {
	c, err := e.owned(ctx, name)
	if err != nil {
		return err
	}
	q := url.Values{"force": {"1"}, "v": {"1"}}
	err = e.call(ctx, request{method: http.MethodDelete, path: "/containers/" + c.ID, query: q}, nil)
	if err != nil {
		return fmt.Errorf("removing module %s: %w", name, err)
	}
	return nil
}
