package hub

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
)

// A direct method with connectTimeoutInSeconds waits for its device to
// come online; without it, an offline device fails the call at once.
func TestMethodWaitsForConnect(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	r := Ref{Device: "late"}
	newIdentity(t, s, r)
	if _, err := s.InvokeMethod(ctx, r, &MethodRequest{MethodName: "m"}); !azerr.HasStatus(err, 404) {
		t.Fatalf("an offline device without a connect timeout: %v", err)
	}
	if _, err := s.InvokeMethod(ctx, r, &MethodRequest{MethodName: "m", ConnectTimeoutInSeconds: 301}); !azerr.HasStatus(err, 400) {
		t.Fatalf("a connect timeout over 300 s: %v", err)
	}
	done := make(chan error, 1)
	go func() {
		res, err := s.InvokeMethod(ctx, r, &MethodRequest{MethodName: "m", ConnectTimeoutInSeconds: 10})
		if err == nil && res.Status != 201 {
			err = fmt.Errorf("status %d", res.Status)
		}
		done <- err
	}()
	time.Sleep(2 * methodPoll)
	defer s.ServeMethods(r, func(context.Context, string, json.RawMessage) (int, json.RawMessage, error) { return 201, nil, nil })()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("a device that connected within the connect timeout: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the call did not end")
	}
}
