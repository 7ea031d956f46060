package hub

import (
	"context"
	"testing"
	"time"
)

// A device's messages record its lastActivityTime, at most once per
// activityEvery, whether or not it is connected (HTTPS devices never are).
func TestMessagesRecordActivity(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	r := Ref{Device: "d"}
	newIdentity(t, s, r)
	now := time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)
	s.Now = func() time.Time { return now }
	lastActivity := func() time.Time {
		t.Helper()
		d, err := s.GetIdentity(ctx, r)
		if err != nil {
			t.Fatal(err)
		}
		return d.LastActivityTime
	}
	if _, err := s.SendEvent(ctx, r, nil, []byte("1")); err != nil {
		t.Fatal(err)
	}
	if got := lastActivity(); !got.Equal(now) {
		t.Fatalf("after a message: %s, want %s", got, now)
	}
	first := now
	now = now.Add(time.Minute)
	if err := s.SendEvents(ctx, r, []Message{{Body: []byte("2")}}); err != nil {
		t.Fatal(err)
	}
	if got := lastActivity(); !got.Equal(first) {
		t.Fatalf("a minute later: %s, want it left at %s", got, first)
	}
	now = now.Add(activityEvery)
	if err := s.SendEvents(ctx, r, []Message{{Body: []byte("3")}}); err != nil {
		t.Fatal(err)
	}
	if got := lastActivity(); !got.Equal(now) {
		t.Fatalf("%s later: %s, want %s", activityEvery, got, now)
	}
}
