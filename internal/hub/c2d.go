package hub

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	mathrand "math/rand/v2"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/periodic"
	"github.com/hatchery/hatchery/internal/store"
)

const (
	kindC2D = "hub.c2d"
	// maxC2DQueue is the hosted hub's limit of pending messages per device.
	maxC2DQueue = 50
	// maxC2DSize is the hosted hub's limit of a message's body.
	maxC2DSize = 64 << 10
	// maxC2DProps bounds a message's properties URL-encoded, as MQTT
	// delivers them in the topic, which holds at most 65,535 bytes with
	// the device ID and the hub's own properties: a message that cannot
	// become a topic can never be delivered.
	maxC2DProps = 60 << 10
	// c2dTTL is how long a message waits by default, maxC2DTTL at most.
	c2dTTL    = time.Hour
	maxC2DTTL = 48 * time.Hour
)

// C2DMessage is a cloud-to-device message waiting for its device.
type C2DMessage struct {
	ID         string            `json:"id"` // store ID: device/sortable-time
	MessageID  string            `json:"messageId"`
	Properties map[string]string `json:"properties,omitempty"`
	Body       []byte            `json:"body"`
	Enqueued   time.Time         `json:"enqueuedTime"`
	Expiry     time.Time         `json:"expiryTime"`
	// A message received over HTTPS is locked, hidden from the next
	// receive, until its device settles it or the lock expires.
	LockToken     string    `json:"lockToken,omitempty"`
	LockedUntil   time.Time `json:"lockedUntil"`
	DeliveryCount int       `json:"deliveryCount,omitempty"`
}

// SendC2D queues a message for a device and tells its connection, if any.
func (s *Service) SendC2D(ctx context.Context, device string, props map[string]string, body []byte) (*C2DMessage, error) {
	if len(body) > maxC2DSize {
		return nil, azerr.MessageTooLarge("the message body is %d bytes: cloud-to-device messages carry at most %d", len(body), maxC2DSize)
	}
	now := s.Now().UTC()
	expiry, err := c2dExpiry(props, now)
	if err != nil {
		return nil, err
	}
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	m := &C2DMessage{
		ID:        fmt.Sprintf("%s/%020d%s", device, now.UnixNano(), hex.EncodeToString(rnd[:])),
		MessageID: props["messageId"], Properties: props, Body: body, Enqueued: now, Expiry: expiry,
	}
	if m.MessageID == "" {
		m.MessageID = hex.EncodeToString(rnd[:]) + fmt.Sprint(now.UnixNano())
	}
	// Measured as MQTT will carry them, in the topic.
	if n := len(m.PropertyBag(device)); n > maxC2DProps {
		return nil, azerr.BadRequest("the message's properties take %d bytes URL-encoded: cloud-to-device properties may take at most %d "+
			"(Azure IoT Hub limits a message to 64 KB with its properties): send fewer or shorter ones, or put them in the body", n, maxC2DProps)
	}
	// Sends to one device take turns on this replica, each seeing the
	// queue as the one before left it.
	lock := stripe(s.c2dLocks[:], device)
	lock.Lock()
	defer lock.Unlock()
	if _, _, err := s.load(ctx, Ref{Device: device}); err != nil {
		return nil, err
	}
	pending, err := s.PendingC2D(ctx, device)
	if err != nil {
		return nil, err
	}
	if len(pending) >= maxC2DQueue {
		return nil, c2dQueueFull(device)
	}
	doc, _ := json.Marshal(m)
	// Under its device: a message sent while the device is deleted goes
	// with it, or is refused, and never waits for a device created again.
	switch _, err := s.store.CreateUnder(ctx, store.Doc{Kind: kindC2D, ID: m.ID, Body: doc}, kindDevice, device); {
	case errors.Is(err, store.ErrNotFound):
		return nil, Ref{Device: device}.notFound()
	case err != nil:
		return nil, err
	}
	// The message is in: what follows must not stop halfway because the
	// sender went away, or a send answered with an error would stay queued.
	ctx, cancel := afterCommit(ctx)
	defer cancel()
	// Sends on other replicas may have queued meanwhile. Each lists the
	// queue again once its message is in, so that of those that went over
	// the limit the last to queue sees them all, and each takes its own
	// message back. The limit is decided on that listing, not on writing
	// the count: a count that loses its races is left to the next one.
	msgs, _, err := s.queuedC2D(ctx, device)
	if err == nil && len(msgs) > maxC2DQueue {
		err = c2dQueueFull(device)
	}
	if err != nil {
		if err := s.store.Delete(ctx, kindC2D, m.ID, ""); err != nil && !errors.Is(err, store.ErrNotFound) {
			slog.Warn("taking back a cloud-to-device message the queue had no room for", "device", device, "error", err)
		}
		s.countC2D(ctx, device)
		return nil, err
	}
	s.countC2D(ctx, device)
	s.c2dArrivedHere(device)
	s.publish("c2d", Ref{Device: device})
	return m, nil
}

