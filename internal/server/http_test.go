package server

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/store"
)

// An answer that says only "internal server error" leaves its cause in the
// log under the tracking ID the client saw; API errors and hang-ups say
// everything already. A full database answers 503 with Retry-After, and
// is logged once however many requests fail on it.
func TestFailureLogsInternalErrors(t *testing.T) {
	var log bytes.Buffer
	defer slog.SetDefault(slog.Default())
	slog.SetDefault(slog.New(slog.NewTextHandler(&log, nil)))
	r := httptest.NewRequest("PUT", "/configurations/x", nil)

	id, _ := failure(r, fmt.Errorf("deployment x: %w", errors.New("unexpected end of JSON input")))
	if !strings.Contains(log.String(), "trackingId="+id) || !strings.Contains(log.String(), "unexpected end of JSON input") {
		t.Fatalf("internal error not logged under %s:\n%s", id, log.String())
	}
	log.Reset()
	failure(r, azerr.BadRequest("targetCondition is required"))
	failure(r, fmt.Errorf("reading: %w", context.Canceled))
	if log.Len() != 0 {
		t.Fatalf("logged an API error or a hang-up:\n%s", log.String())
	}

	for range 3 {
		_, err := failure(r, fmt.Errorf("writing: %w: disk I/O", store.ErrFull))
		if e := azerr.As(err); e.Status() != 503 || e.RetryAfter <= 0 {
			t.Fatalf("a full database answered %+v", e)
		}
	}
	if n := strings.Count(log.String(), "level=ERROR"); n != 1 {
		t.Fatalf("a full database logged %d times:\n%s", n, log.String())
	}
}

// GET /events?follow=true streams: an event stored after the request
// arrives while the answer stays open (hatchery hub tail -f).
func TestEventsFollowStreams(t *testing.T) {
	e := newEnv(t)
	e.newDevice("d1", false)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	lines := make(chan string, 1)
	go func() {
		body, err := e.hubAPI.Stream(ctx, "/events?device=d1&follow=true")
		if err != nil {
			t.Error(err)
			return
		}
		defer body.Close()
		sc := bufio.NewScanner(body)
		if sc.Scan() {
			lines <- sc.Text()
		}
	}()
	time.Sleep(300 * time.Millisecond) // the request is in, and has found nothing yet
	if _, err := e.hub.SendEvent(ctx, hub.Ref{Device: "d1"}, nil, []byte(`{"n":1}`)); err != nil {
		t.Fatal(err)
	}
	select {
	case line := <-lines:
		if !strings.Contains(line, `"body":{"n":1}`) {
			t.Fatalf("streamed event: %s", line)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the event was not streamed while the answer stayed open")
	}
}
