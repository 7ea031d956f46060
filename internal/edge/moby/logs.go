package moby

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// LogOptions are the options of `iotedge logs`.
type LogOptions struct {
	// Tail is the number of lines from the end, or "all" ("" = all).
	Tail string
	// Since is a duration back from now ("15m", "2h"), an RFC 3339 time
	// or a Unix timestamp ("" = from the start).
	Since      string
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
		since, err := sinceParam(opts.Since, time.Now())
		if err != nil {
			return err
		}
		q.Set("since", since)
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

// sinceParam turns Since into the Unix time the engine wants.
func sinceParam(s string, now time.Time) (string, error) {
	if d, err := time.ParseDuration(s); err == nil {
		return strconv.FormatInt(now.Add(-d).Unix(), 10), nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return strconv.FormatInt(t.Unix(), 10), nil
	}
	if _, err := strconv.ParseFloat(s, 64); err == nil {
		return s, nil
	}
	return "", fmt.Errorf("since %q: want a duration (15m, 2h), an RFC 3339 time or a Unix timestamp", s)
}
