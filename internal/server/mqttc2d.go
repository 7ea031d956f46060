package server

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/mqtt"
)

// Cloud-to-device messages over MQTT: each session claims what it sends,
// and one delivery loop per connection at a time sends what is pending.

// startC2D claims a pending C2D message for sending; false if it was sent
// on this connection and awaits its acknowledgement, as each new message's
// notification reads the whole pending queue again. A send that fails
// gives the claim back (endC2D).
func (s *session) startC2D(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.c2dSent[id] {
		return false
	}
	if s.c2dSent == nil {
		s.c2dSent = map[string]bool{}
	}
	s.c2dSent[id] = true
	return true
}

// deliverWhenUnlocked has deliver run when the first lock among msgs that
// holds at now runs out, replacing what it had scheduled before.
func (s *session) deliverWhenUnlocked(msgs []*hub.C2DMessage, now time.Time, deliver func()) {
	var first time.Time
	for _, m := range msgs {
		if now.Before(m.LockedUntil) && (first.IsZero() || m.LockedUntil.Before(first)) {
			first = m.LockedUntil
		}
	}
	if first.IsZero() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.unlockClosed {
		return
	}
	if s.unlocked != nil {
		s.unlocked.Stop()
	}
	s.unlocked = time.AfterFunc(first.Sub(now), deliver)
}

// stopUnlocked ends deliverWhenUnlocked's schedule with the connection.
func (s *session) stopUnlocked() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.unlockClosed = true
	if s.unlocked != nil {
		s.unlocked.Stop()
	}
}

func (s *session) endC2D(id string) {
	s.mu.Lock()
	delete(s.c2dSent, id)
	s.mu.Unlock()
}

// keepSentC2D forgets sent messages that are no longer pending: their
// acknowledgement removed them from the queue. (Forgetting them when the
// acknowledgement arrives instead could let a reading of the queue taken
// just before send them again.)
func (s *session) keepSentC2D(pending []*hub.C2DMessage) {
	ids := make(map[string]bool, len(pending))
	for _, m := range pending {
		ids[m.ID] = true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for id := range s.c2dSent {
		if !ids[id] {
			delete(s.c2dSent, id)
		}
	}
}

const (
	deliveryIdle = iota
	deliveryRunning
	deliveryAgain
)

// deliverSoon has deliverC2D run on a goroutine of its own, or, if it
// runs already, run once more when it ends.
func (d *DeviceEndpoint) deliverSoon(c *mqtt.Conn, s *session) {
	for {
		switch s.delivery.Load() {
		case deliveryIdle:
			if s.delivery.CompareAndSwap(deliveryIdle, deliveryRunning) {
				go d.deliverUntilDone(c, s)
				return
			}
		case deliveryRunning:
			if s.delivery.CompareAndSwap(deliveryRunning, deliveryAgain) {
				return
			}
		default: // asked for again already
			return
		}
	}
}

func (d *DeviceEndpoint) deliverUntilDone(c *mqtt.Conn, s *session) {
	for {
		d.deliverC2D(c, s)
		if s.delivery.CompareAndSwap(deliveryRunning, deliveryIdle) {
			return
		}
		s.delivery.Store(deliveryRunning) // it was asked for again
	}
}

// deliverC2D sends the device's pending messages at QoS 1; each is removed
// from the queue when the device acknowledges it, and each sending counts
// as a delivery.
func (d *DeviceEndpoint) deliverC2D(c *mqtt.Conn, s *session) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	msgs, err := d.hub.PendingC2D(ctx, s.ref.Device)
	if err != nil {
		slog.Warn("reading cloud-to-device messages", "device", s.ref.Device, "error", err)
		return
	}
	s.keepSentC2D(msgs)
	now := d.hub.Now()
	s.deliverWhenUnlocked(msgs, now, func() { d.deliverSoon(c, s) })
	for _, m := range msgs {
		if now.Before(m.LockedUntil) {
			continue // received over HTTPS, being worked on
		}
		if !s.startC2D(m.ID) {
			continue // sent on this connection, its acknowledgement awaited
		}
		id := m.ID
		topic := s.own() + "messages/devicebound/" + m.PropertyBag(s.ref.Device)
		err := c.Send(topic, m.Body, 1, func(err error) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err == nil {
				if err := d.hub.CompleteC2D(ctx, id); err != nil { // it stays queued, and comes again
					slog.Warn("removing a delivered cloud-to-device message", "device", s.ref.Device, "error", err)
				}
				return
			}
			// Delivered, but the connection ended before its PUBACK: a
			// message no connection acknowledges is dropped after as many
			// deliveries as over HTTPS. (An acknowledged one is gone, so
			// only these need counting.)
			if err := d.hub.DeliveredC2D(ctx, id); err != nil {
				slog.Warn("counting a delivery of a cloud-to-device message", "device", s.ref.Device, "messageId", m.MessageID, "error", err)
			}
		})
		if errors.Is(err, mqtt.ErrTopicName) {
			// Never deliverable (queued before SendC2D bounded the
			// properties): dropped, as the hosted hub dead-letters, so
			// that it does not hold up the messages behind it.
			slog.Warn("dropping a cloud-to-device message that cannot become an MQTT topic", "device", s.ref.Device, "messageId", m.MessageID, "error", err)
			if err := d.hub.CompleteC2D(ctx, id); err != nil {
				slog.Warn("removing an undeliverable cloud-to-device message", "device", s.ref.Device, "error", err)
			}
			s.endC2D(id)
			continue
		}
		if err != nil {
			s.endC2D(id)
			if !errors.Is(err, mqtt.ErrNotSubscribed) { // unsubscribed: it waits for the next SUBSCRIBE
				slog.Warn("delivering a cloud-to-device message", "device", s.ref.Device, "messageId", m.MessageID, "error", err)
			}
			return
		}
	}
}
