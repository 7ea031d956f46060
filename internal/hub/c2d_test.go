package hub

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/mqtt"
	"github.com/hatchery/hatchery/internal/store"
)

// Over HTTPS a received message is locked: hidden from the next receive
// until its device settles it, or the lock expires and it comes again.
// Only the lock token of the current lock settles it.
func TestReceiveC2DLocks(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	now := time.Now()
	s.Now = func() time.Time { return now }
	newIdentity(t, s, Ref{Device: "d1"})
	for _, body := range []string{"one", "two"} {
		if _, err := s.SendC2D(ctx, "d1", nil, []byte(body)); err != nil {
			t.Fatal(err)
		}
		now = now.Add(time.Millisecond) // the queue's order is the time of sending
	}
	receive := func(want string) string {
		t.Helper()
		m, token, err := s.ReceiveC2D(ctx, "d1")
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case want == "" && m != nil:
			t.Fatalf("received %q, want nothing", m.Body)
		case want != "" && (m == nil || string(m.Body) != want):
			t.Fatalf("received %v, want %q", m, want)
		}
		return token
	}
	one := receive("one")
	two := receive("two")
	receive("")
	for _, bad := range []string{"", "x", "x.y", "../d2/x.y", one + "0"} {
		if err := s.SettleC2D(ctx, "d1", bad, false); !azerr.HasStatus(err, 412) {
			t.Errorf("settled with %q: %v", bad, err)
		}
	}
	if err := s.SettleC2D(ctx, "d1", one, true); err != nil { // abandoned: it comes again
		t.Fatal(err)
	}
	receive("one")
	now = now.Add(2 * c2dLock) // both locks expire
	if err := s.SettleC2D(ctx, "d1", two, false); !azerr.HasStatus(err, 412) {
		t.Fatalf("settled with an expired lock: %v", err)
	}
	receive("one")
	two = receive("two")
	if err := s.SettleC2D(ctx, "d1", two, false); err != nil {
		t.Fatal(err)
	}
	if err := s.SettleC2D(ctx, "d1", two, false); !azerr.HasStatus(err, 412) {
		t.Fatalf("completed twice: %v", err)
	}
	if msgs, _ := s.PendingC2D(ctx, "d1"); len(msgs) != 1 || string(msgs[0].Body) != "one" {
		t.Fatalf("left in the queue: %v", msgs)
	}
}

// A device's cloudToDeviceMessageCount is the messages waiting for it.
func TestC2DCount(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	newIdentity(t, s, Ref{Device: "d"})
	count := func() int {
		t.Helper()
		d, err := s.GetIdentity(ctx, Ref{Device: "d"})
		if err != nil {
			t.Fatal(err)
		}
		return d.CloudToDeviceMessageCount
	}
	var sent []*C2DMessage
	for i := range 3 {
		m, err := s.SendC2D(ctx, "d", nil, []byte{byte(i)})
		if err != nil {
			t.Fatal(err)
		}
		sent = append(sent, m)
	}
	if n := count(); n != 3 {
		t.Fatalf("3 sent: count %d", n)
	}
	if err := s.CompleteC2D(ctx, sent[0].ID); err != nil {
		t.Fatal(err)
	}
	if n := count(); n != 2 {
		t.Fatalf("one completed: count %d", n)
	}
	_, token, err := s.ReceiveC2D(ctx, "d")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SettleC2D(ctx, "d", token, false); err != nil {
		t.Fatal(err)
	}
	if n := count(); n != 1 {
		t.Fatalf("one received and completed over HTTPS: count %d", n)
	}
	tw, _ := s.GetTwin(ctx, Ref{Device: "d"})
	if tw.CloudToDeviceMessageCount != 1 {
		t.Fatalf("the twin's count %d", tw.CloudToDeviceMessageCount)
	}
}

