package hub

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// activityEvery is how stale a device's lastActivityTime may get while it
// sends: recording every message would double the writes of telemetry.
const activityEvery = 5 * time.Minute

// activity remembers when this replica last recorded each device's
// activity.
type activity struct {
	mu   sync.Mutex
	last map[string]time.Time
}

// due says whether device's activity at now is to be recorded, and
// counts it recorded.
func (a *activity) due(device string, now time.Time) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if now.Sub(a.last[device]) < activityEvery {
		return false
	}
	if a.last == nil || len(a.last) >= maxActivityMemory {
		a.last = map[string]time.Time{} // forgetting costs one early write per device
	}
	a.last[device] = now
	return true
}

const maxActivityMemory = 1 << 20

// noteActivity records that device sent or received a message, in its
// lastActivityTime, as the hosted hub does (connecting and disconnecting
// record it too, in setConnected).
func (s *Service) noteActivity(ctx context.Context, device string) {
	now := s.Now().UTC()
	if !s.activity.due(device, now) {
		return
	}
	_, err := s.update(ctx, Ref{Device: device}, func(rec *record) error {
		rec.Device.LastActivityTime = now
		return nil
	})
	if err != nil {
		slog.Debug("recording a device's activity", "device", device, "error", err)
	}
}
