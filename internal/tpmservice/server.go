// Package tpmservice lets processes that may not open the TPM use it
// through aziot-tpmd, a small service that alone runs as the user the udev
// rule grants the TPM device to (aziottpm). The protocol is HTTP/1.1 with
// JSON bodies over a Unix socket, so curl --unix-socket can debug it:
//
//	GET  /endorsement-key  → {"endorsementKey": b64 TPM2B_PUBLIC, "registrationId": hex}
//	GET  /storage-root-key → {"storageRootKey": b64 TPM2B_PUBLIC}
//	GET  /endorsement-certificate → {"certificate": b64 DER} ({} without one)
//	POST /import {"blob": b64}  → {}  (into the identity handle only)
//	POST /sign   {"data": b64}  → {"digest": b64 HMAC-SHA256}
//
// Errors are {"message": "..."} with a meaningful status code. /import and
// /sign take an optional "handle", which must be the service's identity
// handle: callers can never reach another key; and they serve only the
// users Server.Signers names (403 for others, whom the kernel names).
package tpmservice

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/tpm"
)

// maxBody bounds request bodies: an activation blob is under 1 KiB and a
// SAS string-to-sign a few hundred bytes.
const maxBody = 64 << 10

// TPM is what the service needs of the TPM; *tpm.Device has it.
type TPM interface {
	EndorsementKey() ([]byte, error)
	StorageRootKey() ([]byte, error)
	ImportActivationBlob(blob []byte, handle uint32) error
	HMAC(handle uint32, data []byte) ([]byte, error)
}

// Wire types, shared with the Client. []byte fields travel as base64.
type (
	endorsementKeyResponse struct {
		EndorsementKey []byte `json:"endorsementKey"`
		RegistrationID string `json:"registrationId"`
	}
	storageRootKeyResponse struct {
		StorageRootKey []byte `json:"storageRootKey"`
	}
	endorsementCertificateResponse struct {
		Certificate []byte `json:"certificate,omitempty"` // DER; absent when the TPM has none
	}
	importRequest struct {
		Blob   []byte  `json:"blob"`
		Handle *uint32 `json:"handle,omitempty"` // absent: the identity handle
	}
	signRequest struct {
		Data   []byte  `json:"data"`
		Handle *uint32 `json:"handle,omitempty"` // absent: the identity handle
	}
	signResponse struct {
		Digest []byte `json:"digest"`
	}
	errorResponse struct {
		Message string `json:"message"`
	}
)

// Server answers the service's requests.
type Server struct {
	// Signers, when not nil, are the users (uids) who may import into the
	// identity key and sign with it: the device's identity is theirs
	// (iotedged's, and root's). Others who reach the socket — it is its
	// group's, which CLI users join — read the public keys only.
	Signers []uint32

	// mu runs one TPM operation at a time whatever TPM implementation is
	// behind: an activation is several commands that must not interleave.
	mu     sync.Mutex
	dev    TPM
	handle uint32
	log    *slog.Logger
	routes map[string]route
}

type route struct {
	method string
	fn     func(body []byte) (any, error)
	// identity: the route uses the identity key, for Signers only.
	identity bool
}

// NewServer serves dev, importing and signing only with the identity key at
// tpm.IdentityHandle(authKeyIndex). It logs to slog.Default(), never key
// material or signed data.
func NewServer(dev TPM, authKeyIndex uint32) *Server {
	s := &Server{dev: dev, handle: tpm.IdentityHandle(authKeyIndex), log: slog.Default()}
	s.routes = map[string]route{
		"/endorsement-key":         {"GET", s.endorsementKey, false},
		"/endorsement-certificate": {"GET", s.endorsementCertificate, false},
		"/storage-root-key":        {"GET", s.storageRootKey, false},
		"/import":                  {"POST", s.importBlob, true},
		"/sign":                    {"POST", s.sign, true},
	}
	return s
}

// httpError is an error with the status code that describes it.
type httpError struct {
	status int
	err    error
}

func (e *httpError) Error() string { return e.err.Error() }

func statusError(status int, format string, args ...any) error {
	return &httpError{status, fmt.Errorf(format, args...)}
}

