package moby

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
)

// RegistryAuth is one of the deployment's registryCredentials.
type RegistryAuth struct {
	Username, Password, Address string
}

// header is the X-Registry-Auth value: base64url of a JSON AuthConfig.
func (a *RegistryAuth) header() string {
	b, _ := json.Marshal(map[string]string{"username": a.Username, "password": a.Password, "serveraddress": a.Address})
	return base64.URLEncoding.EncodeToString(b)
}

// Registry returns the registry host of an image reference, as the engine
// reads it: the first path element when it looks like a host (has a dot or
// a port, or is localhost), else Docker Hub, "docker.io".
func Registry(image string) string {
	first, _, ok := strings.Cut(image, "/")
	if ok && (strings.ContainsAny(first, ".:") || first == "localhost") {
		return first
	}
	return "docker.io"
}

// normalize adds the tag "latest" to a reference with neither tag nor
// digest: the engine would otherwise pull every tag of the repository.
func normalize(ref string) string {
	last := ref[strings.LastIndex(ref, "/")+1:]
	if strings.ContainsAny(last, ":@") {
		return ref
	}
	return ref + ":latest"
}

// SameImage says whether references a and b name one image as the engine
// reads them: "app" is "app:latest", and on Docker Hub (docker.io, or
// index.docker.io) "app" is "docker.io/library/app".
func SameImage(a, b string) bool { return canonical(a) == canonical(b) }

func canonical(ref string) string {
	ref = normalize(ref)
	if r := Registry(ref); r == "docker.io" || r == "index.docker.io" {
		ref = strings.TrimPrefix(strings.TrimPrefix(ref, r+"/"), "library/")
	}
	return ref
}

// EnsureImage gets s.Image for a new container, as Azure's agent does:
// with imagePullPolicy on-create (the default) it pulls, so that a tag
// that moved is run at its new image; with never, the engine must have it.
// When the pull fails, the image the engine has is used, except for an
// update (the deployment gave a module a new version of the image its
// container runs): that module keeps its old container until a pull
// succeeds, rather than being recreated from a stale image as if it were
// updated.
func (e *Engine) EnsureImage(ctx context.Context, s ModuleSpec, update bool) error {
	if s.PullPolicy == "never" {
		return e.haveImage(ctx, s)
	}
	err := e.pull(ctx, normalize(s.Image), s.Auth)
	if err == nil {
		return nil
	}
	if update {
		return fmt.Errorf("module %s: version %s: %w; its container is left as it is until the image can be pulled", s.Name, s.Version, err)
	}
	if local := e.imageHere(ctx, s); local == nil {
		slog.Warn("pulling a module's image failed; using the copy the engine has", "module", s.Name, "image", s.Image, "error", err)
		return nil
	}
	return fmt.Errorf("module %s: %w", s.Name, err)
}

// haveImage pulls s.Image only when the engine lacks it and the policy
// allows.
func (e *Engine) haveImage(ctx context.Context, s ModuleSpec) error {
	err := e.imageHere(ctx, s)
	if !errors.Is(err, ErrNotFound) {
		return err
	}
	if s.PullPolicy == "never" {
		return fmt.Errorf("module %s: image %s %w on this device, and its imagePullPolicy is never: load it (docker load, docker pull) or set imagePullPolicy to on-create", s.Name, s.Image, ErrNotFound)
	}
	if err := e.pull(ctx, normalize(s.Image), s.Auth); err != nil {
		return fmt.Errorf("module %s: %w", s.Name, err)
	}
	return nil
}

// imageHere returns nil if the engine has s.Image, an ErrNotFound if not.
func (e *Engine) imageHere(ctx context.Context, s ModuleSpec) error {
	err := e.call(ctx, request{method: http.MethodGet, path: "/images/" + pathRef(normalize(s.Image)) + "/json"}, nil)
	if err != nil && !errors.Is(err, ErrNotFound) {
		return fmt.Errorf("module %s: looking up image %s: %w", s.Name, s.Image, err)
	}
	return err
}

// pull pulls ref from its registry.
func (e *Engine) pull(ctx context.Context, ref string, auth *RegistryAuth) error {
	h := http.Header{}
	if auth != nil {
		h.Set("X-Registry-Auth", auth.header())
	}
	rsp, err := e.do(ctx, request{method: http.MethodPost, path: "/images/create", query: url.Values{"fromImage": {ref}}, header: h})
	if err == nil {
		// Failures after the pull began come inside the progress stream.
		err = streamError(rsp.Body)
		rsp.Body.Close()
	}
	if err != nil {
		how := "without credentials"
		if auth != nil {
			how = "as " + auth.Username
		}
		return fmt.Errorf("pulling image %s from registry %s (%s): %w", ref, Registry(ref), how, err)
	}
	return nil
}

// Import makes an image ref from a root filesystem tarball, like `docker
// import`; changes are Dockerfile instructions such as `ENTRYPOINT ["/m"]`.
// Tests use it to build module images without a registry.
func (e *Engine) Import(ctx context.Context, ref string, rootfs io.Reader, changes ...string) error {
	ref = normalize(ref)
	i := strings.LastIndex(ref, ":")
	q := url.Values{"fromSrc": {"-"}, "repo": {ref[:i]}, "tag": {ref[i+1:]}, "changes": changes}
	h := http.Header{"Content-Type": {"application/x-tar"}}
	rsp, err := e.do(ctx, request{method: http.MethodPost, path: "/images/create", query: q, body: rootfs, header: h})
	if err == nil {
		err = streamError(rsp.Body)
		rsp.Body.Close()
	}
	if err != nil {
		return fmt.Errorf("importing image %s: %w", ref, err)
	}
	return nil
}

// RemoveImage removes the image ref (its tag, when it has others).
func (e *Engine) RemoveImage(ctx context.Context, ref string) error {
	err := e.call(ctx, request{method: http.MethodDelete, path: "/images/" + pathRef(normalize(ref)), query: url.Values{"force": {"1"}}}, nil)
	if err != nil {
		return fmt.Errorf("removing image %s: %w", ref, err)
	}
	return nil
}
