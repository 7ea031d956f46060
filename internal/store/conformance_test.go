package store

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/testutil"
)

// The conformance suite: what every Store answers, run against each
// backend (TestSQLite, TestPostgres). A behaviour of the store is tested
// here, once, so that the backends cannot drift apart.

// backend makes databases for the suite.
type backend struct {
	name string
	// newDB makes a new, empty database and returns the DSN Open takes.
	newDB func(tb testing.TB) string
	// exec runs SQL on the database at dsn, bypassing the store.
	exec func(tb testing.TB, dsn, sql string)
}

// open opens a store on dsn, closed when the test ends.
func (b backend) open(tb testing.TB, dsn string) Store {
	tb.Helper()
	s, err := Open(context.Background(), dsn, "")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Close() })
	return s
}

// fresh opens a store on a new database.
func (b backend) fresh(tb testing.TB) Store {
	tb.Helper()
	return b.open(tb, b.newDB(tb))
}

func runConformance(t *testing.T, b backend) {
	for _, tc := range []struct {
		name string
		test func(*testing.T, backend)
	}{
		{"DocLifecycle", testDocLifecycle},
		{"PutRules", testPutRules},
		{"DeleteRules", testDeleteRules},
		{"KindsAreSeparate", testKindsAreSeparate},
		{"DeleteTree", testDeleteTree},
		{"CreateUnder", testCreateUnder},
		{"CreateUnderRacingDeleteTree", testCreateUnderRacingDeleteTree},
		{"ListOrder", testListOrder},
		{"BodiesVerbatim", testBodiesVerbatim},
		{"Timestamps", testTimestamps},
		{"CreateRace", testCreateRace},
		{"PutRace", testPutRace},
		{"DeleteRace", testDeleteRace},
		{"Events", testEvents},
		{"EventFields", testEventFields},
		{"DeleteEventsBefore", testDeleteEventsBefore},
		{"AppendEventConcurrent", testAppendEventConcurrent},
		{"AppendEventCanceled", testAppendEventCanceled},
		{"AppendEventClosed", testAppendEventClosed},
		{"Reopen", testReopen},
		{"ConcurrentOpen", testConcurrentOpen},
		{"NewerSchemaRefused", testNewerSchemaRefused},
		{"OlderSchemaUpgradedOnlyByTheServer", testOlderSchemaUpgradedOnlyByTheServer},
		{"ForeignDatabaseRefused", testForeignDatabaseRefused},
		{"Replicas", testReplicas},
	} {
		t.Run(tc.name, func(t *testing.T) { tc.test(t, b) })
	}
}

func doc(kind, id, body string) Doc { return Doc{Kind: kind, ID: id, Body: []byte(body)} }

func testDocLifecycle(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.fresh(t)
	d, err := s.Create(ctx, doc("k", "a", `{"v":1}`))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(ctx, doc("k", "a", `{}`)); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate create: %v", err)
	}
	if _, err := s.Put(ctx, doc("k", "a", `{"v":2}`), "stale"); !errors.Is(err, ErrPrecondition) {
		t.Fatalf("stale etag: %v", err)
	}
	if _, err := s.Put(ctx, doc("k", "zz", `{}`), "*"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("put * on missing: %v", err)
	}
	d2, err := s.Put(ctx, doc("k", "a", `{"v":2}`), d.ETag)
	if err != nil || d2.ETag == d.ETag {
		t.Fatalf("conditional put: %v %q", err, d2.ETag)
	}
	got, err := s.Get(ctx, "k", "a")
	if err != nil || string(got.Body) != `{"v":2}` || got.ETag != d2.ETag {
		t.Fatalf("get: %+v %v", got, err)
	}
	if _, err := s.Put(ctx, doc("k", "b", `{}`), ""); err != nil {
		t.Fatal(err)
	}
	list, _ := s.List(ctx, "k", "", 10)
	if len(list) != 2 || list[0].ID != "a" || list[1].ID != "b" {
		t.Fatalf("list: %+v", list)
	}
	if page, _ := s.List(ctx, "k", "a", 10); len(page) != 1 || page[0].ID != "b" {
		t.Fatalf("list after a: %+v", page)
	}
	if n, _ := s.Count(ctx, "k"); n != 2 {
		t.Fatalf("count %d", n)
	}
	if err := s.Delete(ctx, "k", "a", "stale"); !errors.Is(err, ErrPrecondition) {
		t.Fatalf("delete stale: %v", err)
	}
	if err := s.Delete(ctx, "k", "a", d2.ETag); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, "k", "a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after delete: %v", err)
	}
	if err := s.Delete(ctx, "k", "a", ""); !errors.Is(err, ErrNotFound) {
		t.Fatalf("delete missing: %v", err)
	}
}

