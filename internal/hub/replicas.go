package hub

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/periodic"
	"github.com/hatchery/hatchery/internal/store"
)

// A connection is recorded under the name of the replica holding it, so a
// replica that ends without recording its devices disconnected — killed,
// its machine gone, cut off from the database — would leave them
// "Connected" for good. Every replica therefore beats: it rewrites a
// document of its own every beatInterval, and records disconnected the
// devices of a replica whose beat it has seen stand still for deadBeats of
// its own (its clock is never compared with another's). With SQLite there
// is one server, and any other beat found when it starts is a previous
// run's.
const (
	kindReplica  = "hub.replica"
	beatInterval = 10 * time.Second
	deadBeats    = 3
)

// heartbeat is a replica's document.
type heartbeat struct {
	Beat  int64     `json:"beat"`
	Since time.Time `json:"since"` // informational: when the replica started
}

// Heartbeat beats until ctx ends.
func (s *Service) Heartbeat(ctx context.Context) {
	b := beater{s: s, since: s.Now().UTC(), seen: map[string]stillBeat{}}
	periodic.Run(ctx, beatInterval, "recording this replica alive", b.beat)
}

type beater struct {
	s       *Service
	n       int64
	written bool // a beat of this replica's is in the store
	listed  bool // the other replicas' beats have been read once
	since   time.Time
	seen    map[string]stillBeat // the other replicas' beats
}

// stillBeat is another replica's last beat, and for how many of this
// replica's it has not changed.
type stillBeat struct {
	body  string
	still int
}

func (b *beater) beat(ctx context.Context) error {
	s := b.s
	b.n++
	body, _ := json.Marshal(heartbeat{Beat: b.n, Since: b.since})
	doc := store.Doc{Kind: kindReplica, ID: s.origin, Body: body}
	if !b.written { // the first beat, or none has been written yet
		if _, err := s.store.Put(ctx, doc, ""); err != nil {
			return err
		}
		b.written = true
	} else if _, err := s.store.Put(ctx, doc, "*"); errors.Is(err, store.ErrNotFound) {
		// The others took this replica for dead (it could not write for a
		// while) and recorded its devices disconnected: end their
		// connections, so that they connect again and are recorded anew.
		slog.Warn("the other replicas took this one for dead: closing its device connections")
		s.dropAll()
		if _, err := s.store.Put(ctx, doc, ""); err != nil {
			return err
		}
	} else if err != nil {
		return err
	}
	// Within a beat's time, so that the beats go on: a replica busy for
	// longer would be taken for dead.
	s.recordClosed(ctx, beatInterval/2)
	docs, err := s.store.List(ctx, kindReplica, "", 1000)
	if err != nil {
		return err
	}
	for _, d := range docs {
		if d.ID == s.origin {
			continue
		}
		if s.relay != nil || b.listed {
			prev, ok := b.seen[d.ID]
			if !ok || prev.body != string(d.Body) {
				b.seen[d.ID] = stillBeat{body: string(d.Body)}
				continue
			}
			if prev.still++; prev.still < deadBeats {
				b.seen[d.ID] = prev
				continue
			}
		}
		delete(b.seen, d.ID)
		// Its document goes first, unless it beat meanwhile: from then on
		// it learns, at its next beat, that it was taken for dead.
		err := s.store.Delete(ctx, kindReplica, d.ID, d.ETag)
		switch {
		case errors.Is(err, store.ErrPrecondition), errors.Is(err, store.ErrNotFound):
			continue // alive after all, or swept by another replica
		case err != nil:
			return err
		}
		n, err := s.disconnectReplica(ctx, d.ID)
		if err != nil {
			return err
		}
		if n > 0 {
			slog.Info("recorded disconnected the devices of a replica that stopped", "replica", d.ID, "devices", n)
		}
	}
	b.listed = true
	return nil
}

// disconnectReplica records disconnected every device and module whose
// latest connection is the replica origin's, and says how many there were.
func (s *Service) disconnectReplica(ctx context.Context, origin string) (int, error) {
	n := 0
	for _, kind := range []string{kindDevice, kindModule} {
		err := s.eachRecord(ctx, kind, func(rec *record) error {
			if rec.Connection != "" && replicaOf(rec.Connection) == origin &&
				s.setConnected(ctx, Ref{Device: rec.Device.DeviceID, Module: rec.Device.ModuleID}, rec.Connection, false, "", nil) == nil {
				n++
			}
			return nil
		})
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// replicaOf is the origin of the replica that recorded connection.
func replicaOf(connection string) string {
	origin, _, _ := strings.Cut(connection, ".")
	return origin
}
