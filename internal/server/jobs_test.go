package server

import (
	"strings"
	"testing"

	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/hub"
)

// A job does a back end's work on every device it selects: scheduling or
// cancelling one needs the right that work needs (ServiceConnect), not
// RegistryWrite; reading jobs needs either.
func TestJobRights(t *testing.T) {
	e := newEnv(t)
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/d1", "", map[string]any{"deviceId": "d1"}, nil); err != nil {
		t.Fatal(err)
	}
	client := func(policy string) *azclient.Client {
		cs, _ := e.hub.PolicyConnectionString(policy)
		c, err := azclient.New(cs, e.ts.URL, "2021-04-12", e.tls)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	registry, service := client("registryReadWrite"), client("service")
	jobs := map[string]map[string]any{
		"twin": {"type": hub.JobUpdateTwin, "queryCondition": "*",
			"updateTwin": map[string]any{"tags": map[string]any{"pwned": true}, "properties": map[string]any{"desired": map[string]any{"evil": 1}}}},
		"method": {"type": hub.JobCallMethod, "queryCondition": "*", "cloudToDeviceMethod": map[string]any{"methodName": "reboot"}},
	}
	for id, j := range jobs {
		if err := registry.Do(ctx, "PUT", "/jobs/v2/"+id, "", j, nil); azerr.As(err).Status() != 401 || !strings.Contains(err.Error(), "ServiceConnect") {
			t.Errorf("%s job with registryReadWrite: %v", id, err)
		}
		if _, err := e.hub.GetJob(ctx, id); !azerr.HasStatus(err, 404) {
			t.Errorf("a refused %s job was stored: %v", id, err)
		}
	}
	// Queued, not run: the test server runs no jobs.
	if err := service.Do(ctx, "PUT", "/jobs/v2/later", "", jobs["method"], nil); err != nil {
		t.Fatalf("job with the service policy: %v", err)
	}
	for _, c := range []*azclient.Client{registry, service} {
		if err := c.Do(ctx, "GET", "/jobs/v2/later", "", nil, nil); err != nil {
			t.Errorf("reading a job: %v", err)
		}
		if err := c.Do(ctx, "GET", "/jobs/v2/query", "", nil, nil); err != nil {
			t.Errorf("querying jobs: %v", err)
		}
	}
	if err := registry.Do(ctx, "POST", "/jobs/v2/later/cancel", "", nil, nil); azerr.As(err).Status() != 401 {
		t.Errorf("cancelling with registryReadWrite: %v", err)
	}
	var got hub.Job
	if err := service.Do(ctx, "POST", "/jobs/v2/later/cancel", "", nil, &got); err != nil || got.Status != "cancelled" {
		t.Errorf("cancelling with the service policy: %v %+v", err, got)
	}
}

// A page of jobs names its items' type, as the C# SDK's query results need
// (QueryResult reads x-ms-item-type; GetNextAsJobResponseAsync wants
// JobResponse).
func TestJobQueryItemType(t *testing.T) {
	e := newEnv(t)
	hdr, err := e.hubAPI.DoHeaders(ctx, "GET", "/jobs/v2/query", "", nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := hdr.Get("x-ms-item-type"); got != "JobResponse" {
		t.Fatalf("x-ms-item-type %q", got)
	}
}
