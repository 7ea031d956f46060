package hub

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/hatchery/hatchery/internal/store"
)

// errNoSpace is what a database out of space answers a write.
var errNoSpace = fmt.Errorf("%w: could not extend file", store.ErrFull)

// failingStore refuses, while failing is set, the writes (Create, CreateUnder and Put)
// of documents of kind — only of the one whose ID is id, when id is set —
// as a database out of space does. before, when set, runs once, just
// before the first write it refuses.
type failingStore struct {
	store.Store
	kind, id string
	failing  atomic.Bool
	before   func()
	once     sync.Once
}

// failWrites wraps st in a failingStore that refuses writes from the start.
func failWrites(st store.Store, kind, id string) *failingStore {
	f := &failingStore{Store: st, kind: kind, id: id}
	f.failing.Store(true)
	return f
}

func (f *failingStore) refuses(kind, id string) bool {
	if !f.failing.Load() || kind != f.kind || (f.id != "" && id != f.id) {
		return false
	}
	if f.before != nil {
		f.once.Do(f.before)
	}
	return true
}

func (f *failingStore) Create(ctx context.Context, d store.Doc) (store.Doc, error) {
	if f.refuses(d.Kind, d.ID) {
		return store.Doc{}, errNoSpace
	}
	return f.Store.Create(ctx, d)
}

func (f *failingStore) CreateUnder(ctx context.Context, d store.Doc, parentKind, parentID string) (store.Doc, error) {
	if f.refuses(d.Kind, d.ID) {
		return store.Doc{}, errNoSpace
	}
	return f.Store.CreateUnder(ctx, d, parentKind, parentID)
}

func (f *failingStore) Put(ctx context.Context, d store.Doc, ifMatch string) (store.Doc, error) {
	if f.refuses(d.Kind, d.ID) {
		return store.Doc{}, errNoSpace
	}
	return f.Store.Put(ctx, d, ifMatch)
}