// answer routes a request of the user uid (known: the connection said
// who), checks its method and the user's right, runs it and shapes its
// answer or error.
func (s *Server) answer(r *request, uid uint32, known bool) response {
	rt, ok := s.routes[r.path]
	if !ok {
		return response{status: 404, v: errorResponse{fmt.Sprintf("no endpoint %s: aziot-tpmd serves /endorsement-key, /endorsement-certificate, /storage-root-key, /import and /sign", r.path)}}
	}
	if r.method != rt.method {
		return response{status: 405, allow: rt.method, v: errorResponse{fmt.Sprintf("%s %s: use %s", r.method, r.path, rt.method)}}
	}
	if rt.identity && !s.signer(uid, known) {
		s.log.Warn("request refused: the user may not use the identity key", "path", r.path, "uid", uid)
		return response{status: 403, v: errorResponse{fmt.Sprintf("user %d may not use the device's identity key: aziot-tpmd imports and signs for root and the users its --principals names (iotedged's)", uid)}}
	}
	start := time.Now()
	v, err := rt.fn(r.body)
	if err != nil {
		status := 500
		if he, ok := errors.AsType[*httpError](err); ok {
			status = he.status
		}
		s.log.Warn("request failed", "path", r.path, "status", status, "error", err.Error())
		return response{status: status, v: errorResponse{err.Error()}}
	}
	s.log.Debug("request", "path", r.path, "duration", time.Since(start))
	return response{status: 200, v: v}
}

// signer says whether user uid may use the identity key.
func (s *Server) signer(uid uint32, known bool) bool {
	return s.Signers == nil || known && slices.Contains(s.Signers, uid)
}

func (s *Server) endorsementKey([]byte) (any, error) {
	s.mu.Lock()
	ek, err := s.dev.EndorsementKey()
	s.mu.Unlock()
	if err != nil {
		return nil, tpmError(err, 0)
	}
	return endorsementKeyResponse{ek, attest.RegistrationID(ek)}, nil
}

func (s *Server) endorsementCertificate([]byte) (any, error) {
	ec, ok := s.dev.(interface{ EndorsementCertificate() ([]byte, error) })
	if !ok {
		return endorsementCertificateResponse{}, nil
	}
	s.mu.Lock()
	cert, err := ec.EndorsementCertificate()
	s.mu.Unlock()
	if err != nil {
		return nil, tpmError(err, 0)
	}
	return endorsementCertificateResponse{cert}, nil
}

func (s *Server) storageRootKey([]byte) (any, error) {
	s.mu.Lock()
	srk, err := s.dev.StorageRootKey()
	s.mu.Unlock()
	if err != nil {
		return nil, tpmError(err, 0)
	}
	return storageRootKeyResponse{srk}, nil
}

func (s *Server) importBlob(body []byte) (any, error) {
	var req importRequest
	if err := decode(body, &req); err != nil {
		return nil, err
	}
	if err := s.checkHandle(req.Handle); err != nil {
		return nil, err
	}
	if err := checkBlob(req.Blob); err != nil {
		return nil, err
	}
	s.mu.Lock()
	err := s.dev.ImportActivationBlob(req.Blob, s.handle)
	s.mu.Unlock()
	if err != nil {
		return nil, tpmError(err, 422)
	}
	s.log.Info("imported the identity key", "handle", fmt.Sprintf("0x%08x", s.handle))
	return struct{}{}, nil
}

func (s *Server) sign(body []byte) (any, error) {
	var req signRequest
	if err := decode(body, &req); err != nil {
		return nil, err
	}
	if err := s.checkHandle(req.Handle); err != nil {
		return nil, err
	}
	s.mu.Lock()
	digest, err := s.dev.HMAC(s.handle, req.Data)
	s.mu.Unlock()
	if errors.Is(err, tpm.ErrNoIdentityKey) {
		return nil, statusError(409, "%w", err)
	}
	if err != nil {
		return nil, tpmError(err, 0)
	}
	return signResponse{digest}, nil
}

func (s *Server) checkHandle(h *uint32) error {
	if h != nil && *h != s.handle {
		return statusError(403, "handle 0x%08x refused: aziot-tpmd uses only the identity key at 0x%08x (auth_key_index 0x%x)",
			*h, s.handle, s.handle-tpm.IdentityHandle(0))
	}
	return nil
}

// decode reads a JSON request body (its size is bounded when read).
func decode(body []byte, v any) error {
	if err := json.Unmarshal(body, v); err != nil {
		return statusError(400, "request body: %w", err)
	}
	return nil
}

// checkBlob rejects what cannot be an activation blob (five or six TPM2B
// parts, PROTOCOL.md §2) before it takes the TPM: malformed input is the
// caller's fault (400), unlike what the TPM refuses (422).
func checkBlob(blob []byte) error {
	if _, err := attest.SplitBlob(blob); err != nil {
		return &httpError{400, err}
	}
	return nil
}

// tpmError gives err the status that tells the caller what to do: retry
// later when the TPM is busy or locked out (its warnings), fix the input
// when the TPM refused it (refused, if nonzero), else report a fault (500).
// The message is the tpm package's, which names lockout and its remedy.
func tpmError(err error, refused int) error {
	var rc tpm2.TPMRC
	switch {
	case !errors.As(err, &rc):
		return err // I/O with the TPM: 500
	case rc.IsWarning():
		return &httpError{503, err}
	case refused != 0:
		return &httpError{refused, err}
	default:
		return err
	}
}
