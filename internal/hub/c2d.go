package hub

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/store"
)

const (
	kindC2D = "hub.c2d"
	// maxC2DQueue is the hosted hub's limit of pending messages per device.
	maxC2DQueue = 50
	// maxC2DSize is the hosted hub's limit of a message's body.
	maxC2DSize = 64 << 10
	c2dTTL     = time.Hour
)

// C2DMessage is a cloud-to-device message waiting for its device.
type C2DMessage struct {
	ID         string            `json:"id"` // store ID: device/sortable-time
	MessageID  string            `json:"messageId"`
	Properties map[string]string `json:"properties,omitempty"`
	Body       []byte            `json:"body"`
	Enqueued   time.Time         `json:"enqueuedTime"`
	Expiry     time.Time         `json:"expiryTime"`
}

// SendC2D queues a message for a device and tells its connection, if any.
func (s *Service) SendC2D(ctx context.Context, device string, props map[string]string, body []byte) (*C2DMessage, error) {
	if len(body) > maxC2DSize {
		return nil, azerr.New(413001, "MessageTooLarge", "the message body is %d bytes: cloud-to-device messages carry at most %d", len(body), maxC2DSize)
	}
	if _, _, err := s.load(ctx, Ref{Device: device}); err != nil {
		return nil, err
	}
	pending, err := s.PendingC2D(ctx, device)
	if err != nil {
		return nil, err
	}
	if len(pending) >= maxC2DQueue {
		return nil, azerr.New(403004, "DeviceMaximumQueueDepthExceeded",
			"device %q already has %d cloud-to-device messages waiting: it must receive some first", device, maxC2DQueue)
	}
	now := s.Now().UTC()
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	m := &C2DMessage{
		ID:        fmt.Sprintf("%s/%020d%s", device, now.UnixNano(), hex.EncodeToString(rnd[:])),
		MessageID: props["messageId"], Properties: props, Body: body, Enqueued: now, Expiry: now.Add(c2dTTL),
	}
	if m.MessageID == "" {
		m.MessageID = hex.EncodeToString(rnd[:]) + fmt.Sprint(now.UnixNano())
	}
	doc, _ := json.Marshal(m)
	if _, err := s.store.Create(ctx, store.Doc{Kind: kindC2D, ID: m.ID, Body: doc}); err != nil {
		return nil, err
	}
	s.c2dArrivedHere(device)
	s.publish("c2d", Ref{Device: device})
	return m, nil
}

// c2dArrivedHere wakes this replica's connection of device, if it has it.
func (s *Service) c2dArrivedHere(device string) {
	for _, f := range s.c2dWatchers.get(device) {
		(*f)()
	}
}

// PendingC2D returns a device's unexpired messages, oldest first; expired
// ones are dropped.
func (s *Service) PendingC2D(ctx context.Context, device string) ([]*C2DMessage, error) {
	docs, err := s.store.List(ctx, kindC2D, device+"/", maxC2DQueue+1)
	if err != nil {
		return nil, err
	}
	now := s.Now()
	var out []*C2DMessage
	for _, d := range docs {
		if len(d.ID) <= len(device) || d.ID[:len(device)+1] != device+"/" {
			break
		}
		m := &C2DMessage{}
		if err := json.Unmarshal(d.Body, m); err != nil {
			return nil, err
		}
		if now.After(m.Expiry) {
			_ = s.store.Delete(ctx, kindC2D, d.ID, "")
			continue
		}
		out = append(out, m)
	}
	return out, nil
}

// CompleteC2D removes a delivered message.
func (s *Service) CompleteC2D(ctx context.Context, id string) error {
	if err := s.store.Delete(ctx, kindC2D, id, ""); err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	return nil
}

// WatchC2D calls f whenever a message is queued for device, until cancel.
func (s *Service) WatchC2D(device string, f func()) (cancel func()) {
	return s.c2dWatchers.add(device, f)
}