// c2dQueueFull refuses a message to a device that has maxC2DQueue waiting.
func c2dQueueFull(device string) error {
	return azerr.New(403004, "DeviceMaximumQueueDepthExceeded",
		"device %q already has %d cloud-to-device messages waiting: it must receive some first", device, maxC2DQueue)
}

// PropertyBag is m's properties with the hub's own ($.mid, $.to, $.exp),
// URL-encoded as MQTT delivers them after devices/{id}/messages/devicebound/:
// percent-encoding throughout, as '+' for a space would be a wildcard.
func (m *C2DMessage) PropertyBag(device string) string {
	bag := url.Values{"$.mid": {m.MessageID}, "$.to": {"/devices/" + device + "/messages/deviceBound"},
		"$.exp": {m.Expiry.UTC().Format(time.RFC3339Nano)}}
	for k, v := range m.Properties {
		if k != "messageId" {
			bag.Set(k, v)
		}
	}
	return strings.ReplaceAll(bag.Encode(), "+", "%20")
}

// c2dExpiry is when a message sent now expires: at its "$.exp" system
// property (taken out of props), an RFC 3339 or HTTP date within
// maxC2DTTL, else after c2dTTL, the hosted hub's defaults.
func c2dExpiry(props map[string]string, now time.Time) (time.Time, error) {
	v, ok := props["$.exp"]
	if !ok {
		return now.Add(c2dTTL), nil
	}
	delete(props, "$.exp")
	t, err := time.Parse(time.RFC3339, v)
	if err != nil {
		if t, err = http.ParseTime(v); err != nil {
			return time.Time{}, azerr.BadRequest("expiry %q is not a time: give an RFC 3339 time such as %s", v, now.Add(time.Hour).Format(time.RFC3339))
		}
	}
	if !t.After(now) || t.After(now.Add(maxC2DTTL)) {
		return time.Time{}, azerr.BadRequest("expiry %s must be in the next %d hours", v, int(maxC2DTTL.Hours()))
	}
	return t.UTC(), nil
}

// c2dArrivedHere wakes this replica's connection of device, if it has it.
func (s *Service) c2dArrivedHere(device string) {
	for _, f := range s.c2dWatchers.get(device) {
		(*f)()
	}
}

// PendingC2D returns a device's live messages, oldest first; expired and
// dead-lettered ones are dropped, and the device's cloudToDeviceMessageCount
// follows.
func (s *Service) PendingC2D(ctx context.Context, device string) ([]*C2DMessage, error) {
	out, dropped, err := s.queuedC2D(ctx, device)
	if dropped {
		ctx, cancel := afterCommit(ctx)
		defer cancel()
		s.countC2D(ctx, device)
	}
	return out, err
}

// afterCommit is the context of what follows a write that committed: not
// cancelled when the caller goes away, as a client disconnecting then must
// not leave the change half done, yet bounded.
func afterCommit(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
}

// countC2D is recountC2D that does not fail what it follows: a count
// that loses its races on the device record to other writers is tried
// again a few times after a pause, then left to SweepC2D.
func (s *Service) countC2D(ctx context.Context, device string) {
	wait := 10 * time.Millisecond
	for try := 0; ; try++ {
		_, err := s.recountC2D(ctx, device)
		if err == nil || azerr.HasStatus(err, 404) {
			s.mu.Lock()
			delete(s.c2dStale, device)
			s.mu.Unlock()
			return
		}
		if !azerr.HasStatus(err, 412) || try == 3 || ctx.Err() != nil {
			s.mu.Lock()
			s.c2dStale[device] = true
			s.mu.Unlock()
			return
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait + time.Duration(mathrand.Int64N(int64(wait)))):
		}
		wait *= 2
	}
}

