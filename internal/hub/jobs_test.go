package hub

import (
	"context"
	"encoding/json"
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
		"bad property": {Type: JobUpdateTwin, QueryCondition: "*", UpdateTwin: &TwinPatch{Tags: map[string]any{"a.b": 1}}},
	} {
		if _, err := s.CreateJob(ctx, "bad", j); !azerr.HasStatus(err, 400) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := s.GetJob(ctx, "bad"); !azerr.HasStatus(err, 404) {
		t.Fatalf("a refused job was stored: %v", err)
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
	if _, err := s.CreateJob(ctx, "fw", &Job{Type: JobUpdateTwin, QueryCondition: "tags.env = 'prod'",
		UpdateTwin: &TwinPatch{Properties: &DesiredPatch{Desired: map[string]any{"fw": "2.0"}}}}); err != nil {
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
		if d["fw"] != want {
			t.Errorf("%s: desired %v", id, d)
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
}
