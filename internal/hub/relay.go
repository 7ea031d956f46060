package hub

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"log/slog"
)

// Replicas on one database each hold some devices' connections. What one
// replica does that a connection elsewhere must act on — cutting off an
// identity revoked, or connected again, here; a new cloud-to-device
// message; a desired-property change; a direct method — it also publishes
// on the store's relay, and every replica acts on what the others publish.
// A desired-property change travels as a signal to read the twin
// (FollowDesired), a direct method as a call document that the
// connection's replica answers (methodrelay.go).

// relayed is a signal between replicas.
type relayed struct {
	Origin string `json:"o"`           // the replica that sent it, which ignores its own
	Kind   string `json:"k"`           // "revoke", "connect", "c2d", "desired", "call", "answered" or "configurations"
	Device string `json:"d"`           // device ID
	Module string `json:"m,omitempty"` // a module; for revoke, "" is the device and its modules
	Call   string `json:"c,omitempty"` // for call and answered: the method call's ID
}

// newOrigin names this replica in its relay messages.
func newOrigin() string { return rand.Text() }

// publish tells the other replicas, if there are any; a failure only costs
// the signal, so it is logged.
func (s *Service) publish(kind string, r Ref) { s.publishCall(kind, r, "") }

func (s *Service) publishCall(kind string, r Ref, call string) {
	if s.relay == nil {
		return
	}
	msg, _ := json.Marshal(relayed{Origin: s.origin, Kind: kind, Device: r.Device, Module: r.Module, Call: call})
	if err := s.relay.Publish(context.Background(), string(msg)); err != nil {
		slog.Warn("telling the other replicas", "kind", kind, "identity", r.String(), "error", err)
	}
}

// RelaySignals acts on the other replicas' signals until ctx ends; without
// a relay (SQLite: one server) it returns at once.
func (s *Service) RelaySignals(ctx context.Context) {
	if s.relay == nil {
		return
	}
	s.relay.Subscribe(ctx, func(msg string) {
		var m relayed
		if err := json.Unmarshal([]byte(msg), &m); err != nil || m.Origin == s.origin {
			return
		}
		switch r := (Ref{Device: m.Device, Module: m.Module}); m.Kind {
		case "revoke":
			s.revokeHere(r)
		case "connect":
			s.connectedElsewhere(r)
		case "c2d":
			s.c2dArrivedHere(m.Device)
		case "call":
			go s.answerCall(r, m.Call)
		case "answered":
			s.callAnswered(m.Call)
		case "configurations":
			s.configurationsChanged()
		case "desired":
			for _, f := range s.desiredWatchers.get(r) {
				(*f)(desiredChange{}) // read it: the patch itself is too large to relay
			}
		}
	}, func() { s.catchUp(ctx) })
}

// catchUp does, from the store, what any signal the relay lost would have
// made this replica do: connections whose records say they should have
// ended end, and every connection looks for desired changes and messages.
// Callers waiting for a relayed method look at its call again.
func (s *Service) catchUp(ctx context.Context) {
	slog.Debug("relay between replicas: listening; checking connections against the store")
	for _, f := range s.desiredWatchers.all() {
		(*f)(desiredChange{})
	}
	for _, f := range s.c2dWatchers.all() {
		(*f)()
	}
	s.mu.Lock()
	for id := range s.calls {
		s.wake(id)
	}
	s.mu.Unlock()
	for _, c := range s.conns.all() {
		if ctx.Err() != nil {
			return
		}
		s.recheck(ctx, *c)
	}
}
