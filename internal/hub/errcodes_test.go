package hub

import (
	"context"
	"testing"

	"github.com/hatchery/hatchery/internal/azerr"
)

// The hub's errors carry IoT Hub's numbers, by which the SDKs tell them
// apart (their ErrorCode): a clash of two, or a number of another error,
// makes a client handle one as the other.
func TestErrorCodesAreIoTHubs(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	newIdentity(t, s, Ref{Device: "d"})
	newIdentity(t, s, Ref{Device: "d", Module: "m"})
	for _, c := range []struct {
		name string
		err  error
		code int
	}{
		{"DeviceAlreadyExists", func() error { _, err := s.PutIdentity(ctx, Ref{Device: "d"}, "", &Device{}); return err }(), 409001},
		{"ModuleAlreadyExistsOnDevice", func() error { _, err := s.PutIdentity(ctx, Ref{Device: "d", Module: "m"}, "", &Device{}); return err }(), 409301},
		{"PreconditionFailed", func() error { _, err := s.PutIdentity(ctx, Ref{Device: "d"}, "stale", &Device{}); return err }(), 412001},
		{"DeviceMessageLockLost", s.SettleC2D(ctx, "d", "gone.lock", false), 412002},
		{"ArgumentInvalid", func() error { _, err := s.GetIdentity(ctx, Ref{Device: "a b"}); return err }(), 400004},
		{"JobNotFound", func() error { _, err := s.GetJob(ctx, "nojob"); return err }(), 404002},
		{"MessageTooLarge", s.SendEvents(ctx, Ref{Device: "d"}, []Message{{Body: make([]byte, MaxMessageSize+1)}}), 413001},
	} {
		if e := azerr.As(c.err); e.Code != c.code || e.Name != c.name {
			t.Errorf("%s: %d %s (%v), want %d", c.name, e.Code, e.Name, c.err, c.code)
		}
	}
}
