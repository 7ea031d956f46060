package moby

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
)

// EnsureNetwork creates the bridge network name ("" = DefaultNetwork) that
// modules join, unless the engine already has a network of that name.
func (e *Engine) EnsureNetwork(ctx context.Context, name string) error {
	if name == "" {
		name = DefaultNetwork
	}
	var n struct{ Name string }
	err := e.call(ctx, request{method: http.MethodGet, path: "/networks/" + url.PathEscape(name)}, &n)
	// The engine also matches IDs and ID prefixes: insist on the name.
	if err == nil && n.Name == name {
		return nil
	}
	if err != nil && !errors.Is(err, ErrNotFound) {
		return fmt.Errorf("looking up network %s: %w", name, err)
	}
	body := map[string]any{"Name": name, "Driver": "bridge", "CheckDuplicate": true}
	err = e.call(ctx, request{method: http.MethodPost, path: "/networks/create", json: body}, nil)
	var api *APIError
	if errors.As(err, &api) && api.Status == http.StatusConflict {
		return nil // another agent created it meanwhile
	}
	if err != nil {
		return fmt.Errorf("creating network %s: %w", name, err)
	}
	return nil
}

// RemoveNetwork removes the network name.
func (e *Engine) RemoveNetwork(ctx context.Context, name string) error {
	if err := e.call(ctx, request{method: http.MethodDelete, path: "/networks/" + url.PathEscape(name)}, nil); err != nil {
		return fmt.Errorf("removing network %s: %w", name, err)
	}
	return nil
}
