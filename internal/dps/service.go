package dps

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/store"
)

// Document kinds in the store.
const (
	kindEnrollment   = "dps.enrollment"
	kindGroup        = "dps.enrollmentGroup"
	kindRegistration = "dps.registration"
	kindChallenge    = "dps.challenge"
	kindTPMKey       = "dps.tpmKey"
	kindTPMKeyOf     = "dps.tpmKeyOf"
	kindLeaving      = "dps.leaving"
	kindLinkedHub    = "dps.linkedHub"
	kindSettings     = "dps.settings"
)

// ErrDeviceTaken is UpsertDevice's answer when HubDevice.NoTakeover kept it
// from replacing a device with other credentials.
var ErrDeviceTaken = errors.New("the hub has a device of that ID with other credentials")

// Registry writes devices into a linked hub through its registry API.
type Registry interface {
	// UpsertDevice creates the device with its initial twin, or updates
	// the credentials and capabilities of an existing one, and returns the
	// device's generation ID, which tells it from one deleted and created
	// again under the same ID.
	UpsertDevice(ctx context.Context, hub LinkedHub, d HubDevice) (generationID string, err error)
	// ReadTwin returns a device's tags and desired properties; of a device
	// that does not exist, an azerr.Error of status 404.
	ReadTwin(ctx context.Context, hub LinkedHub, deviceID string) (*InitialTwin, error)
	// ReplaceTwin sets a device's tags and desired properties to t's.
	ReplaceTwin(ctx context.Context, hub LinkedHub, deviceID string, t *InitialTwin) error
	// DeleteDevice removes a device if its credential is still the one of
	// that fingerprint (HubDevice.Credential; "": whatever it is). One
	// that does not exist is no error; one with another credential is
	// ErrDeviceTaken.
	DeleteDevice(ctx context.Context, hub LinkedHub, deviceID, credential string) error
}

// Settings are the service's identity: ID scope and access policies.
type Settings struct {
	IDScope  string       `json:"idScope"`
	Policies []sas.Policy `json:"policies"`
}

// Service is the provisioning service.
type Service struct {
	store    store.Store
	registry Registry
	host     string
	settings Settings
	// Now and Rand are replaceable for tests.
	Now  func() time.Time
	Rand io.Reader
	// ChallengeTTL bounds how long a TPM challenge key authenticates a device.
	ChallengeTTL time.Duration
	// CAs resolves X.509 groups' caReferences; nil allows only inline
	// signingCertificates.
	CAs CAStore
	// What this replica wrote lately for devices registering.
	recentChallenges *recent[pendingChallenges]
	recentOperations *recent[answered]
	// What every registration consults.
	hubs   listCache[LinkedHub]
	groups listCache[EnrollmentGroup]
	// Throttle limits device traffic; nil is no limit.
	Throttle *Throttle
	// Webhooks calls custom allocation webhooks (default http.DefaultClient),
	// each bounded by WebhookTimeout (default 10 s). Register calls the
	// webhook inside the device's request, which waits for it.
	Webhooks       *http.Client
	WebhookTimeout time.Duration
}

// WebhookTimeoutOrDefault is how long a custom allocation webhook has to
// answer: WebhookTimeout, or 10 s when it is not set.
func (s *Service) WebhookTimeoutOrDefault() time.Duration {
	return cmp.Or(s.WebhookTimeout, 10*time.Second)
}

// Open loads the service's settings from st, creating an ID scope and the
// provisioningserviceowner policy on first start.
func Open(ctx context.Context, st store.Store, registry Registry, host string) (*Service, error) {
	s := &Service{store: st, registry: registry, host: host, Now: time.Now, Rand: rand.Reader, ChallengeTTL: time.Hour,
		recentChallenges: newRecent[pendingChallenges](challengeMemory), recentOperations: newRecent[answered](operationMemory)}
	err := store.LoadOrCreate(ctx, st, kindSettings, "service", func() any {
		var b [4]byte
		_, _ = rand.Read(b[:])
		return Settings{
			IDScope:  "0ne" + strings.ToUpper(hex.EncodeToString(b[:])),
			Policies: []sas.Policy{sas.NewPolicy("provisioningserviceowner", "ServiceConfig, DeviceConnect, EnrollmentWrite")},
		}
	}, &s.settings)
	if err != nil {
		return nil, fmt.Errorf("loading provisioning service settings: %w", err)
	}
	return s, nil
}

