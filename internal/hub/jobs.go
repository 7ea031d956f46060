package hub

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/hub/query"
	"github.com/hatchery/hatchery/internal/hubid"
	"github.com/hatchery/hatchery/internal/store"
)

// Jobs update the twins of, or call a direct method on, every device a
// query condition selects (the jobs API v2 of JobClient.scheduleTwinUpdate
// and scheduleDeviceMethod). A job is a document; a replica runs it under
// a lease it renews, so that another takes it over if it stops.
const (
	kindJob        = "hub.job"
	JobUpdateTwin  = "scheduleUpdateTwin"
	JobCallMethod  = "scheduleDeviceMethod"
	jobLease       = 30 * time.Second
	jobPoll        = time.Second
	maxJobDuration = 24 * time.Hour
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

// jobRecord is how a job is stored: the job, and who runs it until when.
type jobRecord struct {
	Job
	Runner     string    `json:"runner,omitempty"`
	LeaseUntil time.Time `json:"leaseUntil"`
	// Done are the devices already done, so that a job taken over goes on
	// where it stopped.
	Done int64 `json:"done,omitempty"`
}

func (j *Job) finished() bool {
	return j.Status == "completed" || j.Status == "failed" || j.Status == "cancelled"
}

// CreateJob schedules a job (PUT /jobs/v2/{id}).
func (s *Service) CreateJob(ctx context.Context, id string, j *Job) (*Job, error) {
	if !hubid.Valid(id) {
		return nil, azerr.BadRequest("job ID %q is not valid: use %s", id, hubid.Rule)
	}
	if j.JobID != "" && j.JobID != id {
		return nil, azerr.BadRequest("jobId %q in the body differs from %q in the URL", j.JobID, id)
	}
	switch j.Type {
	case JobUpdateTwin:
		if j.UpdateTwin == nil || (j.UpdateTwin.Tags == nil && j.UpdateTwin.Properties == nil) {
			return nil, azerr.BadRequest("a %s job needs updateTwin with tags or properties.desired", JobUpdateTwin)
		}
		if err := checkTwinPatch(j.UpdateTwin); err != nil {
			return nil, err
		}
		j.CloudToDeviceMethod = nil
	case JobCallMethod:
		m := j.CloudToDeviceMethod
		if m == nil || m.MethodName == "" {
			return nil, azerr.BadRequest("a %s job needs cloudToDeviceMethod with a methodName", JobCallMethod)
		}
		if _, err := m.timeout(); err != nil {
			return nil, err
		}
		j.UpdateTwin = nil
	default:
		return nil, azerr.BadRequest("job type %q: use %s or %s", j.Type, JobUpdateTwin, JobCallMethod)
	}
	if _, err := query.ParseCondition(j.QueryCondition); err != nil {
		return nil, azerr.BadRequest("queryCondition: %v", err)
	}
	switch {
	case j.MaxExecutionTimeInSeconds == 0:
		j.MaxExecutionTimeInSeconds = 3600
	case j.MaxExecutionTimeInSeconds < 0 || time.Duration(j.MaxExecutionTimeInSeconds)*time.Second > maxJobDuration:
		return nil, azerr.BadRequest("maxExecutionTimeInSeconds %d: give 1 to %d", j.MaxExecutionTimeInSeconds, int64(maxJobDuration/time.Second))
	}
	now := s.Now().UTC()
	j.JobID, j.CreatedTime, j.EndTime, j.FailureReason = id, now, nil, ""
	j.DeviceJobStatistics = JobStatistics{}
	if j.StartTime.IsZero() || j.StartTime.Before(now) {
		j.StartTime = now
	}
	j.Status = "queued"
	if j.StartTime.After(now) {
		j.Status = "scheduled"
	}
	body, _ := json.Marshal(jobRecord{Job: *j})
	if _, err := s.store.Create(ctx, store.Doc{Kind: kindJob, ID: id, Body: body}); err != nil {
		if errors.Is(err, store.ErrExists) {
			return nil, azerr.Conflict("JobAlreadyExists", "job %q exists: jobs cannot be changed, give a new ID", id)
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
		r.Status, r.EndTime = "cancelled", &now
		return true
	})
	if err != nil {
		return nil, err
	}
	return &rec.Job, nil
}

// QueryJobs lists jobs, of a type and status if given (GET
// /jobs/v2/query), page by page after the job ID after.
func (s *Service) QueryJobs(ctx context.Context, jobType, status, after string, limit int) ([]*Job, string, error) {
	docs, err := s.store.List(ctx, kindJob, after, limit)
	if err != nil {
		return nil, "", err
	}
	out := []*Job{}
	for _, d := range docs {
		var rec jobRecord
		if err := json.Unmarshal(d.Body, &rec); err != nil {
			return nil, "", err
		}
		if (jobType == "" || rec.Type == jobType) && (status == "" || rec.Status == status) {
			out = append(out, &rec.Job)
		}
	}
	next := ""
	if len(docs) == limit {
		next = docs[len(docs)-1].ID
	}
	return out, next, nil
}

func (s *Service) loadJob(ctx context.Context, id string) (*jobRecord, string, error) {
	d, err := s.store.Get(ctx, kindJob, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, "", azerr.NotFound("JobNotFound", "no job %q", id)
	}
	if err != nil {
		return nil, "", err
	}
	var rec jobRecord
	if err := json.Unmarshal(d.Body, &rec); err != nil {
		return nil, "", err
	}
	return &rec, d.ETag, nil
}

// updateJob changes a job if change says so, retrying on concurrent
// writes; it returns the job as it is.
func (s *Service) updateJob(ctx context.Context, id string, change func(*jobRecord) bool) (*jobRecord, error) {
	for range 16 {
		rec, etag, err := s.loadJob(ctx, id)
		if err != nil {
			return nil, err
		}
		if !change(rec) {
			return rec, nil
		}
		body, _ := json.Marshal(rec)
		_, err = s.store.Put(ctx, store.Doc{Kind: kindJob, ID: id, Body: body}, etag)
		if errors.Is(err, store.ErrPrecondition) {
			continue
		}
		return rec, err
	}
	return nil, azerr.New(409002, "PreconditionFailed", "job %q is being changed concurrently: retry", id)
}

// wakeJobs tells RunJobs to look for jobs now.
func (s *Service) wakeJobs() {
	select {
	case s.jobsWake <- struct{}{}:
	default:
	}
}

// RunJobs runs the jobs that are due, on this replica, until ctx ends.
func (s *Service) RunJobs(ctx context.Context) {
	tick := time.NewTicker(jobPoll)
	defer tick.Stop()
	for {
		s.takeJobs(ctx)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-s.jobsWake:
		}
	}
}

