package daemon

import (
	"context"
	"log/slog"
	"strings"
	"sync"
)

// LogBuffer keeps the daemon's recent log lines for `iotedge system logs`
// when there is no journal, and wakes followers on each new line.
type LogBuffer struct {
	mu    sync.Mutex
	lines []string
	max   int
	seq   uint64 // lines ever written
	wake  chan struct{}
}

// NewLogBuffer keeps the last max lines.
func NewLogBuffer(max int) *LogBuffer { return &LogBuffer{max: max, wake: make(chan struct{})} }

// Write takes whole lines, as slog's text handler writes them.
func (b *LogBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	for _, l := range strings.Split(strings.TrimRight(string(p), "\n"), "\n") {
		b.lines = append(b.lines, l)
		b.seq++
	}
	if over := len(b.lines) - b.max; over > 0 {
		b.lines = append(b.lines[:0:0], b.lines[over:]...)
	}
	close(b.wake)
	b.wake = make(chan struct{})
	b.mu.Unlock()
	return len(p), nil
}

// Since returns the lines after sequence number after (0: the last tail
// lines) and the sequence number to continue from, plus a channel closed
// when more arrive.
func (b *LogBuffer) Since(after uint64, tail int) ([]string, uint64, <-chan struct{}) {
	b.mu.Lock()
	defer b.mu.Unlock()
	first := b.seq - uint64(len(b.lines)) // sequence number of lines[0]
	var out []string
	if after == 0 {
		start := max(0, len(b.lines)-tail)
		out = append(out, b.lines[start:]...)
	} else if after < b.seq {
		start := int(max(after, first) - first)
		out = append(out, b.lines[start:]...)
	}
	return out, b.seq, b.wake
}

// Tee returns a handler writing both to next and to the buffer.
func (b *LogBuffer) Tee(next slog.Handler, level slog.Leveler) slog.Handler {
	return teeHandler{next, slog.NewTextHandler(b, &slog.HandlerOptions{Level: level})}
}

type teeHandler struct{ a, b slog.Handler }

func (t teeHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return t.a.Enabled(ctx, l) || t.b.Enabled(ctx, l)
}

func (t teeHandler) Handle(ctx context.Context, r slog.Record) error {
	if t.a.Enabled(ctx, r.Level) {
		_ = t.a.Handle(ctx, r.Clone())
	}
	if t.b.Enabled(ctx, r.Level) {
		return t.b.Handle(ctx, r)
	}
	return nil
}

func (t teeHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return teeHandler{t.a.WithAttrs(as), t.b.WithAttrs(as)}
}

func (t teeHandler) WithGroup(name string) slog.Handler {
	return teeHandler{t.a.WithGroup(name), t.b.WithGroup(name)}
}
