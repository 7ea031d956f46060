package hub

import (
	"context"
	"encoding/json"
	"strings"
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
	replica := postgresReplicas(ctx, t)
	a, b := replica(), replica()
	dev, err := a.PutIdentity(ctx, Ref{Device: "d1"}, "", &Device{})
	if err != nil {
		t.Fatal(err)
	}
	// The device's connection is on b.
	c2d := make(chan struct{}, 100)
	defer b.WatchC2D("d1", func() { c2d <- struct{}{} })()

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
	dropped := make(chan struct{}, 1)
	drop := func() { dropped <- struct{}{} }
	defer attach(t, b, Ref{Device: "d1"}, drop)()
	// Connected on b but not (yet) subscribed to methods: b says so at
	// once, rather than the caller waiting for its response timeout; and
	// within a connect timeout the call waits for the subscription.
	type result struct {
		res *MethodResult
		err error
	}
	call := func(req *MethodRequest) <-chan result {
		out := make(chan result, 1)
		go func() { res, err := a.InvokeMethod(ctx, Ref{Device: "d1"}, req); out <- result{res, err} }()
		return out
	}
	if r := testutil.Within(t, call(&MethodRequest{MethodName: "ping", ResponseTimeoutInSeconds: 120}), "an answer for a device not subscribed"); azerr.As(r.err).Code != 404103 {
		t.Fatalf("method for a device on b not subscribed to methods: %+v %v", r.res, r.err)
	}
	waiting := call(&MethodRequest{MethodName: "ping", Payload: json.RawMessage(`{"n":1}`), ConnectTimeoutInSeconds: 60})
	time.Sleep(2 * methodPoll)
	defer b.ServeMethods(Ref{Device: "d1"}, func(_ context.Context, name string, payload json.RawMessage) (int, json.RawMessage, error) {
		switch name {
		case "garble":
			return 200, json.RawMessage("not json {{"), nil
		case "flood":
			return 200, json.RawMessage(`"` + strings.Repeat("x", maxMethodPayload) + `"`), nil
		}
		return 200, json.RawMessage(`{"echo":` + string(payload) + `,"method":"` + name + `"}`), nil
	})()
	if r := testutil.Within(t, waiting, "the answer of a device that subscribed within the connect timeout"); r.err != nil || r.res.Status != 200 || string(r.res.Payload) != `{"echo":{"n":1},"method":"ping"}` {
		t.Fatalf("method through the other replica, waiting for its subscription: %+v %v", r.res, r.err)
	}
	res, err := a.InvokeMethod(ctx, Ref{Device: "d1"}, &MethodRequest{MethodName: "ping", Payload: json.RawMessage(`{"n":1}`)})
	if err != nil || res.Status != 200 || string(res.Payload) != `{"echo":{"n":1},"method":"ping"}` {
		t.Fatalf("method through the other replica: %+v %v", res, err)
	}
	// An answer the hub refuses is refused at once through the other
	// replica too, not waited for until the timeout.
	for name, want := range map[string]string{"garble": "not JSON", "flood": "at most 131072"} {
		r := testutil.Within(t, call(&MethodRequest{MethodName: name, ResponseTimeoutInSeconds: 120}), "the answer to "+name)
		if azerr.As(r.err).Code != 502101 || !strings.Contains(r.err.Error(), want) {
			t.Errorf("method %s through the other replica: %+v %v, want 502101 saying %q", name, r.res, r.err, want)
		}
	}

	// Connecting through a replaces the connection on b.
	defer attach(t, a, Ref{Device: "d1"}, func() {})()
	select {
	case <-dropped:
	case <-time.After(10 * time.Second):
		t.Fatal("the device's connection on b was not replaced when it connected through a")
	}
	defer attach(t, b, Ref{Device: "d1"}, drop)()
	dev.Status = "disabled"
	if _, err := a.PutIdentity(ctx, Ref{Device: "d1"}, "*", dev); err != nil {
		t.Fatal(err)
	}
	select {
	case <-dropped:
	case <-time.After(10 * time.Second):
		t.Fatal("the device's connection on b was not cut off when a disabled it")
	}
}

// postgresReplicas returns a function that starts replicas on one new
// PostgreSQL database, each acting on the others' signals until ctx ends.
func postgresReplicas(ctx context.Context, t *testing.T) func() *Service {
	dsn := testutil.StartPostgres(t).NewDatabase(t)
	return func() *Service {
		st, err := store.OpenPostgres(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		s := openHub(t, st)
		go s.RelaySignals(ctx)
		return s
	}
}

// A replica whose beat stands still for three of another's is taken for
// dead, and its devices are recorded disconnected; one that beats is not.
func TestStoppedReplicaOnPostgres(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	replica := postgresReplicas(ctx, t)
	a, b := replica(), replica()
	d1, d2 := Ref{Device: "d1"}, Ref{Device: "d2"}
	newIdentity(t, a, d1)
	newIdentity(t, a, d2)
	attach(t, a, d1, func() {})
	defer attach(t, b, d2, func() {})()
	beatA := &beater{s: a, seen: map[string]stillBeat{}}
	beatB := &beater{s: b, seen: map[string]stillBeat{}}
	beat := func(bs ...*beater) {
		t.Helper()
		for _, x := range bs {
			if err := x.beat(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	for range 2 * deadBeats {
		beat(beatA, beatB)
	}
	if st := connectionState(t, b, d1); st != "Connected" {
		t.Fatalf("a device of a replica that beats: %s", st)
	}
	for range deadBeats - 1 {
		beat(beatB)
	}
	if st := connectionState(t, b, d1); st != "Connected" {
		t.Fatalf("after %d beats of b without one of a: %s", deadBeats-1, st)
	}
	beat(beatB)
	if st := connectionState(t, b, d1); st != "Disconnected" {
		t.Fatalf("after %d beats of b without one of a: %s", deadBeats, st)
	}
	if st := connectionState(t, b, d2); st != "Connected" {
		t.Fatalf("b's own device: %s", st)
	}
}

// A connection that closes while the database is out of reach is recorded
// disconnected at the first beat after it is back, not left "Connected"
// until the device connects again.
func TestClosedDuringOutageRecordedLater(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pg := testutil.StartPostgres(t)
	st, err := store.OpenPostgres(ctx, pg.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	s := openHub(t, st)
	r := Ref{Device: "d1"}
	newIdentity(t, s, r)
	detach := attach(t, s, r, func() {})
	b := &beater{s: s, seen: map[string]stillBeat{}}
	if err := b.beat(ctx); err != nil {
		t.Fatal(err)
	}

	pg.Stop(t)
	detach()
	pg.Start(t)
	if st := connectionState(t, s, r); st != "Connected" {
		t.Fatalf("before the next beat: %s (was the close recorded after all?)", st)
	}
	if err := b.beat(ctx); err != nil {
		t.Fatal(err)
	}
	if st := connectionState(t, s, r); st != "Disconnected" {
		t.Fatalf("after the beat: %s", st)
	}
}
