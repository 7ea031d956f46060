package hub

import (
	"context"
	"encoding/json"
	"log/slog"
	"maps"
	"time"
)

// desiredChange is a committed desired-property patch of this replica, or,
// without one (version 0), word that the twin changed through another.
type desiredChange struct {
	patch   map[string]any
	version int64
}

// desiredQueue is how many changes may wait for a device that is slow to
// read; one that falls further behind is cut off (overflow).
const desiredQueue = 64

// FollowDesired sends r's desired-property patches — each a JSON merge
// patch with its $version, as the device protocol carries it — to send,
// from a goroutine of its own, in $version order and without gaps,
// whichever replica changes the twin: where a patch is missing (made
// through another replica, or lost to a race) it reads the twin and sends
// the patch from what it sent last. Until cancel.
func (s *Service) FollowDesired(r Ref, send func(patch []byte, version int64), overflow func()) (cancel func()) {
	queue, done := make(chan desiredChange, desiredQueue), make(chan struct{})
	stop := s.desiredWatchers.add(r, func(c desiredChange) {
		select {
		case queue <- c:
		default:
			overflow()
		}
	})
	// After the watcher, so that no change falls between the two.
	f := &follower{s: s, r: r, send: send}
	f.sent, f.version, _ = s.desiredDocument(r)
	go func() {
		for {
			select {
			case c := <-queue:
				f.handle(c)
			case <-done:
				return
			}
		}
	}()
	return func() { stop(); close(done) }
}

// follower is what one device has been sent of its desired properties.
type follower struct {
	s       *Service
	r       Ref
	send    func(patch []byte, version int64)
	sent    map[string]any // the document as the device has it
	version int64
}

func (f *follower) handle(c desiredChange) {
	switch {
	case c.version != 0 && c.version <= f.version: // already sent, within a later read
	case c.version == f.version+1:
		mergePatch(f.sent, c.patch)
		f.emit(c.patch, c.version)
	default: // a gap, or a change elsewhere: read what there is now
		doc, version, err := f.s.desiredDocument(f.r)
		if err != nil {
			slog.Warn("reading desired properties to send", "identity", f.r.String(), "error", err)
			return
		}
		if version <= f.version {
			return
		}
		patch := replacePatch(f.sent, doc)
		f.sent = doc
		f.emit(patch, version)
	}
}

func (f *follower) emit(patch map[string]any, version int64) {
	f.version = version
	m := maps.Clone(patch)
	if m == nil {
		m = map[string]any{}
	}
	m["$version"] = version
	body, _ := json.Marshal(m)
	f.send(body, version)
}

// desiredDocument reads r's desired properties and their version.
func (s *Service) desiredDocument(r Ref) (map[string]any, int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rec, _, err := s.load(ctx, r)
	if err != nil {
		return map[string]any{}, 0, err
	}
	if rec.Desired == nil {
		rec.Desired = map[string]any{}
	}
	return rec.Desired, rec.DesiredVersion, nil
}
