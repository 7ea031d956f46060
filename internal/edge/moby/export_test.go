package moby

import (
	"context"
	"net/http"
	"net/url"
	"strings"
)

// InspectRaw returns the engine's whole inspection of a container.
func (e *Engine) InspectRaw(ctx context.Context, name string) (map[string]any, error) {
	var m map[string]any
	err := e.call(ctx, request{method: http.MethodGet, path: "/containers/" + url.PathEscape(name) + "/json"}, &m)
	return m, err
}

// CreateForeign creates a container the way another tool would, with
// only the given labels.
func (e *Engine) CreateForeign(ctx context.Context, name, image string, labels map[string]string) error {
	body := map[string]any{"Image": image, "Labels": labels}
	return e.call(ctx, request{method: http.MethodPost, path: "/containers/create", query: url.Values{"name": {name}}, json: body}, nil)
}

// RemoveAny removes a container whoever owns it.
func (e *Engine) RemoveAny(ctx context.Context, name string) error {
	return e.call(ctx, request{method: http.MethodDelete, path: "/containers/" + url.PathEscape(name), query: url.Values{"force": {"1"}}}, nil)
}

// ImageID returns the ID of the image the engine has as ref.
func (e *Engine) ImageID(ctx context.Context, ref string) (string, error) {
	var img struct{ ID string }
	err := e.call(ctx, request{method: http.MethodGet, path: "/images/" + pathRef(normalize(ref)) + "/json"}, &img)
	return img.ID, err
}

// Tag gives the image src the further reference ref.
func (e *Engine) Tag(ctx context.Context, src, ref string) error {
	ref = normalize(ref)
	i := strings.LastIndex(ref, ":")
	q := url.Values{"repo": {ref[:i]}, "tag": {ref[i+1:]}}
	return e.call(ctx, request{method: http.MethodPost, path: "/images/" + pathRef(normalize(src)) + "/tag", query: q}, nil)
}