// Put: "" writes whatever is there (creating), "*" needs a document, an
// etag needs that etag; every write gives a new etag; a refused write
// changes nothing.
func testPutRules(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.fresh(t)
	for _, ifMatch := range []string{"*", "some-etag"} {
		if _, err := s.Put(ctx, doc("k", "missing", `1`), ifMatch); !errors.Is(err, ErrNotFound) {
			t.Errorf("Put(ifMatch %q) of a missing document: %v, want ErrNotFound", ifMatch, err)
		}
	}
	if _, err := s.Get(ctx, "k", "missing"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a refused Put created the document: %v", err)
	}
	d1, err := s.Put(ctx, doc("k", "a", `1`), "")
	if err != nil {
		t.Fatal(err)
	}
	if d1.Kind != "k" || d1.ID != "a" || d1.ETag == "" || d1.Updated.IsZero() {
		t.Fatalf("Put returned %+v", d1)
	}
	d2, err := s.Put(ctx, doc("k", "a", `2`), "") // unconditional over an existing one
	if err != nil || d2.ETag == d1.ETag {
		t.Fatalf("unconditional overwrite: %v, etag %q after %q", err, d2.ETag, d1.ETag)
	}
	d3, err := s.Put(ctx, doc("k", "a", `3`), "*")
	if err != nil || d3.ETag == d2.ETag {
		t.Fatalf("Put *: %v, etag %q after %q", err, d3.ETag, d2.ETag)
	}
	if _, err := s.Put(ctx, doc("k", "a", `stale`), d2.ETag); !errors.Is(err, ErrPrecondition) {
		t.Fatalf("Put with the etag before last: %v", err)
	}
	d4, err := s.Put(ctx, doc("k", "a", `4`), d3.ETag)
	if err != nil || d4.ETag == d3.ETag {
		t.Fatalf("Put with the current etag: %v", err)
	}
	got, err := s.Get(ctx, "k", "a")
	if err != nil || string(got.Body) != `4` || got.ETag != d4.ETag || got.Kind != "k" || got.ID != "a" {
		t.Fatalf("Get: %+v %v", got, err)
	}
	if n, _ := s.Count(ctx, "k"); n != 1 {
		t.Fatalf("count %d after writes to one document", n)
	}
}

// Delete: "" and "*" delete whatever is there, an etag must match; a
// refused delete keeps the document.
func testDeleteRules(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.fresh(t)
	for _, ifMatch := range []string{"", "*", "some-etag"} {
		if err := s.Delete(ctx, "k", "missing", ifMatch); !errors.Is(err, ErrNotFound) {
			t.Errorf("Delete(ifMatch %q) of a missing document: %v, want ErrNotFound", ifMatch, err)
		}
	}
	d, _ := s.Create(ctx, doc("k", "a", `1`))
	if err := s.Delete(ctx, "k", "a", "stale"); !errors.Is(err, ErrPrecondition) {
		t.Fatalf("delete with a stale etag: %v", err)
	}
	if got, err := s.Get(ctx, "k", "a"); err != nil || got.ETag != d.ETag {
		t.Fatalf("a refused delete changed the document: %+v %v", got, err)
	}
	if err := s.Delete(ctx, "k", "a", "*"); err != nil {
		t.Fatalf("delete *: %v", err)
	}
	if _, err := s.Create(ctx, doc("k", "a", `2`)); err != nil {
		t.Fatalf("create after delete: %v", err)
	}
	if err := s.Delete(ctx, "k", "a", ""); err != nil {
		t.Fatalf("unconditional delete: %v", err)
	}
	if n, _ := s.Count(ctx, "k"); n != 0 {
		t.Fatalf("count %d after deleting everything", n)
	}
}

func testKindsAreSeparate(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.fresh(t)
	if _, err := s.Create(ctx, doc("device", "x", `"device"`)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(ctx, doc("enrollment", "x", `"enrollment"`)); err != nil {
		t.Fatalf("the same ID under another kind: %v", err)
	}
	if _, err := s.Create(ctx, doc("enrollment", "y", `"enrollment"`)); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.Get(ctx, "device", "x"); string(got.Body) != `"device"` {
		t.Fatalf("device x: %s", got.Body)
	}
	if n, _ := s.Count(ctx, "enrollment"); n != 2 {
		t.Fatalf("enrollments: %d", n)
	}
	if n, _ := s.Count(ctx, "nothing"); n != 0 {
		t.Fatalf("kind with no documents: %d", n)
	}
	if l, _ := s.List(ctx, "device", "", 10); len(l) != 1 || l[0].Kind != "device" {
		t.Fatalf("devices: %+v", l)
	}
	if err := s.Delete(ctx, "device", "x", ""); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, "enrollment", "x"); err != nil {
		t.Fatalf("deleting device x deleted enrollment x: %v", err)
	}
}

