package daemon

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/edge/agent"
	"github.com/hatchery/hatchery/internal/edge/moby"
	"github.com/hatchery/hatchery/internal/sas"
)

// Where modules find the workload API inside their container.
const (
	workloadInContainer = "/var/run/iotedge/workload.sock"
	workloadAPIVersion  = "2019-01-30"
)

// workload serves each module its own socket of the workload API, so a
// module can only ask for its own tokens: the socket it talks to names it.
type workload struct {
	dir string

	mu      sync.Mutex
	servers map[string]*http.Server
	signer  func(module string, data []byte) ([]byte, error)
	bundle  []byte
	prefix  func(module string) string // the resource a module's tokens are for
}

func newWorkload(dir string) *workload {
	return &workload{dir: dir, servers: map[string]*http.Server{}}
}

// configure sets how tokens are signed and what the trust bundle is; it
// changes with each identity.
func (w *workload) configure(signer func(string, []byte) ([]byte, error), prefix func(string) string, bundle []byte) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.signer, w.prefix, w.bundle = signer, prefix, bundle
}

// socket returns the host path of module's socket, serving it if new.
func (w *workload) socket(module string) (string, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	dir := filepath.Join(w.dir, module)
	path := filepath.Join(dir, "workload.sock")
	if _, ok := w.servers[module]; ok {
		return dir, nil
	}
	// The sockets are open to anyone, as a module's user inside its
	// container may be anyone; the directory above them keeps the host's
	// other users out. A container reaches only its own, bind-mounted.
	if err := os.MkdirAll(w.dir, 0o700); err != nil {
		return "", err
	}
	if err := os.Chmod(w.dir, 0o700); err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	ln, err := listenUnix(path, 0o666)
	if err != nil {
		return "", err
	}
	srv := &http.Server{Handler: w.handler(module), ReadHeaderTimeout: 10 * time.Second}
	w.servers[module] = srv
	go func() { _ = srv.Serve(ln) }()
	return dir, nil
}

// release stops serving module's socket: a module that left the
// deployment must not keep having tokens signed for its identity.
func (w *workload) release(module string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if s, ok := w.servers[module]; ok {
		_ = s.Close() // removes the socket file
		delete(w.servers, module)
	}
	_ = os.RemoveAll(filepath.Join(w.dir, module))
}

// served returns the modules whose sockets are served.
func (w *workload) served() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Collect(maps.Keys(w.servers))
}

func (w *workload) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, s := range w.servers {
		_ = s.Close()
	}
	w.servers = map[string]*http.Server{}
}

func (w *workload) handler(module string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /modules/{module}/genid/{genid}/sign", func(rw http.ResponseWriter, r *http.Request) {
		if r.PathValue("module") != module {
			writeError(rw, http.StatusForbidden, fmt.Errorf("this socket belongs to module %q", module))
			return
		}
		var req struct {
			KeyID string `json:"keyId"`
			Algo  string `json:"algo"`
			Data  string `json:"data"`
		}
		if err := json.NewDecoder(http.MaxBytesReader(rw, r.Body, 64<<10)).Decode(&req); err != nil {
			writeError(rw, http.StatusBadRequest, fmt.Errorf("request body: %w", err))
			return
		}
		if req.Algo != "" && req.Algo != "HMACSHA256" {
			writeError(rw, http.StatusBadRequest, fmt.Errorf("algo %q: only HMACSHA256 is supported", req.Algo))
			return
		}
		data, err := base64.StdEncoding.DecodeString(req.Data)
		if err != nil {
			writeError(rw, http.StatusBadRequest, errors.New("data is not base64"))
			return
		}
		w.mu.Lock()
		sign, prefix := w.signer, w.prefix
		w.mu.Unlock()
		if sign == nil {
			writeError(rw, http.StatusServiceUnavailable, errors.New("the device is not provisioned yet"))
			return
		}
		if err := tokenFor(string(data), prefix(module), time.Now()); err != nil {
			writeError(rw, http.StatusForbidden, fmt.Errorf("module %q: %w", module, err))
			return
		}
		digest, err := sign(module, data)
		if err != nil {
			writeError(rw, http.StatusInternalServerError, err)
			return
		}
		writeJSON(rw, map[string]string{"digest": base64.StdEncoding.EncodeToString(digest)})
	})
	mux.HandleFunc("GET /trust-bundle", func(rw http.ResponseWriter, r *http.Request) {
		w.mu.Lock()
		b := w.bundle
		w.mu.Unlock()
		writeJSON(rw, map[string]string{"certificate": string(b)})
	})
	return mux
}

// decorated gives modules what the Azure IoT SDKs expect of the runtime:
// IOTEDGE_* variables and the workload socket.
type decorated struct {
	agent.Engine
	w   *workload
	env func(module string) map[string]string
}

