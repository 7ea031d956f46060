// Package store persists Hatchery's state as JSON documents keyed by kind
// and ID, each with an etag for optimistic concurrency. The domain packages
// own the shapes; the store only guarantees atomic, conditional writes, so
// that every request a replica may see next is answered from here.
package store

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Errors the domain packages map to protocol answers.
var (
	ErrNotFound     = errors.New("not found")
	ErrExists       = errors.New("already exists")
	ErrPrecondition = errors.New("etag does not match")
)

// Raced reports whether a conditional write lost to another writer, which
// changed, deleted or created the document after it was read: reading it
// again tells what to do.
func Raced(err error) bool {
	return errors.Is(err, ErrPrecondition) || errors.Is(err, ErrNotFound) || errors.Is(err, ErrExists)
}

// Doc is one stored document.
type Doc struct {
	Kind    string
	ID      string
	ETag    string
	Body    []byte
	Updated time.Time
}

// Event is one message of the durable device-to-cloud stream.
type Event struct {
	Seq        int64
	DeviceID   string
	ModuleID   string
	Properties map[string]string
	Body       []byte
	Enqueued   time.Time
}

// Store is what the domain services need of persistence.
type Store interface {
	Get(ctx context.Context, kind, id string) (Doc, error)
	// Create stores a new document; ErrExists if the ID is taken.
	Create(ctx context.Context, d Doc) (Doc, error)
	// Put writes d. ifMatch "" writes unconditionally (creating if need be);
	// "*" requires the document to exist; any other value must equal its etag.
	Put(ctx context.Context, d Doc, ifMatch string) (Doc, error)
	// Delete removes a document under the same ifMatch rules as Put.
	Delete(ctx context.Context, kind, id, ifMatch string) error
	// CreateUnder stores a new document d beneath the document
	// parentKind/parentID (d.ID must be parentID + "/" + ...), only while
	// that one exists: ErrNotFound if it does not, ErrExists if d's ID is
	// taken. Against a DeleteTree of the parent it either lands first, and
	// is deleted with it, or finds the parent gone.
	CreateUnder(ctx context.Context, d Doc, parentKind, parentID string) (Doc, error)
	// DeleteTree removes a document as Delete does and, in the same
	// transaction, every document of the kinds under whose ID begins with
	// id + "/". It returns those it removed, without their bodies.
	DeleteTree(ctx context.Context, kind, id, ifMatch string, under ...string) ([]Doc, error)
	// List returns up to limit documents of kind with IDs after `after`, in ID order.
	List(ctx context.Context, kind, after string, limit int) ([]Doc, error)
	// Count returns how many documents of kind there are.
	Count(ctx context.Context, kind string) (int, error)
	AppendEvent(ctx context.Context, e Event) (int64, error)
	// Events returns events with Seq > after, oldest first; deviceID "" means all.
	Events(ctx context.Context, deviceID string, after int64, limit int) ([]Event, error)
	// DeleteEventsBefore removes up to limit of the oldest events enqueued
	// before t, and says how many it removed.
	DeleteEventsBefore(ctx context.Context, t time.Time, limit int) (int64, error)
	Close() error
}

// subtree is the range of IDs under id: those from id+"/" up to, not
// including, id+"0" ('0' follows '/'), compared byte by byte.
func subtree(id string) (lo, hi string) { return id + "/", id + "0" }

// newETag returns a fresh opaque etag.
func newETag() string {
	var b [9]byte
	_, _ = rand.Read(b[:])
	return base64.StdEncoding.EncodeToString(b[:])
}

// LoadOrCreate decodes the JSON document kind/id into v, storing initial()
// first when there is none. Replicas starting together agree on one
// document: the first create wins and the others read it.
func LoadOrCreate(ctx context.Context, st Store, kind, id string, initial func() any, v any) error {
	d, err := st.Get(ctx, kind, id)
	if errors.Is(err, ErrNotFound) {
		body, err := json.Marshal(initial())
		if err != nil {
			return err
		}
		if _, err := st.Create(ctx, Doc{Kind: kind, ID: id, Body: body}); err != nil && !errors.Is(err, ErrExists) {
			return err
		}
		d, err = st.Get(ctx, kind, id)
		if err != nil {
			return err
		}
	} else if err != nil {
		return err
	}
	if err := json.Unmarshal(d.Body, v); err != nil {
		return fmt.Errorf("stored %s %q is corrupt: %w", kind, id, err)
	}
	return nil
}
