package hub

import (
	"context"
	"log/slog"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/hatchery/hatchery/internal/store"
)

// countingStore counts the documents read one by one.
type countingStore struct {
	store.Store
	gets atomic.Int64
}

func (c *countingStore) Get(ctx context.Context, kind, id string) (store.Doc, error) {
	c.gets.Add(1)
	return c.Store.Get(ctx, kind, id)
}

// With no configurations, the periodic evaluation reads no device one by
// one: nothing is to be applied, and no device holds a status to take back.
func TestIdleSweepReadsNoDevice(t *testing.T) {
	ctx := context.Background()
	st, err := store.OpenSQLite(filepath.Join(t.TempDir(), "hatchery.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	counting := &countingStore{Store: st}
	s := openHub(t, counting)
	for _, id := range []string{"d1", "d2", "d3"} {
		newIdentity(t, s, Ref{Device: id})
	}
	counting.gets.Store(0)
	if err := s.evaluateAll(ctx, slog.LevelDebug); err != nil {
		t.Fatal(err)
	}
	if n := counting.gets.Load(); n != 0 {
		t.Errorf("an evaluation with no configurations read %d documents one by one", n)
	}
}
