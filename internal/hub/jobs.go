package hub

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/hub/query"
	"github.com/hatchery/hatchery/internal/hubid"
	"github.com/hatchery/hatchery/internal/store"
	"github.com/hatchery/hatchery/internal/twindoc"
)

// Jobs update the twins of, or call a direct method on, every device a
// query condition selects (the jobs API v2 of JobClient.scheduleTwinUpdate
// and scheduleDeviceMethod). A job is a document, and while it is not
// finished a small entry in a queue of its own, which every replica polls.
// One replica runs it, in device ID order, a batch of devices at a time,
// saving the last device done every jobSave: if that replica dies (its
// heartbeat stops, replicas.go: no clocks are compared) or stops, another
// goes on after that device, so the devices done since the last save see
// the job twice.
const (
	kindJob        = "hub.job"
	kindJobQueue   = "hub.jobqueue"
	JobUpdateTwin  = "scheduleUpdateTwin"
	JobCallMethod  = "scheduleDeviceMethod"
	jobPoll        = time.Second
	jobSave        = 2 * time.Second // how often a runner saves its counts and looks for a cancel
	maxJobDuration = 24 * time.Hour
	jobRetention   = 30 * 24 * time.Hour // the hosted hub keeps finished jobs 30 days
)

// Job is a job as the API shows it.
type Job struct {
	JobID                     string         `json:"jobId"`
	Type                      string         `json:"type"`
	QueryCondition            string         `json:"queryCondition"`
	CreatedTime               time.Time      `json:"createdTime"`
	StartTime                 time.Time      `json:"startTime"`
	EndTime                   *time.Time     `json:"endTime,omitempty"`
	MaxExecutionTimeInSeconds int64          `json:"maxExecutionTimeInSeconds"`
	UpdateTwin                *TwinPatch     `json:"updateTwin,omitempty"`
	CloudToDeviceMethod       *MethodRequest `json:"cloudToDeviceMethod,omitempty"`
	// Status is queued, scheduled (its start is ahead), running,
	// completed, failed or cancelled.
	Status              string        `json:"status"`
	FailureReason       string        `json:"failureReason,omitempty"`
	DeviceJobStatistics JobStatistics `json:"deviceJobStatistics"`
}

// JobStatistics counts a job's devices.
type JobStatistics struct {
	DeviceCount    int64 `json:"deviceCount"`
	FailedCount    int64 `json:"failedCount"`
	SucceededCount int64 `json:"succeededCount"`
	RunningCount   int64 `json:"runningCount"`
	PendingCount   int64 `json:"pendingCount"`
}

// jobRecord is how a job is stored: the job, the replica running it, and
// the last device it did, after which a replica taking it over goes on.
type jobRecord struct {
	Job
	Runner string `json:"runner,omitempty"`
	After  string `json:"after,omitempty"`
}

func (j *Job) finished() bool {
	return j.Status == "completed" || j.Status == "failed" || j.Status == "cancelled"
}

