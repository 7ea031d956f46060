package server

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dps"
)

func (a *api) routesDPS(mux *http.ServeMux) {
	// The device API is registered under the literal ID scope: a wildcard
	// first segment would clash with /registrations/{id}/query.
	scope := "/" + a.dps.IDScope()
	device := func(method, path string, h func(http.ResponseWriter, *http.Request) error) {
		mux.HandleFunc(method+" "+scope+path, a.dpsHandler(false, h))
		if lower := strings.ToLower(scope); lower != scope {
			mux.HandleFunc(method+" "+lower+path, a.dpsHandler(false, h))
		}
	}
	device("PUT", "/registrations/{regId}/register", a.register)
	device("GET", "/registrations/{regId}/operations/{opId}", a.operationStatus)
	device("POST", "/registrations/{regId}", a.deviceRegistrationStatus)

	service := func(pattern string, h func(http.ResponseWriter, *http.Request) error) {
		mux.HandleFunc(pattern, a.dpsHandler(true, h))
	}
	service("PUT /enrollments/{id}", a.putEnrollment)
	service("GET /enrollments/{id}", a.getEnrollment)
	service("DELETE /enrollments/{id}", a.deleteEnrollment)
	service("POST /enrollments/{id}/attestationmechanism", a.enrollmentAttestation)
	service("POST /enrollments/query", a.queryEnrollments)
	service("PUT /enrollmentGroups/{id}", a.putGroup)
	service("GET /enrollmentGroups/{id}", a.getGroup)
	service("DELETE /enrollmentGroups/{id}", a.deleteGroup)
	service("POST /enrollmentGroups/{id}/attestationmechanism", a.groupAttestation)
	service("POST /enrollmentGroups/query", a.queryGroups)
	service("GET /registrations/{id}", a.getRegistration)
	service("DELETE /registrations/{id}", a.deleteRegistration)
	service("POST /registrations/{id}/query", a.queryRegistrations)
}

// dpsHandler checks api-version (and, for the service API, the policy
// token) and writes errors in the DPS shape.
func (a *api) dpsHandler(serviceAPI bool, h func(http.ResponseWriter, *http.Request) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		err := checkAPIVersion(r)
		if err == nil && serviceAPI {
			err = a.dps.AuthorizeService(r.Header.Get("Authorization"))
		}
		if err == nil {
			err = h(w, r)
		}
		if err != nil {
			azerr.WriteDPS(w, err, trackingID())
		}
	}
}

func (a *api) register(w http.ResponseWriter, r *http.Request) error {
	body, err := readBody(r)
	if err != nil {
		return err
	}
	op, ch, err := a.dps.Register(r.Context(), dps.RegisterRequest{
		IDScope: a.dps.IDScope(), RegistrationID: r.PathValue("regId"),
		Authorization: r.Header.Get("Authorization"), Body: body,
	})
	if err != nil {
		return err
	}
	if ch != nil {
		writeJSON(w, http.StatusUnauthorized, ch)
		return nil
	}
	w.Header().Set("Retry-After", "1")
	w.Header().Set("Location", r.URL.Path[:strings.LastIndex(r.URL.Path, "/register")]+"/operations/"+op.OperationID)
	writeJSON(w, http.StatusAccepted, op)
	return nil
}

func (a *api) operationStatus(w http.ResponseWriter, r *http.Request) error {
	op, err := a.dps.OperationStatus(r.Context(), a.dps.IDScope(), r.PathValue("regId"), r.PathValue("opId"), r.Header.Get("Authorization"))
	if err != nil {
		return err
	}
	status := http.StatusOK
	if op.Status == dps.StatusAssigning {
		status = http.StatusAccepted
		w.Header().Set("Retry-After", "1")
	}
	writeJSON(w, status, op)
	return nil
}

