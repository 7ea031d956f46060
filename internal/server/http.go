// Package server is the front end: it maps the Azure DPS and IoT Hub REST
// APIs (HTTPS) and device protocols (MQTT) onto the dps and hub services,
// which hold the logic.
package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/jsonbody"
	"github.com/hatchery/hatchery/internal/mqtt"
	"github.com/hatchery/hatchery/internal/store"
)

// maxBody bounds request bodies; enrollments and twins are far smaller.
const maxBody = 1 << 20

// New returns the handler serving both APIs on one port, as the Azure SDKs
// hard-code 443 for both, and with devices, the hub's MQTT endpoint over
// WebSocket there too.
func New(d *dps.Service, h *hub.Service, devices *mqtt.Server) http.Handler {
	mux := http.NewServeMux()
	a := &api{dps: d, hub: h}
	a.routesDPS(mux)
	a.routesHub(mux)
	a.routesDeployments(mux)
	if devices != nil {
		mux.HandleFunc("GET /$iothub/websocket", mqttOverWebSocket(devices))
	}
	// For load balancers and monitoring: 200 while the server can reach
	// its database, 503 when not. It needs no credentials and tells
	// nothing else.
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		if err := h.Ready(ctx); err != nil {
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "unavailable", "reason": "the database cannot be reached"})
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		// The device API is registered under the ID scope as configured;
		// devices may spell it in any case, as over MQTT.
		if r2 := withCanonicalScope(r, d.IDScope()); r2 != nil {
			mux.ServeHTTP(w, r2)
			return
		}
		hubPath := isHubPath(r.URL.Path)
		var err error
		if allow := allowedMethods(mux, r); len(allow) > 0 {
			w.Header().Set("Allow", strings.Join(allow, ", "))
			err = azerr.New(405001, "MethodNotAllowed", "%s is not served at %s: use %s", r.Method, r.URL.Path, strings.Join(allow, " or "))
		} else if hubPath {
			err = azerr.NotFound("NotFound", "no API at %s %s: the hub's service APIs are under /devices, /twins, /jobs/v2, /configurations and /statistics", r.Method, r.URL.Path)
		} else {
			err = azerr.NotFound("NotFound", "no API at %s %s: device registration is under /%s/registrations/, the service APIs under /enrollments, /enrollmentGroups, /registrations, /devices and /twins",
				r.Method, r.URL.Path, d.IDScope())
		}
		id, err := failure(r, err)
		// In the shape the service's SDKs parse: theirs differ.
		if hubPath {
			azerr.WriteHub(w, err, id)
		} else {
			azerr.WriteDPS(w, err, id)
		}
	})
	return logRequests(mux)
}

// withCanonicalScope returns r with its first path segment spelled as scope
// if it is scope in another case, else nil.
func withCanonicalScope(r *http.Request, scope string) *http.Request {
	first := firstSegment(r.URL.Path)
	if first == scope || !strings.EqualFold(first, scope) {
		return nil
	}
	u := *r.URL
	u.Path = "/" + scope + r.URL.Path[1+len(first):]
	if u.RawPath != "" { // its escapes in the registration ID kept
		u.RawPath = "/" + scope + u.RawPath[1+len(firstSegment(u.RawPath)):]
	}
	r2 := r.Clone(r.Context())
	r2.URL = &u
	return r2
}

// hubRoots are the first path segments of the hub's APIs; the others are
// the provisioning service's.
var hubRoots = map[string]bool{"devices": true, "twins": true, "jobs": true, "configurations": true,
	"statistics": true, "messages": true, "certificates": true, "events": true, "$iothub": true}

func isHubPath(path string) bool { return hubRoots[strings.ToLower(firstSegment(path))] }

// firstSegment returns the first segment of a path that starts with "/".
func firstSegment(path string) string {
	first, _, _ := strings.Cut(strings.TrimPrefix(path, "/"), "/")
	return first
}

// allowedMethods lists the methods mux serves at r's path other than the
// catch-all: none for a path it does not know. ServeMux would answer 405
// itself, but the catch-all matches every method first.
func allowedMethods(mux *http.ServeMux, r *http.Request) []string {
	var allow []string
	for _, m := range []string{"GET", "PUT", "POST", "PATCH", "DELETE"} {
		probe := *r
		probe.Method = m
		if _, pattern := mux.Handler(&probe); pattern != "" && pattern != "/" {
			allow = append(allow, m)
		}
	}
	return allow
}

