package hub

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/store"
	"github.com/hatchery/hatchery/internal/testutil"
)

// Two replicas on one PostgreSQL database: a device connected to one hears
// of new cloud-to-device messages sent through the other, and is cut off
// when it connects, or is disabled, through the other.
func TestRelayBetweenReplicas(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dsn := testutil.StartPostgres(t).NewDatabase(t)
	replica := func() *Service {
		st, err := store.OpenPostgres(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		s, err := Open(ctx, st, "hub.test")
		if err != nil {
			t.Fatal(err)
		}
		go s.RelaySignals(ctx)
		return s
	}
	a, b := replica(), replica()
	dev, err := a.PutIdentity(ctx, Ref{Device: "d1"}, "", &Device{})
	if err != nil {
		t.Fatal(err)
	}
	// The device's connection is on b.
	c2d, revoked := make(chan struct{}, 100), make(chan struct{}, 1)
	defer b.WatchC2D("d1", func() { c2d <- struct{}{} })()
	defer b.OnRevoked(Ref{Device: "d1"}, func() { revoked <- struct{}{} })()

	// Messages sent before b listens are lost: send until b hears one.
	deadline := time.After(20 * time.Second)
	for heard := false; !heard; {
		if _, err := a.SendC2D(ctx, "d1", nil, []byte("x")); err != nil {
			t.Fatal(err)
		}
		select {
		case <-c2d:
			heard = true
		case <-time.After(200 * time.Millisecond):
		case <-deadline:
			t.Fatal("b never heard of a cloud-to-device message sent through a")
		}
	}
	// Desired properties changed through a reach the device on b, as merge
	// patches b works out from what it sent.
	patches := make(chan string, 10)
	defer b.FollowDesired(Ref{Device: "d1"}, func(p []byte, _ int64) { patches <- string(p) }, func() { t.Error("overflow") })()
	for _, step := range []struct {
		desired map[string]any
		replace bool
		want    string
	}{
		{map[string]any{"x": 1}, false, `{"$version":2,"x":1}`},
		{map[string]any{"y": 2}, true, `{"$version":3,"x":null,"y":2}`},
	} {
		if _, err := a.UpdateTwin(ctx, Ref{Device: "d1"}, "", &TwinPatch{Properties: &DesiredPatch{Desired: step.desired}}, step.replace); err != nil {
			t.Fatal(err)
		}
		select {
		case p := <-patches:
			if p != step.want {
				t.Fatalf("patch on b %s, want %s", p, step.want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no patch on b for %v", step.desired)
		}
	}

	// A direct method through a reaches the device on b, and its answer
	// comes back; a device connected nowhere is not online.
	if _, err := a.InvokeMethod(ctx, Ref{Device: "d1"}, &MethodRequest{MethodName: "ping"}); azerr.As(err).Code != 404103 {
		t.Fatalf("method for a device connected nowhere: %v", err)
	}
	b.SetConnected(ctx, Ref{Device: "d1"}, "on-b", true)
	defer b.ServeMethods(Ref{Device: "d1"}, func(_ context.Context, name string, payload json.RawMessage) (int, json.RawMessage, error) {
		return 200, json.RawMessage(`{"echo":` + string(payload) + `,"method":"` + name + `"}`), nil
	})()
	res, err := a.InvokeMethod(ctx, Ref{Device: "d1"}, &MethodRequest{MethodName: "ping", Payload: json.RawMessage(`{"n":1}`)})
	if err != nil || res.Status != 200 || string(res.Payload) != `{"echo":{"n":1},"method":"ping"}` {
		t.Fatalf("method through the other replica: %+v %v", res, err)
	}

	// Connecting through a replaces the connection on b.
	replaced := make(chan struct{}, 1)
	defer b.OnConnectedElsewhere(Ref{Device: "d1"}, func() { replaced <- struct{}{} })()
	a.SetConnected(ctx, Ref{Device: "d1"}, "through-a", true)
	select {
	case <-replaced:
	case <-time.After(10 * time.Second):
		t.Fatal("the device's connection on b was not replaced when it connected through a")
	}
	dev.Status = "disabled"
	if _, err := a.PutIdentity(ctx, Ref{Device: "d1"}, "*", dev); err != nil {
		t.Fatal(err)
	}
	select {
	case <-revoked:
	case <-time.After(10 * time.Second):
		t.Fatal("the device's connection on b was not cut off when a disabled it")
	}
}
