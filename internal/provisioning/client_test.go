package provisioning

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// answer is one scripted response of the provisioning service.
type answer struct {
	status     int
	retryAfter string // the Retry-After header; none if empty
	opStatus   string // the operation's status; an error body if empty
}

// scripted serves answers in order, the last one for every request
// beyond them, and counts the operation polls (GETs).
func scripted(t *testing.T, answers ...answer) (*Client, *int) {
	t.Helper()
	var mu sync.Mutex
	n, polls := 0, 0
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		a := answers[min(n, len(answers)-1)]
		n++
		if r.Method == http.MethodGet {
			polls++
		}
		mu.Unlock()
		if a.retryAfter != "" {
			w.Header().Set("Retry-After", a.retryAfter)
		}
		w.WriteHeader(a.status)
		switch a.opStatus {
		case "":
			fmt.Fprintf(w, `{"errorCode":%d001,"message":"scripted refusal"}`, a.status)
		case "assigned":
			fmt.Fprint(w, `{"operationId":"op1","status":"assigned","registrationState":{"registrationId":"dev1","status":"assigned","assignedHub":"hub.example","deviceId":"dev1"}}`)
		default:
			fmt.Fprintf(w, `{"operationId":"op1","status":%q}`, a.opStatus)
		}
	}))
	t.Cleanup(ts.Close)
	return &Client{Endpoint: ts.URL, IDScope: "0ne00000001", RegistrationID: "dev1", HTTP: ts.Client()}, &polls
}

// recordWaits makes the client's waits return at once and records them.
func recordWaits(t *testing.T) *[]time.Duration {
	var waits []time.Duration
	old := after
	after = func(d time.Duration) <-chan time.Time {
		waits = append(waits, d)
		c := make(chan time.Time, 1)
		c <- time.Time{}
		return c
	}
	t.Cleanup(func() { after = old })
	return &waits
}

func register(t *testing.T, c *Client) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := c.RegisterSymmetricKey(ctx, []byte("0123456789abcdef0123456789abcdef"))
	if err == nil && (st.AssignedHub != "hub.example" || st.DeviceID != "dev1") {
		t.Fatalf("registration state %+v", st)
	}
	return err
}

// Polls wait as long as each 202's Retry-After says, 0 included; none, or
// one over a minute, is read as a second.
func TestPollsWaitRetryAfter(t *testing.T) {
	waits := recordWaits(t)
	c, polls := scripted(t,
		answer{202, "3", "assigning"},
		answer{202, "0", "assigning"},
		answer{202, "", "assigning"},
		answer{202, "120", "assigning"},
		answer{202, "soon", "assigning"},
		answer{200, "", "assigned"})
	if err := register(t, c); err != nil {
		t.Fatal(err)
	}
	if want := []time.Duration{3 * time.Second, 0, time.Second, time.Second, time.Second}; !slices.Equal(*waits, want) || *polls != 5 {
		t.Fatalf("waits %v over %d polls, want %v over 5", *waits, *polls, want)
	}
}

// A 429 is retried after its Retry-After (at least a second), the wait told
// to Throttled; the tenth in a row is given up on.
func TestThrottledRequestsWaitRetryAfter(t *testing.T) {
	waits := recordWaits(t)
	var told []time.Duration
	c, _ := scripted(t,
		answer{429, "2", ""},
		answer{429, "", ""},
		answer{429, "0", ""},
		answer{202, "0", "assigning"},
		answer{429, "5", ""},
		answer{200, "", "assigned"})
	c.Throttled = func(d time.Duration) { told = append(told, d) }
	if err := register(t, c); err != nil {
		t.Fatal(err)
	}
	wantTold := []time.Duration{2 * time.Second, time.Second, time.Second, 5 * time.Second}
	wantWaits := []time.Duration{2 * time.Second, time.Second, time.Second, 0, 5 * time.Second}
	if !slices.Equal(told, wantTold) || !slices.Equal(*waits, wantWaits) {
		t.Fatalf("told %v and waited %v, want %v and %v", told, *waits, wantTold, wantWaits)
	}

	told = nil
	c, _ = scripted(t, answer{429, "1", ""})
	c.Throttled = func(d time.Duration) { told = append(told, d) }
	var e *Error
	if err := register(t, c); !errors.As(err, &e) || e.Status != 429 || e.ErrorCode != 429001 {
		t.Fatalf("always throttled: %v, want the 429", err)
	}
	if len(told) != 10 || told[9] != 0 {
		t.Fatalf("always throttled: told %v, want 10 with the last 0 (given up)", told)
	}
}

// MaxPolls bounds the polls of an operation that stays assigning.
func TestMaxPolls(t *testing.T) {
	recordWaits(t)
	c, polls := scripted(t, answer{202, "0", "assigning"})
	c.MaxPolls = 3
	if err := register(t, c); err == nil || !strings.Contains(err.Error(), `still "assigning" after 3 polls`) || *polls != 3 {
		t.Fatalf("%d polls: %v, want 3 and an error saying so", *polls, err)
	}
}
