package dps

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/jsonbody"
	"github.com/hatchery/hatchery/internal/sas"
)

// Credentials are what a device proves itself with: a SAS token in the
// Authorization header (TPM, symmetric key) or its TLS client certificate
// chain (X.509), leaf first.
type Credentials struct {
	Authorization string
	Certificates  []*x509.Certificate
}

// RegisterRequest is a device's registration PUT.
type RegisterRequest struct {
	IDScope        string
	RegistrationID string
	Credentials
	Body []byte
	// Addr is the device's network address, for geoLatency allocation.
	Addr netip.Addr
}

type registerBody struct {
	RegistrationID string `json:"registrationId"`
	TPM            *struct {
		EndorsementKey string `json:"endorsementKey"`
		StorageRootKey string `json:"storageRootKey"`
		// EndorsementKeyCertificate (base64 DER, a Hatchery extension)
		// lets a device of a TPM group register without an enrollment.
		EndorsementKeyCertificate string `json:"endorsementKeyCertificate,omitempty"`
	} `json:"tpm"`
	Payload json.RawMessage `json:"payload"`
}

// attestation is what authentication found: the enrollment (or group) the
// device belongs to, and for TPM devices the challenge it answered.
type attestation struct {
	enrollment *Enrollment
	group      *EnrollmentGroup
	challenge  *challenge
	// keys are those the device's SAS token verified under: for a
	// symmetric-key group's device, the keys derived from the group's
	// primary and secondary keys, in that order (either may sign).
	keys [][]byte
	// X.509 devices: their certificate, and for group members the CA it
	// chained to and the IDs of every group it chains to.
	certificate, signer *x509.Certificate
	matched             []string
}

func (a *attestation) status() string {
	if a.group != nil {
		return a.group.ProvisioningStatus
	}
	return a.enrollment.ProvisioningStatus
}

// Register handles a device's registration request. It answers with a TPM
// challenge (returned as *Challenge, for a 401) or an operation (202).
func (s *Service) Register(ctx context.Context, req RegisterRequest) (*Operation, *Challenge, error) {
	regID, err := s.checkScope(req.IDScope, req.RegistrationID)
	if err != nil {
		return nil, nil, err
	}
	var body registerBody
	if len(strings.TrimSpace(string(req.Body))) > 0 {
		if err := jsonbody.Decode(req.Body, &body); err != nil {
			return nil, nil, err
		}
	}
	if body.RegistrationID != "" && !strings.EqualFold(body.RegistrationID, regID) {
		return nil, nil, azerr.BadRequest("registrationId %q in the body differs from %q in the request path (HTTPS) or MQTT username: send the same registration ID in both", body.RegistrationID, regID)
	}
	if req.Authorization == "" && len(req.Certificates) == 0 {
		ch, err := s.challenge(ctx, regID, &body)
		return nil, ch, err
	}
	att, err := s.authenticate(ctx, req.IDScope, regID, req.Credentials)
	if err != nil {
		return nil, nil, err
	}
	if err := s.Throttle.device(regID, s.Now()); err != nil {
		return nil, nil, err
	}
	// The global rate counts only requests that will do real work, so that
	// a flood of bad ones cannot make real devices wait.
	if err := s.Throttle.registration(s.Now()); err != nil {
		return nil, nil, err
	}
	if att.status() == "disabled" {
		if g := att.group; g != nil {
			return nil, nil, azerr.Unauthorized("enrollment group %s, through which %q registers, is disabled: enable it with "+
				"`hatchery enrollment-group update --group-id %s --provisioning-status enabled`", g.EnrollmentGroupID, regID, g.EnrollmentGroupID)
		}
		return nil, nil, azerr.Unauthorized("the enrollment of %q is disabled: enable it with "+
			"`hatchery enrollment update --registration-id %s --provisioning-status enabled`", regID, regID)
	}
	op, err := s.assign(ctx, req, regID, att, body.Payload)
	if err != nil {
		return nil, nil, err
	}
	// The device polls for the result, as the protocol requires of it.
	return &Operation{OperationID: op.OperationID, Status: StatusAssigning,
		RegistrationState: &RegistrationState{RegistrationID: regID, Status: StatusAssigning}}, nil, nil
}

