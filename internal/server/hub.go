package server

import (
	"encoding/json"
	"mime"
	"net/http"
	"strconv"
	"strings"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/jsonbody"
	"github.com/hatchery/hatchery/internal/sas"
)

func (a *api) routesHub(mux *http.ServeMux) {
	service := func(right, pattern string, h handler) { handle(mux, pattern, a.hubService(right, h)) }
	h := a.hub
	// Module identities are also managed by their edge device itself.
	edgeScope := func(right, pattern string, hd handler) { handle(mux, pattern, a.hubServiceOrEdgeDevice(right, hd)) }
	for prefix, route := range map[string]func(string, string, handler){"/devices/{id}": service, "/devices/{id}/modules/{mid}": edgeScope} {
		route(sas.RegistryWrite, "PUT "+prefix, withBody(func(r *http.Request, d *hub.Device) (any, error) {
			return h.PutIdentity(r.Context(), ref(r), ifMatch(r), d)
		}))
		route(sas.RegistryRead, "GET "+prefix, reply(func(r *http.Request) (any, error) { return h.GetIdentity(r.Context(), ref(r)) }))
		route(sas.RegistryWrite, "DELETE "+prefix, noContent(func(r *http.Request) error { return h.DeleteIdentity(r.Context(), ref(r), ifMatch(r)) }))
	}
	service(sas.RegistryRead, "GET /devices", a.listDevices)
	service(sas.RegistryRead, "GET /devices/{$}", a.listDevices) // Registry.list of the Node SDK
	service(sas.RegistryWrite, "POST /devices", func(w http.ResponseWriter, r *http.Request) error {
		var ops []hub.ImportDevice
		if err := readJSON(r, &ops); err != nil {
			return err
		}
		res, err := h.BulkIdentities(r.Context(), ops)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, res)
		return nil
	})
	service(sas.JobWrite, "PUT /jobs/v2/{id}", withBody(func(r *http.Request, j *hub.Job) (any, error) {
		return h.CreateJob(r.Context(), r.PathValue("id"), j)
	}))
	service(sas.JobRead, "GET /jobs/v2/{id}", reply(func(r *http.Request) (any, error) { return h.GetJob(r.Context(), r.PathValue("id")) }))
	service(sas.JobWrite, "POST /jobs/v2/{id}/cancel", reply(func(r *http.Request) (any, error) { return h.CancelJob(r.Context(), r.PathValue("id")) }))
	service(sas.JobRead, "GET /jobs/v2/query", a.queryJobs)
	service(sas.RegistryRead, "GET /statistics/devices", reply(func(r *http.Request) (any, error) { return h.Statistics(r.Context()) }))
	service(sas.ServiceConnect, "GET /statistics/service", reply(func(r *http.Request) (any, error) { return h.ServiceStatistics(r.Context()) }))
	edgeScope(sas.RegistryRead, "GET /devices/{id}/modules", reply(func(r *http.Request) (any, error) { return h.ListModules(r.Context(), r.PathValue("id")) }))
	for _, prefix := range []string{"/twins/{id}", "/twins/{id}/modules/{mid}"} {
		service(sas.ServiceConnect, "GET "+prefix, reply(func(r *http.Request) (any, error) { return h.GetTwin(r.Context(), ref(r)) }))
		for method, replace := range map[string]bool{"PATCH": false, "PUT": true} {
			service(sas.ServiceConnect, method+" "+prefix, withBody(func(r *http.Request, p *hub.TwinPatch) (any, error) {
				return h.UpdateTwin(r.Context(), ref(r), ifMatch(r), p, replace)
			}))
		}
		service(sas.ServiceConnect, "POST "+prefix+"/methods", withBody(func(r *http.Request, m *hub.MethodRequest) (any, error) {
			return h.InvokeMethod(r.Context(), ref(r), m)
		}))
	}

	// Device-facing HTTPS: telemetry and cloud-to-device messages,
	// authenticated with the device's own token or certificate.
	handle(mux, "POST /devices/{id}/messages/events", a.hubHandler(a.deviceEvent))
	handle(mux, "POST /devices/{id}/modules/{mid}/messages/events", a.hubHandler(a.deviceEvent))
	handle(mux, "GET /devices/{id}/messages/deviceBound", a.hubHandler(a.receiveC2D))
	handle(mux, "DELETE /devices/{id}/messages/deviceBound/{token}", a.hubHandler(a.settleC2D(false)))
	handle(mux, "POST /devices/{id}/messages/deviceBound/{token}/abandon", a.hubHandler(a.settleC2D(true)))
}

// authenticateDevice checks the device (or module) of the path by its SAS
// token or, without one, its client certificate.
func (a *api) authenticateDevice(r *http.Request) error {
	cred := deviceCredentials(r)
	_, err := a.hub.Authenticate(r.Context(), ref(r), cred.Authorization, cred.Certificates)
	return err
}

