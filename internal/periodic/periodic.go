// Package periodic runs the servers' background passes: expiring events,
// heartbeats, sweeps that finish what an interrupted request left.
package periodic

import (
	"context"
	"log/slog"
	"time"
)

// Run calls pass now and then every period until ctx ends. A pass that
// fails is logged, as failed saying what, and the next one tries again;
// one ended by ctx is not.
func Run(ctx context.Context, period time.Duration, failed string, pass func(context.Context) error) {
	tick := time.NewTicker(period)
	defer tick.Stop()
	for {
		if err := pass(ctx); err != nil && ctx.Err() == nil {
			slog.Warn(failed, "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}