// Exists reports whether st already holds a provisioning service: the ID
// scope devices are configured with, and what they were given to trust.
func Exists(ctx context.Context, st store.Store) (bool, error) {
	_, err := st.Get(ctx, kindSettings, "service")
	if errors.Is(err, store.ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

// IDScope is the scope devices put in their configuration.
func (s *Service) IDScope() string { return s.settings.IDScope }

// OwnerConnectionString is the provisioningserviceowner connection string.
func (s *Service) OwnerConnectionString() string {
	p := s.settings.Policies[0]
	return sas.PolicyConnectionString(s.host, p.KeyName, p.PrimaryKey)
}

// AuthorizeService checks a service-API Authorization header of a request
// to path.
func (s *Service) AuthorizeService(header, path string) error {
	if _, err := sas.AuthorizeService(header, s.host, path, s.settings.Policies, s.Now()); err != nil {
		return azerr.Unauthorized("%v", err)
	}
	return nil
}

var registrationIDPattern = regexp.MustCompile(`^[a-z0-9\-._:]{1,128}$`)

// normalizeID checks a registration or group ID and lowercases it: IDs are
// case-insensitive.
func normalizeID(what, id string) (string, error) {
	l := strings.ToLower(id)
	if !registrationIDPattern.MatchString(l) {
		return "", azerr.New(400208, "ArgumentInvalid",
			"%s %q is not valid: use 1 to 128 characters of a-z, 0-9, '-', '.', '_' and ':'", what, id)
	}
	return l, nil
}

// get reads and decodes a document; ErrNotFound becomes the given error.
func get[T any](ctx context.Context, st store.Store, kind, id string, notFound error) (*T, string, error) {
	d, err := st.Get(ctx, kind, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, "", notFound
	}
	if err != nil {
		return nil, "", err
	}
	v := new(T)
	if err := json.Unmarshal(d.Body, v); err != nil {
		return nil, "", fmt.Errorf("stored %s %q is corrupt: %w", kind, id, err)
	}
	return v, d.ETag, nil
}

// current is a document as a caller read it: its value (nil when there was
// none) and etag.
type current[T any] struct {
	val  *T
	etag string
}

// upsert stores what change makes of the document kind/id (nil when there
// is none) and returns its new etag. read is the document as the caller
// already read it, or nil to read it here. When another writer gets there
// first (on any replica), or deletes it meanwhile, it reads again and
// applies change to what is there, a bounded number of times.
func upsert[T any](ctx context.Context, st store.Store, kind, id string, read *current[T], change func(old *T) T) (string, error) {
	for attempt := 0; ; attempt++ {
		if read == nil {
			old, etag, err := get[T](ctx, st, kind, id, nil)
			if err != nil {
				return "", err
			}
			read = &current[T]{old, etag}
		}
		body, _ := json.Marshal(change(read.val))
		doc := store.Doc{Kind: kind, ID: id, Body: body}
		var d store.Doc
		var err error
		if read.val == nil {
			d, err = st.Create(ctx, doc)
		} else {
			d, err = st.Put(ctx, doc, read.etag)
		}
		if !store.Raced(err) || attempt == 20 || ctx.Err() != nil {
			return d.ETag, err
		}
		read = nil
	}
}

// storeErr maps a conditional-write failure to the protocol's error.
func storeErr(err error, what string) error {
	switch {
	case errors.Is(err, store.ErrPrecondition):
		// The provisioning service numbers its errors apart from the
		// hub's (404201, 409203): this one stays as it was.
		return azerr.New(412002, "PreconditionFailed", "%s was changed since the etag in If-Match: read it again and retry", what)
	case errors.Is(err, store.ErrNotFound):
		return azerr.New(404201, "NotFound", "%s does not exist", what)
	case errors.Is(err, store.ErrExists):
		return azerr.New(409203, "Conflict", "%s exists already: to replace it, send its etag in If-Match (or \"*\" for any version)", what)
	}
	return err
}

// newKey is a fresh 32-byte key (base64), the size of hub device keys and
// of the keys a TPM imports.
func (s *Service) newKey() string { return s.randomKey(32) }

// randomKey is n random bytes in base64.
func (s *Service) randomKey(n int) string {
	b := make([]byte, n)
	_, _ = io.ReadFull(s.Rand, b)
	return base64.StdEncoding.EncodeToString(b)
}

// checkKey validates a base64 symmetric key, as Azure does: 16 to 64 bytes.
func checkKey(field, k string) error {
	if !sas.ValidKey(k) {
		return azerr.BadRequest("%s must be %s", field, sas.KeyRule)
	}
	return nil
}

func decodeEK(field, b64 string) ([]byte, error) {
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return nil, azerr.BadRequest("%s is not base64: %v (write it on one line, as `base64 -w0` does)", field, err)
	}
	if _, err := attest.ParsePublic(raw); err != nil {
		if len(raw) < 1<<16 {
			if _, e := attest.ParsePublic(append([]byte{byte(len(raw) >> 8), byte(len(raw))}, raw...)); e == nil {
				return nil, azerr.BadRequest("%s is a TPMT_PUBLIC without the 2-byte size of a TPM2B_PUBLIC: "+
					"send what `tpm2_readpublic -o` writes in its default (tss) format", field)
			}
		}
		return nil, azerr.BadRequest("%s is not a TPM2B_PUBLIC of an RSA-2048 storage key: %v "+
			"(send the base64 of what `tpm2_readpublic -c 0x81010001 -o ek.pub` writes)", field, err)
	}
	return raw, nil
}
