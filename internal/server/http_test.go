package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/azerr"
)

// TestFailureIDLogsInternalErrors: an answer that says only "internal server
// error" must leave its cause in the log under the tracking ID the client
// saw; API errors and hang-ups say everything already.
func TestFailureIDLogsInternalErrors(t *testing.T) {
	var log bytes.Buffer
	defer slog.SetDefault(slog.Default())
	slog.SetDefault(slog.New(slog.NewTextHandler(&log, nil)))
	r := httptest.NewRequest("PUT", "/configurations/x", nil)

	id := failureID(r, fmt.Errorf("deployment x: %w", errors.New("unexpected end of JSON input")))
	if !strings.Contains(log.String(), "trackingId="+id) || !strings.Contains(log.String(), "unexpected end of JSON input") {
		t.Fatalf("internal error not logged under %s:\n%s", id, log.String())
	}
	log.Reset()
	failureID(r, azerr.BadRequest("targetCondition is required"))
	failureID(r, fmt.Errorf("reading: %w", context.Canceled))
	if log.Len() != 0 {
		t.Fatalf("logged an API error or a hang-up:\n%s", log.String())
	}
}
