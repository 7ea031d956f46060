package hub

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"log/slog"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/store"
)

// A direct method for a device connected to another replica travels as a
// document, the call, which the replica holding the connection answers in
// place; relay signals say "call" and "answered" (payloads of up to 128 KiB
// do not fit a signal).
const kindMethodCall = "hub.methodcall"

type methodCall struct {
	Ref     Ref             `json:"ref"`
	Name    string          `json:"name"`
	Payload json.RawMessage `json:"payload"`
	Timeout time.Duration   `json:"timeout"`
	// The answer, once there is one: the device's, or why there is none.
	Answered bool            `json:"answered,omitempty"`
	Status   int             `json:"status,omitempty"`
	Response json.RawMessage `json:"response,omitempty"`
	Error    *azerr.Error    `json:"error,omitempty"`
}

// invokeElsewhere asks the replica holding r's connection to call the
// method, and waits for its answer until ctx ends.
func (s *Service) invokeElsewhere(ctx context.Context, r Ref, name string, payload json.RawMessage, timeout time.Duration) (int, json.RawMessage, error) {
	id := rand.Text()
	body, _ := json.Marshal(methodCall{Ref: r, Name: name, Payload: payload, Timeout: timeout})
	answered := make(chan struct{}, 1)
	s.mu.Lock()
	s.calls[id] = answered
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.calls, id)
		s.mu.Unlock()
		_ = s.store.Delete(context.Background(), kindMethodCall, id, "") // an answer after this finds no call
	}()
	if _, err := s.store.Create(ctx, store.Doc{Kind: kindMethodCall, ID: id, Body: body}); err != nil {
		return 0, nil, err
	}
	s.publishCall("call", r, id)
	var c methodCall
	for !c.Answered { // woken by "answered", or to look again after the relay lost signals
		select {
		case <-answered:
		case <-ctx.Done():
			return 0, nil, ctx.Err()
		}
		d, err := s.store.Get(ctx, kindMethodCall, id)
		if err != nil {
			return 0, nil, err
		}
		if err := json.Unmarshal(d.Body, &c); err != nil {
			return 0, nil, err
		}
	}
	if c.Error != nil {
		return 0, nil, c.Error
	}
	return c.Status, c.Response, nil
}

// answerCall calls a relayed method if this replica holds the connection,
// and writes the answer into the call; a connection here that has not
// subscribed to methods (yet) answers DeviceNotOnline at once, rather than
// leaving the caller to wait for its timeout.
func (s *Service) answerCall(r Ref, id string) {
	s.mu.Lock()
	reg := s.methods[r]
	s.mu.Unlock()
	if reg == nil && !s.holds(r) {
		return // the connection is elsewhere
	}
	ctx := context.Background()
	d, err := s.store.Get(ctx, kindMethodCall, id)
	if err != nil {
		return // the caller gave up
	}
	var c methodCall
	if err := json.Unmarshal(d.Body, &c); err != nil {
		return
	}
	c.Answered = true
	if reg == nil {
		c.Error = notOnline(r)
	} else {
		callCtx, cancel := context.WithTimeout(ctx, c.Timeout)
		defer cancel()
		var err error
		c.Status, c.Response, err = (*reg)(callCtx, c.Name, c.Payload)
		if err == nil { // checked here: an answer that is not JSON cannot be stored as one
			err = checkAnswer(r, c.Name, c.Response)
		}
		if err != nil {
			c.Status, c.Response, c.Error = 0, nil, methodError(r, c.Name, c.Timeout, err)
		}
	}
	body, err := json.Marshal(c)
	if err != nil {
		slog.Warn("answering a relayed direct method", "identity", r.String(), "error", err)
		return
	}
	if _, err := s.store.Put(ctx, store.Doc{Kind: kindMethodCall, ID: id, Body: body}, "*"); err != nil {
		if !errors.Is(err, store.ErrNotFound) {
			slog.Warn("answering a relayed direct method", "identity", r.String(), "error", err)
		}
		return
	}
	s.publishCall("answered", r, id)
}

// holds says whether r's connection is on this replica.
func (s *Service) holds(r Ref) bool {
	for _, c := range s.conns.get(r.Device) {
		if (*c).ref == r {
			return true
		}
	}
	return false
}

// callAnswered wakes the caller waiting here for call id, if any.
func (s *Service) callAnswered(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.wake(id)
}

// wake tells the caller waiting for call id to read it; s.mu is held.
func (s *Service) wake(id string) {
	select {
	case s.calls[id] <- struct{}{}:
	default: // already woken, or nobody waits (a nil channel)
	}
}
