package dps

import (
	"cmp"
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/jsonbody"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/store"
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

// challenge is a pending TPM challenge: the key the device must sign with,
// and for a device of a TPM group, the group its EK certificate chains to.
type challenge struct {
	Key   string `json:"key"`
	Group string `json:"group,omitempty"`
	// HubKey is the hub key the registration answering this challenge
	// gets: chosen once, so that concurrent retries write the same key to
	// the hub whichever answer the device keeps.
	HubKey         string    `json:"hubKey,omitempty"`
	EndorsementKey string    `json:"endorsementKey"`
	StorageRootKey string    `json:"storageRootKey"`
	Expires        time.Time `json:"expires"`
	// EndorsementKeyCertificate is a TPM group's device's EK certificate
	// (base64 DER), checked against the group again when the device
	// answers (stillTrusts).
	EndorsementKeyCertificate string `json:"endorsementKeyCertificate,omitempty"`
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
		return nil, nil, azerr.BadRequest("registrationId %q in the body differs from %q in the URL", body.RegistrationID, regID)
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
func (s *Service) AuthenticateDevice(ctx context.Context, scope, regID string, cred Credentials) error {
	regID, err := s.checkScope(scope, regID)
	if err != nil {
		return err
	}
	_, err = s.authenticate(ctx, scope, regID, cred)
	return err
}

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

func (s *Service) checkScope(scope, regID string) (string, error) {
	if !strings.EqualFold(scope, s.settings.IDScope) {
		return "", azerr.New(404201, "NotFound", "ID scope %q is not this service's (%s): check id_scope in the device configuration", scope, s.settings.IDScope)
	}
	return NormalizeID("registration ID", regID)
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

// challenge answers a TPM device's unauthenticated PUT with an activation
// blob wrapping a fresh key, kept in the store so any replica can verify it.
func (s *Service) challenge(ctx context.Context, regID string, body *registerBody) (*Challenge, error) {
	if body.TPM == nil || body.TPM.EndorsementKey == "" {
		return nil, unauthorized(regID, "no SharedAccessSignature in the Authorization header")
	}
	ek, err := decodeEK("tpm.endorsementKey", body.TPM.EndorsementKey)
	if err != nil {
		return nil, err
	}
	srk, err := decodeEK("tpm.storageRootKey", body.TPM.StorageRootKey)
	if err != nil {
		return nil, err
	}
	e, _, err := get[Enrollment](ctx, s.store, kindEnrollment, regID, nil)
	if err != nil {
		return nil, err
	}
	group, ekCert := "", ""
	switch {
	case e == nil && body.TPM.EndorsementKeyCertificate != "":
		g, cert, err := s.tpmGroup(ctx, regID, ek, body.TPM.EndorsementKeyCertificate)
		if err != nil {
			return nil, err
		}
		group, ekCert = g.EnrollmentGroupID, base64.StdEncoding.EncodeToString(cert.Raw)
	case e == nil:
		return nil, denied(regID, "no TPM enrollment has this registration ID (and the device sent no EK certificate for a TPM group)")
	default:
		if err := enrolledTPM(regID, e, ek, srk); err != nil {
			return nil, err
		}
	}
	// Anyone who knows an enrolled EK may ask for challenges: its
	// registration ID's challenge allowance goes first, so that such
	// requests cannot spend everyone's, nor the device's for the rest of
	// its registration.
	if err := s.Throttle.challenge(regID, s.Now()); err != nil {
		return nil, err
	}
	if err := s.Throttle.registration(s.Now()); err != nil {
		return nil, err
	}
	// The SRK the device registered with last keeps its challenge against
	// requests for others (an enrolled SRK refuses them outright).
	proven := ""
	if e == nil || e.Attestation.TPM.StorageRootKey == "" {
		rec, _, err := get[registrationRecord](ctx, s.store, kindRegistration, regID, nil)
		if err != nil {
			return nil, err
		}
		if rec != nil {
			proven = rec.StorageRootKey
		}
	}
	// The keys are kept re-encoded, so that one key sent in other spellings
	// (base64 with line breaks) is one key.
	c := challenge{Key: s.newKey(), Group: group, HubKey: s.newKey(), EndorsementKey: base64.StdEncoding.EncodeToString(ek),
		StorageRootKey: base64.StdEncoding.EncodeToString(srk), Expires: s.Now().Add(s.ChallengeTTL), EndorsementKeyCertificate: ekCert}
	issued, err := s.addChallenge(ctx, regID, c, proven)
	if err != nil {
		return nil, err
	}
	blob, err := s.activationBlob(ek, srk, issued.Key)
	if err != nil {
		return nil, err
	}
	return &Challenge{Message: "Unauthorized", AuthenticationKey: base64.StdEncoding.EncodeToString(blob), KeyName: "registration"}, nil
}

// enrolledTPM checks a TPM's keys against its individual enrollment. An
// enrolled SRK pins it too, so that nobody who knows the public EK can
// crowd the device's challenges out with other SRKs.
func enrolledTPM(regID string, e *Enrollment, ek, srk []byte) error {
	if e.Attestation.Type != AttestationTPM || e.Attestation.TPM == nil {
		return denied(regID, "the enrollment does not use TPM attestation")
	}
	enrolled, _ := base64.StdEncoding.DecodeString(e.Attestation.TPM.EndorsementKey)
	if same, err := attest.SameKey(ek, enrolled); err != nil || !same {
		return denied(regID, "the endorsement key differs from the enrolled one")
	}
	if k := e.Attestation.TPM.StorageRootKey; k != "" {
		enrolledSRK, _ := base64.StdEncoding.DecodeString(k)
		if same, err := attest.SameKey(srk, enrolledSRK); err != nil || !same {
			return denied(regID, "the storage root key differs from the enrolled one")
		}
	}
	return nil
}

func (s *Service) activationBlob(ek, srk []byte, keyB64 string) ([]byte, error) {
	key, _ := base64.StdEncoding.DecodeString(keyB64)
	blob, err := attest.ActivationBlob(ek, srk, key, s.Rand)
	if err != nil {
		return nil, azerr.BadRequest("cannot wrap a key to this TPM: %v", err)
	}
	return blob, nil
}

// authenticate verifies a device's credentials against its enrollment: for
// SAS tokens the pending challenge key (TPM) or the enrollment's or derived
// key (symmetric key); else its certificate (X.509).
func (s *Service) authenticate(ctx context.Context, scope, regID string, cred Credentials) (*attestation, error) {
	e, _, err := get[Enrollment](ctx, s.store, kindEnrollment, regID, nil)
	if err != nil {
		return nil, err
	}
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

// pendingChallenges are a TPM device's unanswered challenges, newest
// first but for the proven SRK's (keepPending). Since EKs are public,
// anyone may ask for a challenge in a device's name: a request with the
// EK and SRK of a pending challenge gets that challenge's key again
// (wrapped anew), so replaying the device's request cannot void the
// challenge it is answering; and a few challenges for other SRKs are kept
// besides.
type pendingChallenges struct {
	Pending []challenge `json:"pending"`
}

const maxPendingChallenges = 4

// addChallenge records c among regID's pending challenges, dropping expired
// ones, and returns the challenge to send: c, or the pending one for the
// same EK and SRK. Concurrent requests (on any replica) each add theirs.
// proven is the SRK the device last registered with, if any.
func (s *Service) addChallenge(ctx context.Context, regID string, c challenge, proven string) (challenge, error) {
	var written pendingChallenges
	_, err := upsert(ctx, s.store, kindChallenge, regID, nil, func(old *pendingChallenges) pendingChallenges {
		written = pendingChallenges{Pending: []challenge{c}}
		if old == nil {
			return written
		}
		reused := false
		for _, o := range old.Pending {
			switch {
			case !s.Now().Before(o.Expires):
			case !reused && o.EndorsementKey == c.EndorsementKey && o.StorageRootKey == c.StorageRootKey && o.Group == c.Group:
				// The same device asking again: the same key, until it
				// expires, and a hub key of this registration's own. (One
				// issued under an enrollment since deleted, or a group,
				// does not serve the other.)
				o.HubKey, reused = c.HubKey, true
				o.EndorsementKeyCertificate = c.EndorsementKeyCertificate // the one just checked
				written.Pending[0] = o
			default:
				written.Pending = append(written.Pending, o)
			}
		}
		written.Pending = keepPending(written.Pending, proven)
		return written
	})
	if err != nil {
		return challenge{}, err
	}
	s.recentChallenges.put(regID, written, s.Now())
	return written.Pending[0], nil
}

// keepPending is at most maxPendingChallenges of pending (newest first),
// the first (the one being sent) always among them. Since anyone who knows
// the public EK may ask for challenges with other SRKs, the challenge for
// the SRK the device last registered with (proven) is kept before newer
// ones, so that such requests cannot push it out.
func keepPending(pending []challenge, proven string) []challenge {
	if len(pending) <= maxPendingChallenges {
		return pending
	}
	kept := pending[:1:1]
	for _, c := range pending[1:] {
		if proven != "" && c.StorageRootKey == proven && len(kept) < maxPendingChallenges {
			kept = append(kept, c)
		}
	}
	for _, c := range pending[1:] {
		if len(kept) < maxPendingChallenges && (proven == "" || c.StorageRootKey != proven) {
			kept = append(kept, c)
		}
	}
	return kept
}

// answeredChallenge is the pending challenge whose key signed tok: one this
// replica issued lately, else one in the store (issued by any replica).
func (s *Service) answeredChallenge(ctx context.Context, regID string, tok *sas.Token, now time.Time) (*challenge, error) {
	if p, ok := s.recentChallenges.get(regID, now); ok {
		if c, err := p.answeredBy(tok, now); err == nil {
			return c, nil
		}
	}
	p, _, err := get[pendingChallenges](ctx, s.store, kindChallenge, regID, nil)
	if err != nil {
		return nil, err
	}
	c, err := p.answeredBy(tok, now)
	if err != nil {
		return nil, denied(regID, err.Error())
	}
	return c, nil
}

// answeredBy is the unexpired challenge whose key signed tok.
func (p *pendingChallenges) answeredBy(tok *sas.Token, now time.Time) (*challenge, error) {
	if p != nil {
		for i := range p.Pending {
			c := &p.Pending[i]
			if now.Before(c.Expires) && tok.Verify(now, sas.Keys(c.Key)...) == nil {
				return c, nil
			}
		}
	}
	return nil, errors.New("no pending TPM challenge's key signed the token: the challenge expired, or requests for other storage root keys pushed it out " +
		"(the device registers again from the start; enrolling its storageRootKey stops such requests)")
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

// assign allocates the device to a hub, creates or updates it there
// following the reprovisioning policy, and records the registration and
// its operation.
func (s *Service) assign(ctx context.Context, req RegisterRequest, regID string, att *attestation, payload json.RawMessage) (*Operation, error) {
	now := s.Now().UTC()
	// The device's payload goes to a custom allocation webhook only; the
	// result carries the webhook's payload, as in the hosted service.
	state := &RegistrationState{RegistrationID: regID, CreatedDateTimeUtc: &now, LastUpdatedDateTimeUtc: &now}
	read, etag, err := get[registrationRecord](ctx, s.store, kindRegistration, regID, nil)
	if err != nil {
		return nil, err
	}
	if read != nil && read.CreatedDateTimeUtc != nil {
		state.CreatedDateTimeUtc = read.CreatedDateTimeUtc
	}
	prev := read.lastAssignment() // what to reprovision from
	ekKey, err := s.tpmIdentity(ctx, regID, att)
	if err != nil {
		return nil, err
	}
	// A group's credentials do not reach devices that another enrollment
	// provisioned: a certificate or key of group B whose registration ID
	// happens to be a device of group A must not take it over. A
	// certificate that group A trusts too may move to B (a group made for
	// its intermediate CA), as may a TPM, whose EK names it.
	if att.group != nil && prev != nil && !strings.EqualFold(prev.EnrollmentGroupID, att.group.EnrollmentGroupID) &&
		att.challenge == nil && !slices.ContainsFunc(att.matched, func(id string) bool { return strings.EqualFold(id, prev.EnrollmentGroupID) }) {
		how := "its individual enrollment"
		if prev.EnrollmentGroupID != "" {
			how = "enrollment group " + prev.EnrollmentGroupID
		}
		return nil, unauthorized(regID, fmt.Sprintf("the device was provisioned through %s, not group %s: to move it, delete its registration record (DELETE /registrations/%s)",
			how, att.group.EnrollmentGroupID, regID))
	}

	dev := HubDevice{DeviceID: regID}
	alloc := allocation{runtime: deviceRuntimeContext{RegistrationID: regID, Payload: payload}, addr: req.Addr}
	t := att.terms(&dev, &alloc)
	if att.enrollment == nil {
		state.EnrollmentGroupID = att.group.EnrollmentGroupID
	}
	// Devices of a symmetric-key or X.509 group choose their registration
	// IDs, so one the group has not provisioned before must not seize a
	// hub device made another way (TPM group IDs derive from the EK).
	dev.NoTakeover = att.group != nil && att.challenge == nil && prev == nil
	if err := s.hubCredentials(att, regID, &dev, state, &alloc); err != nil {
		return nil, err
	}
	if prev != nil {
		alloc.runtime.CurrentIoTHubHostName, alloc.runtime.CurrentDeviceID = prev.Hub, prev.DeviceID
	}

	hub, former, err := s.place(ctx, alloc, prev, t.repro, t.twin, &dev, state)
	if errors.Is(err, ErrDeviceTaken) {
		return nil, unauthorized(regID, fmt.Sprintf("the hub already has a device %s with other credentials, which group %s did not provision: delete that device from its hub to let the group provision it",
			dev.DeviceID, att.group.EnrollmentGroupID))
	}
	if err != nil && ctx.Err() != nil {
		// The device hung up (a slow webhook, say): nobody waits for this
		// failure, and recording it would show a device assigned before
		// as failed.
		return nil, err
	}
	if err != nil {
		slog.Warn("assignment failed", "registrationId", regID, "error", err)
		state.Status, state.Substatus, state.TPM = StatusFailed, "", nil
		state.ErrorCode = azerr.As(err).Code
		state.ErrorMessage = "assigning the device to a hub failed: " + err.Error()
		if azerr.HasStatus(err, 401) { // the linked hub's policy and rights are the operator's business
			state.ErrorMessage = "assigning the device to a hub failed: the hub refused the provisioning service's credentials (the service's log says why)"
		}
	} else {
		state.Status, state.AssignedHub, state.DeviceID = StatusAssigned, hub.HostName, dev.DeviceID
	}
	op := &Operation{OperationID: s.operationID(), Status: state.Status, RegistrationState: state}
	rec := registrationRecord{RegistrationState: *state, Operations: []string{op.OperationID}, EndorsementKeyID: ekKey}
	if state.Status == StatusAssigned {
		rec.HubCredential = dev.Credential()
		if att.challenge != nil {
			rec.StorageRootKey = att.challenge.StorageRootKey
		}
	}
	// From the record's write on, what it implies is done whether or not
	// the device still waits for the answer.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	var note string
	if former != nil {
		if note, err = s.noteLeaving(ctx, regID, former); err != nil {
			return nil, err
		}
	}
	if state.ETag, err = s.record(ctx, rec, &current[registrationRecord]{read, etag}); err != nil {
		return nil, err // the note finds the record unchanged, and goes
	}
	if ekKey != "" {
		// A DELETE of the record while this registration ran freed the
		// claim, and the record is back: claim the ID again. If the TPM
		// took another ID meanwhile, this registration is undone.
		if err = s.claimID(ctx, regID, ekKey); azerr.HasStatus(err, 401) {
			s.undo(ctx, regID, state.ETag, hub, &dev)
			if former != nil {
				s.dropNote(ctx, regID, former, note)
			}
			return nil, err
		}
	}
	if former != nil && s.leave(ctx, regID, former) { // the record names where the device went
		s.dropNote(ctx, regID, former, note)
	}
	if err != nil {
		return nil, err
	}
	if a := (answered{op: *op, proof: proof{keys: att.keys, certificate: att.certificate}}); a.small() {
		s.recentOperations.put(regID, a, s.Now())
	}
	return op, nil
}

// enrollmentTerms are what the enrollment or group that attested a device
// says of its registration beyond the hub device.
type enrollmentTerms struct {
	twin  *InitialTwin
	repro *ReprovisionPolicy
}

// terms reads the attesting enrollment or group into dev and alloc.
func (att *attestation) terms(dev *HubDevice, alloc *allocation) enrollmentTerms {
	var caps *Capabilities
	var t enrollmentTerms
	var enroll any
	if e := att.enrollment; e != nil {
		if e.DeviceID != "" {
			dev.DeviceID = e.DeviceID
		}
		caps, t.twin, t.repro = e.Capabilities, e.InitialTwin, e.ReprovisionPolicy
		alloc.policy, alloc.hubs, alloc.static, alloc.webhook = e.AllocationPolicy, e.IoTHubs, e.IoTHubHostName, e.CustomAllocationDefinition
		alloc.enrollmentField, enroll = "individualEnrollment", e
	} else {
		g := att.group
		caps, t.twin, t.repro = g.Capabilities, g.InitialTwin, g.ReprovisionPolicy
		alloc.policy, alloc.hubs, alloc.static, alloc.webhook = g.AllocationPolicy, g.IoTHubs, g.IoTHubHostName, g.CustomAllocationDefinition
		alloc.enrollmentField, enroll = "enrollmentGroup", g
	}
	alloc.enrollment, alloc.deviceID = enroll, dev.DeviceID
	dev.IoTEdge = caps != nil && caps.IoTEdge
	return t
}

// hubCredentials gives dev the credentials it will have in its hub, as it
// attested, and says so in state and in what a custom allocation webhook
// is told.
func (s *Service) hubCredentials(att *attestation, regID string, dev *HubDevice, state *RegistrationState, alloc *allocation) error {
	switch {
	case att.challenge != nil:
		// The hub key chosen with the challenge, delivered wrapped to this
		// TPM: on the device it never exists outside the TPM.
		dev.PrimaryKey, dev.SecondaryKey = cmp.Or(att.challenge.HubKey, s.newKey()), s.newKey()
		ek, _ := base64.StdEncoding.DecodeString(att.challenge.EndorsementKey)
		srk, _ := base64.StdEncoding.DecodeString(att.challenge.StorageRootKey)
		blob, err := s.activationBlob(ek, srk, dev.PrimaryKey)
		if err != nil {
			return err
		}
		state.TPM = &TPMResult{AuthenticationKey: base64.StdEncoding.EncodeToString(blob)}
		alloc.runtime.TPM = &TPMAttestation{EndorsementKey: att.challenge.EndorsementKey, StorageRootKey: att.challenge.StorageRootKey}
	case att.certificate != nil:
		// The hub authenticates the device by this very certificate, so a
		// device must register again when it renews it.
		info := CertificateInfo(att.certificate)
		dev.Thumbprint = info.SHA256Thumbprint
		state.X509 = &X509Result{CertificateInfo: info}
		if att.group != nil {
			state.X509.EnrollmentGroupID = att.group.EnrollmentGroupID
			state.X509.SigningCertificateInfo = CertificateInfo(att.signer)
		}
		alloc.runtime.X509 = state.X509
	case att.group != nil:
		// Both, as in the hosted service: a device that signs with its
		// secondary key while the group's primary is rotated keeps working.
		dev.PrimaryKey = base64.StdEncoding.EncodeToString(att.keys[0])
		if len(att.keys) > 1 {
			dev.SecondaryKey = base64.StdEncoding.EncodeToString(att.keys[1])
		}
		state.SymmetricKey = &SymKeyResult{RegistrationID: regID, EnrollmentGroupID: att.group.EnrollmentGroupID}
		alloc.runtime.SymmetricKey = state.SymmetricKey
	default:
		k := att.enrollment.Attestation.SymmetricKey
		dev.PrimaryKey, dev.SecondaryKey = k.PrimaryKey, k.SecondaryKey
		state.SymmetricKey = &SymKeyResult{RegistrationID: regID}
		alloc.runtime.SymmetricKey = state.SymmetricKey
	}
	return nil
}

// recordedOperations is how many of a device's operations stay answerable:
// a device that retried while its first request was still running may poll
// either. From the store, all of them answer with the latest state, the one
// in the hub.
const recordedOperations = 16

// record stores a registration and its operation, keeping the IDs of the
// device's recent operations; concurrent registrations of one device (on
// any replica) each add theirs. rec is the registration with its one
// operation; what it leaves empty of an SRK and hub credential stays as
// recorded, and a failed one keeps the last assignment. read is the record
// as assign found it.
func (s *Service) record(ctx context.Context, rec registrationRecord, read *current[registrationRecord]) (string, error) {
	return upsert(ctx, s.store, kindRegistration, rec.RegistrationID, read, func(old *registrationRecord) registrationRecord {
		r := rec // a fresh copy for each attempt
		if old != nil {
			r.Operations = append(rec.Operations[:1:1], old.Operations...)
			r.Operations = r.Operations[:min(len(r.Operations), recordedOperations)]
			r.StorageRootKey = cmp.Or(rec.StorageRootKey, old.StorageRootKey)
			r.HubCredential = cmp.Or(rec.HubCredential, old.HubCredential)
			r.EndorsementKeyID = cmp.Or(rec.EndorsementKeyID, old.EndorsementKeyID)
		}
		if r.Status != StatusAssigned {
			r.Kept = old.lastAssignment()
		}
		return r
	})
}

// place chooses the device's hub and writes the device there. A device
// registering again follows the enrollment's reprovisionPolicy:
// updateHubAssignment false keeps it on its hub, as the device it was;
// otherwise it goes where the allocation says and its twin is carried over
// (migrateDeviceData) or reset to the initial twin, and a device that moved
// (to another hub or device ID) is to be removed from where it was: place
// returns that former identity. state.Substatus records which happened.
func (s *Service) place(ctx context.Context, alloc allocation, prev *assignment, repro *ReprovisionPolicy,
	twin *InitialTwin, dev *HubDevice, state *RegistrationState) (*LinkedHub, *formerIdentity, error) {
	if repro == nil {
		repro = &ReprovisionPolicy{UpdateHubAssignment: true, MigrateDeviceData: true}
	}
	var prevHub *LinkedHub
	var err error
	if prev != nil {
		hubs, err := s.cachedHubs(ctx)
		if err != nil {
			return nil, nil, err
		}
		prevHub = hubNamed(hubs, prev.Hub)
	}
	if prevHub != nil && !repro.UpdateHubAssignment {
		// Never reprovisioned: the device stays the identity it was, even
		// if the enrollment's deviceId changed since; writing the new one
		// would leave a second device beside the old, whose credentials
		// still work.
		dev.DeviceID = prev.DeviceID
		state.Substatus = "reprovisionedToInitialAssignment"
		state.GenerationID, err = s.registry.UpsertDevice(ctx, *prevHub, *dev)
		return prevHub, nil, err
	}
	placed, err := s.allocate(ctx, alloc)
	if err != nil {
		return nil, nil, err
	}
	if placed.twin != nil {
		twin = placed.twin // the webhook's choice
	}
	if placed.payload != nil {
		state.Payload = placed.payload
	}
	if twin != nil {
		dev.Tags = twin.Tags
		if twin.Properties != nil {
			dev.Desired = twin.Properties.Desired
		}
	}
	hub := placed.hub
	if prevHub == nil {
		state.Substatus = "initialAssignment"
		state.GenerationID, err = s.registry.UpsertDevice(ctx, *hub, *dev)
		return hub, nil, err
	}
	// Registering again: the device may exist on the new hub already, so
	// its twin is set explicitly — the old one, or the initial one.
	sameDevice := prev.at(hub.HostName, dev.DeviceID)
	keep, movedAlready := twin, false
	state.Substatus = "deviceDataReset"
	if repro.MigrateDeviceData {
		state.Substatus = "deviceDataMigrated"
		old, err := s.registry.ReadTwin(ctx, *prevHub, prev.DeviceID)
		switch {
		case err == nil:
			keep = old
		case !sameDevice && azerr.HasStatus(err, 404):
			// The former identity is gone. If a concurrent registration
			// from the same record moved the device and its twin already
			// (it deletes that identity only once its record says so),
			// resetting the twin now would lose what it carried; if the
			// operator deleted it, there is nothing to migrate.
			if movedAlready, err = s.movedMeanwhile(ctx, state.RegistrationID, prev); err != nil {
				return nil, nil, err
			}
			if !movedAlready {
				state.Substatus = "deviceDataReset"
			}
		default:
			slog.Warn("reading the twin to migrate failed; the device starts from its initial twin",
				"registrationId", state.RegistrationID, "hub", prevHub.HostName, "error", err)
			state.Substatus = "deviceDataReset"
		}
	}
	if state.GenerationID, err = s.registry.UpsertDevice(ctx, *hub, *dev); err != nil {
		return nil, nil, err
	}
	var former *formerIdentity
	if !sameDevice {
		former = &formerIdentity{hub: *prevHub, deviceID: prev.DeviceID, credential: prev.HubCredential}
	}
	if (sameDevice || movedAlready) && state.Substatus == "deviceDataMigrated" {
		return hub, former, nil // the data is where it was, or where the other registration put it
	}
	if keep == nil {
		keep = &InitialTwin{}
	}
	if err := s.registry.ReplaceTwin(ctx, *hub, dev.DeviceID, keep); err != nil {
		return nil, nil, err
	}
	return hub, former, nil
}

// formerIdentity is where a device that moved was.
type formerIdentity struct {
	hub                  LinkedHub
	deviceID, credential string
}

// leave removes a moved device from where it was, as the hosted service
// does: its credentials there would otherwise go on admitting it; unless
// the identity there has other credentials now (a concurrent
// registration's, or a device made there since). It runs once the record
// names where the device went, so that a concurrent registration finding
// the identity gone finds the move recorded (a note made before the record
// finishes it after a crash between the two). It says whether it is done;
// false means try again later.
func (s *Service) leave(ctx context.Context, regID string, f *formerIdentity) bool {
	// A later registration may have moved the device back meanwhile.
	rec, _, err := get[registrationRecord](ctx, s.store, kindRegistration, regID, nil)
	if err != nil {
		slog.Warn("reading the record of a reprovisioned device; its former identity is deleted later",
			"registrationId", regID, "error", err)
		return false
	}
	if rec.lastAssignment().at(f.hub.HostName, f.deviceID) {
		return true
	}
	switch err := s.registry.DeleteDevice(ctx, f.hub, f.deviceID, f.credential); {
	case errors.Is(err, ErrDeviceTaken):
		slog.Info("a reprovisioned device's former identity has other credentials now; it stays",
			"registrationId", regID, "hub", f.hub.HostName, "deviceId", f.deviceID)
	case err != nil:
		slog.Warn("removing a reprovisioned device from its former hub failed; it is tried again in a few minutes",
			"registrationId", regID, "hub", f.hub.HostName, "deviceId", f.deviceID, "error", err)
		return false
	}
	return true
}

// undo takes back a registration whose TPM claimed another ID while it
// ran: its record (as it wrote it, at etag) and its hub device (hub nil:
// it made none), which would otherwise admit the TPM under a second ID.
func (s *Service) undo(ctx context.Context, regID, etag string, hub *LinkedHub, dev *HubDevice) {
	err := s.store.Delete(ctx, kindRegistration, regID, etag)
	s.recentOperations.forget(regID)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		slog.Warn("taking back the registration of a TPM that registered under another ID meanwhile", "registrationId", regID, "error", err)
	}
	if hub == nil {
		return
	}
	if err := s.registry.DeleteDevice(ctx, *hub, dev.DeviceID, dev.Credential()); err != nil && !errors.Is(err, ErrDeviceTaken) {
		slog.Warn("removing the hub device of a TPM that registered under another ID meanwhile; delete it there",
			"registrationId", regID, "hub", hub.HostName, "deviceId", dev.DeviceID, "error", err)
	}
}

// movedMeanwhile says whether another registration of regID recorded an
// assignment other than prev since this one read the record.
func (s *Service) movedMeanwhile(ctx context.Context, regID string, prev *assignment) (bool, error) {
	rec, _, err := get[registrationRecord](ctx, s.store, kindRegistration, regID, nil)
	if err != nil {
		return false, err
	}
	now := rec.lastAssignment()
	return now != nil && !now.at(prev.Hub, prev.DeviceID), nil
}

func (s *Service) operationID() string {
	var b [16]byte
	_, _ = io.ReadFull(s.Rand, b[:])
	return "5." + hex.EncodeToString(b[:8]) + "." + hex.EncodeToString(b[8:])
}

// LinkedHubs lists the hubs devices can be assigned to.
func (s *Service) LinkedHubs(ctx context.Context) ([]*LinkedHub, error) {
	hubs, _, err := list[LinkedHub](ctx, s.store, kindLinkedHub, "", 1000, func(*LinkedHub, string) {})
	return hubs, err
}

// cachedHubs are the linked hubs as registrations see them.
func (s *Service) cachedHubs(ctx context.Context) ([]*LinkedHub, error) {
	return s.hubs.get(func() ([]*LinkedHub, error) { return s.LinkedHubs(ctx) })
}
