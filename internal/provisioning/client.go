// Package provisioning is the device side of the DPS registration API: it
// registers a device with a TPM, a symmetric key or an X.509 certificate against any
// DPS-compatible service and returns the hub assignment.
package provisioning

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/dpsapi"
	"github.com/hatchery/hatchery/internal/sas"
)

// APIVersion is the version the Identity Service and C SDK send.
const APIVersion = "2021-06-01"

// Client registers one device.
type Client struct {
	// Endpoint is the global endpoint, e.g. https://dpsapi.example (port optional).
	Endpoint       string
	IDScope        string
	RegistrationID string
	HTTP           *http.Client
	// Payload is sent with the registration for a custom allocation
	// webhook; the result's payload is the webhook's, not this one.
	Payload json.RawMessage
	// TokenLifetime is how long each SAS token is valid.
	TokenLifetime time.Duration
	// MaxPolls bounds the operation polling.
	MaxPolls int
	// Throttled, when set, is told of each 429 answer and how long the
	// client waits before it asks again (0 when it gives up), so that
	// throttling a client absorbs can be reported.
	Throttled func(wait time.Duration)
}

// TPM is what registration needs of a TPM (internal/tpm.Device has it).
type TPM interface {
	EndorsementKey() ([]byte, error)
	StorageRootKey() ([]byte, error)
	ImportActivationBlob(blob []byte, handle uint32) error
	HMAC(handle uint32, data []byte) ([]byte, error)
}

// EKCertificate is what a TPM with a manufacturer's EK certificate has;
// the certificate lets a device of a TPM group register without an
// enrollment of its own.
type EKCertificate interface {
	EndorsementCertificate() ([]byte, error) // DER; nil if there is none
}

// Error is a registration the service refused or failed.
type Error struct {
	Status    int
	ErrorCode int
	Message   string
}

func (e *Error) Error() string {
	return fmt.Sprintf("provisioning service refused the registration (HTTP %d, errorCode %d): %s", e.Status, e.ErrorCode, e.Message)
}

// signer signs "audience\nexpiry".
type signer func(data []byte) ([]byte, error)

// RegisterSymmetricKey registers a device that proves itself with key.
func (c *Client) RegisterSymmetricKey(ctx context.Context, key []byte) (*dpsapi.RegistrationState, error) {
	return c.registerSigned(ctx, func(data []byte) ([]byte, error) { return hmacSHA256(key, data), nil }, nil)
}

// RegisterX509 registers a device that proves itself with its TLS client
// certificate, which c.HTTP must present; its subject CN is the
// registration ID.
func (c *Client) RegisterX509(ctx context.Context) (*dpsapi.RegistrationState, error) {
	return c.registerSigned(ctx, nil, nil)
}

// RegisterTPM registers a TPM device: it answers the service's challenge by
// importing the activation blob at handle, signs with the imported key,
// and on success imports the hub key the result carries into the same
// handle, so that hub tokens are signed inside the TPM too.
func (c *Client) RegisterTPM(ctx context.Context, t TPM, handle uint32) (*dpsapi.RegistrationState, error) {
	ek, err := t.EndorsementKey()
	if err != nil {
		return nil, err
	}
	srk, err := t.StorageRootKey()
	if err != nil {
		return nil, err
	}
	tpmBody := map[string]string{
		"endorsementKey": base64.StdEncoding.EncodeToString(ek),
		"storageRootKey": base64.StdEncoding.EncodeToString(srk),
	}
	if ec, ok := t.(EKCertificate); ok {
		if cert, err := ec.EndorsementCertificate(); err == nil && len(cert) > 0 {
			tpmBody["endorsementKeyCertificate"] = base64.StdEncoding.EncodeToString(cert)
		}
	}
	status, body, _, err := c.send(ctx, http.MethodPut, c.path("/register"), "", c.body(tpmBody))
	if err != nil {
		return nil, err
	}
	if status != http.StatusUnauthorized {
		return nil, c.refusal(status, body, "expected a 401 TPM challenge")
	}
	var ch dpsapi.Challenge
	if err := json.Unmarshal(body, &ch); err != nil || ch.AuthenticationKey == "" {
		return nil, c.refusal(status, body, "the 401 answer carries no authenticationKey")
	}
	blob, err := base64.StdEncoding.DecodeString(ch.AuthenticationKey)
	if err != nil {
		return nil, fmt.Errorf("challenge authenticationKey is not base64: %w", err)
	}
	state, err := c.answerChallenge(ctx, t, handle, blob, tpmBody)
	if err != nil {
		return nil, challengeImported{err}
	}
	return state, nil
}

// answerChallenge imports the challenge at handle, registers with a token
// signed by it, and imports the hub key the result carries there.
func (c *Client) answerChallenge(ctx context.Context, t TPM, handle uint32, blob []byte, tpmBody map[string]string) (*dpsapi.RegistrationState, error) {
	if err := t.ImportActivationBlob(blob, handle); err != nil {
		return nil, fmt.Errorf("activating the provisioning service's challenge in the TPM: %w", err)
	}
	sign := func(data []byte) ([]byte, error) { return t.HMAC(handle, data) }
	state, err := c.registerSigned(ctx, sign, tpmBody)
	if err != nil {
		return nil, err
	}
	if state.TPM == nil || state.TPM.AuthenticationKey == "" {
		return nil, errors.New("the registration result carries no tpm.authenticationKey for the hub key")
	}
	hubBlob, err := base64.StdEncoding.DecodeString(state.TPM.AuthenticationKey)
	if err != nil {
		return nil, fmt.Errorf("result authenticationKey is not base64: %w", err)
	}
	if err := t.ImportActivationBlob(hubBlob, handle); err != nil {
		return nil, fmt.Errorf("importing the hub key into the TPM: %w", err)
	}
	return state, nil
}

