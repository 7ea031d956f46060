package daemon

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/edge/mgmt"
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

// edgeAgent runs inside the daemon, but Azure's users look for it as a
// module: `iotedge list` shows it, running once the device is provisioned
// (the seed's first check), `iotedge logs edgeAgent` shows the daemon's
// log, and `iotedge restart edgeAgent` reads the deployment again. edgeHub
// does not run here, and says so.
func TestEdgeAgentAsAModule(t *testing.T) {
	logs := NewLogBuffer(10)
	logs.Write([]byte("msg=one\nmsg=two\n"))
	d := New(Options{Logs: logs})
	h := d.mgmtHandler()
	get := func(method, path string) *httptest.ResponseRecorder {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(method, path, nil))
		return w
	}
	var ms []mgmt.Module
	if w := get("GET", "/modules"); json.Unmarshal(w.Body.Bytes(), &ms) != nil || len(ms) != 1 ||
		ms[0] != (mgmt.Module{Name: "edgeAgent", Status: "stopped", Description: "iotedged is starting", Config: "iotedged"}) {
		t.Errorf("modules while starting: %s", w.Body.String())
	}
	d.setStatus(func(s *mgmt.Status) { s.State = "running" })
	d.setModules(map[string]any{"modules": map[string]any{
		"sensor": map[string]any{"status": "running", "runtimeStatus": "running", "settings": map[string]any{"image": "img"}}}})
	if w := get("GET", "/modules"); json.Unmarshal(w.Body.Bytes(), &ms) != nil || len(ms) != 2 ||
		ms[0].Name != "edgeAgent" || ms[0].Status != "running" || ms[1].Name != "sensor" {
		t.Errorf("modules once provisioned: %s", w.Body.String())
	}
	if w := get("GET", "/modules/edgeAgent/logs?tail=all"); w.Code != http.StatusOK || w.Body.String() != "msg=one\nmsg=two\n" {
		t.Errorf("edgeAgent's logs: %d %q", w.Code, w.Body.String())
	}
	// --since and --until pick lines by their time, as for a module.
	logs.Write([]byte("time=2026-11-25T01:00:00.000Z msg=early\ntime=2026-11-25T02:00:00.000Z msg=late\n"))
	for query, want := range map[string]string{
		"since=2026-11-25T01:30:00Z":                           "time=2026-11-25T02:00:00.000Z msg=late\n",
		"until=2026-11-25T01:30:00Z":                           "time=2026-11-25T01:00:00.000Z msg=early\n",
		"since=1795570200&until=2026-11-25T02:00:00Z&tail=all": "time=2026-11-25T02:00:00.000Z msg=late\n", // 01:30 as a Unix time
	} {
		if w := get("GET", "/modules/edgeAgent/logs?"+query); w.Code != http.StatusOK || w.Body.String() != want {
			t.Errorf("edgeAgent's logs with %s: %d %q, want %q", query, w.Code, w.Body.String(), want)
		}
	}
	if w := get("GET", "/modules/edgeAgent/logs?since=yesterday"); w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), "since") {
		t.Errorf("a bad --since: %d %s", w.Code, w.Body.String())
	}
	if w := get("POST", "/modules/edgeAgent/restart"); w.Code != http.StatusNoContent {
		t.Errorf("restarting edgeAgent: %d %s", w.Code, w.Body.String())
	}
	select {
	case <-d.reloadCh:
	default:
		t.Error("restarting edgeAgent did not read the deployment again")
	}
	if w := get("GET", "/modules/edgeHub/logs"); w.Code != http.StatusNotFound || !strings.Contains(w.Body.String(), "modules connect to the IoT hub directly") {
		t.Errorf("edgeHub's logs: %d %s", w.Code, w.Body.String())
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