// Purging removes every waiting message, those received over HTTPS and
// not settled too, and says how many; the count on the device follows.
func TestPurgeC2D(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	newIdentity(t, s, Ref{Device: "d1"})
	newIdentity(t, s, Ref{Device: "d2"})
	for _, d := range []string{"d1", "d1", "d1", "d2"} {
		if _, err := s.SendC2D(ctx, d, nil, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	if m, _, err := s.ReceiveC2D(ctx, "d1"); err != nil || m == nil {
		t.Fatalf("receive: %v %v", m, err)
	}
	if n, err := s.PurgeC2D(ctx, "d1"); err != nil || n != 3 {
		t.Fatalf("purged %d: %v", n, err)
	}
	if m, _, err := s.ReceiveC2D(ctx, "d1"); err != nil || m != nil {
		t.Fatalf("after the purge d1 received %v %v", m, err)
	}
	if d, err := s.GetIdentity(ctx, Ref{Device: "d1"}); err != nil || d.CloudToDeviceMessageCount != 0 {
		t.Fatalf("d1 counts %d waiting: %v", d.CloudToDeviceMessageCount, err)
	}
	if left, err := s.PendingC2D(ctx, "d2"); err != nil || len(left) != 1 {
		t.Fatalf("d2 has %d waiting: %v", len(left), err)
	}
	if _, err := s.PurgeC2D(ctx, "nobody"); !azerr.HasStatus(err, 404) {
		t.Fatalf("purging an unknown device: %v", err)
	}
}

// A message may say when it expires (the iothub-expiry header, "$.exp"),
// within 48 hours as in the hosted hub; it is dropped then.
func TestC2DExpiry(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	now := time.Now().UTC().Truncate(time.Second)
	s.Now = func() time.Time { return now }
	newIdentity(t, s, Ref{Device: "d1"})
	in10m := now.Add(10 * time.Minute)
	m, err := s.SendC2D(ctx, "d1", map[string]string{"$.exp": in10m.Format(time.RFC3339), "k": "v"}, []byte("soon gone"))
	if err != nil {
		t.Fatal(err)
	}
	if !m.Expiry.Equal(in10m) || m.Properties["$.exp"] != "" || m.Properties["k"] != "v" {
		t.Fatalf("message %+v", m)
	}
	if m, err := s.SendC2D(ctx, "d1", nil, []byte("default")); err != nil || !m.Expiry.Equal(now.Add(time.Hour)) {
		t.Fatalf("default expiry: %+v %v", m, err)
	}
	for _, bad := range []string{"tomorrow", now.Add(-time.Minute).Format(time.RFC3339), now.Add(49 * time.Hour).Format(http.TimeFormat)} {
		if _, err := s.SendC2D(ctx, "d1", map[string]string{"$.exp": bad}, []byte("x")); !azerr.HasStatus(err, 400) {
			t.Errorf("expiry %q: %v", bad, err)
		}
	}
	now = now.Add(11 * time.Minute)
	if left, err := s.PendingC2D(ctx, "d1"); err != nil || len(left) != 1 || string(left[0].Body) != "default" {
		t.Fatalf("after 11 minutes: %v %v", left, err)
	}
}

// A message whose properties could not be delivered in an MQTT topic is
// refused, and not queued to hold up the device's others.
func TestC2DPropertiesTooLarge(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	newIdentity(t, s, Ref{Device: "d1"})
	// 25 KB that URL-encode to 75 KB.
	_, err := s.SendC2D(ctx, "d1", map[string]string{"k": strings.Repeat("/", 25<<10)}, []byte("x"))
	if !azerr.HasStatus(err, 400) || !strings.Contains(err.Error(), "properties") {
		t.Fatalf("properties of 75 KB encoded: %v", err)
	}
	// Spaces go into a topic as %20, not as a query's '+'.
	_, err = s.SendC2D(ctx, "d1", map[string]string{"k": strings.Repeat(" ", 30<<10)}, []byte("x"))
	if !azerr.HasStatus(err, 400) || !strings.Contains(err.Error(), "properties") {
		t.Fatalf("30 KB of spaces, 90 KB in a topic: %v", err)
	}
	m, err := s.SendC2D(ctx, "d1", map[string]string{"k": strings.Repeat("a", 50<<10)}, []byte("x"))
	if err != nil {
		t.Fatalf("properties of 50 KB: %v", err)
	}
	if msgs, err := s.PendingC2D(ctx, "d1"); err != nil || len(msgs) != 1 {
		t.Fatalf("queued: %d %v", len(msgs), err)
	}
	// What was admitted fits the topic it is delivered in.
	if err := mqtt.ValidateTopicName("devices/d1/messages/devicebound/" + m.PropertyBag("d1")); err != nil {
		t.Fatalf("an admitted message's topic: %v", err)
	}
}

// Concurrent sends to one device queue at most maxC2DQueue messages, on
// one replica or several; each refused send is told the queue is full,
// and takes nothing with it.
func TestC2DQueueLimitConcurrent(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	other := openHub(t, s.store) // another replica, on the same database
	for _, c := range []struct {
		device   string
		replicas []*Service
	}{{"one", []*Service{s}}, {"two", []*Service{s, other}}} {
		newIdentity(t, s, Ref{Device: c.device})
		var wg sync.WaitGroup
		var accepted atomic.Int32
		for i := range 80 {
			wg.Go(func() {
				_, err := c.replicas[i%len(c.replicas)].SendC2D(ctx, c.device, nil, []byte("x"))
				switch {
				case err == nil:
					accepted.Add(1)
				case azerr.As(err).Code != 403004:
					t.Errorf("send %d: %v, want 403004 when the queue is full", i, err)
				}
			})
		}
		wg.Wait()
		msgs, err := s.PendingC2D(ctx, c.device)
		if err != nil {
			t.Fatal(err)
		}
		n := int(accepted.Load())
		// Replicas racing at the limit may each take theirs back, but
		// not all of them.
		if len(msgs) != n || n > maxC2DQueue || n < maxC2DQueue-len(c.replicas)+1 {
			t.Errorf("%s replica(s): %d sends accepted, %d messages queued; the limit is %d", c.device, n, len(msgs), maxC2DQueue)
		}
	}
}

// queueOver stores n messages for device past SendC2D's limit, as a
// queue filled before the limit held concurrent sends may hold them.
func queueOver(t *testing.T, s *Service, device string, n int) {
	t.Helper()
	now := s.Now().UTC()
	for i := range n {
		m := C2DMessage{ID: fmt.Sprintf("%s/%020d", device, now.UnixNano()+int64(i)), MessageID: fmt.Sprint(i), Body: []byte("x"),
			Enqueued: now, Expiry: now.Add(time.Hour)}
		body, _ := json.Marshal(m)
		if _, err := s.store.Create(context.Background(), store.Doc{Kind: kindC2D, ID: m.ID, Body: body}); err != nil {
			t.Fatal(err)
		}
	}
}

// Purging, and deleting the device, take every message of its queue,
// however long it is.
func TestC2DRemovalTakesWholeQueue(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	const many = 3*maxC2DQueue + 7
	for _, d := range []string{"d", "d0", "e"} {
		newIdentity(t, s, Ref{Device: d})
	}
	queueOver(t, s, "d", many)
	queueOver(t, s, "d0", 1) // a device whose ID the first one's prefixes
	if n, err := s.PurgeC2D(ctx, "d"); err != nil || n != many {
		t.Fatalf("purged %d of %d: %v", n, many, err)
	}
	if msgs, err := s.PendingC2D(ctx, "d"); err != nil || len(msgs) != 0 {
		t.Fatalf("%d left after the purge: %v", len(msgs), err)
	}
	if msgs, err := s.PendingC2D(ctx, "d0"); err != nil || len(msgs) != 1 {
		t.Fatalf("d0 has %d waiting: %v", len(msgs), err)
	}

	queueOver(t, s, "e", many)
	if err := s.DeleteIdentity(ctx, Ref{Device: "e"}, ""); err != nil {
		t.Fatal(err)
	}
	newIdentity(t, s, Ref{Device: "e"})
	if msgs, err := s.PendingC2D(ctx, "e"); err != nil || len(msgs) != 0 {
		t.Fatalf("the new e inherited %d messages: %v", len(msgs), err)
	}
}

// A device's cloudToDeviceMessageCount is what its queue holds: after
// sends and completions racing on two replicas, after a message is
// dropped for having been delivered too often, and after one expires,
// with no one reading the queue.
func TestC2DCountIsTheQueue(t *testing.T) {
	ctx := context.Background()
	count := func(t *testing.T, s *Service) int {
		t.Helper()
		d, err := s.GetIdentity(ctx, Ref{Device: "d"})
		if err != nil {
			t.Fatal(err)
		}
		return d.CloudToDeviceMessageCount
	}
	t.Run("races", func(t *testing.T) {
		s := sqliteHub(t)
		replicas := []*Service{s, openHub(t, s.store)}
		newIdentity(t, s, Ref{Device: "d"})
		for round := range 5 { // a race goes one way or the other
			var wg sync.WaitGroup
			sent := make([]*C2DMessage, 40)
			for i := range sent {
				wg.Go(func() {
					m, err := replicas[i%2].SendC2D(ctx, "d", nil, []byte("x"))
					if err != nil {
						t.Error(err)
					}
					sent[i] = m
				})
			}
			wg.Wait()
			if n := count(t, s); n != 40 {
				t.Fatalf("round %d: 40 sent: count %d", round, n)
			}
			for i, m := range sent[:25] {
				wg.Go(func() {
					if err := replicas[i%2].CompleteC2D(ctx, m.ID); err != nil {
						t.Error(err)
					}
				})
			}
			wg.Wait()
			if n := count(t, s); n != 15 {
				t.Fatalf("round %d: 25 of 40 completed: count %d", round, n)
			}
			if _, err := s.PurgeC2D(ctx, "d"); err != nil {
				t.Fatal(err)
			}
		}
	})
	t.Run("dropped", func(t *testing.T) {
		// Received over HTTPS and never settled: dropped at the next receive.
		s := sqliteHub(t)
		newIdentity(t, s, Ref{Device: "d"})
		now := time.Now()
		s.Now = func() time.Time { return now }
		if _, err := s.SendC2D(ctx, "d", nil, []byte("never settled")); err != nil {
			t.Fatal(err)
		}
		for i := range maxC2DDeliveries {
			if m, _, err := s.ReceiveC2D(ctx, "d"); err != nil || m == nil {
				t.Fatalf("receive %d: %v %v", i+1, m, err)
			}
			now = now.Add(2 * c2dLock)
		}
		if m, _, err := s.ReceiveC2D(ctx, "d"); err != nil || m != nil {
			t.Fatalf("received %d times, then %v %v", maxC2DDeliveries, m, err)
		}
		if n := count(t, s); n != 0 {
			t.Fatalf("the message dropped: count %d", n)
		}
	})
	t.Run("expired", func(t *testing.T) {
		s := sqliteHub(t)
		newIdentity(t, s, Ref{Device: "d"})
		exp := time.Now().Add(time.Second).UTC().Format(time.RFC3339Nano)
		for _, props := range []map[string]string{{"$.exp": exp}, nil} {
			if _, err := s.SendC2D(ctx, "d", props, []byte("x")); err != nil {
				t.Fatal(err)
			}
		}
		if n := count(t, s); n != 2 {
			t.Fatalf("2 sent: count %d", n)
		}
		for deadline := time.Now().Add(10 * time.Second); count(t, s) != 1; time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("one of two messages expired: count %d", count(t, s))
			}
		}
	})
}

