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
	_, err := p.pool.Exec(ctx, `SELECT pg_notify($1, $2)`, relayChannel, msg)
	return err
}

// Subscribe listens on a connection of its own, outside the pool, which it
// holds for as long as it listens.
func (p *Postgres) Subscribe(ctx context.Context, f func(msg string), missed func()) {
	for ctx.Err() == nil {
		if err := p.listen(ctx, f, missed); err != nil && ctx.Err() == nil {
			slog.Warn("relay between replicas: listening again in 1 s", "error", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
}

// listen calls listening, if any, once LISTEN is in place.
func (p *Postgres) listen(ctx context.Context, f func(msg string), listening func()) error {
	conn, err := pgx.ConnectConfig(ctx, p.pool.Config().ConnConfig.Copy())
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "LISTEN "+relayChannel); err != nil {
		return err
	}
	if listening != nil {
		go listening()
	}
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			return err
		}
		f(n.Payload)
	}
}