// OperationStatus answers a device polling its operation.
func (s *Service) OperationStatus(ctx context.Context, scope, regID, opID string, cred Credentials) (*Operation, error) {
	regID, err := s.checkScope(scope, regID)
	if err != nil {
		return nil, err
	}
	// The device's own operation, just answered here, proven the same way;
	// else the credentials and the operation are checked against the store.
	now := s.Now()
	a, remembered := s.recentOperations.get(regID, now)
	remembered = remembered && a.op.OperationID == opID && a.proof.accepts(scope, regID, cred, now)
	if !remembered {
		if _, err := s.authenticate(ctx, scope, regID, cred); err != nil {
			return nil, err
		}
	}
	if err := s.Throttle.device(regID, now); err != nil {
		return nil, err
	}
	if remembered {
		return &a.op, nil // a copy
	}
	notFound := azerr.New(404201, "NotFound", "no operation %q for registration %q: register again", opID, regID)
	rec, etag, err := get[registrationRecord](ctx, s.store, kindRegistration, regID, notFound)
	if err != nil {
		return nil, err
	}
	if !slices.Contains(rec.Operations, opID) {
		return nil, notFound
	}
	rec.ETag = etag
	return &Operation{OperationID: opID, Status: rec.Status, RegistrationState: &rec.RegistrationState}, nil
}

// registrationRecord is a registration as stored: its state and the
// device's recent operations, newest first, which it polls.
type registrationRecord struct {
	RegistrationState
	Operations []string `json:"operations,omitempty"`
	// StorageRootKey is the SRK a TPM device last registered with, whose
	// challenges others cannot push out (keepPending).
	StorageRootKey string `json:"storageRootKey,omitempty"`
	// HubCredential is the fingerprint of the credential the device was
	// given in its hub (HubDevice.Credential), so that when it moves, its
	// former identity is deleted only if it is still that one.
	HubCredential string `json:"hubCredential,omitempty"`
	// EndorsementKeyID names the EK of a TPM group's device (ekKeyID),
	// whose claim on this registration ID it holds.
	EndorsementKeyID string `json:"endorsementKeyId,omitempty"`
	// Kept is, while the device's latest registration failed, where its
	// last successful one put it: the next registration reprovisions from
	// there rather than as a new device.
	Kept *assignment `json:"keptAssignment,omitempty"`
}

// assignment is where a registration put the device.
type assignment struct {
	Hub               string `json:"hub"`
	DeviceID          string `json:"deviceId"`
	EnrollmentGroupID string `json:"enrollmentGroupId,omitempty"`
	HubCredential     string `json:"-"` // the record's
}

// at says whether a puts the device on hub (named in any case) as deviceID.
func (a *assignment) at(hub, deviceID string) bool {
	return a != nil && strings.EqualFold(a.Hub, hub) && a.DeviceID == deviceID
}

// lastAssignment is where the device's last successful registration put
// it; nil if none did.
func (r *registrationRecord) lastAssignment() *assignment {
	switch {
	case r == nil:
		return nil
	case r.Status == StatusAssigned:
		return &assignment{Hub: r.AssignedHub, DeviceID: r.DeviceID, EnrollmentGroupID: r.EnrollmentGroupID, HubCredential: r.HubCredential}
	case r.Kept != nil:
		a := *r.Kept
		a.HubCredential = r.HubCredential
		return &a
	}
	return nil
}

