package daemon

import (
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
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