// handle registers pattern ("METHOD /path"), and the path in lower case
// too: the hosted services match paths without regard to case, and SDKs
// differ (the Node provisioning SDK posts to /enrollmentgroups/…).
func handle(mux *http.ServeMux, pattern string, h http.HandlerFunc) {
	mux.HandleFunc(pattern, h)
	method, path, _ := strings.Cut(pattern, " ")
	if lower := strings.ToLower(path); lower != path {
		mux.HandleFunc(method+" "+lower, h)
	}
}

type api struct {
	dps *dps.Service
	hub *hub.Service
}

var apiVersionPattern = regexp.MustCompile(`^\d{4}-\d{2}-\d{2}(-preview)?$`)

// checkAPIVersion requires an api-version, as the hosted services do; any
// dated version is served, since clients in the wild send many.
func checkAPIVersion(r *http.Request) error {
	v := r.URL.Query().Get("api-version")
	if v == "" {
		return azerr.BadRequest("the api-version query parameter is required, e.g. ?api-version=2021-10-01")
	}
	if !apiVersionPattern.MatchString(v) {
		return azerr.BadRequest("api-version %q is not a version: use a date such as 2021-10-01", v)
	}
	return nil
}

// readJSON decodes a bounded JSON body into v.
func readJSON(r *http.Request, v any) error { return readJSONMax(r, v, maxBody) }

// readJSONMax is readJSON with another bound, for bulk operations.
func readJSONMax(r *http.Request, v any, limit int64) error {
	body, err := readBodyMax(r, limit)
	if err != nil {
		return err
	}
	return jsonbody.DecodeTwin(body, v) // service bodies may carry twin documents
}

func readBody(r *http.Request) ([]byte, error) { return readBodyMax(r, maxBody) }

func readBodyMax(r *http.Request, limit int64) ([]byte, error) {
	body, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, limit))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return nil, azerr.MessageTooLarge("request body is larger than %d bytes", limit)
		}
		return nil, azerr.BadRequest("reading request body: %v", err)
	}
	return body, nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// failure is how the API answers err, and the tracking ID it carries.
// Internal errors, and why a refused request was refused, are logged under
// that ID; a database full or out of reach, once a period (unavailable).
func failure(r *http.Request, err error) (string, error) {
	id := trackingID()
	noteTrackingID(r, id)
	if u := unavailable(err); u != nil {
		return id, stoppedAt(err, u)
	}
	e, ok := errors.AsType[*azerr.Error](err)
	switch {
	case ok && e.Reason != "":
		slog.Info("request refused", "method", r.Method, "path", r.URL.Path, "trackingId", id, "reason", e.Reason)
	case !ok && !errors.Is(err, context.Canceled):
		slog.Error("request failed", "method", r.Method, "path", r.URL.Path, "trackingId", id, "error", err)
	}
	return id, stoppedAt(err, err)
}

// stoppedAt is answer, what the client is sent for err, saying too how far
// the bulk operation err stopped got: the items before the one that failed
// stay applied, and the client must know to resume from it.
func stoppedAt(err, answer error) error {
	stopped, ok := errors.AsType[*azerr.BulkStoppedError](err)
	if !ok {
		return answer
	}
	a := *azerr.As(answer)
	a.Message = stopped.Progress() + ": " + a.Message
	return &a
}

// unavailable is err as a 503 with Retry-After when the database is full
// or read-only (every write fails until the operator acts) or out of reach, so
// that clients back off and retry rather than give up; nil otherwise. Each
// condition is logged once a period, not once a request.
func unavailable(err error) *azerr.Error {
	switch {
	case errors.Is(err, store.ErrFull):
		logEvery(&fullLogged, time.Minute, "the database has no space left: writes fail until there is (free disk space, or lower --event-retention)", err)
		return retryLater("the service cannot store anything now", time.Minute)
	case store.ReadOnly(err):
		logEvery(&readOnlyLogged, 10*time.Second, "the database is read-only (a standby? after a failover, point --database at the new primary): writes are answered 503 until it takes them", err)
		return retryLater("the service cannot store anything now", 10*time.Second)
	case store.Contended(err):
		return retryLater("the database gave way to a concurrent write", time.Second)
	case store.Unavailable(err):
		logEvery(&unreachableLogged, 10*time.Second, "the database cannot be reached: requests are answered 503 until it can", err)
		return retryLater("the service cannot reach its database now", 5*time.Second)
	}
	return nil
}

