package server

import (
	"bytes"
	"context"
	"encoding/base64"
	"net/http"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dps"
	"github.com/hatchery/hatchery/internal/jsonbody"
)

func (a *api) routesDPS(mux *http.ServeMux) {
	// The device API is registered under the literal ID scope (a wildcard
	// first segment would clash with /registrations/{id}/query); the
	// catch-all routes it in any other case (withCanonicalScope).
	scope := "/" + a.dps.IDScope()
	device := func(method, path string, h handler) { mux.HandleFunc(method+" "+scope+path, a.dpsHandler(false, h)) }
	device("PUT", "/registrations/{regId}/register", a.register)
	device("GET", "/registrations/{regId}/operations/{opId}", a.operationStatus)
	device("POST", "/registrations/{regId}", a.deviceRegistrationStatus)

	service := func(pattern string, h handler) { handle(mux, pattern, a.dpsHandler(true, h)) }
	d := a.dps
	id := func(r *http.Request) string { return r.PathValue("id") }
	service("PUT /enrollments/{id}", withBody(func(r *http.Request, e *dps.Enrollment) (any, error) {
		return d.PutEnrollment(r.Context(), id(r), ifMatch(r), e)
	}))
	service("GET /enrollments/{id}", reply(func(r *http.Request) (any, error) {
		e, err := d.GetEnrollment(r.Context(), id(r))
		if err != nil {
			return nil, err
		}
		return e.Redacted(), nil
	}))
	service("DELETE /enrollments/{id}", noContent(func(r *http.Request) error { return d.DeleteEnrollment(r.Context(), id(r), ifMatch(r)) }))
	service("POST /enrollments/{id}/attestationmechanism", reply(func(r *http.Request) (any, error) {
		e, err := d.GetEnrollment(r.Context(), id(r))
		if err != nil {
			return nil, err
		}
		return e.Attestation, nil
	}))
	service("POST /enrollments/query", query("Enrollment", redactedPages(d.ListEnrollments, dps.Enrollment.Redacted)))
	bulk := bulkHandler(d.Bulk)
	// The Node service SDK posts to /enrollments/ with the slash.
	service("POST /enrollments", bulk)
	service("POST /enrollments/{$}", bulk)
	// The same bulk operation on enrollment groups, under the policy of
	// their single writes.
	bulkGroups := bulkHandler(d.BulkGroups)
	service("POST /enrollmentGroups", bulkGroups)
	service("POST /enrollmentGroups/{$}", bulkGroups)
	service("PUT /enrollmentGroups/{id}", withBody(func(r *http.Request, g *dps.EnrollmentGroup) (any, error) {
		return d.PutGroup(r.Context(), id(r), ifMatch(r), g)
	}))
	service("GET /enrollmentGroups/{id}", reply(func(r *http.Request) (any, error) {
		g, err := d.GetGroup(r.Context(), id(r))
		if err != nil {
			return nil, err
		}
		return g.Redacted(), nil
	}))
	service("DELETE /enrollmentGroups/{id}", noContent(func(r *http.Request) error { return d.DeleteGroup(r.Context(), id(r), ifMatch(r)) }))
	service("POST /enrollmentGroups/{id}/attestationmechanism", reply(func(r *http.Request) (any, error) {
		g, err := d.GetGroup(r.Context(), id(r))
		if err != nil {
			return nil, err
		}
		return g.Attestation, nil
	}))
	service("POST /enrollmentGroups/query", query("EnrollmentGroup", redactedPages(d.ListGroups, dps.EnrollmentGroup.Redacted)))
	// Linked hubs are managed in Azure's resource manager; here they are
	// part of the service API, under the same policy.
	service("PUT /linkedHubs/{id}", withBody(func(r *http.Request, h *dps.LinkedHub) (any, error) {
		out, err := d.PutLinkedHub(r.Context(), id(r), h)
		if err != nil {
			return nil, err
		}
		return out.Redacted(), nil
	}))
	service("GET /linkedHubs", reply(func(r *http.Request) (any, error) {
		hubs, err := d.LinkedHubs(r.Context())
		out := make([]*dps.LinkedHub, 0, len(hubs))
		for _, h := range hubs {
			out = append(out, h.Redacted())
		}
		return out, err
	}))
	service("DELETE /linkedHubs/{id}", noContent(func(r *http.Request) error { return d.UnlinkHub(r.Context(), id(r)) }))
	service("GET /registrations/{id}", reply(func(r *http.Request) (any, error) { return d.GetRegistration(r.Context(), id(r)) }))
	service("DELETE /registrations/{id}", noContent(func(r *http.Request) error { return d.DeleteRegistration(r.Context(), id(r), ifMatch(r)) }))
	service("POST /registrations/{id}/query", func(w http.ResponseWriter, r *http.Request) error {
		return query("DeviceRegistration", func(ctx context.Context, after string, limit int) ([]*dps.RegistrationState, string, error) {
			return d.ListRegistrations(ctx, id(r), after, limit)
		})(w, r)
	})
}

