package dps

import (
	"encoding/json"
	"testing"
)

func TestReprovisionPolicyDefaultsEachFlag(t *testing.T) {
	for body, want := range map[string]ReprovisionPolicy{
		`{}`:                            {UpdateHubAssignment: true, MigrateDeviceData: true},
		`{"migrateDeviceData":false}`:   {UpdateHubAssignment: true, MigrateDeviceData: false},
		`{"updateHubAssignment":false}`: {UpdateHubAssignment: false, MigrateDeviceData: true},
		`{"updateHubAssignment":false,"migrateDeviceData":false}`: {},
	} {
		var e Enrollment
		if err := json.Unmarshal([]byte(`{"reprovisionPolicy":`+body+`}`), &e); err != nil {
			t.Fatal(err)
		}
		if e.ReprovisionPolicy == nil || *e.ReprovisionPolicy != want {
			t.Errorf("reprovisionPolicy %s read as %+v, want %+v", body, e.ReprovisionPolicy, want)
		}
	}
	var e Enrollment
	if err := json.Unmarshal([]byte(`{"reprovisionPolicy":{"migrateDeviceData":"no"}}`), &e); err == nil {
		t.Error("a flag that is not a boolean was accepted")
	}
}