// AuthenticateDevice checks a device's credentials, as its requests will
// be checked, without counting against its request allowance: for sessions
// (MQTT) that authenticate once and then send requests.
//
// As in Azure, such sessions serve no TPM attestation (its challenge is an
// HTTPS 401): a device of a TPM enrollment is refused saying so, before its
// token, which no challenge could have keyed, hides the reason.
func (s *Service) AuthenticateDevice(ctx context.Context, scope, regID string, cred Credentials) error {
	regID, err := s.checkScope(scope, regID)
	if err != nil {
		return err
	}
	e, _, err := get[Enrollment](ctx, s.store, kindEnrollment, regID, nil)
	if err != nil {
		return err
	}
	if e != nil && e.Attestation.Type == AttestationTPM && cred.Authorization != "" {
		err := azerr.Unauthorized("registration %q is not authorized: %s", regID, TPMOverMQTT)
		err.Reason = TPMOverMQTT
		return err
	}
	_, err = s.authenticateAs(ctx, scope, regID, e, cred)
	return err
}

// TPMOverMQTT says why a TPM device's MQTT session cannot register.
const TPMOverMQTT = "TPM attestation is not supported over MQTT: register over HTTPS"

// DeviceRegistrationStatus answers a device asking for its registration record.
func (s *Service) DeviceRegistrationStatus(ctx context.Context, scope, regID string, cred Credentials) (*RegistrationState, error) {
	regID, err := s.checkScope(scope, regID)
	if err != nil {
		return nil, err
	}
	if _, err := s.authenticate(ctx, scope, regID, cred); err != nil {
		return nil, err
	}
	if err := s.Throttle.device(regID, s.Now()); err != nil {
		return nil, err
	}
	r, etag, err := get[RegistrationState](ctx, s.store, kindRegistration, regID,
		azerr.New(404201, "NotFound", "device %q has not registered yet", regID))
	if err != nil {
		return nil, err
	}
	r.ETag = etag
	return r, nil
}

// CarriesTPM reports whether a registration request's body carries tpm: the
// device means to attest with a TPM.
func CarriesTPM(body []byte) bool {
	var b registerBody
	return json.Unmarshal(body, &b) == nil && b.TPM != nil
}

func (s *Service) checkScope(scope, regID string) (string, error) {
	if !strings.EqualFold(scope, s.settings.IDScope) {
		return "", azerr.New(404201, "NotFound", "ID scope %q is not this service's (%s): check id_scope in the device configuration", scope, s.settings.IDScope)
	}
	return normalizeID("registration ID", regID)
}

// unauthorized refuses a request for what the request itself shows (no
// token, a token for another registration): the device is told why.
func unauthorized(regID string, why string) error {
	return azerr.Unauthorized("registration %q is not authorized: %s", regID, why)
}

// denied refuses credentials that do not match what is enrolled. Unknown
// devices and bad credentials get the same answer, so that callers cannot
// probe which registration IDs are enrolled; why goes to the service's log.
func denied(regID string, why string) error {
	return azerr.Denied(why, "registration %q is not authorized: check its credentials and its enrollment "+
		"(the provisioning service's log says what did not match, under this answer's trackingId)", regID)
}

// authenticate verifies a device's credentials against its enrollment: for
// SAS tokens the pending challenge key (TPM) or the enrollment's or derived
// key (symmetric key); else its certificate (X.509).
func (s *Service) authenticate(ctx context.Context, scope, regID string, cred Credentials) (*attestation, error) {
	e, _, err := get[Enrollment](ctx, s.store, kindEnrollment, regID, nil)
	if err != nil {
		return nil, err
	}
	return s.authenticateAs(ctx, scope, regID, e, cred)
}

