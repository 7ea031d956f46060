package hub

import (
	"context"
	"encoding/json"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/store"
)

// interleavedStore runs meanwhile once, just before the first write
// (Create, Put, Delete or DeleteTree) of the document kind/id: another
// client's write landing between this one's read and its write.
type interleavedStore struct {
	store.Store
	kind, id  string
	meanwhile func()
	ran       atomic.Bool
}

func (s *interleavedStore) writing(kind, id string) {
	// Not sync.Once: meanwhile writes the same document through this store.
	if kind == s.kind && id == s.id && s.ran.CompareAndSwap(false, true) {
		s.meanwhile()
	}
}

func (s *interleavedStore) Create(ctx context.Context, d store.Doc) (store.Doc, error) {
	s.writing(d.Kind, d.ID)
	return s.Store.Create(ctx, d)
}

func (s *interleavedStore) Put(ctx context.Context, d store.Doc, ifMatch string) (store.Doc, error) {
	s.writing(d.Kind, d.ID)
	return s.Store.Put(ctx, d, ifMatch)
}

func (s *interleavedStore) Delete(ctx context.Context, kind, id, ifMatch string) error {
	s.writing(kind, id)
	return s.Store.Delete(ctx, kind, id, ifMatch)
}

func (s *interleavedStore) DeleteTree(ctx context.Context, kind, id, ifMatch string, under ...string) ([]store.Doc, error) {
	s.writing(kind, id)
	return s.Store.DeleteTree(ctx, kind, id, ifMatch, under...)
}

func raceConfig() *Configuration {
	return &Configuration{TargetCondition: "*",
		Content: ConfigContent{DeviceContent: map[string]json.RawMessage{"properties.desired.fw": json.RawMessage(`"2.0"`)}}}
}

// TestConcurrentWritesAnswerAsAzure has a second client write the same
// identity or configuration between a request's read and its write: the
// request that loses answers what Azure answers (404, 409, 412), never a
// store error, which would be a 500 "internal server error".
func TestConcurrentWritesAnswerAsAzure(t *testing.T) {
	ctx := context.Background()
	dev, mod := Ref{Device: "d"}, Ref{Device: "d", Module: "m"}
	putConfig := func(s *Service) error { _, err := s.PutConfiguration(ctx, "fw", "", raceConfig()); return err }
	for _, tc := range []struct {
		name      string
		kind, id  string // the document the two race to write
		meanwhile func(s *Service) error
		request   func(s *Service, etag string) error
		want      string // the losing request's error name; "" for success
	}{
		{"two deletes of a module", kindModule, mod.id(),
			func(s *Service) error { return s.DeleteIdentity(ctx, mod, "*") },
			func(s *Service, _ string) error { return s.DeleteIdentity(ctx, mod, "*") },
			"ModuleNotFound"},
		{"two deletes of a device", kindDevice, dev.id(),
			func(s *Service) error { return s.DeleteIdentity(ctx, dev, "*") },
			func(s *Service, _ string) error { return s.DeleteIdentity(ctx, dev, "*") },
			"DeviceNotFound"},
		{"a twin update of a device being deleted", kindDevice, dev.id(),
			func(s *Service) error { return s.DeleteIdentity(ctx, dev, "*") },
			func(s *Service, _ string) error {
				_, err := s.UpdateTwin(ctx, dev, "", &TwinPatch{Tags: map[string]any{"site": "lab"}}, false)
				return err
			},
			"DeviceNotFound"},
		{"two deletes of a configuration", kindConfiguration, "fw",
			func(s *Service) error { return s.DeleteConfiguration(ctx, "fw", "*") },
			func(s *Service, _ string) error { return s.DeleteConfiguration(ctx, "fw", "*") },
			"ConfigurationNotFound"},
		{"two creates of a configuration", kindConfiguration, "new",
			func(s *Service) error { _, err := s.PutConfiguration(ctx, "new", "", raceConfig()); return err },
			func(s *Service, _ string) error {
				_, err := s.PutConfiguration(ctx, "new", "", raceConfig())
				return err
			},
			"ConfigurationAlreadyExists"},
		{"two updates of a configuration on one etag", kindConfiguration, "fw",
			func(s *Service) error { _, err := s.PutConfiguration(ctx, "fw", "*", raceConfig()); return err },
			func(s *Service, etag string) error {
				_, err := s.PutConfiguration(ctx, "fw", etag, raceConfig())
				return err
			},
			"PreconditionFailed"},
		{"an update of a configuration meanwhile deleted", kindConfiguration, "fw",
			func(s *Service) error { return s.DeleteConfiguration(ctx, "fw", "*") },
			func(s *Service, _ string) error {
				_, err := s.PutConfiguration(ctx, "fw", "*", raceConfig())
				return err
			},
			""}, // created again, as a PUT "*" finding none does
		{"an update on an etag of a configuration meanwhile deleted", kindConfiguration, "fw",
			func(s *Service) error { return s.DeleteConfiguration(ctx, "fw", "*") },
			func(s *Service, etag string) error {
				_, err := s.PutConfiguration(ctx, "fw", etag, raceConfig())
				return err
			},
			"ConfigurationNotFound"}, // that version is gone: not brought back
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := sqliteHub(t)
			newIdentity(t, s, dev)
			newIdentity(t, s, mod)
			if err := putConfig(s); err != nil {
				t.Fatal(err)
			}
			cfg, err := s.GetConfiguration(ctx, "fw")
			if err != nil {
				t.Fatal(err)
			}
			is := &interleavedStore{Store: s.store, kind: tc.kind, id: tc.id}
			is.meanwhile = func() {
				if err := tc.meanwhile(s); err != nil {
					t.Errorf("the other client's write: %v", err)
				}
			}
			s.store = is
			err = tc.request(s, cfg.ETag)
			if !is.ran.Load() {
				t.Fatal("the other client's write never ran: the test does not race what it names")
			}
			var e *azerr.Error
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("got %v, want success", err)
			case tc.want == "":
			case !errors.As(err, &e):
				t.Fatalf("got %v (a 500 internal server error), want %s", err, tc.want)
			case e.Name != tc.want || e.Status() >= 500:
				t.Fatalf("got %d %s %q, want %s", e.Status(), e.Name, e.Message, tc.want)
			}
		})
	}
}
