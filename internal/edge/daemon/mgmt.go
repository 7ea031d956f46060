package daemon

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/edge/mgmt"
	"github.com/hatchery/hatchery/internal/edge/moby"
)

// mgmtHandler is the management API the iotedge CLI calls.
func (d *Daemon) mgmtHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", d.handleStatus)
	mux.HandleFunc("GET /modules", d.handleModules)
	mux.HandleFunc("POST /modules/{name}/restart", d.handleRestart)
	mux.HandleFunc("GET /modules/{name}/logs", d.handleModuleLogs)
	mux.HandleFunc("GET /logs", d.handleLogs)
	mux.HandleFunc("POST /reload", signalling(d.reloadCh))
	mux.HandleFunc("POST /reprovision", signalling(d.reprovCh))
	mux.HandleFunc("POST /stop", signalling(d.stopCh))
	mux.HandleFunc("PUT /log-level", d.handleLogLevel)
	return mux
}

func (d *Daemon) handleStatus(w http.ResponseWriter, r *http.Request) {
	d.mu.Lock()
	s := d.status
	d.mu.Unlock()
	writeJSON(w, s)
}

func (d *Daemon) handleModules(w http.ResponseWriter, r *http.Request) {
	d.mu.Lock()
	ms := append(slices.Clone(d.modules), agentRow(d.status))
	d.mu.Unlock()
	slices.SortFunc(ms, func(a, b mgmt.Module) int { return cmp.Compare(a.Name, b.Name) })
	writeJSON(w, ms)
}

// agentName is the edge agent's module name, as Azure's `iotedge` shows it.
const agentName = "edgeAgent"

// agentRow is the edge agent's row of `iotedge list`, as in Azure, where it
// is a container operators look for there (the seed's first check after
// provisioning): here it runs inside iotedged, up once the device is
// provisioned and its deployment followed.
func agentRow(s mgmt.Status) mgmt.Module {
	row := mgmt.Module{Name: agentName, Status: "running", Description: "running inside iotedged", Config: "iotedged"}
	if s.State != "running" {
		row.Status, row.Description = "stopped", "iotedged is "+s.State
	}
	return row
}

func (d *Daemon) handleRestart(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if name == agentName { // as restarting Azure's agent container: the deployment read again
		signal(d.reloadCh)
		slog.Info("edge agent restarted on request: reading the configuration and the deployment again")
		w.WriteHeader(http.StatusNoContent)
		return
	}
	e, err := d.moduleEngine(name)
	if err != nil {
		writeError(w, http.StatusNotFound, err)
		return
	}
	d.mu.Lock()
	stopped := d.stopped[name]
	d.mu.Unlock()
	if stopped { // the reconciler would stop it again within seconds
		writeError(w, http.StatusConflict, fmt.Errorf("module %s's desired status is stopped: the agent keeps it stopped; "+
			"set its status to \"running\" in the deployment to start it", name))
		return
	}
	if err = e.Stop(r.Context(), name, 10*time.Second); err == nil {
		err = e.Start(r.Context(), name)
	}
	if err != nil {
		writeError(w, http.StatusInternalServerError, err)
		return
	}
	slog.Info("module restarted on request", "module", name)
	w.WriteHeader(http.StatusNoContent)
}

func (d *Daemon) handleModuleLogs(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if name == agentName { // the agent's log is the daemon's
		d.handleLogs(w, r)
		return
	}
	e, err := d.moduleEngine(name)
	if err != nil {
		writeError(w, http.StatusNotFound, err)
		return
	}
	q := r.URL.Query()
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	out := &flushWriter{w: w}
	if err := e.Logs(r.Context(), name, moby.LogOptions{Tail: cmp.Or(q.Get("tail"), "all"),
		Since: q.Get("since"), Until: q.Get("until"), Follow: q.Get("follow") == "true"}, out); err != nil {
		if !out.wrote { // nothing streamed yet: a status the CLI exits with
			writeError(w, http.StatusNotFound, err)
			return
		}
		fmt.Fprintf(w, "error: %v\n", err)
	}
}

