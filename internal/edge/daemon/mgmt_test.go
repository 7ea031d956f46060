package daemon

import (
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/edge/moby"
)

// A module the daemon does not run is 404 to every module request, so the
// CLI says "no module" rather than reporting a failure of the daemon.
func TestUnknownModuleIsNotFound(t *testing.T) {
	h := (&Daemon{}).mgmtHandler()
	for _, req := range []*http.Request{
		httptest.NewRequest("POST", "/modules/nosuch/restart", nil),
		httptest.NewRequest("GET", "/modules/nosuch/logs", nil),
	} {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != http.StatusNotFound || !strings.Contains(w.Body.String(), `no module \"nosuch\"`) {
			t.Errorf("%s %s: %d %s", req.Method, req.URL.Path, w.Code, w.Body.String())
		}
	}
}

// edgeAgent is no module here, but Azure's users ask for it as one: the
// answer says what to use instead.
func TestEdgeAgentIsNoModule(t *testing.T) {
	h := (&Daemon{}).mgmtHandler()
	for _, c := range []struct{ method, path, want string }{
		{"POST", "/modules/edgeAgent/restart", "iotedge system restart"},
		{"GET", "/modules/edgeAgent/logs", "iotedge system logs"},
		{"GET", "/modules/edgeHub/logs", "modules connect to the IoT hub directly"},
	} {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(c.method, c.path, nil))
		if w.Code != http.StatusNotFound || !strings.Contains(w.Body.String(), c.want) {
			t.Errorf("%s %s: %d %s, want 404 saying %q", c.method, c.path, w.Code, w.Body.String(), c.want)
		}
	}
}

// Azure's trace is the finest level: here, debug.
func TestLogLevelTrace(t *testing.T) {
	d := &Daemon{opts: Options{Level: new(slog.LevelVar)}}
	for level, want := range map[string]int{`"trace"`: http.StatusNoContent, `"TRACE"`: http.StatusNoContent, `"verbose"`: http.StatusBadRequest} {
		w := httptest.NewRecorder()
		d.mgmtHandler().ServeHTTP(w, httptest.NewRequest("PUT", "/log-level", strings.NewReader(`{"level": `+level+`}`)))
		if w.Code != want {
			t.Errorf("level %s: %d %s, want %d", level, w.Code, w.Body.String(), want)
		}
	}
	if d.opts.Level.Level() != slog.LevelDebug {
		t.Errorf("level after trace: %v, want debug", d.opts.Level.Level())
	}
}

// A module the deployment wants stopped is not restarted on request: the
// reconciler would stop it again within seconds, after the CLI said it
// had restarted.
func TestRestartRefusedForStoppedModule(t *testing.T) {
	e, err := moby.New("unix:///nonexistent/docker.sock")
	if err != nil {
		t.Fatal(err)
	}
	d := &Daemon{engine: e}
	d.setModules(map[string]any{"modules": map[string]any{
		"sensor": map[string]any{"status": "stopped", "runtimeStatus": "stopped", "settings": map[string]any{"image": "img"}},
	}})
	w := httptest.NewRecorder()
	d.mgmtHandler().ServeHTTP(w, httptest.NewRequest("POST", "/modules/sensor/restart", nil))
	if w.Code != http.StatusConflict || !strings.Contains(w.Body.String(), `module sensor's desired status is stopped`) {
		t.Errorf("restarting a module desired stopped: %d %s", w.Code, w.Body.String())
	}
}
