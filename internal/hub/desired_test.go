package hub

import (
	"context"
	"testing"

	"github.com/hatchery/hatchery/internal/store"
	"github.com/hatchery/hatchery/internal/testutil"
)

// A change that arrives while a follower first reads the desired
// properties is sent after that read, from what it read: the patch of the
// version after it, once.
func TestFollowerChangeDuringFirstRead(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	r := Ref{Device: "d"}
	newIdentity(t, s, r)
	if _, err := s.UpdateTwin(ctx, r, "*", &TwinPatch{Properties: &DesiredPatch{Desired: map[string]any{"a": 1}}}, false); err != nil {
		t.Fatal(err)
	}
	reading, release := make(chan struct{}), make(chan struct{})
	s.store = &blockFirstGet{Store: s.store, kind: kindDevice, reading: reading, release: release}
	sent := make(chan string, 10)
	followed := make(chan func(), 1)
	go func() {
		followed <- s.FollowDesired(r, func(p []byte, _ int64) { sent <- string(p) }, func() { t.Error("overflow") })
	}()
	<-reading // the follower's first read has begun
	s.notifyDesired(r, map[string]any{"b": 2}, 3)
	close(release)
	defer (<-followed)()
	if p := testutil.Within(t, sent, "the patch of version 3"); p != `{"$version":3,"b":2}` {
		t.Fatalf("sent %s", p)
	}
	select {
	case p := <-sent:
		t.Fatalf("sent again: %s", p)
	default:
	}
}

// blockFirstGet holds the first Get of kind until release, saying when it
// began.
type blockFirstGet struct {
	store.Store
	kind             string
	reading, release chan struct{}
	once             bool
}

func (b *blockFirstGet) Get(ctx context.Context, kind, id string) (store.Doc, error) {
	if kind == b.kind && !b.once {
		b.once = true
		close(b.reading)
		<-b.release
	}
	return b.Store.Get(ctx, kind, id)
}
