package dps

import (
	"context"
	"encoding/base64"
	"errors"
	"time"

	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/sas"
)

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