// challengeImported is a TPM registration's failure once the challenge's
// import began at its handle: the key that was there may be gone.
type challengeImported struct{ error }

func (e challengeImported) Unwrap() error { return e.error }

// ChallengeImported reports whether err is a TPM registration's failure
// after it began replacing the key at its handle with the challenge's.
func ChallengeImported(err error) bool { return errors.As(err, new(challengeImported)) }

// registerSigned sends the authenticated registration and polls it to the
// end; without a signer the TLS client certificate authenticates it.
func (c *Client) registerSigned(ctx context.Context, sign signer, tpmBody map[string]string) (*dpsapi.RegistrationState, error) {
	auth := ""
	if sign != nil {
		var err error
		if auth, err = c.token(sign); err != nil {
			return nil, err
		}
	}
	status, body, hdr, err := c.send(ctx, http.MethodPut, c.path("/register"), auth, c.body(tpmBody))
	if err != nil {
		return nil, err
	}
	polls := c.MaxPolls
	if polls == 0 {
		polls = 60
	}
	for i := 0; ; i++ {
		if status != http.StatusOK && status != http.StatusAccepted {
			return nil, c.refusal(status, body, "")
		}
		var op dpsapi.Operation
		if err := json.Unmarshal(body, &op); err != nil {
			return nil, fmt.Errorf("registration answer is not JSON: %w", err)
		}
		if op.Status != dpsapi.StatusAssigning && op.Status != dpsapi.StatusUnassigned {
			if op.RegistrationState == nil {
				return nil, errors.New("registration result has no registrationState")
			}
			if op.Status != dpsapi.StatusAssigned {
				rs := op.RegistrationState
				return rs, &Error{Status: status, ErrorCode: rs.ErrorCode, Message: "registration " + op.Status + ": " + rs.ErrorMessage}
			}
			return op.RegistrationState, nil
		}
		if i >= polls {
			return nil, fmt.Errorf("registration still %q after %d polls", op.Status, polls)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-after(retryAfter(hdr, time.Second)):
		}
		status, body, hdr, err = c.send(ctx, http.MethodGet, c.path("/operations/"+url.PathEscape(op.OperationID)), auth, nil)
		if err != nil {
			return nil, err
		}
	}
}

func (c *Client) path(suffix string) string {
	return "/" + url.PathEscape(c.IDScope) + "/registrations/" + url.PathEscape(c.RegistrationID) + suffix
}

func (c *Client) body(tpmBody map[string]string) []byte {
	b := map[string]any{"registrationId": c.RegistrationID}
	if tpmBody != nil {
		b["tpm"] = tpmBody
	}
	if len(c.Payload) > 0 {
		b["payload"] = c.Payload
	}
	out, _ := json.Marshal(b)
	return out
}

// token signs the DPS device token: sr = {scope}/registrations/{id}, skn = registration.
func (c *Client) token(sign signer) (string, error) {
	life := c.TokenLifetime
	if life == 0 {
		life = time.Hour
	}
	return sas.BuildSigned(sign, c.IDScope+"/registrations/"+c.RegistrationID, "registration", time.Now().Add(life))
}

// send sends one request, waiting out throttling: a 429 is retried after
// its Retry-After, as the SDKs do.
func (c *Client) send(ctx context.Context, method, path, auth string, body []byte) (int, []byte, http.Header, error) {
	for attempt := 1; ; attempt++ {
		status, data, hdr, err := c.sendOnce(ctx, method, path, auth, body)
		if err != nil || status != http.StatusTooManyRequests {
			return status, data, hdr, err
		}
		wait := max(retryAfter(hdr, time.Second), time.Second) // 0 would not wait at all
		if attempt == 10 {
			wait = 0
		}
		if c.Throttled != nil {
			c.Throttled(wait)
		}
		if wait == 0 {
			return status, data, hdr, err
		}
		select {
		case <-ctx.Done():
			return 0, nil, nil, ctx.Err()
		case <-after(wait):
		}
	}
}

// after is time.After, which tests replace so as not to sleep.
var after = time.After

// retryAfter reads a Retry-After in seconds, or returns def if there is none
// or it is over a minute: a device that waits that long looks hung.
func retryAfter(h http.Header, def time.Duration) time.Duration {
	if s, err := strconv.Atoi(h.Get("Retry-After")); err == nil && s >= 0 && s <= 60 {
		return time.Duration(s) * time.Second
	}
	return def
}

func (c *Client) sendOnce(ctx context.Context, method, path, auth string, body []byte) (int, []byte, http.Header, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(c.Endpoint, "/")+path+"?api-version="+APIVersion, rd)
	if err != nil {
		return 0, nil, nil, fmt.Errorf("provisioning endpoint %q: %w", c.Endpoint, err)
	}
	req.Header.Set("Content-Type", "application/json; charset=utf-8")
	req.Header.Set("Accept", "application/json")
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, nil, nil, fmt.Errorf("provisioning service %s is unreachable: %w", c.Endpoint, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, data, resp.Header, err
}

func (c *Client) refusal(status int, body []byte, context string) error {
	var e struct {
		ErrorCode int    `json:"errorCode"`
		Message   string `json:"message"`
	}
	_ = json.Unmarshal(body, &e)
	if e.Message == "" {
		e.Message = strings.TrimSpace(string(body))
	}
	if context != "" {
		e.Message = context + ": " + e.Message
	}
	return &Error{Status: status, ErrorCode: e.ErrorCode, Message: e.Message}
}

func hmacSHA256(key, data []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(data)
	return m.Sum(nil)
}