// CreateJob schedules a job (PUT /jobs/v2/{id}).
func (s *Service) CreateJob(ctx context.Context, id string, j *Job) (*Job, error) {
	if !hubid.Valid(id) {
		return nil, azerr.BadRequest("job ID %q is not valid: use %s", id, hubid.Rule)
	}
	if id == "query" {
		return nil, azerr.BadRequest("job ID %q is not valid: GET /jobs/v2/query lists the jobs, so a job of that ID could never be read: give another ID", id)
	}
	if j.JobID != "" && j.JobID != id {
		return nil, azerr.BadRequest("jobId %q in the body differs from %q in the URL", j.JobID, id)
	}
	switch j.Type {
	case JobUpdateTwin:
		var tags, desired map[string]any
		if u := j.UpdateTwin; u != nil {
			tags = u.Tags
			if u.Properties != nil {
				desired = twindoc.WithoutMeta(u.Properties.Desired)
			}
		}
		if len(tags) == 0 && len(desired) == 0 {
			return nil, azerr.BadRequest("a %s job needs updateTwin with tags or properties.desired", JobUpdateTwin)
		}
		if err := checkTwinPatch(tags, desired); err != nil {
			return nil, err
		}
		j.CloudToDeviceMethod = nil
	case JobCallMethod:
		m := j.CloudToDeviceMethod
		if m == nil {
			return nil, azerr.BadRequest("a %s job needs cloudToDeviceMethod with a methodName", JobCallMethod)
		}
		if err := m.check(); err != nil {
			return nil, err
		}
		j.UpdateTwin = nil
	default:
		return nil, azerr.BadRequest("job type %q: use %s or %s", j.Type, JobUpdateTwin, JobCallMethod)
	}
	if cond, err := query.ParseCondition(j.QueryCondition); err != nil {
		return nil, azerr.BadRequest("queryCondition: %v", err)
	} else if cond.From != query.Devices {
		return nil, azerr.BadRequest("queryCondition: jobs select devices, not modules")
	}
	switch {
	case j.MaxExecutionTimeInSeconds == 0:
		j.MaxExecutionTimeInSeconds = 3600
	// In seconds: a Duration of a large count of seconds overflows.
	case j.MaxExecutionTimeInSeconds < 0 || j.MaxExecutionTimeInSeconds > int64(maxJobDuration/time.Second):
		return nil, azerr.BadRequest("maxExecutionTimeInSeconds %d: give 1 to %d", j.MaxExecutionTimeInSeconds, int64(maxJobDuration/time.Second))
	}
	now := s.Now().UTC()
	j.JobID, j.CreatedTime, j.EndTime, j.FailureReason = id, now, nil, ""
	j.DeviceJobStatistics = JobStatistics{}
	if j.StartTime.IsZero() || j.StartTime.Before(now) {
		j.StartTime = now
	}
	if j.StartTime.After(now.Add(365 * 24 * time.Hour)) {
		return nil, azerr.BadRequest("startTime %s is more than a year ahead", j.StartTime.Format(time.RFC3339))
	}
	j.Status = "queued"
	if j.StartTime.After(now) {
		j.Status = "scheduled"
	}
	body, _ := json.Marshal(jobRecord{Job: *j})
	created, err := s.store.Create(ctx, store.Doc{Kind: kindJob, ID: id, Body: body})
	if err != nil {
		if errors.Is(err, store.ErrExists) {
			return nil, azerr.Conflict("JobAlreadyExists", "job %q exists: jobs cannot be changed, give a new ID", id)
		}
		return nil, err
	}
	if _, err := s.store.Put(ctx, store.Doc{Kind: kindJobQueue, ID: id, Body: []byte("{}")}, ""); err != nil {
		// A job off the queue never runs, and its retry would be refused
		// as a job that exists: take it back, unless it changed (a
		// cancel) since.
		err2 := s.store.Delete(context.WithoutCancel(ctx), kindJob, id, created.ETag)
		if err2 != nil && !errors.Is(err2, store.ErrPrecondition) && !errors.Is(err2, store.ErrNotFound) {
			slog.Error("taking back a job that could not be queued: it never runs; cancel it and give its work a new job ID", "job", id, "error", err2)
		}
		return nil, err
	}
	s.wakeJobs()
	return j, nil
}

// GetJob is GET /jobs/v2/{id}.
func (s *Service) GetJob(ctx context.Context, id string) (*Job, error) {
	rec, _, err := s.loadJob(ctx, id)
	if err != nil {
		return nil, err
	}
	return &rec.Job, nil
}

// CancelJob stops a job that has not finished (POST /jobs/v2/{id}/cancel):
// the devices done stay done.
func (s *Service) CancelJob(ctx context.Context, id string) (*Job, error) {
	rec, err := s.updateJob(ctx, id, func(r *jobRecord) bool {
		if r.finished() {
			return false
		}
		now := s.Now().UTC()
		r.Status, r.EndTime, r.DeviceJobStatistics.RunningCount = "cancelled", &now, 0
		return true
	})
	if err != nil {
		return nil, err
	}
	s.dequeueJob(ctx, id)
	return &rec.Job, nil
}

// QueryJobs lists jobs, of a type and status if given (GET
// /jobs/v2/query), page by page after the job ID after (store.FilteredPage).
func (s *Service) QueryJobs(ctx context.Context, jobType, status, after string, limit int) ([]*Job, string, error) {
	out := []*Job{}
	next, err := store.FilteredPage(ctx, s.store, kindJob, after, limit, 10, func(d store.Doc) (bool, error) {
		var rec jobRecord
		if err := twindoc.Unmarshal(d.Body, &rec); err != nil {
			return false, err
		}
		if (jobType != "" && rec.Type != jobType) || (status != "" && rec.Status != status) {
			return false, nil
		}
		out = append(out, &rec.Job)
		return true, nil
	})
	if err != nil {
		return nil, "", err
	}
	return out, next, nil
}

func (s *Service) loadJob(ctx context.Context, id string) (*jobRecord, string, error) {
	d, err := s.store.Get(ctx, kindJob, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, "", azerr.New(404002, "JobNotFound", "no job %q", id)
	}
	if err != nil {
		return nil, "", err
	}
	var rec jobRecord
	if err := twindoc.Unmarshal(d.Body, &rec); err != nil {
		return nil, "", err
	}
	return &rec, d.ETag, nil
}

