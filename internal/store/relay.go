package store

import (
	"context"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
)

// Relay carries short signals between the replicas sharing a database:
// what one replica learns that connections held by the others must act on.
// SQLite has one server and needs none.
type Relay interface {
	// Publish sends msg (at most 7,000 bytes) to every replica's Subscribe,
	// this one's included.
	Publish(ctx context.Context, msg string) error
	// Subscribe calls f with each message published until ctx ends,
	// reconnecting when the connection drops. Messages sent before it
	// listens, or meanwhile, are lost: each time it starts listening it
	// calls missed, in a goroutine of its own.
	Subscribe(ctx context.Context, f func(msg string), missed func())
}

const relayChannel = "hatchery_relay"

func (p *Postgres) Publish(ctx context.Context, msg string) error {
	ctx, cancel := p.bound(ctx)
	defer cancel()
	_, err := p.pool.Exec(ctx, `SELECT pg_notify($1, $2)`, relayChannel, msg)
	return err
}

// Subscribe listens on a connection of its own, outside the pool, which it
// holds for as long as it listens.
// A dropped connection is reconnected after a second, and while the
// database stays unreachable, after twice as long each time, up to 30 s.
func (p *Postgres) Subscribe(ctx context.Context, f func(msg string), missed func()) {
	delay := time.Second
	for ctx.Err() == nil {
		listened, err := p.listen(ctx, f, missed)
		if err == nil || ctx.Err() != nil {
			continue
		}
		if listened {
			delay = time.Second
		}
		slog.Warn("relay between replicas: listening again", "in", delay.String(), "error", err)
		select {
		case <-ctx.Done():
		case <-time.After(delay):
		}
		delay = min(2*delay, 30*time.Second)
	}
}

// listen calls listening once LISTEN is in place, and says whether it was.
func (p *Postgres) listen(ctx context.Context, f func(msg string), listening func()) (listened bool, err error) {
	conn, err := pgx.ConnectConfig(ctx, p.pool.Config().ConnConfig.Copy())
	if err != nil {
		return false, err
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "LISTEN "+relayChannel); err != nil {
		return false, err
	}
	go listening()
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			return true, err
		}
		f(n.Payload)
	}
}