// recountC2D records how many messages wait for device as its
// cloudToDeviceMessageCount, as the hosted hub shows them, and returns
// that number: every change of the queue is followed by one. It lists the
// queue after reading the record, and writes on the version it read even
// when the number is the same, so that of two recounts around a change,
// on any replicas, the one that listed before the change cannot write
// last without reading again. A failure is logged; one of losing the
// races on the record only at debug level, as countC2D tries again.
func (s *Service) recountC2D(ctx context.Context, device string) (int, error) {
	var msgs []*C2DMessage
	_, err := s.update(ctx, Ref{Device: device}, func(rec *record) error {
		var err error
		msgs, _, err = s.queuedC2D(ctx, device)
		rec.Device.CloudToDeviceMessageCount = len(msgs)
		return err
	})
	if err != nil {
		switch {
		case azerr.HasStatus(err, 404): // a deleted device has no queue to count
		case azerr.HasStatus(err, 412): // other writers won: counted again later
			slog.Debug("counting a device's cloud-to-device messages", "device", device, "error", err)
		default:
			slog.Warn("counting a device's cloud-to-device messages", "device", device, "error", err)
		}
		return 0, err
	}
	s.recountAtExpiry(device, msgs)
	return len(msgs), nil
}

// recountAtExpiry has device's queue counted again once the first of msgs
// expires, as nothing else reads the queue of a device that stays away. A
// replica keeps one timer a device, at the earliest expiry its counts saw:
// counts may end out of order, and one more count costs less than one
// missed.
func (s *Service) recountAtExpiry(device string, msgs []*C2DMessage) {
	var first time.Time
	for _, m := range msgs {
		if first.IsZero() || m.Expiry.Before(first) {
			first = m.Expiry
		}
	}
	if first.IsZero() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.c2dExpiry[device]
	if old != nil && !old.at.After(first) {
		return
	}
	if old != nil {
		old.timer.Stop()
	}
	e := &expiryTimer{at: first}
	e.timer = time.AfterFunc(first.Sub(s.Now()), func() {
		s.mu.Lock()
		if s.c2dExpiry[device] == e {
			delete(s.c2dExpiry, device)
		}
		s.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		s.countC2D(ctx, device) // its listing drops what expired
	})
	s.c2dExpiry[device] = e
}

// expiryTimer is recountAtExpiry's timer of a device, and when it fires.
type expiryTimer struct {
	at    time.Time
	timer *time.Timer
}

// queuedC2D is PendingC2D without the count: every message, read a page
// at a time; dropped says it dropped some (deadC2D).
func (s *Service) queuedC2D(ctx context.Context, device string) (out []*C2DMessage, dropped bool, err error) {
	now := s.Now()
	err = s.eachDocUnder(ctx, kindC2D, device+"/", c2dPage, func(d store.Doc) error {
		m := &C2DMessage{}
		if err := json.Unmarshal(d.Body, m); err != nil {
			return err
		}
		if deadC2D(m, now) {
			_ = s.store.Delete(ctx, kindC2D, d.ID, "")
			dropped = true
			return nil
		}
		out = append(out, m)
		return nil
	})
	if err != nil {
		return nil, dropped, err
	}
	return out, dropped, nil
}

// c2dPage is how many messages queuedC2D reads at once: a full queue and
// one more.
const c2dPage = maxC2DQueue + 1

// PurgeC2D removes every message waiting for device, as the hosted hub's
// purge does, and says how many there were.
func (s *Service) PurgeC2D(ctx context.Context, device string) (int, error) {
	if _, _, err := s.load(ctx, Ref{Device: device}); err != nil {
		return 0, err
	}
	n, err := s.removeC2D(ctx, device)
	ctx, cancel := afterCommit(ctx)
	defer cancel()
	s.countC2D(ctx, device) // the purge is done, or done in part, whatever this says
	return n, err
}

