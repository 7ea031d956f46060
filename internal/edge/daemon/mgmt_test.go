package daemon

import (
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
