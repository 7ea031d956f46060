package hub

import (
	"context"
	"fmt"
	"testing"

	"github.com/hatchery/hatchery/internal/azerr"
)

// A bulk request that is malformed as a whole changes nothing; one whose
// identities fail one by one says which and why, and does the rest.
func TestBulkIdentities(t *testing.T) {
	ctx := context.Background()
	s := sqliteHub(t)
	tooMany := make([]ImportDevice, MaxBulkIdentities+1)
	for i := range tooMany {
		tooMany[i] = ImportDevice{ID: fmt.Sprint("d", i), ImportMode: "create"}
	}
	for name, ops := range map[string][]ImportDevice{
		"none":     nil,
		"too many": tooMany,
		"twice":    {{ID: "a", ImportMode: "create"}, {ID: "a", ImportMode: "delete"}},
		"no id":    {{ImportMode: "create"}},
	} {
		if _, err := s.BulkIdentities(ctx, ops); !azerr.HasStatus(err, 400) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if n, _ := s.Statistics(ctx); n.TotalDeviceCount != 0 {
		t.Fatalf("a refused bulk request created %d devices", n.TotalDeviceCount)
	}

	newIdentity(t, s, Ref{Device: "taken"})
	res, err := s.BulkIdentities(ctx, []ImportDevice{
		{ID: "new", ImportMode: "Create"},
		{ID: "taken", ImportMode: "create"},
		{ID: "ghost", ImportMode: "delete"},
		{ID: "odd", ImportMode: "replace"},
		{ID: "taken", Device: Device{ModuleID: "m"}, ImportMode: "createOrUpdate"},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"taken": "DeviceAlreadyExists", "ghost": "DeviceNotFound", "odd": "ArgumentInvalid"}
	if res.IsSuccessful || len(res.Errors) != len(want) {
		t.Fatalf("result %+v", res)
	}
	for _, e := range res.Errors {
		if want[e.DeviceID] != e.ErrorCode || e.ErrorStatus == "" {
			t.Errorf("error %+v, want code %s", e, want[e.DeviceID])
		}
	}
	if _, err := s.GetIdentity(ctx, Ref{Device: "new"}); err != nil {
		t.Errorf("the identity that could be created was not: %v", err)
	}
	if _, err := s.GetIdentity(ctx, Ref{Device: "taken", Module: "m"}); err != nil {
		t.Errorf("the module was not created: %v", err)
	}
}