// Deliveries over MQTT and HTTPS count alike toward the message's last.
func TestC2DDeliveriesOverBothTransports(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	now := time.Now()
	s.Now = func() time.Time { return now }
	newIdentity(t, s, Ref{Device: "d"})
	m, err := s.SendC2D(ctx, "d", nil, []byte("x"))
	if err != nil {
		t.Fatal(err)
	}
	for range maxC2DDeliveries - 1 {
		if err := s.DeliveredC2D(ctx, m.ID); err != nil {
			t.Fatal(err)
		}
	}
	if got, _, err := s.ReceiveC2D(ctx, "d"); err != nil || got == nil || got.DeliveryCount != maxC2DDeliveries {
		t.Fatalf("the last delivery, over HTTPS: %+v %v", got, err)
	}
	now = now.Add(2 * c2dLock)
	if got, _, err := s.ReceiveC2D(ctx, "d"); err != nil || got != nil {
		t.Fatalf("received after %d deliveries: %+v %v", maxC2DDeliveries, got, err)
	}
	if msgs, err := s.PendingC2D(ctx, "d"); err != nil || len(msgs) != 0 {
		t.Fatalf("%d still waiting: %v", len(msgs), err)
	}
	if err := s.DeliveredC2D(ctx, m.ID); err != nil {
		t.Fatalf("counting a delivery of a message gone: %v", err)
	}
}

