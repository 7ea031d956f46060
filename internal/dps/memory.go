package dps

import (
	"crypto/subtle"
	"crypto/x509"
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/sas"
)

// recent is a bounded memory, local to this replica, of what it wrote
// lately for devices in the middle of registering: the challenges it issued
// and the operations it answered. A device's next request usually comes
// back to the same replica within milliseconds, and is then answered without
// reading those documents back from the store. The store stays the record:
// a miss (another replica, an entry expired or pushed out by newer ones)
// reads it. Changes made through other replicas do not reach this memory,
// hence its short lifetimes (challengeMemory, operationMemory).
type recent[V any] struct {
	mu    sync.Mutex
	ttl   time.Duration
	items map[string]recentItem[V]
	ring  []string // keys in the order they were put; the oldest is overwritten
	next  int
}

type recentItem[V any] struct {
	val     V
	expires time.Time
	slot    int // where in ring the key was last put
}

// recentCapacity is how many devices a replica remembers: a few seconds'
// worth of registrations at full speed, a few megabytes (see maxRemembered).
const recentCapacity = 4096

// How long a replica remembers. A device answers its challenge as soon as
// its TPM has activated the credential, and the enrollment is read again
// then, so a challenge may be remembered for long. A device polls as soon
// as its PUT is answered; an operation is remembered only briefly, because
// answering the poll from memory does not see what another replica did
// since: a rotated key, a deleted enrollment, group or registration record,
// or a newer registration of the same device (the store would answer with
// that one's state).
const (
	challengeMemory = time.Minute
	operationMemory = 5 * time.Second
)

func newRecent[V any](ttl time.Duration) *recent[V] {
	return &recent[V]{ttl: ttl, items: map[string]recentItem[V]{}, ring: make([]string, recentCapacity)}
}

func (r *recent[V]) put(key string, v V, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if old := r.ring[r.next]; old != "" {
		// A key put again since owns a newer slot and stays.
		if it, ok := r.items[old]; ok && it.slot == r.next {
			delete(r.items, old)
		}
	}
	r.ring[r.next] = key
	r.items[key] = recentItem[V]{val: v, expires: now.Add(r.ttl), slot: r.next}
	r.next = (r.next + 1) % len(r.ring)
}

func (r *recent[V]) get(key string, now time.Time) (V, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	it, ok := r.items[key]
	if !ok || !now.Before(it.expires) {
		var zero V
		return zero, false
	}
	return it.val, true
}

func (r *recent[V]) forget(key string) {
	r.mu.Lock()
	delete(r.items, key)
	r.mu.Unlock()
}

// answered is a device's latest operation on this replica, with what
// authenticated it, so that its poll can be checked the same way.
type answered struct {
	op    Operation
	proof proof
}

// maxRemembered bounds what one remembered operation may hold of what the
// device or a webhook chose (payload, certificate); larger ones are
// answered from the store, so that the memory stays small.
const maxRemembered = 8 << 10

func (a *answered) small() bool {
	n := len(a.op.RegistrationState.Payload)
	if a.proof.certificate != nil {
		n += len(a.proof.certificate.Raw)
	}
	return n <= maxRemembered
}

// proof is what a device authenticated with: the keys its SAS token
// verified under (challenge key, enrollment keys, or keys derived from a
// group's), or its certificate.
type proof struct {
	keys        [][]byte
	certificate *x509.Certificate
}

// accepts reports whether cred proves the same thing now: a valid token of
// scope/registrations/regID signed with one of the keys, or the same
// certificate, still valid.
func (p proof) accepts(scope, regID string, cred Credentials, now time.Time) bool {
	if cred.Authorization == "" {
		return p.certificate != nil && len(cred.Certificates) > 0 &&
			subtle.ConstantTimeCompare(cred.Certificates[0].Raw, p.certificate.Raw) == 1 &&
			x509Identity(regID, cred.Certificates[0], now) == nil
	}
	tok, err := sas.Parse(cred.Authorization)
	return err == nil && len(p.keys) > 0 && tok.AudienceIs(scope+"/registrations/"+regID) && tok.Verify(now, p.keys...) == nil
}

// listCache holds documents of a kind that every registration consults
// (linked hubs, enrollment groups), read from the store at most every
// listCacheTTL. A change made through this replica counts at once (its
// writer calls forget), one made through another within listCacheTTL.
// The documents are shared: callers must not change them.
type listCache[T any] struct {
	mu    sync.Mutex
	list  []*T
	until time.Time
}

const listCacheTTL = 2 * time.Second

func (c *listCache[T]) get(read func() ([]*T, error)) ([]*T, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if time.Now().Before(c.until) {
		return c.list, nil
	}
	l, err := read()
	if err != nil {
		return nil, err
	}
	c.list, c.until = l, time.Now().Add(listCacheTTL)
	return l, nil
}

func (c *listCache[T]) forget() {
	c.mu.Lock()
	c.until = time.Time{}
	c.mu.Unlock()
}
