package hub

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/hatchery/hatchery/internal/azerr"
)

// MethodHandler delivers a direct method to a connected device and waits
// for its answer.
type MethodHandler func(ctx context.Context, name string, payload json.RawMessage) (status int, response json.RawMessage, err error)

// MethodRequest is the body of POST /twins/{id}/methods.
type MethodRequest struct {
	MethodName               string          `json:"methodName"`
	Payload                  json.RawMessage `json:"payload"`
	ResponseTimeoutInSeconds int             `json:"responseTimeoutInSeconds"`
	// ConnectTimeoutInSeconds is how long to wait for an offline device
	// to connect (0, the default: not at all).
	ConnectTimeoutInSeconds int `json:"connectTimeoutInSeconds"`
}

// MethodResult is the answer of a direct method.
type MethodResult struct {
	Status  int             `json:"status"`
	Payload json.RawMessage `json:"payload"`
}

// ServeMethods registers the connection that answers r's direct methods;
// the returned cancel unregisters it (only if it is still the current one).
func (s *Service) ServeMethods(r Ref, h MethodHandler) (cancel func()) {
	reg := &h
	s.mu.Lock()
	s.methods[r] = reg
	s.mu.Unlock()
	return func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.methods[r] == reg {
			delete(s.methods, r)
		}
	}
}

// InvokeMethod calls a direct method on a connected device or module.
func (s *Service) InvokeMethod(ctx context.Context, r Ref, req *MethodRequest) (*MethodResult, error) {
	if err := req.check(); err != nil {
		return nil, err
	}
	rec, _, err := s.load(ctx, r)
	if err != nil {
		return nil, err
	}
	timeout, err := req.timeout()
	if err != nil {
		return nil, err
	}
	payload := req.Payload
	if len(payload) == 0 {
		payload = json.RawMessage("null")
	}
	connectBy := time.Now().Add(time.Duration(req.ConnectTimeoutInSeconds) * time.Second)
	reg, online := s.methodTarget(rec, r)
	for {
		if !online && time.Now().Before(connectBy) {
			if reg, online, err = s.awaitMethodTarget(ctx, r, time.Until(connectBy)); err != nil {
				return nil, err
			}
		}
		if !online {
			return nil, notOnline(r)
		}
		res, err := s.callMethod(ctx, r, reg, req.MethodName, payload, timeout)
		// A device another replica records connected may not have
		// subscribed to methods yet: within the connect timeout, wait on.
		if e, ok := errors.AsType[*azerr.Error](err); ok && e.Code == notOnline(r).Code && time.Now().Before(connectBy) {
			online = false
			continue
		}
		return res, err
	}
}

func notOnline(r Ref) *azerr.Error {
	return azerr.New(404103, "DeviceNotOnline", "%s is not connected, or has not subscribed to direct methods", r)
}

// callMethod calls the method once: through reg, r's connection here, or
// (reg nil) through the replica holding it.
func (s *Service) callMethod(ctx context.Context, r Ref, reg *MethodHandler, name string, payload json.RawMessage, timeout time.Duration) (*MethodResult, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var status int
	var resp json.RawMessage
	var err error
	if reg != nil {
		status, resp, err = (*reg)(ctx, name, payload)
	} else {
		status, resp, err = s.invokeElsewhere(ctx, r, name, payload, timeout)
	}
	if err == nil {
		err = checkAnswer(r, name, resp)
	}
	if err != nil {
		return nil, methodError(r, name, timeout, err)
	}
	if len(resp) == 0 {
		resp = json.RawMessage("null")
	}
	return &MethodResult{Status: status, Payload: resp}, nil
}

// checkAnswer refuses a device's answer the hosted hub refuses: over 128
// KiB, as a request, or not JSON. It is the device's fault, said at once.
func checkAnswer(r Ref, name string, resp json.RawMessage) error {
	switch {
	case len(resp) > maxMethodPayload:
		return azerr.New(502101, "InvalidResponseWhileProxying", "%s answered method %q with %d bytes: an answer carries at most %d, as a request does", r, name, len(resp), maxMethodPayload)
	case len(resp) > 0 && !json.Valid(resp):
		return azerr.New(502101, "InvalidResponseWhileProxying", "%s answered method %q with a payload that is not JSON: a method's answer must be JSON (a string in quotes, an object, ...)", r, name)
	}
	return nil
}

// methodTarget is the connection here that answers r's methods, if any,
// and whether r can be called: through it, or through the replica the
// record (rec) says it is connected to.
func (s *Service) methodTarget(rec *record, r Ref) (*MethodHandler, bool) {
	s.mu.Lock()
	reg := s.methods[r]
	s.mu.Unlock()
	return reg, reg != nil || s.relay != nil && rec.Device.ConnectionState == "Connected"
}

// awaitMethodTarget waits up to wait (connectTimeoutInSeconds) for r to
// come online, looking every methodPoll.
func (s *Service) awaitMethodTarget(ctx context.Context, r Ref, wait time.Duration) (*MethodHandler, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	tick := time.NewTicker(methodPoll)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil, false, nil
		case <-tick.C:
		}
		rec, _, err := s.load(ctx, r)
		if err != nil {
			if ctx.Err() != nil {
				return nil, false, nil
			}
			return nil, false, err
		}
		if reg, online := s.methodTarget(rec, r); online {
			return reg, true, nil
		}
	}
}

const methodPoll = 250 * time.Millisecond

// methodError is how a method call without an answer is reported.
func methodError(r Ref, name string, timeout time.Duration, err error) *azerr.Error {
	if e, ok := errors.AsType[*azerr.Error](err); ok {
		return e
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return azerr.New(504101, "GatewayTimeout", "%s did not answer method %q within %s", r, name, timeout)
	}
	return azerr.New(404103, "DeviceNotOnline", "%s: %v", r, err)
}

// maxMethodPayload is the hosted hub's limit of a direct method's payload,
// its request's and its answer's.
const maxMethodPayload = 128 << 10

// check refuses a request the hosted hub refuses: no name or one over 128
// characters, a payload over 128 KiB, a timeout out of range.
func (req *MethodRequest) check() error {
	switch {
	case req.MethodName == "":
		return azerr.BadRequest("methodName is required")
	case len(req.MethodName) > 128:
		return azerr.BadRequest("methodName is longer than 128 characters")
	case strings.ContainsAny(req.MethodName, "/?#+\x00") || !utf8.ValidString(req.MethodName):
		// Devices read the name from an MQTT topic, as it is.
		return azerr.BadRequest("methodName %q has a character a device's MQTT topic cannot carry (/ ? # + NUL)", req.MethodName)
	case len(req.Payload) > maxMethodPayload:
		return azerr.MessageTooLarge("the payload is %d bytes: direct methods carry at most %d", len(req.Payload), maxMethodPayload)
	case req.ConnectTimeoutInSeconds < 0 || req.ConnectTimeoutInSeconds > 300:
		return azerr.BadRequest("connectTimeoutInSeconds must be between 0 and 300")
	}
	_, err := req.timeout()
	return err
}

// timeout is how long a device has to answer: responseTimeoutInSeconds, 5
// to 300, 30 if not given.
func (req *MethodRequest) timeout() (time.Duration, error) {
	switch {
	case req.ResponseTimeoutInSeconds == 0:
		return 30 * time.Second, nil
	case req.ResponseTimeoutInSeconds < 5 || req.ResponseTimeoutInSeconds > 300:
		return 0, azerr.BadRequest("responseTimeoutInSeconds must be between 5 and 300")
	}
	return time.Duration(req.ResponseTimeoutInSeconds) * time.Second, nil
}
