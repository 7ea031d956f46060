package hub

import (
	"context"
	"crypto/rand"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
)

// connection is a device's or module's live connection on this replica.
type connection struct {
	ref  Ref
	id   string // its name in the record: this replica's origin, ".", a random part
	drop func() // ends it

	mu    sync.Mutex
	creds *Authentication // what the record held once it was recorded connected; nil before
}

// Attach records r connected through this replica, and calls drop when the
// connection must end: r, or the device of a module, is disabled, deleted
// or given new keys; r connects again through another replica, as a new
// connection replaces the old one in the hosted hub; or the other replicas
// took this one for dead. detach records r disconnected, unless it has
// connected again since (here or elsewhere).
func (s *Service) Attach(ctx context.Context, r Ref, drop func()) (detach func()) {
	c := &connection{ref: r, id: s.origin + "." + rand.Text(), drop: drop}
	cancel := s.conns.add(r.Device, c)
	if rec := s.setConnected(ctx, r, c.id, true); rec != nil {
		c.mu.Lock()
		c.creds = &rec.Device.Authentication
		c.mu.Unlock()
	}
	return func() {
		cancel()
		ctx, done := context.WithTimeout(context.Background(), 10*time.Second)
		defer done()
		s.setConnected(ctx, r, c.id, false)
	}
}

// revoke ends the access of r, on every replica: of a module, or of a
// device and its modules.
func (s *Service) revoke(r Ref) {
	s.revokeHere(r)
	s.publish("revoke", r)
}

func (s *Service) revokeHere(r Ref) {
	for _, c := range s.conns.get(r.Device) {
		if r.Module == "" || r.Module == (*c).ref.Module {
			(*c).drop()
		}
	}
}

// connectedElsewhere ends this replica's connections of r, which has
// connected through another.
func (s *Service) connectedElsewhere(r Ref) {
	for _, c := range s.conns.get(r.Device) {
		if (*c).ref == r {
			(*c).drop()
		}
	}
}

// dropAll ends every connection of this replica.
func (s *Service) dropAll() {
	for _, c := range s.conns.all() {
		(*c).drop()
	}
}

// recheck ends c if its record says it should have been: what revoke and
// connectedElsewhere do on a signal, from the record, for signals that
// may have been lost.
func (s *Service) recheck(ctx context.Context, c *connection) {
	c.mu.Lock()
	creds := c.creds
	c.mu.Unlock()
	if creds == nil {
		return // still being recorded
	}
	rec, _, err := s.load(ctx, c.ref)
	if err == nil && c.ref.Module != "" {
		var dev *record
		if dev, _, err = s.load(ctx, Ref{Device: c.ref.Device}); err == nil && dev.Device.Status == "disabled" {
			c.drop()
			return
		}
	}
	switch {
	case azerr.HasStatus(err, 404):
		c.drop()
	case err != nil:
		slog.Warn("checking a connection against its record", "identity", c.ref.String(), "error", err)
	case rec.Device.Status == "disabled", !sameCredentials(*creds, rec.Device.Authentication), rec.Connection != c.id:
		c.drop()
	}
}

// setConnected records r's connection state and returns the record, or nil
// when an older connection closed or the record could not be written.
func (s *Service) setConnected(ctx context.Context, r Ref, connection string, connected bool) *record {
	now := s.Now().UTC()
	state := "Disconnected"
	if connected {
		state = "Connected"
	}
	rec, err := s.update(ctx, r, func(rec *record) error {
		switch {
		case connected:
			rec.Connection = connection
		case rec.Connection != connection:
			return errNewerConnection
		default:
			rec.Connection = ""
		}
		rec.Device.ConnectionState, rec.Device.ConnectionStateUpdatedTime, rec.Device.LastActivityTime = state, now, now
		return nil
	})
	if err != nil {
		if !errors.Is(err, errNewerConnection) {
			slog.Warn("recording connection state", "identity", r.String(), "error", err)
		}
		return nil
	}
	if connected {
		s.publish("connect", r)
	}
	return rec
}

// errNewerConnection leaves the state of a device whose latest connection,
// here or on another replica, is not the one that closed.
var errNewerConnection = errors.New("the device has connected again since")