// The count of a device that stays away follows its queue even when the
// replica that counted it last stops, its timers with it: the periodic
// pass of any replica drops what expired and counts the queue again.
func TestC2DSweepAfterRestart(t *testing.T) {
	ctx := context.Background()
	a := sqliteHub(t)
	now := time.Now().UTC()
	a.Now = func() time.Time { return now }
	newIdentity(t, a, Ref{Device: "d"})
	newIdentity(t, a, Ref{Device: "e"})
	if _, err := a.SendC2D(ctx, "d", map[string]string{"$.exp": now.Add(time.Minute).Format(time.RFC3339Nano)}, []byte("soon gone")); err != nil {
		t.Fatal(err)
	}
	if _, err := a.SendC2D(ctx, "e", nil, []byte("stays")); err != nil {
		t.Fatal(err)
	}
	a.mu.Lock() // a stops: its timers end with it
	for _, e := range a.c2dExpiry {
		e.timer.Stop()
	}
	a.mu.Unlock()
	counting := &countingStore{Store: a.store}
	b := openHub(t, counting)
	b.Now = func() time.Time { return now.Add(2 * time.Minute) }
	if err := b.sweepC2D(ctx); err != nil {
		t.Fatal(err)
	}
	for dev, want := range map[string]int{"d": 0, "e": 1} {
		d, err := b.GetIdentity(ctx, Ref{Device: dev})
		if err != nil {
			t.Fatal(err)
		}
		docs, err := b.store.List(ctx, kindC2D, dev+"/", 10)
		if err != nil {
			t.Fatal(err)
		}
		stored := 0
		for _, doc := range docs {
			if strings.HasPrefix(doc.ID, dev+"/") {
				stored++
			}
		}
		if d.CloudToDeviceMessageCount != want || stored != want {
			t.Errorf("%s: count %d, %d stored, want %d", dev, d.CloudToDeviceMessageCount, stored, want)
		}
	}
	// With nothing to drop, a pass only lists the queues.
	counting.gets.Store(0)
	if err := b.sweepC2D(ctx); err != nil {
		t.Fatal(err)
	}
	if n := counting.gets.Load(); n != 0 {
		t.Errorf("a pass with nothing to drop read %d documents one by one", n)
	}
}