// List serves the socket of every container it returns: a daemon that
// restarted (or a device that rebooted) finds its modules' containers
// already made, so Create, which serves a new module's socket, never runs
// for them. It releases the socket of every module without a container,
// whose container went without Remove seeing it go (a Remove that failed,
// `docker rm`).
func (e decorated) List(ctx context.Context) ([]moby.ModuleState, error) {
	states, err := e.Engine.List(ctx)
	if err != nil {
		return states, err
	}
	listed := map[string]bool{}
	for _, st := range states {
		listed[st.Name] = true
		// Not an error of the listing: the module's own Start reports it.
		if _, serr := e.w.socket(st.Name); serr != nil {
			slog.Warn("serving a module's workload socket", "module", st.Name, "error", serr)
		}
	}
	for _, m := range e.w.served() {
		if !listed[m] {
			e.w.release(m)
		}
	}
	return states, nil
}

// Start serves the module's socket first, so that the directory Docker
// bind-mounts is the workload's own and not one Docker makes, root's and
// empty, when the source is missing (as after a reboot).
func (e decorated) Start(ctx context.Context, name string) error {
	if _, err := e.w.socket(name); err != nil {
		return fmt.Errorf("workload socket for %s: %w", name, err)
	}
	return e.Engine.Start(ctx, name)
}

// Remove releases the module's socket with its container (a recreated
// module gets it again from Create).
func (e decorated) Remove(ctx context.Context, name string) error {
	err := e.Engine.Remove(ctx, name)
	if err == nil || errors.Is(err, moby.ErrNotFound) {
		e.w.release(name)
	}
	return err
}

func (e decorated) Create(ctx context.Context, s moby.ModuleSpec) error {
	dir, err := e.w.socket(s.Name)
	if err != nil {
		return fmt.Errorf("workload socket for %s: %w", s.Name, err)
	}
	env := maps.Clone(s.Env)
	if env == nil {
		env = map[string]string{}
	}
	for k, v := range e.env(s.Name) {
		if _, set := env[k]; !set {
			env[k] = v
		}
	}
	s.Env = env
	opts, err := moby.DecodeCreateOptions(s.CreateOptions)
	if err != nil {
		return fmt.Errorf("module %s: %w", s.Name, err)
	}
	// Checked, not asserted: a mistyped HostConfig or Binds would else be
	// replaced by the socket's bind alone, and the module would start
	// without its volumes.
	hc := map[string]any{}
	if v, ok := opts["HostConfig"]; ok && v != nil {
		if hc, ok = v.(map[string]any); !ok {
			return fmt.Errorf("module %s: createOptions.HostConfig must be an object", s.Name)
		}
	}
	var binds []any
	if v, ok := hc["Binds"]; ok && v != nil {
		if binds, ok = v.([]any); !ok {
			return fmt.Errorf(`module %s: createOptions.HostConfig.Binds must be a list of "source:target[:options]" strings, such as ["/data:/data"]`, s.Name)
		}
	}
	hc["Binds"] = append(binds, dir+":"+filepath.Dir(workloadInContainer))
	opts["HostConfig"] = hc
	if s.CreateOptions, err = json.Marshal(opts); err != nil {
		return err
	}
	return e.Engine.Create(ctx, s)
}

// maxTokenLifetime bounds the tokens a module may have signed: the
// SDKs ask for an hour and renew.
const maxTokenLifetime = 24 * time.Hour

// tokenFor checks what a module asks to have signed: a SAS token's
// "{resource}\n{expiry}" for its own identity (the device's key signs for
// all its modules, so the resource must name this one exactly) that
// expires within maxTokenLifetime.
func tokenFor(data, resource string, now time.Time) error {
	aud, se, ok := strings.Cut(data, "\n")
	dec, err := url.QueryUnescape(aud)
	if !ok || err != nil || !sas.SameResource(dec, resource) {
		return fmt.Errorf("it may only have tokens for %s signed (\"{resource}\\n{expiry}\")", resource)
	}
	expiry, err := strconv.ParseInt(se, 10, 64)
	if err != nil {
		return fmt.Errorf("the token's expiry %q is not a Unix time in seconds", se)
	}
	if time.Unix(expiry, 0).After(now.Add(maxTokenLifetime)) {
		return fmt.Errorf("the token would expire at %s: ask for one that expires within %s and renew it", time.Unix(expiry, 0).UTC().Format(time.RFC3339), maxTokenLifetime)
	}
	return nil
}

// listenUnix listens on a fresh socket file with the given mode.
func listenUnix(path string, mode os.FileMode) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	_ = os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, err error) {
	slog.Debug("api error", "status", status, "error", err)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"message": err.Error()})
}
