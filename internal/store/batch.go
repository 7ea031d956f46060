package store

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
)

var errStoreClosed = errors.New("store: closed")

// pendingEvent is one queued append, ready for a backend (properties as
// JSON text, body never nil); seq and err are set before done closes.
type pendingEvent struct {
	ctx context.Context
	Event
	props string
	seq   int64
	err   error
	done  chan struct{}
}

// eventBatcher group-commits event appends. Each caller queues its event
// and waits; one writer goroutine, running only while there is work, takes
// up to max queued events, has insert store them in one transaction, and
// answers every caller with its own sequence number. There is no timer: an
// append arriving while nothing is being written is committed at once, and
// appends arriving during a commit form the next batch, so batches grow
// with load. Sequence numbers follow queue order.
type eventBatcher struct {
	max int
	// insert stores the events in one transaction, in order, setting seq.
	insert func([]*pendingEvent) error
	// retrySingly says whether a failed batch is worth retrying one event
	// per transaction, so that only a bad event fails.
	retrySingly func(error) bool

	mu      sync.Mutex
	queue   []*pendingEvent
	writing bool
	closed  bool
	idle    sync.WaitGroup // the writer, while it runs
}

// append stores e once committed. If ctx ends before the commit the caller
// gets ctx.Err(), but the event may still be stored (at least once).
func (b *eventBatcher) append(ctx context.Context, e Event) (int64, error) {
	props, err := json.Marshal(e.Properties)
	if err != nil {
		return 0, err
	}
	if e.Body == nil {
		e.Body = []byte{} // an empty message; the column is NOT NULL
	}
	p := &pendingEvent{ctx: ctx, Event: e, props: string(props), done: make(chan struct{})}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return 0, errStoreClosed
	}
	b.queue = append(b.queue, p)
	if !b.writing {
		b.writing = true
		b.idle.Add(1)
		go b.run()
	}
	b.mu.Unlock()
	select {
	case <-p.done:
		return p.seq, full(p.err)
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// run writes batches until the queue is empty.
func (b *eventBatcher) run() {
	defer b.idle.Done()
	for {
		b.mu.Lock()
		batch := b.queue
		if len(batch) == 0 {
			b.writing = false
			b.mu.Unlock()
			return
		}
		if n := batchLen(batch, b.max); n < len(batch) {
			b.queue = append([]*pendingEvent(nil), batch[n:]...)
			batch = batch[:n]
		} else {
			b.queue = nil
		}
		b.mu.Unlock()
		b.write(batch)
	}
}

// maxBatchBytes bounds the bodies of one batch, as max bounds their number:
// a thousand messages of 256 KiB would be one transaction of 256 MiB, long
// enough to fail as the database out of reach (pgOpTimeout).
const maxBatchBytes = 8 << 20

// batchLen is how many of the queued events, from the first, the next
// batch takes: at most max, and at most maxBatchBytes of bodies unless
// the first alone is more.
func batchLen(queue []*pendingEvent, max int) int {
	n, size := 0, 0
	for n < len(queue) && n < max && (n == 0 || size+len(queue[n].Body) <= maxBatchBytes) {
		size += len(queue[n].Body)
		n++
	}
	return n
}

// write commits a batch and answers each caller.
func (b *eventBatcher) write(batch []*pendingEvent) {
	live := batch[:0:0]
	for _, p := range batch {
		if p.err = p.ctx.Err(); p.err != nil {
			close(p.done) // the caller gave up: do not store it
			continue
		}
		live = append(live, p)
	}
	if len(live) == 0 {
		return
	}
	err := b.insert(live)
	if err != nil && len(live) > 1 && b.retrySingly(err) {
		for _, p := range live {
			p.err = b.insert([]*pendingEvent{p})
		}
	} else {
		for _, p := range live {
			p.err = err
		}
	}
	for _, p := range live {
		if p.err != nil {
			p.seq = 0
		}
		close(p.done)
	}
}

// close refuses new appends and waits until the queued ones are written.
func (b *eventBatcher) close() {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	b.idle.Wait()
}
