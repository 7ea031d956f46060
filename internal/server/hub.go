package server

import (
	"net/http"
	"strconv"
	"strings"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/hub"
)

func (a *api) routesHub(mux *http.ServeMux) {
	service := func(pattern string, h func(http.ResponseWriter, *http.Request) error) {
		mux.HandleFunc(pattern, a.hubHandler(func(w http.ResponseWriter, r *http.Request) error {
			if err := a.hub.AuthorizeService(r.Header.Get("Authorization")); err != nil {
				return err
			}
			return h(w, r)
		}))
	}
	for _, prefix := range []string{"/devices/{id}", "/devices/{id}/modules/{mid}"} {
		service("PUT "+prefix, a.putIdentity)
		service("GET "+prefix, a.getIdentity)
		service("DELETE "+prefix, a.deleteIdentity)
	}
	service("GET /devices", a.listDevices)
	service("GET /devices/{id}/modules", a.listModules)
	for _, prefix := range []string{"/twins/{id}", "/twins/{id}/modules/{mid}"} {
		service("GET "+prefix, a.getTwin)
		service("PATCH "+prefix, a.updateTwin(false))
		service("PUT "+prefix, a.updateTwin(true))
		service("POST "+prefix+"/methods", a.invokeMethod)
	}

	// Device-facing HTTPS: telemetry, authenticated with the device's own token.
	mux.HandleFunc("POST /devices/{id}/messages/events", a.hubHandler(a.deviceEvent))
	mux.HandleFunc("POST /devices/{id}/modules/{mid}/messages/events", a.hubHandler(a.deviceEvent))
}

func ref(r *http.Request) hub.Ref { return hub.Ref{Device: r.PathValue("id"), Module: r.PathValue("mid")} }

func (a *api) hubHandler(h func(http.ResponseWriter, *http.Request) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		err := checkAPIVersion(r)
		if err == nil {
			err = h(w, r)
		}
		if err != nil {
			azerr.WriteHub(w, err, trackingID())
		}
	}
}

func (a *api) putIdentity(w http.ResponseWriter, r *http.Request) error {
	var d hub.Device
	if err := readJSON(r, &d); err != nil {
		return err
	}
	out, err := a.hub.PutIdentity(r.Context(), ref(r), r.Header.Get("If-Match"), &d)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (a *api) getIdentity(w http.ResponseWriter, r *http.Request) error {
	d, err := a.hub.GetIdentity(r.Context(), ref(r))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, d)
	return nil
}

func (a *api) deleteIdentity(w http.ResponseWriter, r *http.Request) error {
	if err := a.hub.DeleteIdentity(r.Context(), ref(r), r.Header.Get("If-Match")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (a *api) listModules(w http.ResponseWriter, r *http.Request) error {
	ms, err := a.hub.ListModules(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, ms)
	return nil
}

func (a *api) invokeMethod(w http.ResponseWriter, r *http.Request) error {
	var req hub.MethodRequest
	if err := readJSON(r, &req); err != nil {
		return err
	}
	res, err := a.hub.InvokeMethod(r.Context(), ref(r), &req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, res)
	return nil
}

func (a *api) listDevices(w http.ResponseWriter, r *http.Request) error {
	top := 0
	if v := r.URL.Query().Get("top"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return azerr.BadRequest("top %q must be a positive number", v)
		}
		top = n
	}
	ds, err := a.hub.ListDevices(r.Context(), top)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, ds)
	return nil
}

func (a *api) getTwin(w http.ResponseWriter, r *http.Request) error {
	t, err := a.hub.GetTwin(r.Context(), ref(r))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, t)
	return nil
}

func (a *api) updateTwin(replace bool) func(http.ResponseWriter, *http.Request) error {
	return func(w http.ResponseWriter, r *http.Request) error {
		var p hub.TwinPatch
		if err := readJSON(r, &p); err != nil {
			return err
		}
		t, err := a.hub.UpdateTwin(r.Context(), ref(r), r.Header.Get("If-Match"), &p, replace)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, t)
		return nil
	}
}

// deviceEvent accepts telemetry over HTTPS. Application properties travel
// as iothub-app-* headers, as the SDKs' HTTP transports send them.
func (a *api) deviceEvent(w http.ResponseWriter, r *http.Request) error {
	id := ref(r)
	if err := a.hub.AuthenticateDevice(r.Context(), id, r.Header.Get("Authorization")); err != nil {
		return err
	}
	body, err := readBody(r)
	if err != nil {
		return err
	}
	props := map[string]string{}
	for k, v := range r.Header {
		if name, ok := strings.CutPrefix(strings.ToLower(k), "iothub-app-"); ok && len(v) > 0 {
			props[name] = v[0]
		}
	}
	if ct := r.Header.Get("Content-Type"); ct != "" {
		props["$.ct"] = ct
	}
	if _, err := a.hub.SendEvent(r.Context(), id, props, body); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