// authenticateAs is authenticate with regID's individual enrollment read
// (nil: none).
func (s *Service) authenticateAs(ctx context.Context, scope, regID string, e *Enrollment, cred Credentials) (*attestation, error) {
	if cred.Authorization == "" && len(cred.Certificates) > 0 {
		return s.authenticateX509(ctx, regID, e, cred.Certificates)
	}
	if cred.Authorization == "" {
		return nil, unauthorized(regID, "no SharedAccessSignature in the Authorization header and no client certificate")
	}
	tok, err := sas.Parse(cred.Authorization)
	if err != nil {
		return nil, unauthorized(regID, err.Error())
	}
	if want := scope + "/registrations/" + regID; !tok.AudienceIs(want) {
		return nil, unauthorized(regID, fmt.Sprintf("the token is for %q, not %q", tok.Audience, want))
	}
	now := s.Now()
	if err := tok.Expired(now); err != nil {
		return nil, unauthorized(regID, err.Error())
	}
	if e != nil {
		switch e.Attestation.Type {
		case AttestationTPM:
			c, err := s.answeredChallenge(ctx, regID, tok, now)
			if err != nil {
				return nil, err
			}
			// The enrollment may have changed since the challenge was
			// issued: a TPM it no longer names is not admitted.
			ek, _ := base64.StdEncoding.DecodeString(c.EndorsementKey)
			srk, _ := base64.StdEncoding.DecodeString(c.StorageRootKey)
			if err := enrolledTPM(regID, e, ek, srk); err != nil {
				return nil, err
			}
			return &attestation{enrollment: e, challenge: c, keys: sas.Keys(c.Key)}, nil
		case AttestationSymmetricKey:
			k := e.Attestation.SymmetricKey
			keys := sas.Keys(k.PrimaryKey, k.SecondaryKey)
			if err := tok.Verify(now, keys...); err != nil {
				return nil, denied(regID, err.Error())
			}
			return &attestation{enrollment: e, keys: keys}, nil
		}
		return nil, denied(regID, "the enrollment's attestation is not supported")
	}
	// A TPM group's device has a challenge naming its group; other group
	// devices have none.
	c, err := s.answeredChallenge(ctx, regID, tok, now)
	switch {
	case err == nil && c.Group != "":
		g, _, err := get[EnrollmentGroup](ctx, s.store, kindGroup, c.Group, denied(regID, "its TPM group was deleted"))
		if err != nil {
			return nil, err
		}
		if err := s.stillTrusts(regID, g, c); err != nil {
			return nil, err
		}
		return &attestation{group: g, challenge: c, keys: sas.Keys(c.Key)}, nil
	case err != nil && azerr.As(err).Status() >= 500:
		return nil, err // the store failed
	}
	return s.authenticateGroup(ctx, regID, tok, now)
}

// authenticateGroup finds the symmetric-key group whose derived key signed
// tok (whose expiry the caller checked).
func (s *Service) authenticateGroup(ctx context.Context, regID string, tok *sas.Token, now time.Time) (*attestation, error) {
	var found *attestation
	err := s.eachGroup(ctx, func(g *EnrollmentGroup) bool {
		if g.Attestation.Type != AttestationSymmetricKey || g.Attestation.SymmetricKey == nil {
			return true
		}
		k := g.Attestation.SymmetricKey
		var derived [][]byte
		for _, gk := range sas.Keys(k.PrimaryKey, k.SecondaryKey) {
			derived = append(derived, sas.DeriveDeviceKey(gk, regID))
		}
		if tok.Verify(now, derived...) == nil {
			found = &attestation{group: g, keys: derived}
			return false
		}
		return true
	})
	if err != nil {
		return nil, err
	}
	if found == nil {
		return nil, denied(regID, "no individual enrollment has this registration ID and no symmetric-key group's derived key signed the token")
	}
	return found, nil
}

// eachGroup calls f with every enrollment group until f returns false.
func (s *Service) eachGroup(ctx context.Context, f func(*EnrollmentGroup) bool) error {
	groups, err := s.groups.get(func() (all []*EnrollmentGroup, err error) {
		for after := ""; ; {
			var page []*EnrollmentGroup
			if page, after, err = s.ListGroups(ctx, after, 1000); err != nil {
				return nil, err
			}
			if all = append(all, page...); after == "" {
				return all, nil
			}
		}
	})
	if err != nil {
		return err
	}
	for _, g := range groups {
		if !f(g) {
			return nil
		}
	}
	return nil
}

func (s *Service) operationID() string {
	var b [16]byte
	_, _ = io.ReadFull(s.Rand, b[:])
	return "5." + hex.EncodeToString(b[:8]) + "." + hex.EncodeToString(b[8:])
}