// retryLater is a 503 saying why, and when to retry.
func retryLater(why string, after time.Duration) *azerr.Error {
	return &azerr.Error{Code: 503001, Name: "ServiceUnavailable", Message: why + ": retry later", RetryAfter: after}
}

// When a full, read-only or unreachable database was last logged (Unix seconds).
var fullLogged, readOnlyLogged, unreachableLogged atomic.Int64

func logEvery(last *atomic.Int64, period time.Duration, msg string, err error) {
	now := time.Now().Unix()
	if prev := last.Load(); now-prev >= int64(period.Seconds()) && last.CompareAndSwap(prev, now) {
		slog.Error(msg, "error", err)
	}
}

func trackingID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// statusRecorder remembers the status for the access log.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	s.status = code
	s.ResponseWriter.WriteHeader(code)
}

// Unwrap lets http.ResponseController reach the connection's writer, to
// flush a stream.
func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// accessNote is what a request's access-log line learns as it is served:
// the tracking ID of an error answer, which the client sees.
type accessNote struct{ trackingID string }

type accessNoteKey struct{}

// logRequests logs, at debug level, method, path, status and the tracking
// ID of an error; never headers, which carry tokens. Below debug level it
// costs nothing.
func logRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !slog.Default().Enabled(r.Context(), slog.LevelDebug) {
			next.ServeHTTP(w, r)
			return
		}
		start := time.Now()
		rec, note := &statusRecorder{ResponseWriter: w, status: 200}, &accessNote{}
		next.ServeHTTP(rec, r.WithContext(context.WithValue(r.Context(), accessNoteKey{}, note)))
		attrs := []any{"method", r.Method, "path", r.URL.Path, "status", rec.status, "ms", strconv.FormatInt(time.Since(start).Milliseconds(), 10)}
		if note.trackingID != "" {
			attrs = append(attrs, "trackingId", note.trackingID)
		}
		slog.Debug("http", attrs...)
	})
}

// noteTrackingID gives the access log the tracking ID of r's error answer.
func noteTrackingID(r *http.Request, id string) {
	if n, ok := r.Context().Value(accessNoteKey{}).(*accessNote); ok {
		n.trackingID = id
	}
}

// ifMatch reads If-Match without the quotes some SDKs put around etags
// and around the * wildcard.
func ifMatch(r *http.Request) string { return strings.Trim(r.Header.Get("If-Match"), `"`) }

// handler is an API handler; its error is written in the API's shape.
type handler = func(http.ResponseWriter, *http.Request) error

// Most calls take a JSON body or none and answer JSON or nothing; these
// adapters leave each handler just the call to its service.

// withBody decodes the body into a T for f and writes f's answer (204 when nil).
func withBody[T any](f func(r *http.Request, in *T) (any, error)) handler {
	return func(w http.ResponseWriter, r *http.Request) error {
		var in T
		if err := readJSON(r, &in); err != nil {
			return err
		}
		out, err := f(r, &in)
		if err != nil {
			return err
		}
		answer(w, out)
		return nil
	}
}

// reply writes f's answer (204 when nil).
func reply(f func(r *http.Request) (any, error)) handler {
	return func(w http.ResponseWriter, r *http.Request) error {
		out, err := f(r)
		if err != nil {
			return err
		}
		answer(w, out)
		return nil
	}
}

// noContent answers 204 when f succeeds.
func noContent(f func(r *http.Request) error) handler {
	return reply(func(r *http.Request) (any, error) { return nil, f(r) })
}

func answer(w http.ResponseWriter, out any) {
	if out == nil {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

// maxItemCount is a query page's size: x-ms-max-item-count, 100 without
// it, at most 1000.
func maxItemCount(r *http.Request) (int, error) {
	v := r.Header.Get("x-ms-max-item-count")
	if v == "" {
		return 100, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		return 0, azerr.BadRequest("x-ms-max-item-count %q must be a positive number", v)
	}
	return min(n, 1000), nil
}