// removeC2D deletes device's queued messages and counts those it deleted
// (one a device settled meanwhile is not counted).
func (s *Service) removeC2D(ctx context.Context, device string) (int, error) {
	msgs, _, err := s.queuedC2D(ctx, device)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, m := range msgs {
		switch err := s.store.Delete(ctx, kindC2D, m.ID, ""); {
		case err == nil:
			n++
		case !errors.Is(err, store.ErrNotFound):
			return n, err
		}
	}
	return n, nil
}

// CompleteC2D removes a delivered message.
func (s *Service) CompleteC2D(ctx context.Context, id string) error {
	if err := s.store.Delete(ctx, kindC2D, id, ""); err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	device, _, _ := strings.Cut(id, "/")
	ctx, cancel := afterCommit(ctx)
	defer cancel()
	s.countC2D(ctx, device) // the message is gone whatever this says
	return nil
}

// WatchC2D calls f whenever a message is queued for device, until cancel.
func (s *Service) WatchC2D(device string, f func()) (cancel func()) {
	return s.c2dWatchers.add(device, f)
}

// c2dLock is how long a message received over HTTPS stays hidden from the
// next receive while its device works on it, and maxC2DDeliveries how often
// it is delivered, over either, before it is dropped (the hosted hub's
// defaults).
const (
	c2dLock          = time.Minute
	maxC2DDeliveries = 10
)

// deadC2D says that m is to be dropped, as the hosted hub dead-letters a
// message: it expired, or it was delivered maxC2DDeliveries times without
// being completed, and no device works on it under a lock.
func deadC2D(m *C2DMessage, now time.Time) bool {
	return now.After(m.Expiry) || m.DeliveryCount >= maxC2DDeliveries && !now.Before(m.LockedUntil)
}

// countDelivery counts a delivery of the message of store ID id, on the
// version stored, after deliver changes it (refusing with an error).
func (s *Service) countDelivery(ctx context.Context, id string, deliver func(*C2DMessage) error) (*C2DMessage, error) {
	load := func() (*C2DMessage, string, error) { return s.loadC2D(ctx, id) }
	return modify(ctx, s.store, kindC2D, id, "cloud-to-device message "+id, load, func(m *C2DMessage) error {
		if err := deliver(m); err != nil {
			return err
		}
		m.DeliveryCount++
		return nil
	})
}

// DeliveredC2D counts a delivery over MQTT (a PUBLISH sent) of the message
// of store ID id; one its device never acknowledges is dropped after
// maxC2DDeliveries. A message acknowledged meanwhile is no error.
func (s *Service) DeliveredC2D(ctx context.Context, id string) error {
	_, err := s.countDelivery(ctx, id, func(*C2DMessage) error { return nil })
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	return err
}

// ReceiveC2D locks the oldest message of device that is not locked and
// returns it with its lock token, as the HTTPS device API receives: nil
// when there is none.
func (s *Service) ReceiveC2D(ctx context.Context, device string) (*C2DMessage, string, error) {
	msgs, err := s.PendingC2D(ctx, device)
	if err != nil {
		return nil, "", err
	}
	now := s.Now()
	for _, m := range msgs {
		if now.Before(m.LockedUntil) {
			continue
		}
		var rnd [8]byte
		_, _ = rand.Read(rnd[:])
		got, err := s.countDelivery(ctx, m.ID, func(stored *C2DMessage) error {
			if now.Before(stored.LockedUntil) || deadC2D(stored, now) {
				return errC2DTaken
			}
			stored.LockToken, stored.LockedUntil = hex.EncodeToString(rnd[:]), now.Add(c2dLock)
			return nil
		})
		switch {
		case errors.Is(err, errC2DTaken), errors.Is(err, store.ErrNotFound):
			continue // received, settled or delivered for the last time meanwhile
		case err != nil:
			return nil, "", err
		}
		s.noteActivity(ctx, device)
		return got, strings.TrimPrefix(got.ID, device+"/") + "." + got.LockToken, nil
	}
	return nil, "", nil
}