// handleLogs is the daemon's own log, from its ring of recent lines, those
// of a time window when since or until (as `iotedge logs` takes them) say.
func (d *Daemon) handleLogs(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	tail, err := math.MaxInt, error(nil) // "all", as `iotedge logs` asks by default
	if t := q.Get("tail"); t != "all" {
		tail, err = strconv.Atoi(cmp.Or(t, "200"))
	}
	if err != nil || tail < 0 {
		writeError(w, http.StatusBadRequest, errors.New("tail must be a number of lines, or all"))
		return
	}
	window, err := logWindow(q.Get("since"), q.Get("until"), time.Now())
	if err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	var seq uint64
	for {
		lines, next, more := d.opts.Logs.Since(seq, tail)
		for _, l := range lines {
			if window.holds(l) {
				fmt.Fprintln(w, l)
			}
		}
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
		seq = next
		if q.Get("follow") != "true" {
			return
		}
		select { // (seq 0 means nothing was written: the next read takes it all)
		case <-r.Context().Done():
			return
		case <-more:
		}
	}
}

// timeWindow is the times from since to until; a zero end is open.
type timeWindow struct{ since, until time.Time }

func logWindow(since, until string, now time.Time) (timeWindow, error) {
	var tw timeWindow
	var err error
	if since != "" {
		if tw.since, err = moby.LogTime("since", since, now); err != nil {
			return tw, err
		}
	}
	if until != "" {
		tw.until, err = moby.LogTime("until", until, now)
	}
	return tw, err
}

// holds reports whether the log line, as slog's text handler writes it
// ("time=2026-11-25T03:10:00.123Z level=INFO ..."), falls in the window; a
// line without a time falls in an open one only.
func (tw timeWindow) holds(line string) bool {
	if tw.since.IsZero() && tw.until.IsZero() {
		return true
	}
	stamp, _, _ := strings.Cut(strings.TrimPrefix(line, "time="), " ")
	t, err := time.Parse(time.RFC3339Nano, stamp)
	if err != nil {
		return false
	}
	return (tw.since.IsZero() || !t.Before(tw.since)) && (tw.until.IsZero() || !t.After(tw.until))
}

// signalling answers a request by signalling ch, which the daemon's loop
// acts on.
func signalling(ch chan struct{}) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		signal(ch)
		w.WriteHeader(http.StatusNoContent)
	}
}

func (d *Daemon) handleLogLevel(w http.ResponseWriter, r *http.Request) {
	var req struct{ Level string }
	var lvl slog.Level
	err := json.NewDecoder(r.Body).Decode(&req)
	name := strings.ToLower(req.Level)
	if name == "trace" { // Azure's finest level; debug is the daemon's
		name = "debug"
	}
	if err != nil || lvl.UnmarshalText([]byte(name)) != nil {
		writeError(w, http.StatusBadRequest, fmt.Errorf("log level %q: use trace, debug, info, warn or error", req.Level))
		return
	}
	d.opts.Level.Set(lvl)
	slog.Info("log level changed", "level", lvl.String())
	w.WriteHeader(http.StatusNoContent)
}

// moduleEngine returns the engine if name is one of the agent's modules.
func (d *Daemon) moduleEngine(name string) (*moby.Engine, error) {
	switch name { // Azure runs it as a container; here it is not a module
	case "edgeHub":
		return nil, errors.New("edgeHub does not run on this device: modules connect to the IoT hub directly")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if !slices.ContainsFunc(d.modules, func(m mgmt.Module) bool { return m.Name == name }) || d.engine == nil {
		return nil, fmt.Errorf("no module %q: `iotedge list` shows the modules", name)
	}
	return d.engine, nil
}

// flushWriter flushes after each write, for following logs.
// flushWriter sends each write at once, as a log stream should.
type flushWriter struct {
	w     http.ResponseWriter
	wrote bool
}

func (f *flushWriter) Write(p []byte) (int, error) {
	f.wrote = true
	n, err := f.w.Write(p)
	if fl, ok := f.w.(http.Flusher); ok {
		fl.Flush()
	}
	return n, err
}