// updateJob changes a job if change says so, retrying on concurrent
// writes; it returns the job as it is.
func (s *Service) updateJob(ctx context.Context, id string, change func(*jobRecord) bool) (*jobRecord, error) {
	return modify(ctx, s.store, kindJob, id, fmt.Sprintf("job %q", id), func() (*jobRecord, string, error) { return s.loadJob(ctx, id) },
		func(r *jobRecord) error {
			if !change(r) {
				return errUnchanged
			}
			return nil
		})
}

// wakeJobs tells RunJobs to look for jobs now.
func (s *Service) wakeJobs() {
	select {
	case s.jobsWake <- struct{}{}:
	default:
	}
}

// dequeueJob takes a finished job off the queue the replicas poll.
func (s *Service) dequeueJob(ctx context.Context, id string) {
	if err := s.store.Delete(ctx, kindJobQueue, id, ""); err != nil && !errors.Is(err, store.ErrNotFound) {
		slog.Warn("taking a finished job off the queue", "job", id, "error", err)
	}
}

// RunJobs runs the jobs that are due, on this replica, until ctx ends, and
// then waits for the ones it runs to stop (handing them back to the queue).
func (s *Service) RunJobs(ctx context.Context) {
	var running sync.WaitGroup
	defer running.Wait()
	tick := time.NewTicker(jobPoll)
	defer tick.Stop()
	expired := time.Now()
	for {
		s.takeJobs(ctx, &running)
		if time.Since(expired) > time.Hour {
			s.deleteExpiredJobs(ctx)
			expired = time.Now()
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-s.jobsWake:
		}
	}
}

// takeJobs starts each queued job that is due and that no live replica
// runs.
func (s *Service) takeJobs(ctx context.Context, running *sync.WaitGroup) {
	now := s.Now().UTC()
	err := s.eachDoc(ctx, kindJobQueue, func(q store.Doc) error {
		if s.jobRunning(q.ID, false) {
			return nil // here: its runner dequeues it when done
		}
		rec, etag, err := s.loadJob(ctx, q.ID)
		switch {
		case azerr.HasStatus(err, 404):
			s.dequeueJob(ctx, q.ID)
			return nil
		case err != nil, rec.StartTime.After(now):
			return nil
		case rec.finished():
			s.dequeueJob(ctx, q.ID)
			return nil
		case rec.Runner != "" && rec.Runner != s.origin && s.replicaAlive(ctx, rec.Runner):
			return nil // a runner of this replica's that stopped (a failed save) is not running: take it again
		}
		rec.Status, rec.Runner = "running", s.origin
		body, _ := json.Marshal(rec)
		if _, err := s.store.Put(ctx, store.Doc{Kind: kindJob, ID: q.ID, Body: body}, etag); err != nil {
			return nil // another replica took it, or it changed
		}
		s.jobRunning(q.ID, true)
		running.Go(func() {
			defer s.jobDone(rec.JobID)
			s.runJob(ctx, *rec)
		})
		return nil
	})
	if err != nil && ctx.Err() == nil {
		slog.Warn("looking for jobs to run", "error", err)
	}
}

// replicaAlive says whether the replica named origin still beats: its
// heartbeat document is there (replicas.go deletes a silent one's).
func (s *Service) replicaAlive(ctx context.Context, origin string) bool {
	_, err := s.store.Get(ctx, kindReplica, origin)
	return !errors.Is(err, store.ErrNotFound)
}

// deleteExpiredJobs deletes jobs finished longer than jobRetention ago.
func (s *Service) deleteExpiredJobs(ctx context.Context) {
	now := s.Now()
	err := s.eachDoc(ctx, kindJob, func(d store.Doc) error {
		var rec jobRecord
		if json.Unmarshal(d.Body, &rec) == nil && rec.finished() && rec.EndTime != nil && now.Sub(*rec.EndTime) > jobRetention {
			if err := s.store.Delete(ctx, kindJob, d.ID, d.ETag); err != nil && !errors.Is(err, store.ErrPrecondition) {
				return err
			}
		}
		return nil
	})
	if err != nil && ctx.Err() == nil {
		slog.Warn("deleting finished jobs", "error", err)
	}
}

// jobRunning says whether this replica runs job id, marking it so when
// start.
func (s *Service) jobRunning(id string, start bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if start {
		s.runningJobs[id] = true
	}
	return s.runningJobs[id]
}