// receiveC2D is the HTTPS device API's receive: the oldest message not
// being worked on, locked for a minute, its lock token in ETag; 204 when
// there is none.
func (a *api) receiveC2D(w http.ResponseWriter, r *http.Request) error {
	if err := a.authenticateDevice(r); err != nil {
		return err
	}
	m, token, err := a.hub.ReceiveC2D(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	if m == nil {
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
	h := w.Header()
	h.Set("ETag", `"`+token+`"`)
	h.Set("iothub-messageid", m.MessageID)
	h.Set("iothub-to", "/devices/"+r.PathValue("id")+"/messages/deviceBound")
	h.Set("iothub-enqueuedtime", m.Enqueued.UTC().Format(http.TimeFormat))
	h.Set("iothub-expiry", m.Expiry.UTC().Format(http.TimeFormat))
	h.Set("iothub-deliverycount", strconv.Itoa(m.DeliveryCount))
	for k, v := range m.Properties {
		switch header, ok := systemHeaders[k]; {
		case k == "messageId":
		case ok:
			h.Set(header, v)
		default:
			h.Set("iothub-app-"+k, v)
		}
	}
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(m.Body)
	return nil
}

// settleC2D completes (DELETE, also with ?reject) or abandons (POST
// …/abandon) a message received over HTTPS, by its lock token.
func (a *api) settleC2D(abandon bool) handler {
	return func(w http.ResponseWriter, r *http.Request) error {
		if err := a.authenticateDevice(r); err != nil {
			return err
		}
		if err := a.hub.SettleC2D(r.Context(), r.PathValue("id"), r.PathValue("token"), abandon); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
}

func ref(r *http.Request) hub.Ref {
	return hub.Ref{Device: r.PathValue("id"), Module: r.PathValue("mid")}
}

// hubService wraps a service-API handler: it requires a token of a hub
// policy with right.
func (a *api) hubService(right string, h handler) http.HandlerFunc {
	return a.hubServiceOn(func(r *http.Request) string { return r.URL.Path }, right, h)
}

// hubServiceAllDevices is hubService for a route on every device though
// its path names one, the twin query's: a token for the hub or for
// HOST/devices reaches it, one scoped to a device named "query"
// (sr=HOST/devices/query) does not.
func (a *api) hubServiceAllDevices(right string, h handler) http.HandlerFunc {
	return a.hubServiceOn(func(*http.Request) string { return "/devices" }, right, h)
}

// hubServiceOn admits a hub policy token with right whose scope covers the
// resource path of the request.
func (a *api) hubServiceOn(resource func(*http.Request) string, right string, h handler) http.HandlerFunc {
	return a.hubHandler(func(w http.ResponseWriter, r *http.Request) error {
		if err := a.hub.AuthorizeService(r.Header.Get("Authorization"), resource(r), right); err != nil {
			return err
		}
		return h(w, r)
	})
}

// hubServiceOrEdgeDevice admits a hub policy token with right, or the edge
// device of the path.
func (a *api) hubServiceOrEdgeDevice(right string, h handler) http.HandlerFunc {
	return a.hubHandler(func(w http.ResponseWriter, r *http.Request) error {
		cred := deviceCredentials(r)
		if err := a.hub.AuthorizeServiceOrEdgeDevice(r.Context(), r.PathValue("id"), r.URL.Path, cred.Authorization, cred.Certificates, right); err != nil {
			return err
		}
		return h(w, r)
	})
}

func (a *api) hubHandler(h handler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		err := checkAPIVersion(r)
		if err == nil {
			err = h(w, r)
		}
		if err != nil {
			id, err := failure(r, err)
			azerr.WriteHub(w, err, id)
		}
	}
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

// deviceEvent accepts telemetry over HTTPS. Application properties travel
// as iothub-app-* headers, as the SDKs' HTTP transports send them.
func (a *api) deviceEvent(w http.ResponseWriter, r *http.Request) error {
	id := ref(r)
	if err := a.authenticateDevice(r); err != nil {
		return err
	}
	body, err := readBody(r)
	if err != nil {
		return err
	}
	ct := r.Header.Get("Content-Type")
	if mt, _, _ := mime.ParseMediaType(ct); mt == batchType {
		if len(body) > 2*hub.MaxBatchSize { // base64 and JSON around 256 KiB of messages
			return azerr.MessageTooLarge("the batch is %d bytes: a batch carries at most %d bytes of messages", len(body), hub.MaxBatchSize)
		}
		return a.deviceEventBatch(w, r, id, body)
	}
	props := messageProperties(r.Header)
	if _, ok := props["$.ct"]; !ok && ct != "" {
		props["$.ct"] = ct
	}
	if _, err := a.hub.SendEvent(r.Context(), id, props, body); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// batchType is the content type of several messages sent in one request
// (sendEventBatch of the HTTPS device transports).
const batchType = "application/vnd.microsoft.iothub.json"

// deviceEventBatch stores each message of a batch as an event of its own,
// as the hosted hub does: a JSON array of {"body": base64, "properties":
// {"iothub-app-name": value, "iothub-messageid": …}}, admitted together.
func (a *api) deviceEventBatch(w http.ResponseWriter, r *http.Request, id hub.Ref, body []byte) error {
	var batch []struct {
		Body       []byte            `json:"body"`
		Properties map[string]string `json:"properties"`
	}
	if err := jsonbody.Decode(body, &batch); err != nil {
		return err
	}
	msgs := make([]hub.Message, len(batch))
	for i, m := range batch {
		props := map[string]string{}
		for k, v := range m.Properties {
			// The JSON keeps a property's case, which headers lose.
			if len(k) > len(appPrefix) && strings.EqualFold(k[:len(appPrefix)], appPrefix) {
				props[k[len(appPrefix):]] = v
			} else if sys, ok := systemProperties[strings.ToLower(k)]; ok {
				props[sys] = v
			} else {
				props[k] = v
			}
		}
		msgs[i] = hub.Message{Properties: props, Body: m.Body}
	}
	if err := a.hub.SendEvents(r.Context(), id, msgs); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// systemProperties are the system properties of a message that HTTPS
// carries as headers (and a batch among a message's properties), by the
// names a message keeps them under, as the MQTT topic gives them. A Plug
// and Play component's name comes as dt-subject, which the SDKs send
// without the iothub-app- prefix of an application property.
var systemProperties = map[string]string{"iothub-messageid": "$.mid", "iothub-correlationid": "$.cid",
	"iothub-contenttype": "$.ct", "iothub-contentencoding": "$.ce", "iothub-userid": "$.uid", "iothub-expiry": "$.exp",
	"dt-subject": "$.sub", "iothub-interface-id": "$.ifid"}

// systemHeaders is systemProperties the other way round.
var systemHeaders = func() map[string]string {
	m := make(map[string]string, len(systemProperties))
	for header, name := range systemProperties {
		m[name] = header
	}
	return m
}()

// messageProperties are a message's application properties (iothub-app-*
// headers) and system properties.
func messageProperties(h http.Header) map[string]string {
	props := appProperties(h)
	for header, name := range systemProperties {
		if v := h.Get(header); v != "" {
			props[name] = v
		}
	}
	return props
}

func (a *api) routesDeployments(mux *http.ServeMux) {
	service := func(right, pattern string, h handler) { handle(mux, pattern, a.hubService(right, h)) }
	h := a.hub
	id := func(r *http.Request) string { return r.PathValue("id") }
	service(sas.RegistryWrite, "PUT /configurations/{id}", withBody(func(r *http.Request, c *hub.Configuration) (any, error) {
		return h.PutConfiguration(r.Context(), id(r), ifMatch(r), c)
	}))
	service(sas.RegistryRead, "GET /configurations/{id}", reply(func(r *http.Request) (any, error) { return h.GetConfiguration(r.Context(), id(r)) }))
	service(sas.RegistryWrite, "DELETE /configurations/{id}", noContent(func(r *http.Request) error { return h.DeleteConfiguration(r.Context(), id(r), ifMatch(r)) }))
	service(sas.RegistryRead, "GET /configurations", reply(func(r *http.Request) (any, error) { return h.ListConfigurations(r.Context()) }))
	service(sas.RegistryWrite, "POST /devices/{id}/applyConfigurationContent", withBody(func(r *http.Request, c *hub.ConfigContent) (any, error) {
		return nil, h.ApplyContent(r.Context(), id(r), c)
	}))
	handle(mux, "POST /devices/query", a.hubServiceAllDevices(sas.TwinQuery, a.queryTwins))
	service(sas.ServiceConnect, "POST /devices/{id}/messages/deviceBound", a.sendC2D)
	service(sas.ServiceConnect, "DELETE /devices/{id}/commands", reply(func(r *http.Request) (any, error) {
		n, err := h.PurgeC2D(r.Context(), id(r))
		if err != nil {
			return nil, err
		}
		return map[string]any{"totalMessagesPurged": n, "deviceId": id(r), "moduleId": nil}, nil
	}))
	service(sas.ServiceConnect, "GET /events", a.events)
	name := func(r *http.Request) string { return r.PathValue("name") }
	service(sas.AllRights, "PUT /certificates/{name}", withBody(func(r *http.Request, c *hub.Certificate) (any, error) {
		return h.PutCertificate(r.Context(), name(r), c)
	}))
	// A list in the shape of Azure's certificate list description.
	service(sas.RegistryRead, "GET /certificates", reply(func(r *http.Request) (any, error) {
		cs, err := h.ListCertificates(r.Context())
		return map[string]any{"value": cs}, err
	}))
	service(sas.RegistryRead, "GET /certificates/{name}", reply(func(r *http.Request) (any, error) { return h.GetCertificate(r.Context(), name(r)) }))
	service(sas.AllRights, "DELETE /certificates/{name}", noContent(func(r *http.Request) error { return h.DeleteCertificate(r.Context(), name(r)) }))
}

// queryTwins is POST /devices/query; paging as the service SDKs expect it,
// with x-ms-max-item-count and an opaque x-ms-continuation.
func (a *api) queryTwins(w http.ResponseWriter, r *http.Request) error {
	var q struct {
		Query string `json:"query"`
	}
	if err := readJSON(r, &q); err != nil {
		return err
	}
	limit, err := maxItemCount(r)
	if err != nil {
		return err
	}
	token, err := continuation(r)
	if err != nil {
		return err
	}
	rows, next, err := a.hub.Query(r.Context(), q.Query, token, limit)
	if err != nil {
		return err
	}
	setContinuation(w, r, next)
	w.Header().Set("x-ms-item-type", "Twin")
	if rows == nil {
		rows = []map[string]any{}
	}
	writeJSON(w, http.StatusOK, rows)
	return nil
}

// sendC2D queues a cloud-to-device message (the hosted hub takes these
// over AMQP; Hatchery also takes them here). Application properties come
// as iothub-app-* headers, as on the device side.
func (a *api) sendC2D(w http.ResponseWriter, r *http.Request) error {
	body, err := readBody(r)
	if err != nil {
		return err
	}
	// (Content-Type is the request's, which clients set whatever the
	// message; iothub-contenttype is the message's.)
	props := messageProperties(r.Header)
	if id, ok := props["$.mid"]; ok {
		delete(props, "$.mid")
		props["messageId"] = id
	}
	m, err := a.hub.SendC2D(r.Context(), r.PathValue("id"), props, body)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, map[string]string{"messageId": m.MessageID})
	return nil
}

// events streams the durable device-to-cloud stream as JSON lines:
// GET /events?device=D&after=SEQ[&follow=true]. With follow the answer
// stays open and new events are sent as they are stored.
func (a *api) events(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	var after int64
	if v := q.Get("after"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			return azerr.BadRequest("after %q must be an event sequence number", v)
		}
		after = n
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	enc := json.NewEncoder(w)
	rc := http.NewResponseController(w)
	return a.hub.FollowEvents(r.Context(), q.Get("device"), after, q.Get("follow") == "true", func(evs []hub.Event) error {
		for _, e := range evs {
			if err := enc.Encode(eventJSON(e)); err != nil {
				return err
			}
		}
		return rc.Flush()
	})
}

// eventJSON is an event as the stream shows it; bodies that are JSON stay
// JSON, others are base64.
func eventJSON(e hub.Event) map[string]any {
	m := map[string]any{"sequenceNumber": e.Seq, "deviceId": e.DeviceID, "enqueuedTime": e.Enqueued.UTC(), "properties": e.Properties}
	if e.ModuleID != "" {
		m["moduleId"] = e.ModuleID
	}
	if json.Valid(e.Body) {
		m["body"] = json.RawMessage(e.Body)
	} else {
		m["bodyBase64"] = e.Body
	}
	return m
}

// appPrefix marks an application property among HTTPS headers.
const appPrefix = "iothub-app-"

// appProperties are a message's application properties, which HTTPS
// carries as iothub-app-* headers; header names have no case (HTTP/2 sends
// them in lower case), so the names come in lower case.
func appProperties(h http.Header) map[string]string {
	props := map[string]string{}
	for k, v := range h {
		if name, ok := strings.CutPrefix(strings.ToLower(k), appPrefix); ok && len(v) > 0 {
			props[name] = v[0]
		}
	}
	return props
}

// queryJobs is GET /jobs/v2/query[?jobType=][&jobStatus=], paged as the
// service SDKs page.
func (a *api) queryJobs(w http.ResponseWriter, r *http.Request) error {
	limit, err := maxItemCount(r)
	if err != nil {
		return err
	}
	q := r.URL.Query()
	after, err := continuation(r)
	if err != nil {
		return err
	}
	jobs, next, err := a.hub.QueryJobs(r.Context(), q.Get("jobType"), q.Get("jobStatus"), after, limit)
	if err != nil {
		return err
	}
	setContinuation(w, r, next)
	// The C# SDK reads a page's items by this type.
	w.Header().Set("x-ms-item-type", "JobResponse")
	writeJSON(w, http.StatusOK, jobs)
	return nil
}
