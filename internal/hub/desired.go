package hub

import (
	"context"
	"encoding/json"
	"log/slog"
	"maps"
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/twindoc"
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
// from a goroutine of its own while there are any, in $version order and
// without gaps, whichever replica changes the twin: where a patch is
// missing (made through another replica, or lost to a race) it reads the
// twin and sends the patch from what it sent last. Until cancel.
func (s *Service) FollowDesired(r Ref, send func(patch []byte, version int64), overflow func()) (cancel func()) {
	// Changes queue, undrained, until the first read below is done.
	f := &follower{s: s, r: r, send: send, overflow: overflow, draining: true}
	stop := s.desiredWatchers.add(r, f.push)
	// After the watcher, so that no change falls between the two.
	f.sent, f.version, _ = s.desiredDocument(r)
	f.mu.Lock()
	waiting := len(f.queue) > 0
	f.draining = waiting
	f.mu.Unlock()
	if waiting {
		go f.drain()
	}
	return func() {
		stop()
		f.mu.Lock()
		f.stopped, f.queue = true, nil
		f.mu.Unlock()
	}
}

// follower is what one device has been sent of its desired properties,
// and the changes waiting to be sent. No goroutine waits for a device
// whose twin does not change: one drains the queue while it has changes.
type follower struct {
	s        *Service
	r        Ref
	send     func(patch []byte, version int64)
	overflow func()
	sent     map[string]any // the document as the device has it (drain only)
	version  int64          // (drain only)

	mu       sync.Mutex
	queue    []desiredChange
	draining bool
	stopped  bool
}

// push queues c, starting a drain if none runs; beyond desiredQueue
// waiting changes the device is too slow, and overflow is called.
func (f *follower) push(c desiredChange) {
	f.mu.Lock()
	switch {
	case f.stopped:
		f.mu.Unlock()
	case len(f.queue) >= desiredQueue:
		f.mu.Unlock()
		f.overflow()
	case f.draining:
		f.queue = append(f.queue, c)
		f.mu.Unlock()
	default:
		f.queue, f.draining = append(f.queue, c), true
		f.mu.Unlock()
		go f.drain()
	}
}

// drain handles the queued changes in order until there are none.
func (f *follower) drain() {
	for {
		f.mu.Lock()
		if len(f.queue) == 0 || f.stopped {
			f.queue, f.draining = nil, false
			f.mu.Unlock()
			return
		}
		c := f.queue[0]
		f.queue = f.queue[1:]
		f.mu.Unlock()
		f.handle(c)
	}
}

func (f *follower) handle(c desiredChange) {
	switch {
	case c.version != 0 && c.version <= f.version: // already sent, within a later read
	case c.version == f.version+1:
		twindoc.Merge(f.sent, c.patch)
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
		patch := twindoc.ReplacePatch(f.sent, doc)
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