// DeleteTree removes the document and those of the kinds named whose IDs
// begin with its ID and a slash, and nothing else; a refused one removes
// nothing.
func testDeleteTree(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.fresh(t)
	parent, _ := s.Create(ctx, doc("dev", "d", `{}`))
	under := []Doc{doc("mod", "d/a", `1`), doc("mod", "d/b/c", `2`), doc("msg", "d/1", `3`)}
	besides := []Doc{doc("mod", "d0", `4`), doc("mod", "d-x/a", `5`), doc("mod", "d2/a", `6`),
		doc("mod", "d", `7`), doc("other", "d/a", `8`), doc("dev", "d/a", `9`)}
	for _, d := range append(slices.Clone(under), besides...) {
		if _, err := s.Create(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.DeleteTree(ctx, "dev", "d", "stale", "mod", "msg"); !errors.Is(err, ErrPrecondition) {
		t.Fatalf("DeleteTree with a stale etag: %v", err)
	}
	if _, err := s.DeleteTree(ctx, "dev", "missing", "", "mod", "msg"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("DeleteTree of a missing document: %v", err)
	}
	for _, d := range append([]Doc{parent}, under...) {
		if _, err := s.Get(ctx, d.Kind, d.ID); err != nil {
			t.Fatalf("a refused DeleteTree removed %s %s: %v", d.Kind, d.ID, err)
		}
	}
	gone, err := s.DeleteTree(ctx, "dev", "d", parent.ETag, "mod", "msg")
	if err != nil {
		t.Fatal(err)
	}
	key := func(d Doc) string { return d.Kind + " " + d.ID }
	var got, want []string
	for _, d := range gone {
		got = append(got, key(d))
	}
	for _, d := range under {
		want = append(want, key(d))
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("DeleteTree says it removed %q, want %q", got, want)
	}
	for _, d := range append([]Doc{parent}, under...) {
		if _, err := s.Get(ctx, d.Kind, d.ID); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s %s is still there: %v", d.Kind, d.ID, err)
		}
	}
	for _, d := range besides {
		if _, err := s.Get(ctx, d.Kind, d.ID); err != nil {
			t.Errorf("%s %s, not under d, was removed: %v", d.Kind, d.ID, err)
		}
	}
}

// CreateUnder stores a document only while its parent exists.
func testCreateUnder(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.fresh(t)
	if _, err := s.CreateUnder(ctx, doc("mod", "d/a", `1`), "dev", "d"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("CreateUnder a missing parent: %v", err)
	}
	if _, err := s.Get(ctx, "mod", "d/a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a refused CreateUnder stored its document: %v", err)
	}
	if _, err := s.Create(ctx, doc("dev", "d", `{}`)); err != nil {
		t.Fatal(err)
	}
	d, err := s.CreateUnder(ctx, doc("mod", "d/a", `1`), "dev", "d")
	if err != nil || d.ETag == "" {
		t.Fatalf("CreateUnder: %+v %v", d, err)
	}
	if got, err := s.Get(ctx, "mod", "d/a"); err != nil || got.ETag != d.ETag || string(got.Body) != `1` {
		t.Fatalf("the document created: %+v %v", got, err)
	}
	if _, err := s.CreateUnder(ctx, doc("mod", "d/a", `2`), "dev", "d"); !errors.Is(err, ErrExists) {
		t.Fatalf("CreateUnder of a taken ID: %v", err)
	}
	if _, err := s.DeleteTree(ctx, "dev", "d", "", "mod"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateUnder(ctx, doc("mod", "d/b", `3`), "dev", "d"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("CreateUnder a deleted parent: %v", err)
	}
	// A missing parent is the answer even when a leftover holds the ID.
	if _, err := s.Create(ctx, doc("mod", "d/a", `4`)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateUnder(ctx, doc("mod", "d/a", `5`), "dev", "d"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("CreateUnder a missing parent, over a leftover: %v", err)
	}
}

// Creates under a document racing its DeleteTree: each either lands
// before it, and is removed with it, or is refused; none outlives the
// parent.
func testCreateUnderRacingDeleteTree(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.fresh(t)
	const creators = 8
	for round := range 20 {
		parent := "p" + strconv.Itoa(round)
		if _, err := s.Create(ctx, doc("dev", parent, `{}`)); err != nil {
			t.Fatal(err)
		}
		var gone []Doc
		created := countWins(t, creators+1, func(i int) error {
			if i == creators {
				var err error
				gone, err = s.DeleteTree(ctx, "dev", parent, "", "mod")
				return err
			}
			_, err := s.CreateUnder(ctx, doc("mod", parent+"/"+strconv.Itoa(i), `1`), "dev", parent)
			return err
		}, ErrNotFound) - 1
		if len(gone) != created {
			t.Fatalf("round %d: %d created, %d removed with their parent", round, created, len(gone))
		}
		if left, err := s.List(ctx, "mod", parent+"/", creators); err != nil || len(left) != 0 {
			t.Fatalf("round %d: %d documents outlived their parent: %v", round, len(left), err)
		}
	}
}

// IDs are ordered byte by byte, whatever the database's locale, and paging
// with the last ID as cursor visits each document once.
func testListOrder(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.fresh(t)
	ids := []string{"b", "B", "a", "A", "a-1", "a_1", "a1", "a/2", "a/10", "ab", "é", "e", "z", "~", "Z9", "device/0001", "device/0002", "device0"}
	for _, id := range ids {
		if _, err := s.Create(ctx, doc("k", id, `{}`)); err != nil {
			t.Fatal(err)
		}
	}
	want := slices.Clone(ids)
	slices.Sort(want) // Go compares strings byte by byte
	all, err := s.List(ctx, "k", "", 100)
	if err != nil {
		t.Fatal(err)
	}
	if got := docIDs(all); !slices.Equal(got, want) {
		t.Fatalf("List order:\n got %q\nwant %q", got, want)
	}
	var paged []string
	for after := ""; ; {
		page, err := s.List(ctx, "k", after, 4)
		if err != nil {
			t.Fatal(err)
		}
		if len(page) > 4 {
			t.Fatalf("page of %d, limit 4", len(page))
		}
		if len(page) == 0 {
			break
		}
		paged = append(paged, docIDs(page)...)
		after = page[len(page)-1].ID
	}
	if !slices.Equal(paged, want) {
		t.Fatalf("paging:\n got %q\nwant %q", paged, want)
	}
	// A prefix bounds a range: everything after "device/" up to "device0".
	page, _ := s.List(ctx, "k", "device/", 2)
	if got := docIDs(page); !slices.Equal(got, []string{"device/0001", "device/0002"}) {
		t.Fatalf("after device/: %q", got)
	}
	if none, err := s.List(ctx, "k", "", 0); err != nil || len(none) != 0 {
		t.Fatalf("limit 0: %q %v", docIDs(none), err)
	}
	if unlimited, err := s.List(ctx, "k", "", -1); err != nil || len(unlimited) != len(ids) {
		t.Fatalf("negative limit (no limit): %d documents, %v", len(unlimited), err)
	}
	if none, err := s.List(ctx, "other", "", 10); err != nil || len(none) != 0 {
		t.Fatalf("another kind: %q %v", docIDs(none), err)
	}
}

func docIDs(ds []Doc) []string {
	var out []string
	for _, d := range ds {
		out = append(out, d.ID)
	}
	return out
}

// Bodies come back as the bytes that were stored: not reformatted JSON.
func testBodiesVerbatim(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.fresh(t)
	bodies := map[string][]byte{
		"spacing":   []byte("{ \"b\" : 1,\n\t\"a\":[1, 2.50] }"),
		"duplicate": []byte(`{"a":1,"a":2}`),
		"bigint":    []byte(`{"n":123456789012345678901234567890}`),
		"binary":    {0, 1, 2, 0xff, 0xfe, '\'', '"', '\\', 0},
		"empty":     {},
	}
	for id, body := range bodies {
		if _, err := s.Put(ctx, Doc{Kind: "k", ID: id, Body: body}, ""); err != nil {
			t.Fatalf("%s: %v", id, err)
		}
	}
	for id, body := range bodies {
		got, err := s.Get(ctx, "k", id)
		if err != nil || !bytes.Equal(got.Body, body) {
			t.Errorf("%s: stored %q, got %q %v", id, body, got.Body, err)
		}
	}
	list, _ := s.List(ctx, "k", "", -1)
	for _, d := range list {
		if !bytes.Equal(d.Body, bodies[d.ID]) {
			t.Errorf("List %s: stored %q, got %q", d.ID, bodies[d.ID], d.Body)
		}
	}
}

// Updated is when the document was last written, to the millisecond.
func testTimestamps(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.fresh(t)
	before := time.Now()
	d, err := s.Create(ctx, doc("k", "a", `1`))
	if err != nil {
		t.Fatal(err)
	}
	got, _ := s.Get(ctx, "k", "a")
	if diff := got.Updated.Sub(d.Updated); diff < -time.Millisecond || diff > time.Millisecond {
		t.Fatalf("Updated: Create said %v, Get says %v", d.Updated, got.Updated)
	}
	if got.Updated.Before(before.Add(-time.Millisecond)) || got.Updated.After(time.Now().Add(time.Millisecond)) {
		t.Fatalf("Updated %v is not between %v and now", got.Updated, before)
	}
	time.Sleep(5 * time.Millisecond)
	d2, _ := s.Put(ctx, doc("k", "a", `2`), "")
	got2, _ := s.Get(ctx, "k", "a")
	if !got2.Updated.After(got.Updated) || got2.Updated.Sub(d2.Updated).Abs() > time.Millisecond {
		t.Fatalf("Updated after a Put: %v, before it %v, Put said %v", got2.Updated, got.Updated, d2.Updated)
	}
}

// countWins runs n goroutines of f and counts those that returned nil;
// errors other than the expected ones fail the test.
func countWins(t *testing.T, n int, f func(i int) error, expected ...error) int {
	t.Helper()
	var wg sync.WaitGroup
	var mu sync.Mutex
	wins := 0
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			err := f(i)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				wins++
			case !slices.ContainsFunc(expected, func(e error) bool { return errors.Is(err, e) }):
				t.Errorf("goroutine %d: %v", i, err)
			}
		})
	}
	close(start)
	wg.Wait()
	return wins
}