// cancelAfter cancels a context once a store call matching when has
// returned, as a client going away then cancels its request's.
type cancelAfter struct {
	store.Store
	cancel func()
	when   atomic.Value // func(op, kind string) bool
}

func (c *cancelAfter) after(op, kind string) {
	if f, _ := c.when.Load().(func(op, kind string) bool); f != nil && f(op, kind) {
		c.cancel()
	}
}

func (c *cancelAfter) Create(ctx context.Context, d store.Doc) (store.Doc, error) {
	r, err := c.Store.Create(ctx, d)
	c.after("create", d.Kind)
	return r, err
}

func (c *cancelAfter) Delete(ctx context.Context, kind, id, etag string) error {
	err := c.Store.Delete(ctx, kind, id, etag)
	c.after("delete", kind)
	return err
}

// What follows a committed write is done even when the caller goes away
// right after it: a device deleted then does not leave its queue to one
// created again under its ID, and a send whose message is in is not
// answered with an error while its message stays queued.
func TestC2DFollowUpOutlivesCaller(t *testing.T) {
	never := func(string, string) bool { return false }
	t.Run("delete", func(t *testing.T) {
		ca := &cancelAfter{Store: sqliteHub(t).store}
		s := openHub(t, ca)
		newIdentity(t, s, Ref{Device: "d"})
		if _, err := s.SendC2D(context.Background(), "d", nil, []byte("for the old d")); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		ca.cancel = cancel
		ca.when.Store(func(op, kind string) bool { return op == "delete" && kind == kindDevice })
		if err := s.DeleteIdentity(ctx, Ref{Device: "d"}, ""); err != nil {
			t.Fatal(err)
		}
		ca.when.Store(never)
		newIdentity(t, s, Ref{Device: "d"})
		if msgs, err := s.PendingC2D(context.Background(), "d"); err != nil || len(msgs) != 0 {
			t.Errorf("the new d has %d message(s) of the old one (%v)", len(msgs), err)
		}
	})
	t.Run("send", func(t *testing.T) {
		ca := &cancelAfter{Store: sqliteHub(t).store}
		s := openHub(t, ca)
		newIdentity(t, s, Ref{Device: "d"})
		ctx, cancel := context.WithCancel(context.Background())
		ca.cancel = cancel
		ca.when.Store(func(op, kind string) bool { return op == "create" && kind == kindC2D })
		_, err := s.SendC2D(ctx, "d", nil, []byte("x"))
		ca.when.Store(never)
		msgs, err2 := s.PendingC2D(context.Background(), "d")
		if err2 != nil {
			t.Fatal(err2)
		}
		d, err2 := s.GetIdentity(context.Background(), Ref{Device: "d"})
		if err2 != nil {
			t.Fatal(err2)
		}
		if err != nil || len(msgs) != 1 || d.CloudToDeviceMessageCount != 1 {
			t.Errorf("send: %v; %d queued, count %d", err, len(msgs), d.CloudToDeviceMessageCount)
		}
	})
	t.Run("complete", func(t *testing.T) {
		ca := &cancelAfter{Store: sqliteHub(t).store}
		s := openHub(t, ca)
		newIdentity(t, s, Ref{Device: "d"})
		m, err := s.SendC2D(context.Background(), "d", nil, []byte("x"))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		ca.cancel = cancel
		ca.when.Store(func(op, kind string) bool { return op == "delete" && kind == kindC2D })
		if err := s.CompleteC2D(ctx, m.ID); err != nil {
			t.Fatal(err)
		}
		ca.when.Store(never)
		if d, err := s.GetIdentity(context.Background(), Ref{Device: "d"}); err != nil || d.CloudToDeviceMessageCount != 0 {
			t.Errorf("count after the only message was completed: %d (%v)", d.CloudToDeviceMessageCount, err)
		}
	})
}

