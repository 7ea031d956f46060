// Package azerr carries protocol errors from the domain services to the HTTP
// handlers in the shape Azure clients parse: a numeric errorCode whose first
// three digits are the HTTP status, and a message that says what to do.
package azerr

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"
)

// Error is a failure a client is told about.
type Error struct {
	Code    int    // e.g. 404201; Code/1000 is the HTTP status
	Name    string // IoT Hub's error name, e.g. "DeviceNotFound"
	Message string
	// RetryAfter, when set, is sent as the Retry-After header.
	RetryAfter time.Duration
	// Reason says why a request was refused in more detail than its client
	// may learn (whether a device or enrollment exists). It is never sent:
	// the service logs it with the answer's tracking ID.
	Reason string
}

func (e *Error) Error() string { return e.Message }

// Status is the HTTP status of the error.
func (e *Error) Status() int { return e.Code / 1000 }

// HasStatus reports whether err is an API error of the HTTP status; nil,
// and errors of other kinds, are not (As would call them 500).
func HasStatus(err error, status int) bool {
	var e *Error
	return errors.As(err, &e) && e.Status() == status
}

// New makes an error with a formatted message.
func New(code int, name, format string, args ...any) *Error {
	return &Error{Code: code, Name: name, Message: fmt.Sprintf(format, args...)}
}

// Common errors, numbered as IoT Hub numbers them: the SDKs tell errors
// apart by number (their ErrorCode).
func BadRequest(format string, args ...any) *Error {
	return New(400004, "ArgumentInvalid", format, args...)
}
func Unauthorized(format string, args ...any) *Error {
	return New(401002, "IotHubUnauthorizedAccess", format, args...)
}

// Denied is a 401 for credentials that do not match what is stored. Its
// client is told only the formatted message, the same whether the identity
// exists or not, so that nobody can probe which ones do; why is its Reason.
func Denied(why, format string, args ...any) *Error {
	e := Unauthorized(format, args...)
	e.Reason = why
	return e
}

// Why is what the service logs about err: a refusal's Reason, else its text.
func Why(err error) string {
	if e, ok := errors.AsType[*Error](err); ok && e.Reason != "" {
		return e.Reason
	}
	return err.Error()
}

// Throttled is a 429 whose Retry-After says when to come back: at least a
// second, as Retry-After carries whole seconds.
func Throttled(what string, wait time.Duration) *Error {
	e := &Error{Code: 429001, Name: "ThrottlingException", RetryAfter: max(wait, time.Second)}
	e.Message = fmt.Sprintf("%s: retry after %ds", what, e.RetryAfterSeconds())
	return e
}
func NotFound(name, format string, args ...any) *Error {
	return New(404001, name, format, args...)
}
func Conflict(name, format string, args ...any) *Error {
	return New(409001, name, format, args...)
}
func PreconditionFailed(format string, args ...any) *Error {
	return New(412001, "PreconditionFailed", format, args...)
}
func MessageTooLarge(format string, args ...any) *Error {
	return New(413001, "MessageTooLarge", format, args...)
}

// As returns err as an *Error, wrapping unknown errors as internal ones
// without exposing their text.
func As(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return New(500001, "ServerError", "internal server error")
}

// WriteDPS writes err in the Device Provisioning Service shape.
func WriteDPS(w http.ResponseWriter, err error, trackingID string) {
	e := As(err)
	write(w, e, DPSBody(e, trackingID))
}

// DPSBody is e in the Device Provisioning Service shape, over any transport.
func DPSBody(e *Error, trackingID string) map[string]any {
	return map[string]any{
		"errorCode":    e.Code,
		"trackingId":   trackingID,
		"message":      e.Message,
		"timestampUtc": time.Now().UTC().Format(time.RFC3339Nano),
	}
}

// RetryAfterSeconds is RetryAfter in whole seconds, rounded up, as
// Retry-After carries it; 0 when there is none.
func (e *Error) RetryAfterSeconds() int { return int(e.RetryAfter.Seconds() + 0.999) }

// WriteHub writes err in the IoT Hub shape ("ErrorCode:Name;message").
func WriteHub(w http.ResponseWriter, err error, trackingID string) {
	e := As(err)
	write(w, e, map[string]any{
		"Message":          "ErrorCode:" + e.Name + ";" + e.Message,
		"ExceptionMessage": "Tracking ID:" + trackingID + "-TimeStamp:" + time.Now().UTC().Format("01/02/2006 15:04:05"),
		"errorCode":        e.Code,
		"message":          e.Message,
	})
}

func write(w http.ResponseWriter, e *Error, body map[string]any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	if e.RetryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(e.RetryAfterSeconds()))
	}
	w.WriteHeader(e.Status())
	_ = json.NewEncoder(w).Encode(body)
}

// BulkStoppedError is a bulk operation (the provisioning service's, the
// hub registry's) stopped by a failure of the service's own (a 5xx, such
// as the database out of reach) at one item: the items before it were
// done (applied, or refused on their own) and stay so, it and those after
// it were not. Its message says so, for the client to resume from the item.
type BulkStoppedError struct {
	Index   int    // the item's, from 0
	Applied int    // of the items before it
	What    string // "enrollment", "device"
	ID      string // the item's
	Err     error  // why
}

// Progress is what the operation did before it stopped, and what to do.
func (e *BulkStoppedError) Progress() string {
	return fmt.Sprintf("bulk operation stopped at item %d (%s %q), which was not done, nor those after it (items before it: %d, applied %d, refused %d): send them again from it",
		e.Index, e.What, e.ID, e.Index, e.Applied, e.Index-e.Applied)
}

func (e *BulkStoppedError) Error() string { return e.Progress() + ": " + e.Err.Error() }
func (e *BulkStoppedError) Unwrap() error { return e.Err }
