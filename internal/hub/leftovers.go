package hub

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/hatchery/hatchery/internal/store"
)

// leftoversSwept is the settings' field that records the sweep of
// leftovers; the rest of the settings are kept as they are when it is set.
const leftoversSwept = "leftoversSwept"

// SweepLeftovers removes, once per database, the modules and queued
// cloud-to-device messages of devices that no longer exist: deletes of
// earlier versions could stop between a device and what it held, and a
// device created again under its ID would find them. Deletes are atomic
// now, so once the settings record the sweep no later start walks again.
// The server runs it before it serves, so that no device is created under
// a leftover's ID while the sweep has not yet passed it.
func (s *Service) SweepLeftovers(ctx context.Context) error {
	if err := s.sweepLeftovers(ctx); err != nil {
		return fmt.Errorf("removing what deletes of devices left behind (once, after an upgrade): %w", err)
	}
	return nil
}

func (s *Service) sweepLeftovers(ctx context.Context) error {
	if done, _, _, err := s.leftoversSwept(ctx); err != nil || done {
		return err
	}
	counts := map[string]int{}
	for _, kind := range []string{kindModule, kindC2D} {
		// IDs come in order, so a device's documents are together: once
		// it exists, the rest of them are its. While it does not, it is
		// asked again for each: a device created since (by a replica of an
		// earlier version serving meanwhile) owns those listed after.
		var device string
		var exists bool
		err := s.eachDoc(ctx, kind, func(d store.Doc) error {
			dev, rest, _ := strings.Cut(d.ID, "/")
			if dev != device {
				device, exists = dev, false
			}
			if exists {
				return nil
			}
			switch _, err := s.store.Get(ctx, kindDevice, dev); {
			case err == nil:
				exists = true
				return nil
			case !errors.Is(err, store.ErrNotFound):
				return err
			}
			// Under the etag read: a document written since is not a leftover.
			switch err := s.store.Delete(ctx, kind, d.ID, d.ETag); {
			case err == nil:
				counts[kind]++
				if kind == kindModule {
					s.revoke(Ref{Device: dev, Module: rest})
				}
			case errors.Is(err, store.ErrNotFound), errors.Is(err, store.ErrPrecondition):
			default:
				return err
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("going through %s documents: %w", kind, err)
		}
	}
	if counts[kindModule]+counts[kindC2D] > 0 {
		slog.Info("removed what deleted devices left behind", "modules", counts[kindModule], "messages", counts[kindC2D])
	}
	// Replicas sweeping at once each record it; a write that finds the
	// settings changed reads them again.
	_, err := modify(ctx, s.store, kindSettings, "hub", "the hub settings",
		func() (*map[string]json.RawMessage, string, error) {
			_, settings, etag, err := s.leftoversSwept(ctx)
			return &settings, etag, err
		},
		func(settings *map[string]json.RawMessage) error {
			if swept((*settings)[leftoversSwept]) {
				return errUnchanged
			}
			(*settings)[leftoversSwept] = json.RawMessage("true")
			return nil
		})
	return err
}

// leftoversSwept reads the settings: whether they record the sweep, and
// their fields and etag to record it under.
func (s *Service) leftoversSwept(ctx context.Context) (bool, map[string]json.RawMessage, string, error) {
	d, err := s.store.Get(ctx, kindSettings, "hub")
	if err != nil {
		return false, nil, "", fmt.Errorf("reading the hub settings: %w", err)
	}
	var settings map[string]json.RawMessage
	if err := json.Unmarshal(d.Body, &settings); err != nil {
		return false, nil, "", fmt.Errorf("reading the hub settings: %w", err)
	}
	return swept(settings[leftoversSwept]), settings, d.ETag, nil
}

// swept is whether the settings' leftoversSwept field records the sweep.
func swept(field json.RawMessage) bool {
	var done bool
	_ = json.Unmarshal(field, &done)
	return done
}
