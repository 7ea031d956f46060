// Package progress draws a one-line progress bar for long CLI operations.
package progress

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

// Bar is a progress bar; Add is safe for concurrent use.
type Bar struct {
	w          io.Writer
	what       string
	total, n   int
	start      time.Time
	lastRedraw time.Time
	mu         sync.Mutex
}

// New draws an empty bar for total items on w, if w is a terminal: in a
// file or a pipe the redrawn frames would only be noise, so there the bar
// draws nothing.
func New(w io.Writer, what string, total int) *Bar {
	if !isTerminal(w) {
		w = io.Discard
	}
	b := &Bar{w: w, what: what, total: total, start: time.Now()}
	b.draw()
	return b
}

// Add counts n more items done, redrawing at most ten times a second.
func (b *Bar) Add(n int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.n += n
	if time.Since(b.lastRedraw) > 100*time.Millisecond || b.n == b.total {
		b.draw()
	}
}

func (b *Bar) draw() {
	b.lastRedraw = time.Now()
	const width = 30
	frac := 1.0
	if b.total > 0 {
		frac = min(float64(b.n)/float64(b.total), 1)
	}
	filled := int(frac * width)
	rate := float64(b.n) / max(time.Since(b.start).Seconds(), 1e-3)
	fmt.Fprintf(b.w, "\r%s [%s%s] %d/%d %3.0f%% %.0f/s", b.what, strings.Repeat("=", filled), strings.Repeat(" ", width-filled), b.n, b.total, frac*100, rate)
}

// Done ends the bar's line.
func (b *Bar) Done() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.draw()
	fmt.Fprintln(b.w)
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