// bulkHandler serves a bulk operation on enrollments or groups.
func bulkHandler[Op, Res any](run func(context.Context, *Op) (Res, error)) handler {
	return func(w http.ResponseWriter, r *http.Request) error {
		var op Op
		// Up to dps.MaxBulk items with certificates or endorsement keys.
		if err := readJSONMax(r, &op, 64<<20); err != nil {
			return err
		}
		res, err := run(r.Context(), &op)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, res)
		return nil
	}
}

// dpsHandler checks api-version (and, for the service API, the policy
// token) and writes errors in the DPS shape.
func (a *api) dpsHandler(serviceAPI bool, h handler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		err := checkAPIVersion(r)
		if err == nil && serviceAPI {
			err = a.dps.AuthorizeService(r.Header.Get("Authorization"), r.URL.Path)
		}
		if err == nil {
			err = h(w, r)
		}
		if err != nil {
			id, err := failure(r, err)
			azerr.WriteDPS(w, err, id)
		}
	}
}

// deviceAddr is the client's address, for geoLatency allocation.
func deviceAddr(remote string) netip.Addr {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr()
}

// deviceCredentials are the SAS token and the TLS client certificate chain
// (which the TLS layer requests but leaves to the service to trust).
func deviceCredentials(r *http.Request) dps.Credentials {
	c := dps.Credentials{Authorization: r.Header.Get("Authorization")}
	if r.TLS != nil {
		c.Certificates = r.TLS.PeerCertificates
	}
	return c
}

func (a *api) register(w http.ResponseWriter, r *http.Request) error {
	body, err := readBody(r)
	if err != nil {
		return err
	}
	op, ch, err := a.dps.Register(r.Context(), dps.RegisterRequest{
		IDScope: a.dps.IDScope(), RegistrationID: r.PathValue("regId"),
		Credentials: deviceCredentials(r), Body: body, Addr: deviceAddr(r.RemoteAddr),
	})
	if err != nil {
		return err
	}
	if ch != nil {
		writeJSON(w, http.StatusUnauthorized, ch)
		return nil
	}
	// The assignment is done by now: the device may poll at once.
	w.Header().Set("Retry-After", strconv.Itoa(dps.PollNow))
	w.Header().Set("Location", r.URL.Path[:strings.LastIndex(r.URL.Path, "/register")]+"/operations/"+op.OperationID)
	writeJSON(w, http.StatusAccepted, op)
	return nil
}

func (a *api) operationStatus(w http.ResponseWriter, r *http.Request) error {
	op, err := a.dps.OperationStatus(r.Context(), a.dps.IDScope(), r.PathValue("regId"), r.PathValue("opId"), deviceCredentials(r))
	if err != nil {
		return err
	}
	status := http.StatusOK
	if op.Status == dps.StatusAssigning {
		status = http.StatusAccepted
		w.Header().Set("Retry-After", strconv.Itoa(dps.PollLater))
	}
	writeJSON(w, status, op)
	return nil
}

func (a *api) deviceRegistrationStatus(w http.ResponseWriter, r *http.Request) error {
	st, err := a.dps.DeviceRegistrationStatus(r.Context(), a.dps.IDScope(), r.PathValue("regId"), deviceCredentials(r))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, st)
	return nil
}