func (a *api) deviceRegistrationStatus(w http.ResponseWriter, r *http.Request) error {
	st, err := a.dps.DeviceRegistrationStatus(r.Context(), a.dps.IDScope(), r.PathValue("regId"), r.Header.Get("Authorization"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, st)
	return nil
}

func (a *api) putEnrollment(w http.ResponseWriter, r *http.Request) error {
	var e dps.Enrollment
	if err := readJSON(r, &e); err != nil {
		return err
	}
	out, err := a.dps.PutEnrollment(r.Context(), r.PathValue("id"), ifMatch(r), &e)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (a *api) getEnrollment(w http.ResponseWriter, r *http.Request) error {
	e, err := a.dps.GetEnrollment(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, e)
	return nil
}

func (a *api) deleteEnrollment(w http.ResponseWriter, r *http.Request) error {
	if err := a.dps.DeleteEnrollment(r.Context(), r.PathValue("id"), ifMatch(r)); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (a *api) enrollmentAttestation(w http.ResponseWriter, r *http.Request) error {
	e, err := a.dps.GetEnrollment(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, e.Attestation)
	return nil
}

func (a *api) putGroup(w http.ResponseWriter, r *http.Request) error {
	var g dps.EnrollmentGroup
	if err := readJSON(r, &g); err != nil {
		return err
	}
	out, err := a.dps.PutGroup(r.Context(), r.PathValue("id"), ifMatch(r), &g)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (a *api) getGroup(w http.ResponseWriter, r *http.Request) error {
	g, err := a.dps.GetGroup(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, g)
	return nil
}

func (a *api) deleteGroup(w http.ResponseWriter, r *http.Request) error {
	if err := a.dps.DeleteGroup(r.Context(), r.PathValue("id"), ifMatch(r)); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (a *api) groupAttestation(w http.ResponseWriter, r *http.Request) error {
	g, err := a.dps.GetGroup(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, g.Attestation)
	return nil
}

func (a *api) getRegistration(w http.ResponseWriter, r *http.Request) error {
	st, err := a.dps.GetRegistration(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, st)
	return nil
}

func (a *api) deleteRegistration(w http.ResponseWriter, r *http.Request) error {
	if err := a.dps.DeleteRegistration(r.Context(), r.PathValue("id"), ifMatch(r)); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
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
		if err := json.Unmarshal(body, &q); err != nil {
			return "", 0, azerr.BadRequest("query body is not valid JSON: %v", err)
		}
	}
	if q.Query != "" && strings.TrimSpace(q.Query) != "*" && !strings.EqualFold(strings.TrimSpace(q.Query), "select * from enrollments") {
		return "", 0, azerr.BadRequest("query %q is not supported: use \"*\" to list everything", q.Query)
	}
	limit = 100
	if v := r.Header.Get("x-ms-max-item-count"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return "", 0, azerr.BadRequest("x-ms-max-item-count %q must be a positive number", v)
		}
		limit = n
	}
	return r.Header.Get("x-ms-continuation"), limit, nil
}

func writePage[T any](w http.ResponseWriter, itemType string, items []*T, next string) {
	if next != "" {
		w.Header().Set("x-ms-continuation", next)
	}
	w.Header().Set("x-ms-item-type", itemType)
	if items == nil {
		items = []*T{}
	}
	writeJSON(w, http.StatusOK, items)
}

func (a *api) queryEnrollments(w http.ResponseWriter, r *http.Request) error {
	after, limit, err := querySpec(r)
	if err != nil {
		return err
	}
	items, next, err := a.dps.ListEnrollments(r.Context(), after, limit)
	if err != nil {
		return err
	}
	writePage(w, "Enrollment", items, next)
	return nil
}

func (a *api) queryGroups(w http.ResponseWriter, r *http.Request) error {
	after, limit, err := querySpec(r)
	if err != nil {
		return err
	}
	items, next, err := a.dps.ListGroups(r.Context(), after, limit)
	if err != nil {
		return err
	}
	writePage(w, "EnrollmentGroup", items, next)
	return nil
}

func (a *api) queryRegistrations(w http.ResponseWriter, r *http.Request) error {
	after, limit, err := querySpec(r)
	if err != nil {
		return err
	}
	items, next, err := a.dps.ListRegistrations(r.Context(), r.PathValue("id"), after, limit)
	if err != nil {
		return err
	}
	writePage(w, "DeviceRegistration", items, next)
	return nil
}