func (s *Service) jobDone(id string) {
	s.mu.Lock()
	delete(s.runningJobs, id)
	s.mu.Unlock()
}

// runJob does rec's work, batch by batch in ID order after rec.After,
// saving its counts and the last device done every jobSave, until it is
// done, cancelled, out of time, or taken over; stopped by ctx (the server
// stopping), it hands the job back to the queue.
func (s *Service) runJob(ctx context.Context, rec jobRecord) {
	cond, err := query.ParseCondition(rec.QueryCondition)
	var devices []string
	if err == nil {
		err = s.eachRecord(ctx, kindDevice, func(r *record) error {
			if r.Device.DeviceID > rec.After && cond.Match(r.twinDoc()) {
				devices = append(devices, r.Device.DeviceID)
			}
			return nil
		})
	}
	stats := rec.DeviceJobStatistics
	stats.DeviceCount = stats.SucceededCount + stats.FailedCount + int64(len(devices))
	after := rec.After
	// save writes the counts and the last device done, and says whether to
	// go on: false once the job is cancelled, finished or taken over.
	save := func(status, reason string) bool {
		ctx := context.WithoutCancel(ctx)
		out, err := s.updateJob(ctx, rec.JobID, func(r *jobRecord) bool {
			if r.finished() || r.Runner != s.origin {
				return false
			}
			r.DeviceJobStatistics, r.After, r.Status, r.FailureReason = stats, after, status, reason
			switch status {
			case "queued": // handed back
				r.Runner = ""
			case "completed", "failed":
				now := s.Now().UTC()
				r.EndTime = &now
			}
			return true
		})
		if err == nil && out.finished() {
			s.dequeueJob(ctx, rec.JobID)
		}
		return err == nil && out.Runner == s.origin && !out.finished()
	}
	switch {
	case ctx.Err() != nil:
		save("queued", "")
		return
	case err != nil:
		save("failed", "selecting the devices: "+err.Error())
		return
	}
	deadline := rec.StartTime.Add(time.Duration(rec.MaxExecutionTimeInSeconds) * time.Second)
	jobCtx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	stats.PendingCount = int64(len(devices))
	if !save("running", "") {
		return
	}
	saved := time.Now()
	for len(devices) > 0 && jobCtx.Err() == nil {
		batch := devices[:min(s.jobBatch, len(devices))]
		stats.PendingCount, stats.RunningCount = stats.PendingCount-int64(len(batch)), int64(len(batch))
		done := s.runJobBatch(jobCtx, &rec.Job, batch)
		stats.RunningCount = 0
		if ctx.Err() != nil {
			// Handed back below: the next runner does this batch again.
			stats.PendingCount += int64(len(batch))
			break
		}
		for _, d := range done {
			switch d {
			case jobSucceeded:
				stats.SucceededCount++
			case jobFailed:
				stats.FailedCount++
			default: // out of time
				stats.PendingCount++
			}
		}
		devices, after = devices[len(batch):], batch[len(batch)-1]
		if time.Since(saved) >= jobSave && jobCtx.Err() == nil {
			if !save("running", "") {
				return
			}
			saved = time.Now()
		}
	}
	stats.RunningCount = 0
	switch {
	case ctx.Err() != nil:
		save("queued", "")
	case jobCtx.Err() != nil:
		save("failed", "the job ran past its maxExecutionTimeInSeconds")
	default:
		save("completed", "")
	}
}

// What a job's work on one device came to.
type jobOutcome uint8

const (
	jobStopped   jobOutcome = iota // ctx ended first
	jobSucceeded                   // a method job succeeds when the device answers, whatever its status
	jobFailed
)

// runJobBatch does a job's work on the devices at once, so that a method
// job waits for its slow devices side by side, not one after another.
func (s *Service) runJobBatch(ctx context.Context, j *Job, devices []string) []jobOutcome {
	out := make([]jobOutcome, len(devices))
	var wg sync.WaitGroup
	for i, id := range devices {
		wg.Go(func() {
			var err error
			if j.Type == JobUpdateTwin {
				_, err = s.UpdateTwin(ctx, Ref{Device: id}, "*", j.UpdateTwin, false)
			} else {
				_, err = s.InvokeMethod(ctx, Ref{Device: id}, j.CloudToDeviceMethod)
			}
			switch {
			case err == nil:
				out[i] = jobSucceeded
			case ctx.Err() == nil:
				out[i] = jobFailed
				slog.Debug("job on a device failed", "job", j.JobID, "device", id, "error", err)
			}
		})
	}
	wg.Wait()
	return out
}