// querySpec reads the query body ({"query": "*"}) and the paging headers.
func querySpec(r *http.Request) (after string, limit int, err error) {
	var q struct {
		Query string `json:"query"`
	}
	if body, err := readBody(r); err != nil {
		return "", 0, err
	} else if len(strings.TrimSpace(string(body))) > 0 {
		if err := jsonbody.Decode(body, &q); err != nil {
			return "", 0, err
		}
	}
	if q.Query != "" && strings.TrimSpace(q.Query) != "*" && !selectAll.MatchString(q.Query) {
		return "", 0, azerr.BadRequest("query %q is not supported: use \"*\", \"SELECT *\" or \"SELECT * FROM enrollments\" to list everything", q.Query)
	}
	if limit, err = maxItemCount(r); err != nil {
		return "", 0, err
	}
	if after, err = continuation(r); err != nil {
		return "", 0, err
	}
	return after, limit, nil
}

// maxAfter bounds the item a continuation token names: well over any ID
// (128 characters; a twin query's cursor carries a module's two and a
// digest), so that a forged token reaches no store.
const maxAfter = 1024

// continuation is the item a page of the collection at r's path continues
// after, from the opaque x-ms-continuation token of the page before (""
// for the first). A token names its collection (setContinuation): one from
// another collection, a registration query of another group among them,
// is refused, as are IDs no store holds (not UTF-8, with NUL, too long),
// which PostgreSQL would refuse with a 500 rather than a clear 400.
func continuation(r *http.Request) (string, error) {
	v := r.Header.Get("x-ms-continuation")
	if v == "" {
		return "", nil
	}
	b, err := base64.RawURLEncoding.DecodeString(v)
	// Split at the last NUL: the item holds none, the path may (%00).
	i := bytes.LastIndexByte(b, 0)
	scope, after := string(b[:max(i, 0)]), string(b[i+1:])
	if err != nil || i < 0 || after == "" || len(after) > maxAfter || !utf8.ValidString(after) {
		return "", azerr.BadRequest("x-ms-continuation %.40q is not a token of this service: send the one the previous page came with, or none to start", v)
	}
	if want := continuationScope(r); scope != want {
		return "", azerr.BadRequest("x-ms-continuation is a token of %.80q, not of %q: send the one the previous page of this query came with, or none to start", scope, want)
	}
	return after, nil
}

// setContinuation gives a page the token of the page after it, its
// collection and the last item's ID (none after the last page): opaque,
// so that a garbled one is told apart.
func setContinuation(w http.ResponseWriter, r *http.Request, next string) {
	if next != "" {
		w.Header().Set("x-ms-continuation", base64.RawURLEncoding.EncodeToString([]byte(continuationScope(r)+"\x00"+next)))
	}
}

// continuationScope is the collection a query at r lists: its path,
// without case, as group IDs are.
func continuationScope(r *http.Request) string { return strings.ToLower(r.URL.Path) }

// selectAll is the query the service SDKs' samples send ("SELECT * FROM
// enrollments") or the Azure CLI ("SELECT *"): every item of a collection,
// without conditions.
var selectAll = regexp.MustCompile(`(?i)^\s*select\s+\*(\s+from\s+[a-z]+)?\s*$`)

// pages lists a collection a page at a time (querySpec's after and limit).
type pages[T any] func(ctx context.Context, after string, limit int) ([]*T, string, error)

// redactedPages is list with each item as redact shows it.
func redactedPages[T any](list pages[T], redact func(T) *T) pages[T] {
	return func(ctx context.Context, after string, limit int) ([]*T, string, error) {
		items, next, err := list(ctx, after, limit)
		for i, v := range items {
			items[i] = redact(*v)
		}
		return items, next, err
	}
}

// query answers a query endpoint: one page of list, with the continuation
// token and item type headers the service SDKs read.
func query[T any](itemType string, list pages[T]) handler {
	return func(w http.ResponseWriter, r *http.Request) error {
		after, limit, err := querySpec(r)
		if err != nil {
			return err
		}
		items, next, err := list(r.Context(), after, limit)
		if err != nil {
			return err
		}
		setContinuation(w, r, next)
		w.Header().Set("x-ms-item-type", itemType)
		if items == nil {
			items = []*T{}
		}
		writeJSON(w, http.StatusOK, items)
		return nil
	}
}