// On PostgreSQL, two replicas sending to one device, each message
// completed at once, with reported properties written meanwhile: no send
// is refused because writing the device's count lost its races, and the
// count ends as the queue.
func TestC2DSendsNotRefusedForTheCount(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	replica := postgresReplicas(ctx, t)
	reps := []*Service{replica(), replica()}
	newIdentity(t, reps[0], Ref{Device: "d"})
	var wg sync.WaitGroup
	var ok, failed atomic.Int32
	stop := time.Now().Add(5 * time.Second)
	for w := range 4 {
		wg.Go(func() {
			s := reps[w%2]
			for time.Now().Before(stop) {
				m, err := s.SendC2D(ctx, "d", nil, []byte("x"))
				if err != nil {
					failed.Add(1)
					t.Logf("send: %v", err)
					continue
				}
				ok.Add(1)
				if err := s.CompleteC2D(ctx, m.ID); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Go(func() {
		for i := 0; time.Now().Before(stop); i++ {
			if _, err := reps[i%2].UpdateReported(ctx, Ref{Device: "d"}, map[string]any{"i": i}); err != nil && !azerr.HasStatus(err, 412) {
				t.Errorf("reported: %v", err)
			}
		}
	})
	wg.Wait()
	if failed.Load() > 0 {
		t.Errorf("%d of %d sends refused", failed.Load(), failed.Load()+ok.Load())
	}
	for _, s := range reps {
		if err := s.sweepC2D(ctx); err != nil { // counts left to the pass
			t.Fatal(err)
		}
	}
	msgs, err := reps[0].PendingC2D(ctx, "d")
	if err != nil {
		t.Fatal(err)
	}
	if d, err := reps[0].GetIdentity(ctx, Ref{Device: "d"}); err != nil || d.CloudToDeviceMessageCount != len(msgs) {
		t.Errorf("count %d, queue %d (%v)", d.CloudToDeviceMessageCount, len(msgs), err)
	}
}
