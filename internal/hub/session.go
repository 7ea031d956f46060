package hub

import (
	"context"
	"slices"
)

// Subscription is a topic filter of a persistent session, with the QoS
// granted.
type Subscription struct {
	Filter string `json:"filter"`
	QoS    byte   `json:"qos"`
}

// KeepSession records what r's persistent session is subscribed to (nil:
// it has none), for its next connection on any replica to resume, as the
// hosted hub keeps the sessions of devices connecting with CleanSession 0:
// the SDKs do not subscribe again when they reconnect to renew a token.
// It writes only what changed.
func (s *Service) KeepSession(ctx context.Context, r Ref, subs []Subscription) error {
	_, err := s.update(ctx, r, func(rec *record) error {
		if slices.Equal(rec.Session, subs) {
			return errUnchanged
		}
		rec.Session = slices.Clone(subs)
		return nil
	})
	return err
}