// Concurrent creates of one ID: exactly one wins, the others get ErrExists.
func testCreateRace(t *testing.T, b backend) {
	s := b.fresh(t)
	for round := range 5 {
		id := "x" + strconv.Itoa(round)
		wins := countWins(t, 16, func(i int) error {
			_, err := s.Create(context.Background(), doc("k", id, strconv.Itoa(i)))
			return err
		}, ErrExists)
		if wins != 1 {
			t.Fatalf("round %d: %d creates won", round, wins)
		}
	}
}

// incrementAll runs workers×each read-modify-write increments of the
// counter k/n through the stores (round robin), each retrying on a stale
// etag, and checks that none is lost.
func incrementAll(t *testing.T, stores []Store, workers, each int) {
	t.Helper()
	ctx := context.Background()
	if _, err := stores[0].Create(ctx, doc("k", "n", `0`)); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var conflicts atomic.Int64
	for w := range workers {
		s := stores[w%len(stores)]
		wg.Go(func() {
			for range each {
				for {
					d, err := s.Get(ctx, "k", "n")
					if err != nil {
						t.Error(err)
						return
					}
					n, _ := strconv.Atoi(string(d.Body))
					_, err = s.Put(ctx, doc("k", "n", strconv.Itoa(n+1)), d.ETag)
					if err == nil {
						break
					}
					if !errors.Is(err, ErrPrecondition) {
						t.Error(err)
						return
					}
					conflicts.Add(1)
				}
			}
		})
	}
	wg.Wait()
	d, err := stores[len(stores)-1].Get(ctx, "k", "n")
	if err != nil {
		t.Fatal(err)
	}
	if got := string(d.Body); got != strconv.Itoa(workers*each) {
		t.Fatalf("counter %s after %d increments: updates were lost", got, workers*each)
	}
	t.Logf("%d increments, %d retries after a stale etag", workers*each, conflicts.Load())
}

