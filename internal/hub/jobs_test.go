package hub

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
)

// Jobs update the twins of, or call a method on, the devices their
// condition selects, and count them; bad jobs are refused and stored not;
// a cancelled job does not run.
func TestJobs(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := sqliteHub(t)
	for id, env := range map[string]string{"d1": "prod", "d2": "prod", "d3": "test"} {
		newIdentity(t, s, Ref{Device: id})
		if _, err := s.UpdateTwin(ctx, Ref{Device: id}, "*", &TwinPatch{Tags: map[string]any{"env": env}}, false); err != nil {
			t.Fatal(err)
		}
	}
	defer s.ServeMethods(Ref{Device: "d1"}, func(_ context.Context, name string, _ json.RawMessage) (int, json.RawMessage, error) {
		return 200, json.RawMessage(`"rebooting"`), nil
	})()
	go s.RunJobs(ctx)

	for name, j := range map[string]*Job{
		"no type":      {QueryCondition: "*"},
		"no patch":     {Type: JobUpdateTwin, QueryCondition: "*"},
		"no method":    {Type: JobCallMethod, QueryCondition: "*", CloudToDeviceMethod: &MethodRequest{}},
		"bad query":    {Type: JobUpdateTwin, QueryCondition: "tags.env = ", UpdateTwin: &TwinPatch{Tags: map[string]any{"x": 1}}},
		"bad timeout":  {Type: JobCallMethod, QueryCondition: "*", CloudToDeviceMethod: &MethodRequest{MethodName: "m", ResponseTimeoutInSeconds: 1}},
		"too long":     {Type: JobCallMethod, QueryCondition: "*", CloudToDeviceMethod: &MethodRequest{MethodName: "m"}, MaxExecutionTimeInSeconds: 86401},
		"overflowing":  {Type: JobCallMethod, QueryCondition: "*", CloudToDeviceMethod: &MethodRequest{MethodName: "m"}, MaxExecutionTimeInSeconds: 9223372037},
		"bad property": {Type: JobUpdateTwin, QueryCondition: "*", UpdateTwin: &TwinPatch{Tags: map[string]any{"a.b": 1}}},
		"empty patch":  {Type: JobUpdateTwin, QueryCondition: "*", UpdateTwin: &TwinPatch{Properties: &DesiredPatch{Desired: map[string]any{}}}},
		"modules":      {Type: JobUpdateTwin, QueryCondition: "FROM devices.modules WHERE moduleId = 'm'", UpdateTwin: &TwinPatch{Tags: map[string]any{"x": 1}}},
		"long name":    {Type: JobCallMethod, QueryCondition: "*", CloudToDeviceMethod: &MethodRequest{MethodName: strings.Repeat("m", 129)}},
	} {
		if _, err := s.CreateJob(ctx, "bad", j); !azerr.HasStatus(err, 400) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := s.GetJob(ctx, "bad"); !azerr.HasStatus(err, 404) {
		t.Fatalf("a refused job was stored: %v", err)
	}
	// GET /jobs/v2/query lists jobs: a job of that ID could not be read.
	query := &Job{Type: JobUpdateTwin, QueryCondition: "*", UpdateTwin: &TwinPatch{Tags: map[string]any{"x": 1}}}
	if _, err := s.CreateJob(ctx, "query", query); !azerr.HasStatus(err, 400) || !strings.Contains(err.Error(), "/jobs/v2/query") {
		t.Errorf("a job of ID query: %v", err)
	}

	wait := func(id string) *Job {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			j, err := s.GetJob(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			if j.finished() {
				return j
			}
		}
		t.Fatalf("job %s did not finish", id)
		return nil
	}
	// The job's patch is stored and read back before it is applied:
	// its numbers keep every digit.
	if _, err := s.CreateJob(ctx, "fw", &Job{Type: JobUpdateTwin, QueryCondition: "tags.env = 'prod'",
		UpdateTwin: &TwinPatch{Properties: &DesiredPatch{Desired: map[string]any{"fw": "2.0", "build": json.Number("12345678901234567890")}}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateJob(ctx, "fw", &Job{Type: JobUpdateTwin, QueryCondition: "*", UpdateTwin: &TwinPatch{Tags: map[string]any{"x": 1}}}); !azerr.HasStatus(err, 409) {
		t.Fatalf("a second job fw: %v", err)
	}
	j := wait("fw")
	if st := j.DeviceJobStatistics; j.Status != "completed" || st.DeviceCount != 2 || st.SucceededCount != 2 || st.FailedCount != 0 || j.EndTime == nil {
		t.Fatalf("twin job %+v", j)
	}
	for id, want := range map[string]any{"d1": "2.0", "d2": "2.0", "d3": nil} {
		tw, _ := s.GetTwin(ctx, Ref{Device: id})
		var d map[string]any
		_ = json.Unmarshal(tw.Properties.Desired, &d)
		if d["fw"] != want || (want != nil) != strings.Contains(string(tw.Properties.Desired), `"build":12345678901234567890`) {
			t.Errorf("%s: desired %s", id, tw.Properties.Desired)
		}
	}

	if _, err := s.CreateJob(ctx, "reboot", &Job{Type: JobCallMethod, QueryCondition: "*", CloudToDeviceMethod: &MethodRequest{MethodName: "reboot"}}); err != nil {
		t.Fatal(err)
	}
	j = wait("reboot")
	if st := j.DeviceJobStatistics; j.Status != "completed" || st.DeviceCount != 3 || st.SucceededCount != 1 || st.FailedCount != 2 {
		t.Fatalf("method job (one device connected) %+v", j)
	}

	later := &Job{Type: JobUpdateTwin, QueryCondition: "*", StartTime: time.Now().Add(time.Hour), UpdateTwin: &TwinPatch{Tags: map[string]any{"late": true}}}
	if j, err := s.CreateJob(ctx, "later", later); err != nil || j.Status != "scheduled" {
		t.Fatalf("a job for later: %+v %v", j, err)
	}
	if j, err := s.CancelJob(ctx, "later"); err != nil || j.Status != "cancelled" {
		t.Fatalf("cancelled: %+v %v", j, err)
	}
	jobs, _, err := s.QueryJobs(ctx, JobUpdateTwin, "completed", "", 100)
	if err != nil || len(jobs) != 1 || jobs[0].JobID != "fw" {
		t.Fatalf("query: %v %v", jobs, err)
	}
	// A page of one holds the first job that matches, not the first job.
	jobs, next, err := s.QueryJobs(ctx, JobCallMethod, "", "", 1)
	if err != nil || len(jobs) != 1 || jobs[0].JobID != "reboot" {
		t.Fatalf("a page of one method job: %v %v", jobs, err)
	}
	if jobs, _, err := s.QueryJobs(ctx, JobCallMethod, "", next, 1); err != nil || len(jobs) != 0 {
		t.Fatalf("the page after the last method job: %v %v", jobs, err)
	}
}

// A job whose replica stopped is taken over by another, after the last
// device it did, even where the job's own change makes earlier devices
// fall out of its condition; one whose replica beats is left to it.
func TestJobTakenOver(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a := sqliteHub(t)
	b := openHub(t, a.store)
	for _, id := range []string{"d1", "d2", "d3", "d4"} {
		newIdentity(t, a, Ref{Device: id})
		if _, err := a.UpdateTwin(ctx, Ref{Device: id}, "*", &TwinPatch{Tags: map[string]any{"fw": "1.0"}}, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := (&beater{s: a, seen: map[string]stillBeat{}}).beat(ctx); err != nil {
		t.Fatal(err)
	}
	job := func(id, runner string) {
		t.Helper()
		if _, err := a.CreateJob(ctx, id, &Job{Type: JobUpdateTwin, QueryCondition: "tags.fw = '1.0'",
			UpdateTwin: &TwinPatch{Tags: map[string]any{"fw": "2.0"}}}); err != nil {
			t.Fatal(err)
		}
		// As its runner left it: two devices done.
		if _, err := a.updateJob(ctx, id, func(r *jobRecord) bool {
			r.Status, r.Runner, r.After = "running", runner, "d2"
			r.DeviceJobStatistics = JobStatistics{DeviceCount: 4, SucceededCount: 2, PendingCount: 2}
			return true
		}); err != nil {
			t.Fatal(err)
		}
	}
	job("alive", a.origin)
	job("orphan", "GONEREPLICA")
	var running sync.WaitGroup
	b.takeJobs(ctx, &running)
	running.Wait()
	orphan, _ := b.GetJob(ctx, "orphan")
	if st := orphan.DeviceJobStatistics; orphan.Status != "completed" || st.DeviceCount != 4 || st.SucceededCount != 4 {
		t.Fatalf("the orphan job after the takeover: %+v", orphan)
	}
	for id, want := range map[string]string{"d1": "1.0", "d2": "1.0", "d3": "2.0", "d4": "2.0"} {
		tw, _ := b.GetTwin(ctx, Ref{Device: id})
		var tags map[string]any
		_ = json.Unmarshal(tw.Tags, &tags)
		if tags["fw"] != want {
			t.Errorf("%s: fw %v, want %s (done before the takeover: d1, d2)", id, tags["fw"], want)
		}
	}
	if alive, _ := b.GetJob(ctx, "alive"); alive.Status != "running" {
		t.Fatalf("a job of a replica that beats was taken: %+v", alive)
	}
}

// A cancel stops a running job within a save period; a server stopping
// hands its job back to the queue rather than leaving it claimed.
func TestJobCancelAndStop(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	s.jobBatch = 1 // the test counts calls of devices that each take 0.4 s
	var mu sync.Mutex
	calls := 0
	for i := range 20 {
		r := Ref{Device: fmt.Sprintf("d%02d", i)}
		newIdentity(t, s, r)
		defer s.ServeMethods(r, func(ctx context.Context, _ string, _ json.RawMessage) (int, json.RawMessage, error) {
			mu.Lock()
			calls++
			mu.Unlock()
			time.Sleep(400 * time.Millisecond)
			return 200, nil, nil
		})()
	}
	count := func() int { mu.Lock(); defer mu.Unlock(); return calls }
	method := &MethodRequest{MethodName: "slow"}

	runCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { s.RunJobs(runCtx); close(done) }()
	if _, err := s.CreateJob(ctx, "cancelled", &Job{Type: JobCallMethod, QueryCondition: "*", CloudToDeviceMethod: method}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	if _, err := s.CancelJob(ctx, "cancelled"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	if n := count(); n >= 12 {
		t.Fatalf("%d of 20 devices called after a cancel 0.5 s in", n)
	}
	j, _ := s.GetJob(ctx, "cancelled")
	if j.Status != "cancelled" || j.DeviceJobStatistics.RunningCount != 0 {
		t.Fatalf("cancelled job %+v", j)
	}

	if _, err := s.CreateJob(ctx, "handed-back", &Job{Type: JobCallMethod, QueryCondition: "*", CloudToDeviceMethod: method}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(700 * time.Millisecond)
	stop()
	within := time.After(5 * time.Second)
	select {
	case <-done:
	case <-within:
		t.Fatal("RunJobs did not return when stopped")
	}
	j, _ = s.GetJob(ctx, "handed-back")
	if j.Status != "queued" || j.DeviceJobStatistics.SucceededCount == 0 || j.DeviceJobStatistics.SucceededCount == 20 {
		t.Fatalf("a job of a stopped server: %+v", j)
	}
	rec, _, _ := s.loadJob(ctx, "handed-back")
	if rec.Runner != "" {
		t.Fatalf("still claimed by %q", rec.Runner)
	}
}

// A job this replica's runner left running (a save that failed) is run
// again by this replica, though it beats.
func TestStrandedJobRunsAgain(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	newIdentity(t, s, Ref{Device: "d1"})
	if err := (&beater{s: s, seen: map[string]stillBeat{}}).beat(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateJob(ctx, "stranded", &Job{Type: JobUpdateTwin, QueryCondition: "*", UpdateTwin: &TwinPatch{Tags: map[string]any{"x": 1}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.updateJob(ctx, "stranded", func(r *jobRecord) bool { r.Status, r.Runner = "running", s.origin; return true }); err != nil {
		t.Fatal(err)
	}
	var running sync.WaitGroup
	s.takeJobs(ctx, &running)
	running.Wait()
	if j, _ := s.GetJob(ctx, "stranded"); j.Status != "completed" {
		t.Fatalf("stranded job %+v", j)
	}
}

// A method job calls its devices side by side: each device here answers
// only once every device has been called, which one call at a time would
// never see before the first call's timeout.
func TestJobCallsDevicesTogether(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := sqliteHub(t)
	devices := []string{"d1", "d2", "d3"}
	var called sync.WaitGroup
	called.Add(len(devices))
	all := make(chan struct{})
	go func() { called.Wait(); close(all) }()
	for _, id := range devices {
		newIdentity(t, s, Ref{Device: id})
		defer s.ServeMethods(Ref{Device: id}, func(ctx context.Context, _ string, _ json.RawMessage) (int, json.RawMessage, error) {
			called.Done()
			select {
			case <-all:
				return 200, nil, nil
			case <-ctx.Done():
				return 0, nil, ctx.Err()
			}
		})()
	}
	go s.RunJobs(ctx)
	if _, err := s.CreateJob(ctx, "together", &Job{Type: JobCallMethod, QueryCondition: "*",
		CloudToDeviceMethod: &MethodRequest{MethodName: "m", ResponseTimeoutInSeconds: 5}}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		j, err := s.GetJob(ctx, "together")
		if err != nil {
			t.Fatal(err)
		}
		if j.finished() {
			if st := j.DeviceJobStatistics; j.Status != "completed" || st.SucceededCount != 3 || st.FailedCount != 0 {
				t.Fatalf("job %+v", j)
			}
			return
		}
	}
	t.Fatal("the job did not finish")
}

// A job that cannot be queued is not created, so that creating it again,
// once the store takes writes, queues it and it runs.
func TestJobNotQueuedNotCreated(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := sqliteHub(t)
	newIdentity(t, s, Ref{Device: "d1"})
	st := failWrites(s.store, kindJobQueue, "")
	s.store = st
	job := func() *Job {
		return &Job{Type: JobUpdateTwin, QueryCondition: "*", UpdateTwin: &TwinPatch{Tags: map[string]any{"x": 1}}}
	}
	if _, err := s.CreateJob(ctx, "job1", job()); err == nil {
		t.Fatal("a job created without its queue entry")
	}
	if _, err := s.GetJob(ctx, "job1"); !azerr.HasStatus(err, 404) {
		t.Fatalf("the job not queued stays: %v", err)
	}
	st.failing.Store(false)
	if _, err := s.CreateJob(ctx, "job1", job()); err != nil {
		t.Fatalf("creating it again: %v", err)
	}
	go s.RunJobs(ctx)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		j, err := s.GetJob(ctx, "job1")
		if err != nil {
			t.Fatal(err)
		}
		if j.Status == "completed" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the job created again never ran: %+v", j)
		}
	}
}