// takeJobs starts each job that is due and that no replica runs: queued,
// scheduled and started, or running under a lease that ran out. Jobs
// finished longer than jobRetention ago are deleted (the hosted hub keeps
// them 30 days).
func (s *Service) takeJobs(ctx context.Context) {
	now := s.Now().UTC()
	for after := ""; ; {
		docs, err := s.store.List(ctx, kindJob, after, 500)
		if err != nil {
			if ctx.Err() == nil {
				slog.Warn("looking for jobs to run", "error", err)
			}
			return
		}
		for _, d := range docs {
			s.takeJob(ctx, d, now)
		}
		if len(docs) < 500 {
			return
		}
		after = docs[len(docs)-1].ID
	}
}

const jobRetention = 30 * 24 * time.Hour

func (s *Service) takeJob(ctx context.Context, d store.Doc, now time.Time) {
	var rec jobRecord
	if json.Unmarshal(d.Body, &rec) != nil {
		return
	}
	if rec.finished() && rec.EndTime != nil && now.Sub(*rec.EndTime) > jobRetention {
		_ = s.store.Delete(ctx, kindJob, d.ID, d.ETag)
		return
	}
	if rec.finished() || rec.StartTime.After(now) || (rec.Status == "running" && now.Before(rec.LeaseUntil)) || s.jobRunning(rec.JobID, false) {
		return
	}
	rec.Status, rec.Runner, rec.LeaseUntil = "running", s.origin, now.Add(jobLease)
	body, _ := json.Marshal(rec)
	if _, err := s.store.Put(ctx, store.Doc{Kind: kindJob, ID: d.ID, Body: body}, d.ETag); err != nil {
		return // another replica took it, or it changed
	}
	s.jobRunning(rec.JobID, true)
	go func() {
		defer s.jobDone(rec.JobID)
		s.runJob(ctx, rec)
	}()
}

// jobRunning says whether this replica runs job id (a device call may
// outlast the lease), marking it so when start.
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

// runJob does rec's work device by device, renewing its lease and saving
// its counts as it goes, until it is done, cancelled, out of time, or
// taken over.
func (s *Service) runJob(ctx context.Context, rec jobRecord) {
	var devices []Ref
	cond, err := query.ParseCondition(rec.QueryCondition)
	if err == nil {
		err = s.eachRecord(ctx, kindDevice, func(r *record) error {
			if cond.Match(r.twinDoc()) {
				devices = append(devices, Ref{Device: r.Device.DeviceID})
			}
			return nil
		})
	}
	stats := rec.DeviceJobStatistics
	stats.DeviceCount = int64(len(devices))
	deadline := rec.StartTime.Add(time.Duration(rec.MaxExecutionTimeInSeconds) * time.Second)
	// save writes the counts and renews the lease; false: stop (cancelled,
	// taken over, gone).
	save := func(status, reason string, done int64) bool {
		out, err := s.updateJob(ctx, rec.JobID, func(r *jobRecord) bool {
			if r.finished() || r.Runner != s.origin {
				return false
			}
			now := s.Now().UTC()
			r.DeviceJobStatistics, r.Done, r.LeaseUntil = stats, done, now.Add(jobLease)
			r.Status, r.FailureReason = status, reason
			if status != "running" {
				r.EndTime = &now
			}
			return true
		})
		return err == nil && out.Runner == s.origin && !out.finished()
	}
	if err != nil {
		save("failed", "selecting the devices: "+err.Error(), 0)
		return
	}
	saved := s.Now()
	for i := rec.Done; i < int64(len(devices)); i++ {
		if s.Now().After(deadline) {
			save("failed", "the job ran past its maxExecutionTimeInSeconds", i)
			return
		}
		stats.PendingCount, stats.RunningCount = int64(len(devices))-i-1, 1
		if s.runJobOn(ctx, &rec.Job, devices[i]) {
			stats.SucceededCount++
		} else {
			stats.FailedCount++
		}
		if time.Since(saved) > jobLease/3 {
			if !save("running", "", i+1) {
				return
			}
			saved = s.Now()
		}
	}
	stats.PendingCount, stats.RunningCount = 0, 0
	save("completed", "", int64(len(devices)))
}

// runJobOn does a job's work on one device, and says whether it worked.
func (s *Service) runJobOn(ctx context.Context, j *Job, r Ref) bool {
	var err error
	if j.Type == JobUpdateTwin {
		_, err = s.UpdateTwin(ctx, r, "*", j.UpdateTwin, false)
	} else {
		_, err = s.InvokeMethod(ctx, r, j.CloudToDeviceMethod)
	}
	if err != nil {
		slog.Debug("job on a device failed", "job", j.JobID, "device", r.Device, "error", err)
	}
	return err == nil
}