// Conditional Puts racing on one document: no update is lost.
func testPutRace(t *testing.T, b backend) {
	incrementAll(t, []Store{b.fresh(t)}, 8, 25)
}

// Conditional deletes with one etag: exactly one succeeds.
func testDeleteRace(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.fresh(t)
	d, _ := s.Create(ctx, doc("k", "x", `1`))
	wins := countWins(t, 16, func(int) error { return s.Delete(ctx, "k", "x", d.ETag) }, ErrNotFound, ErrPrecondition)
	if wins != 1 {
		t.Fatalf("%d deletes won", wins)
	}
	// A Put holding the etag races deletes holding it too: one wins.
	d, _ = s.Create(ctx, doc("k", "y", `1`))
	wins = countWins(t, 16, func(i int) error {
		if i%2 == 0 {
			_, err := s.Put(ctx, doc("k", "y", `2`), d.ETag)
			return err
		}
		return s.Delete(ctx, "k", "y", d.ETag)
	}, ErrNotFound, ErrPrecondition)
	if wins != 1 {
		t.Fatalf("%d of racing puts and deletes won", wins)
	}
}

func testEvents(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.fresh(t)
	for i, dev := range []string{"d1", "d2", "d1"} {
		if _, err := s.AppendEvent(ctx, Event{DeviceID: dev, Properties: map[string]string{"i": string(rune('0' + i))}, Body: []byte("x"), Enqueued: time.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	all, _ := s.Events(ctx, "", 0, 10)
	d1, _ := s.Events(ctx, "d1", 0, 10)
	if len(all) != 3 || len(d1) != 2 || d1[1].Properties["i"] != "2" {
		t.Fatalf("all=%+v d1=%+v", all, d1)
	}
	if rest, _ := s.Events(ctx, "", all[0].Seq, 10); len(rest) != 2 {
		t.Fatalf("after: %+v", rest)
	}
	if first, _ := s.Events(ctx, "", 0, 1); len(first) != 1 || first[0].Seq != all[0].Seq {
		t.Fatalf("limit 1: %+v", first)
	}
	if none, _ := s.Events(ctx, "d2", all[1].Seq, 10); len(none) != 0 {
		t.Fatalf("d2 after its only event: %+v", none)
	}
	if every, err := s.Events(ctx, "", 0, -1); err != nil || len(every) != 3 {
		t.Fatalf("negative limit (no limit): %d events, %v", len(every), err)
	}
}

// Expired events go, oldest first and at most limit at a time; newer ones stay.
func testDeleteEventsBefore(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.fresh(t)
	if n, err := s.DeleteEventsBefore(ctx, time.Now(), 10); err != nil || n != 0 {
		t.Fatalf("no events: deleted %d, %v", n, err)
	}
	start := time.Now().Add(-time.Hour)
	for i := range 5 {
		if _, err := s.AppendEvent(ctx, Event{DeviceID: "d1", Body: []byte{byte(i)}, Enqueued: start.Add(time.Duration(i) * time.Minute)}); err != nil {
			t.Fatal(err)
		}
	}
	cutoff := start.Add(3*time.Minute - time.Second) // the first three are older
	if n, err := s.DeleteEventsBefore(ctx, cutoff, 2); err != nil || n != 2 {
		t.Fatalf("first batch: deleted %d, %v", n, err)
	}
	if n, err := s.DeleteEventsBefore(ctx, cutoff, 2); err != nil || n != 1 {
		t.Fatalf("second batch: deleted %d, %v", n, err)
	}
	left, _ := s.Events(ctx, "", 0, 10)
	if len(left) != 2 || left[0].Body[0] != 3 || left[1].Body[0] != 4 {
		t.Fatalf("left %+v", left)
	}
}

// Every field of an event comes back as it went in.
func testEventFields(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.fresh(t)
	enq := time.Now()
	in := []Event{
		{DeviceID: "dev", ModuleID: "mod", Properties: map[string]string{"$.ct": "application/json", "nul": "a\x00b", "ünï": "cødé"},
			Body: []byte{0, 1, 0xff, '{'}, Enqueued: enq},
		{DeviceID: "dev", Enqueued: enq}, // no properties, no body
	}
	var seqs []int64
	for _, e := range in {
		seq, err := s.AppendEvent(ctx, e)
		if err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, seq)
	}
	if seqs[1] <= seqs[0] || seqs[0] <= 0 {
		t.Fatalf("sequence numbers %v", seqs)
	}
	out, err := s.Events(ctx, "dev", 0, 10)
	if err != nil || len(out) != 2 {
		t.Fatalf("%+v %v", out, err)
	}
	for i, e := range out {
		w := in[i]
		if e.Seq != seqs[i] || e.DeviceID != w.DeviceID || e.ModuleID != w.ModuleID || !bytes.Equal(e.Body, w.Body) ||
			len(e.Properties) != len(w.Properties) || e.Enqueued.Sub(w.Enqueued).Abs() > time.Millisecond {
			t.Errorf("event %d: stored %+v, got %+v", i, w, e)
		}
		for k, v := range w.Properties {
			if e.Properties[k] != v {
				t.Errorf("event %d property %q: stored %q, got %q", i, k, v, e.Properties[k])
			}
		}
	}
}

// Concurrent appends, which the backends batch into shared transactions:
// every event stored once, sequence numbers unique and each appender's
// increasing, every caller told the number its own event got.
func testAppendEventConcurrent(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.fresh(t)
	const appenders, each = 64, 100
	seqs := make([][]int64, appenders)
	var wg sync.WaitGroup
	for a := range appenders {
		wg.Go(func() {
			for i := range each {
				seq, err := s.AppendEvent(ctx, Event{DeviceID: fmt.Sprintf("d%02d", a),
					Properties: map[string]string{"i": strconv.Itoa(i)}, Body: []byte(strconv.Itoa(i)), Enqueued: time.Now()})
				if err != nil {
					t.Error(err)
					return
				}
				seqs[a] = append(seqs[a], seq)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	all, err := s.Events(ctx, "", 0, -1)
	if err != nil || len(all) != appenders*each {
		t.Fatalf("%d events stored, want %d (%v)", len(all), appenders*each, err)
	}
	bySeq := map[int64]Event{}
	for i, e := range all {
		if i > 0 && e.Seq <= all[i-1].Seq {
			t.Fatalf("events out of order: %d after %d", e.Seq, all[i-1].Seq)
		}
		bySeq[e.Seq] = e
	}
	seen := map[int64]bool{}
	for a, ss := range seqs {
		for i, seq := range ss {
			if seen[seq] {
				t.Fatalf("sequence number %d returned twice", seq)
			}
			seen[seq] = true
			if i > 0 && seq <= ss[i-1] {
				t.Fatalf("appender %d: seq %d after %d", a, seq, ss[i-1])
			}
			if e, ok := bySeq[seq]; !ok || e.DeviceID != fmt.Sprintf("d%02d", a) || e.Properties["i"] != strconv.Itoa(i) || string(e.Body) != strconv.Itoa(i) {
				t.Fatalf("appender %d event %d: seq %d holds %+v", a, i, seq, e)
			}
		}
	}
}

// An append whose context has ended is refused and not stored.
func testAppendEventCanceled(t *testing.T, b backend) {
	s := b.fresh(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.AppendEvent(ctx, Event{DeviceID: "d", Enqueued: time.Now()}); !errors.Is(err, context.Canceled) {
		t.Fatalf("append with a canceled context: %v", err)
	}
	time.Sleep(20 * time.Millisecond) // the writer may still have the batch
	if evs, _ := s.Events(context.Background(), "", 0, 10); len(evs) != 0 {
		t.Fatalf("stored %+v", evs)
	}
}

// Close waits for queued appends; appends after Close fail.
func testAppendEventClosed(t *testing.T, b backend) {
	dsn := b.newDB(t)
	s, err := Open(context.Background(), dsn, "")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var stored atomic.Int64
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			_, err := s.AppendEvent(ctx, Event{DeviceID: "d", Enqueued: time.Now()})
			switch {
			case err == nil:
				stored.Add(1)
			case !errors.Is(err, errStoreClosed):
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.AppendEvent(ctx, Event{DeviceID: "d", Enqueued: time.Now()}); !errors.Is(err, errStoreClosed) {
		t.Fatalf("append after close: %v", err)
	}
	evs, _ := b.open(t, dsn).Events(ctx, "", 0, -1)
	if int64(len(evs)) != stored.Load() {
		t.Fatalf("%d appends succeeded, %d events stored", stored.Load(), len(evs))
	}
}

// Documents and events outlive the store that wrote them, and opening an
// up-to-date database again migrates nothing.
func testReopen(t *testing.T, b backend) {
	ctx := context.Background()
	dsn := b.newDB(t)
	s1, err := Open(ctx, dsn, "")
	if err != nil {
		t.Fatal(err)
	}
	d, _ := s1.Create(ctx, doc("k", "a", `1`))
	seq, _ := s1.AppendEvent(ctx, Event{DeviceID: "d", Enqueued: time.Now()})
	s1.Close()
	for range 2 {
		s2, err := Open(ctx, dsn, "")
		if err != nil {
			t.Fatalf("reopening: %v", err)
		}
		got, err := s2.Get(ctx, "k", "a")
		if err != nil || got.ETag != d.ETag {
			t.Fatalf("after reopening: %+v %v", got, err)
		}
		next, _ := s2.AppendEvent(ctx, Event{DeviceID: "d", Enqueued: time.Now()})
		if next <= seq {
			t.Fatalf("sequence number %d after %d: not increasing across a reopen", next, seq)
		}
		seq = next
		s2.Close()
	}
}

// Replicas starting together on a new database: every one opens it, and
// the schema is created once.
func testConcurrentOpen(t *testing.T, b backend) {
	dsn := b.newDB(t)
	const n = 8
	stores := make([]Store, n)
	wins := countWins(t, n, func(i int) error {
		var err error
		stores[i], err = Open(context.Background(), dsn, "")
		return err
	})
	for _, s := range stores {
		if s != nil {
			s.Close()
		}
	}
	if wins != n {
		t.Fatalf("%d of %d concurrent opens succeeded", wins, n)
	}
	// The schema was applied exactly once: a second row per version would
	// have violated schema_version's key.
	s := b.open(t, dsn)
	if _, err := s.Create(context.Background(), doc("k", "a", `1`)); err != nil {
		t.Fatal(err)
	}
}

// A database migrated by a newer hatchery is refused, with a message that
// says so, rather than written with an older idea of its schema.
func testNewerSchemaRefused(t *testing.T, b backend) {
	dsn := b.newDB(t)
	b.open(t, dsn).Close()
	b.exec(t, dsn, `INSERT INTO schema_version (version, applied) VALUES (99, `+map[string]string{"sqlite": "0", "postgres": "now()"}[b.name]+`)`)
	s, err := Open(context.Background(), dsn, "")
	if err == nil {
		s.Close()
		t.Fatal("opened a database of schema version 99")
	}
	if want := "schema version 99, newer than this hatchery knows"; !strings.Contains(err.Error(), want) {
		t.Fatalf("error %q does not say %q", err, want)
	}
}

// A database at an older schema version is upgraded by Open (the server),
// never by OpenCurrent (the CLI, a backup), which says what to do instead,
// nor by OpenToRead, which reads its documents as they are; one not served
// yet is refused by both.
func testOlderSchemaUpgradedOnlyByTheServer(t *testing.T, b backend) {
	ctx := context.Background()
	dsn := b.newDB(t)
	for name, open := range map[string]func(context.Context, string, string) (Store, error){"OpenCurrent": OpenCurrent, "OpenToRead": OpenToRead} {
		if s, err := open(ctx, dsn, ""); err == nil || !strings.Contains(err.Error(), "not been served yet") {
			if s != nil {
				s.Close()
			}
			t.Fatalf("%s of a new database: %v", name, err)
		}
	}
	served := b.open(t, dsn)
	if _, err := served.Create(ctx, doc("k", "kept", `1`)); err != nil {
		t.Fatal(err)
	}
	served.Close()
	// This build's next migration, for the length of the test.
	migrations := map[string]*[]string{"sqlite": &sqliteMigrations, "postgres": &postgresMigrations}[b.name]
	saved := *migrations
	*migrations = append(slices.Clone(saved), `CREATE TABLE upgraded (x integer)`)
	t.Cleanup(func() { *migrations = saved })

	if s, err := OpenCurrent(ctx, dsn, ""); err == nil || !strings.Contains(err.Error(), fmt.Sprintf("schema version %d, older than this hatchery's (%d)", len(saved), len(saved)+1)) {
		if s != nil {
			s.Close()
		}
		t.Fatalf("OpenCurrent of an older database: %v", err)
	}
	s, err := OpenToRead(ctx, dsn, "")
	if err != nil {
		t.Fatalf("OpenToRead of an older database: %v", err)
	}
	if d, err := s.Get(ctx, "k", "kept"); err != nil || string(d.Body) != `1` {
		t.Errorf("OpenToRead of an older database reads %q, %v", d.Body, err)
	}
	s.Close()
	if s, err := OpenCurrent(ctx, dsn, ""); err == nil || !strings.Contains(err.Error(), "older than this hatchery's") {
		if s != nil {
			s.Close()
		}
		t.Fatalf("OpenToRead upgraded the database: OpenCurrent says %v", err)
	}
	s, err = Open(ctx, dsn, "")
	if err != nil {
		t.Fatalf("Open of an older database: %v", err)
	}
	s.Close()
	s, err = OpenCurrent(ctx, dsn, "")
	if err != nil {
		t.Fatalf("OpenCurrent once upgraded: %v", err)
	}
	s.Close()
}

// A database of another application — no docs table, or a docs table of
// its own — is refused however it is opened, with a message that names it,
// and is left as it was: no Hatchery table added.
func testForeignDatabaseRefused(t *testing.T, b backend) {
	ctx := context.Background()
	for _, tables := range []string{
		`CREATE TABLE users (id integer PRIMARY KEY, name text)`,
		`CREATE TABLE docs (id integer PRIMARY KEY, title text)`,
	} {
		dsn := b.newDB(t)
		b.exec(t, dsn, tables)
		for name, open := range map[string]func(context.Context, string, string) (Store, error){"Open": Open, "OpenCurrent": OpenCurrent, "OpenToRead": OpenToRead} {
			s, err := open(ctx, dsn, "")
			if err == nil {
				s.Close()
				t.Fatalf("%s of a database with %s succeeded", name, tables)
			}
			if !errors.Is(err, ErrForeign) || !strings.Contains(err.Error(), dsn) || !strings.Contains(err.Error(), "point --database at an empty database") {
				t.Errorf("%s of a database with %s: %v", name, tables, err)
			}
		}
		// Neither of Hatchery's other tables was made: making them succeeds.
		b.exec(t, dsn, `CREATE TABLE schema_version (x integer); CREATE TABLE events (x integer)`)
	}
}

// Two stores on one database, as two `hatchery serve` replicas: each sees
// the other's writes, and their races resolve as within one store.
func testReplicas(t *testing.T, b backend) {
	ctx := context.Background()
	dsn := b.newDB(t)
	r1, r2 := b.open(t, dsn), b.open(t, dsn)

	d, err := r1.Create(ctx, doc("k", "a", `1`))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := r2.Get(ctx, "k", "a"); err != nil || got.ETag != d.ETag || string(got.Body) != `1` {
		t.Fatalf("replica 2 reads replica 1's create: %+v %v", got, err)
	}
	if _, err := r2.Create(ctx, doc("k", "a", `2`)); !errors.Is(err, ErrExists) {
		t.Fatalf("replica 2 creates replica 1's ID: %v", err)
	}
	d2, err := r2.Put(ctx, doc("k", "a", `2`), d.ETag)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r1.Put(ctx, doc("k", "a", `3`), d.ETag); !errors.Is(err, ErrPrecondition) {
		t.Fatalf("replica 1 writes with the etag replica 2 replaced: %v", err)
	}
	if l, _ := r1.List(ctx, "k", "", 10); len(l) != 1 || l[0].ETag != d2.ETag {
		t.Fatalf("replica 1 lists: %+v", l)
	}
	if err := r1.Delete(ctx, "k", "a", d2.ETag); err != nil {
		t.Fatal(err)
	}
	if _, err := r2.Get(ctx, "k", "a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("replica 2 after replica 1's delete: %v", err)
	}

	replicas := []Store{r1, r2}
	for round := range 5 {
		id := "x" + strconv.Itoa(round)
		wins := countWins(t, 16, func(i int) error {
			_, err := replicas[i%2].Create(ctx, doc("k", id, strconv.Itoa(i)))
			return err
		}, ErrExists)
		if wins != 1 {
			t.Fatalf("round %d: %d creates won across two replicas", round, wins)
		}
	}

	t.Run("NoLostUpdate", func(t *testing.T) { incrementAll(t, replicas, 8, 25) })

	// LoadOrCreate from both at once: they agree on one document.
	var vals [16]map[string]int
	countWins(t, 16, func(i int) error {
		return LoadOrCreate(ctx, replicas[i%2], "settings", "s", func() any { return map[string]int{"by": i} }, &vals[i])
	})
	for i := range vals {
		if vals[i]["by"] != vals[0]["by"] {
			t.Fatalf("LoadOrCreate: replica answers %v and %v", vals[0], vals[i])
		}
	}

	t.Run("EventCursor", func(t *testing.T) { testEventCursor(t, replicas) })
}

// A consumer reading the stream with Events(after=last seen) while both
// replicas append misses no event: numbers become visible in order.
func testEventCursor(t *testing.T, replicas []Store) {
	ctx := context.Background()
	const appenders, each = 8, 100
	var wg sync.WaitGroup
	for a := range appenders {
		s := replicas[a%len(replicas)]
		wg.Go(func() {
			for i := range each {
				body, _ := json.Marshal([2]int{a, i})
				if _, err := s.AppendEvent(ctx, Event{DeviceID: "d", Body: body, Enqueued: time.Now()}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()

	seen := map[string]bool{}
	var cursor int64
	read := func() {
		evs, err := replicas[0].Events(ctx, "", cursor, 7)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range evs {
			if e.Seq <= cursor {
				t.Fatalf("seq %d after %d", e.Seq, cursor)
			}
			cursor = e.Seq
			seen[string(e.Body)] = true
		}
	}
	for finished := false; !finished; {
		select {
		case <-done:
			finished = true
		default:
		}
		read()
	}
	for before := -1; before != len(seen); { // drain
		before = len(seen)
		read()
	}
	if len(seen) != appenders*each {
		t.Fatalf("the consumer saw %d of %d events: some became visible behind its cursor", len(seen), appenders*each)
	}
}

// BenchmarkPutGet writes a document and reads it back: the round trip of
// most requests (a twin update, an enrollment read), on each backend.
func BenchmarkPutGet(b *testing.B) {
	b.Run("sqlite", func(b *testing.B) { benchPutGet(b, sqliteBackend) })
	b.Run("postgres", func(b *testing.B) {
		pg := testutil.StartPostgres(b)
		benchPutGet(b, backend{name: "postgres", newDB: pg.NewDatabase, exec: pg.Exec})
	})
}

func benchPutGet(b *testing.B, be backend) {
	ctx := context.Background()
	s := be.fresh(b)
	body := []byte(`{"deviceId":"bench-000123","etag":"AAAAAAAAAAE=","status":"enabled","properties":{"desired":{"telemetryInterval":30,"$version":4},"reported":{"firmware":"1.2.3","$version":17}},"tags":{"site":"plant-7","ring":"canary"}}`)
	const ids = 1000
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		id := "bench-" + strconv.Itoa(i%ids)
		if _, err := s.Put(ctx, Doc{Kind: "twin", ID: id, Body: body}, ""); err != nil {
			b.Fatal(err)
		}
		if _, err := s.Get(ctx, "twin", id); err != nil {
			b.Fatal(err)
		}
	}
}
