package hub

import (
	"context"
	"crypto/rand"
	"errors"
	"log/slog"
	"maps"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/store"
)

// connection is a device's or module's live connection on this replica.
type connection struct {
	ref   Ref
	id    string // its name in the record: this replica's origin, ".", a random part
	grant Grant  // what it was authenticated against
	drop  func() // ends it
}

// Attach records r connected through this replica, authenticated against
// g, and calls drop when the connection must end: r, or the device of a
// module, is disabled, deleted or given new keys; r connects again through
// another replica, as a new connection replaces the old one in the hosted
// hub; or the other replicas took this one for dead. detach records r
// disconnected, unless it has connected again since (here or elsewhere).
// The connection also ends when the token or certificate it presented
// expires, as in the hosted hub: clients connect again with a new one.
// An error (the credentials changed since g, or the record could not be
// written) leaves r unconnected.
func (s *Service) Attach(ctx context.Context, r Ref, g Grant, drop func()) (detach func(), err error) {
	c := &connection{ref: r, id: s.origin + "." + rand.Text(), grant: g, drop: drop}
	cancel := s.conns.add(r.Device, c)
	expiry := time.AfterFunc(g.until.Sub(s.Now()), func() {
		slog.Debug("a connection's credentials expired", "identity", r.String())
		drop()
	})
	detach = func() {
		expiry.Stop()
		cancel()
		ctx, done := context.WithTimeout(context.Background(), 10*time.Second)
		defer done()
		if err := s.setConnected(ctx, r, c.id, false, "", nil); err != nil && !errors.Is(err, errNewerConnection) {
			s.mu.Lock()
			s.unrecorded[r] = c.id // for the next beat to record
			s.mu.Unlock()
		}
	}
	// The record is written as read after the watch above was set: a
	// change between the authentication and the watch, which had nobody to
	// tell, is seen there, and refuses the connection.
	if err := s.setConnected(ctx, r, c.id, true, g.ModelID, func(rec *record) error {
		dev := rec
		if r.Module != "" {
			var err error
			if dev, _, err = s.load(ctx, Ref{Device: r.Device}); err != nil {
				return err
			}
		}
		return c.admittedBy(dev, rec)
	}); err != nil {
		expiry.Stop()
		cancel()
		if azerr.HasStatus(err, 404) { // deleted since it authenticated
			err = azerr.Unauthorized("%v", err)
		}
		return nil, err
	}
	return detach, nil
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

// recheck ends c if the records say it should have ended: what revoke and
// connectedElsewhere do on a signal, from the store, for signals that may
// have been lost.
func (s *Service) recheck(ctx context.Context, c *connection) {
	switch err := s.stillGranted(ctx, c); {
	case err == nil:
	case errors.Is(err, errNewerConnection), azerr.HasStatus(err, 401):
		c.drop()
	default:
		slog.Warn("checking a connection against its record", "identity", c.ref.String(), "error", err)
	}
}

// stillGranted is nil if c's records still admit it (admittedBy) and c is
// the identity's latest connection. Else it is a 401, errNewerConnection,
// or why the records could not be read.
func (s *Service) stillGranted(ctx context.Context, c *connection) error {
	dev, id, err := s.connecting(ctx, c.ref)
	if err != nil {
		return err
	}
	if err := c.admittedBy(dev, id); err != nil {
		return err
	}
	if id.Connection != c.id {
		return errNewerConnection
	}
	return nil
}

// admittedBy is nil if dev and id, c's device and identity (the same for a
// device), admit it: the device is enabled, and both have the credentials
// c was authenticated against.
func (c *connection) admittedBy(dev, id *record) error {
	switch {
	case enabled(dev) != nil:
		return enabled(dev)
	case !sameCredentials(dev.Device.Authentication, c.grant.device), !sameCredentials(id.Device.Authentication, c.grant.identity):
		return azerr.Unauthorized("%s: the credentials changed", c.ref)
	}
	return nil
}

// setConnected records r's connection state, and the model a connecting
// device announced, if any; a connection is recorded only if admit, given
// the record as read, says nil. Recording an older connection closed is
// errNewerConnection, and changes nothing.
func (s *Service) setConnected(ctx context.Context, r Ref, connection string, connected bool, modelID string, admit func(*record) error) error {
	now := s.Now().UTC()
	state := "Disconnected"
	if connected {
		state = "Connected"
	}
	_, err := s.update(ctx, r, func(rec *record) error {
		switch {
		case connected:
			if err := admit(rec); err != nil {
				return err
			}
			rec.Connection = connection
			if modelID != "" {
				rec.ModelID = modelID
			}
		case rec.Connection != connection:
			return errNewerConnection
		default:
			rec.Connection = ""
		}
		rec.Device.ConnectionState, rec.Device.ConnectionStateUpdatedTime, rec.Device.LastActivityTime = state, now, now
		return nil
	})
	if err != nil {
		if !errors.Is(err, errNewerConnection) && !azerr.HasStatus(err, 401) && !azerr.HasStatus(err, 404) {
			slog.Warn("recording connection state", "identity", r.String(), "error", err)
		}
		return err
	}
	if connected {
		s.publish("connect", r)
	}
	return nil
}

// recordClosed records disconnected the connections whose end could not be
// recorded when they closed (the database out of reach, or full), which
// would otherwise stay "Connected" until the device connects again. It
// works for at most budget, and stops at a database still out of reach,
// leaving the rest for the next call; a record that cannot be written for
// another reason is given up, with the reason logged.
func (s *Service) recordClosed(ctx context.Context, budget time.Duration) {
	s.mu.Lock()
	pending := maps.Clone(s.unrecorded)
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()
	for r, id := range pending {
		err := s.setConnected(ctx, r, id, false, "", nil)
		if ctx.Err() != nil || store.Unavailable(err) || errors.Is(err, store.ErrFull) {
			return
		}
		if err != nil && !errors.Is(err, errNewerConnection) && !azerr.HasStatus(err, 404) {
			slog.Warn("giving up recording a closed connection", "identity", r.String(), "error", err)
		}
		s.mu.Lock()
		if s.unrecorded[r] == id {
			delete(s.unrecorded, r)
		}
		s.mu.Unlock()
	}
}

// errNewerConnection leaves the state of a device whose latest connection,
// here or on another replica, is not the one that closed.
var errNewerConnection = errors.New("the device has connected again since")