// SettleC2D ends the lock of the message device received with token:
// completing (or rejecting) removes it, abandoning puts it back in the
// queue.
func (s *Service) SettleC2D(ctx context.Context, device, token string, abandon bool) error {
	id, lock, _ := strings.Cut(token, ".")
	lost := azerr.New(412002, "DeviceMessageLockLost", "the lock token %.60q holds no message of %s now (its lock expired, or it was settled): receive it again", token, device)
	held := func(m *C2DMessage) bool { return lock != "" && m.LockToken == lock && s.Now().Before(m.LockedUntil) }
	if strings.Contains(id, "/") {
		return lost
	}
	m, etag, err := s.loadC2D(ctx, device+"/"+id)
	if errors.Is(err, store.ErrNotFound) {
		return lost
	}
	if err != nil {
		return err
	}
	if !held(m) {
		return lost
	}
	if abandon {
		m.LockToken, m.LockedUntil = "", time.Time{}
		if err := s.writeC2D(ctx, m, etag); err != nil { // held, as read with etag
			if errors.Is(err, errC2DTaken) {
				return lost
			}
			return err
		}
		s.c2dArrivedHere(device)
		return nil
	}
	if err := s.store.Delete(ctx, kindC2D, m.ID, etag); err != nil {
		if store.Raced(err) {
			return lost
		}
		return err
	}
	ctx, cancel := afterCommit(ctx)
	defer cancel()
	s.countC2D(ctx, device) // the message is gone whatever this says
	return nil
}

// errC2DTaken is a message that changed since it was read.
var errC2DTaken = errors.New("the message changed meanwhile")

// loadC2D reads the queued message of store ID id, and its etag.
func (s *Service) loadC2D(ctx context.Context, id string) (*C2DMessage, string, error) {
	d, err := s.store.Get(ctx, kindC2D, id)
	if err != nil {
		return nil, "", err
	}
	m := &C2DMessage{}
	if err := json.Unmarshal(d.Body, m); err != nil {
		return nil, "", err
	}
	return m, d.ETag, nil
}

// writeC2D writes m over the stored message if it is still the version
// of etag.
func (s *Service) writeC2D(ctx context.Context, m *C2DMessage, etag string) error {
	body, _ := json.Marshal(m)
	_, err := s.store.Put(ctx, store.Doc{Kind: kindC2D, ID: m.ID, Body: body}, etag)
	if store.Raced(err) {
		return errC2DTaken
	}
	return err
}

// c2dSweep is how often SweepC2D goes through the queues.
const c2dSweep = 5 * time.Minute

// SweepC2D goes through every device's queue now and every c2dSweep,
// until ctx ends, on any replica (each pass is safe to run on several at
// once): the in-memory timers of recountAtExpiry end with their process,
// and a device that stays away would keep its expired messages, stored
// and counted, until it or a sender came back.
func (s *Service) SweepC2D(ctx context.Context) {
	periodic.Run(ctx, c2dSweep, "going through the cloud-to-device queues; the rest follow at the next pass", s.sweepC2D)
}

// sweepC2D reads every queued message, a page at a time, drops those
// that are dead (deadC2D), and counts again each device whose queue it
// changed, or whose count could not be written here before. With no
// message queued it is a single read.
func (s *Service) sweepC2D(ctx context.Context) error {
	s.mu.Lock()
	recount := make(map[string]bool, len(s.c2dStale))
	for d := range s.c2dStale {
		recount[d] = true
	}
	s.mu.Unlock()
	var failed error
	err := s.eachDoc(ctx, kindC2D, func(d store.Doc) error {
		m := &C2DMessage{}
		if err := json.Unmarshal(d.Body, m); err != nil || !deadC2D(m, s.Now()) {
			return nil // alive, or not for this pass to judge
		}
		// On the version read: one received meanwhile stays.
		switch err := s.store.Delete(ctx, kindC2D, d.ID, d.ETag); {
		case err == nil:
			device, _, _ := strings.Cut(d.ID, "/")
			recount[device] = true
		case errors.Is(err, store.ErrNotFound), errors.Is(err, store.ErrPrecondition):
		default:
			if failed == nil {
				failed = err
			}
		}
		return ctx.Err()
	})
	if err != nil {
		failed = err
	}
	for device := range recount {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		s.countC2D(ctx, device)
	}
	return failed
}
