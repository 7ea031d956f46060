package moby

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode"
)

// LogOptions are the options of `iotedge logs`.
type LogOptions struct {
	// Tail is the number of lines from the end, or "all" ("" = all).
	Tail string
	// Since is a duration back from now ("15m", "2h", "1 day"), an RFC 3339 time
	// or a Unix timestamp ("" = from the start).
	Since string
	// Until, in the same forms, ends the lines at a time ("" = to now).
	Until      string
	Follow     bool
	Timestamps bool
}

// Logs writes the module's output, stdout and stderr interleaved, to w.
// With Follow it returns when the module stops or ctx ends.
func (e *Engine) Logs(ctx context.Context, name string, opts LogOptions, w io.Writer) error {
	q := url.Values{"stdout": {"1"}, "stderr": {"1"}}
	if opts.Tail != "" && opts.Tail != "all" {
		if n, err := strconv.Atoi(opts.Tail); err != nil || n < 0 {
			return fmt.Errorf("tail %q: want a number of lines or all", opts.Tail)
		}
		q.Set("tail", opts.Tail)
	}
	if opts.Since != "" {
		since, err := timeParam("since", opts.Since, time.Now())
		if err != nil {
			return err
		}
		q.Set("since", since)
	}
	if opts.Until != "" {
		until, err := timeParam("until", opts.Until, time.Now())
		if err != nil {
			return err
		}
		q.Set("until", until)
	}
	if opts.Follow {
		q.Set("follow", "1")
	}
	if opts.Timestamps {
		q.Set("timestamps", "1")
	}
	c, err := e.owned(ctx, name)
	if err != nil {
		return err
	}
	rsp, err := e.do(ctx, request{method: http.MethodGet, path: "/containers/" + c.ID + "/logs", query: q})
	if err != nil {
		return fmt.Errorf("logs of module %s: %w", name, err)
	}
	defer rsp.Body.Close()
	if c.Config.Tty { // a terminal has one stream, not multiplexed
		_, err = io.Copy(w, rsp.Body)
	} else {
		err = demux(w, rsp.Body)
	}
	if err != nil && ctx.Err() != nil {
		return nil // following ended by the caller
	}
	return err
}

// demux copies the payloads of the engine's multiplexed stream: frames of
// an 8-byte header (stream, 0, 0, 0, big-endian length) and the payload.
func demux(w io.Writer, r io.Reader) error {
	br := bufio.NewReader(r)
	var hdr [8]byte
	for {
		if _, err := io.ReadFull(br, hdr[:]); err == io.EOF {
			return nil
		} else if err != nil {
			return fmt.Errorf("reading log stream: %v", err)
		}
		if hdr[0] > 2 {
			return fmt.Errorf("reading log stream: unknown stream %d", hdr[0])
		}
		if _, err := io.CopyN(w, br, int64(binary.BigEndian.Uint32(hdr[4:]))); err != nil {
			return fmt.Errorf("reading log stream: %v", err)
		}
	}
}

// timeParam turns Since or Until (flag names which) into the Unix time
// the engine wants.
func timeParam(flag, s string, now time.Time) (string, error) {
	if _, err := strconv.ParseFloat(s, 64); err == nil {
		return s, nil
	}
	t, err := LogTime(flag, s, now)
	if err != nil {
		return "", err
	}
	return strconv.FormatInt(t.Unix(), 10), nil
}

// LogTime is the time `iotedge logs --since` or `--until` (flag names
// which) means by s: a duration back from now (6h, 90 minutes, 2d 3h), an
// RFC 3339 time or a Unix timestamp.
func LogTime(flag, s string, now time.Time) (time.Time, error) {
	if d, err := time.ParseDuration(s); err == nil {
		return now.Add(-d), nil
	}
	if d, ok := humanDuration(s); ok {
		return now.Add(-d), nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	if f, err := strconv.ParseFloat(s, 64); err == nil {
		return time.Unix(0, int64(f*1e9)), nil
	}
	return time.Time{}, fmt.Errorf("%s %q: want a duration (90 minutes, 1 day, 6h, 2d 3h), an RFC 3339 time or a Unix timestamp", flag, s)
}

// humanUnits are the units of the durations Azure's iotedge takes (Rust's
// humantime): "1 day", "90 minutes", "1d", "2h 30m". M is a month.
var humanUnits = map[string]time.Duration{
	"ns": time.Nanosecond, "nsec": time.Nanosecond, "nanos": time.Nanosecond,
	"us": time.Microsecond, "usec": time.Microsecond, "micros": time.Microsecond,
	"ms": time.Millisecond, "msec": time.Millisecond, "millis": time.Millisecond,
	"s": time.Second, "sec": time.Second, "secs": time.Second, "second": time.Second, "seconds": time.Second,
	"m": time.Minute, "min": time.Minute, "mins": time.Minute, "minute": time.Minute, "minutes": time.Minute,
	"h": time.Hour, "hr": time.Hour, "hrs": time.Hour, "hour": time.Hour, "hours": time.Hour,
	"d": 24 * time.Hour, "day": 24 * time.Hour, "days": 24 * time.Hour,
	"w": 7 * 24 * time.Hour, "week": 7 * 24 * time.Hour, "weeks": 7 * 24 * time.Hour,
	"M": 2630016 * time.Second, "month": 2630016 * time.Second, "months": 2630016 * time.Second, // 30.44 days
	"y": 31557600 * time.Second, "year": 31557600 * time.Second, "years": 31557600 * time.Second, // 365.25 days
}

// humanDuration parses a sum of whole numbers with units, as humantime does.
func humanDuration(s string) (time.Duration, bool) {
	var total time.Duration
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, false
	}
	for s != "" {
		i := strings.IndexFunc(s, func(r rune) bool { return r < '0' || r > '9' })
		if i <= 0 {
			return 0, false // no number, or a number without a unit
		}
		n, err := strconv.ParseInt(s[:i], 10, 64)
		s = strings.TrimLeft(s[i:], " ")
		j := strings.IndexFunc(s, func(r rune) bool { return !unicode.IsLetter(r) })
		if j < 0 {
			j = len(s)
		}
		unit, ok := humanUnits[s[:j]]
		if err != nil || !ok || n > int64(math.MaxInt64/unit) || total > math.MaxInt64-time.Duration(n)*unit {
			return 0, false
		}
		total += time.Duration(n) * unit
		s = strings.TrimLeft(s[j:], " ")
	}
	return total, true
}
