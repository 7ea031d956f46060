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
	service("PUT /devices/{id}", a.putDevice)
	service("GET /devices/{id}", a.getDevice)
	service("DELETE /devices/{id}", a.deleteDevice)
	service("GET /devices", a.listDevices)
	service("GET /twins/{id}", a.getTwin)
	service("PATCH /twins/{id}", a.updateTwin(false))
	service("PUT /twins/{id}", a.updateTwin(true))

	// Device-facing HTTPS: telemetry, authenticated with the device's own token.
	mux.HandleFunc("POST /devices/{id}/messages/events", a.hubHandler(a.deviceEvent))
}

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

func (a *api) putDevice(w http.ResponseWriter, r *http.Request) error {
	var d hub.Device
	if err := readJSON(r, &d); err != nil {
		return err
	}
	out, err := a.hub.CreateOrUpdateDevice(r.Context(), r.PathValue("id"), r.Header.Get("If-Match"), &d)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (a *api) getDevice(w http.ResponseWriter, r *http.Request) error {
	d, err := a.hub.GetDevice(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, d)
	return nil
}

func (a *api) deleteDevice(w http.ResponseWriter, r *http.Request) error {
	if err := a.hub.DeleteDevice(r.Context(), r.PathValue("id"), r.Header.Get("If-Match")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
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
	t, err := a.hub.GetTwin(r.Context(), r.PathValue("id"))
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
		t, err := a.hub.UpdateTwin(r.Context(), r.PathValue("id"), r.Header.Get("If-Match"), &p, replace)
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
	id := r.PathValue("id")
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
