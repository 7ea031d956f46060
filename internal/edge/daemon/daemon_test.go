package daemon

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/agent"
	"github.com/hatchery/hatchery/internal/edge/config"
	"github.com/hatchery/hatchery/internal/edge/identity"
)

// A connection dropped (as `iotedge system reprovision` drops it) takes its
// token renewal along: a renewal firing with no connection closed a nil
// client and took the daemon down.
func TestDroppedHubConnNeverRenews(t *testing.T) {
	h := hubConn{done: make(chan struct{}), renew: time.After(0)}
	h.drop()
	h.drop() // dropping what is already dropped is harmless
	select {
	case <-h.renew:
		t.Fatal("the renewal of a dropped connection fired")
	case <-h.done:
		t.Fatal("a dropped connection still reports its end")
	case <-time.After(50 * time.Millisecond):
	}
}

func (e *engineStub) EnsureNetwork(context.Context, string) error { return nil }

// A rejected desired document stays the deployment's status while the last
// good deployment runs on: the agent's next pass used to report that one's
// success over it.
func TestRejectedManifestStaysReported(t *testing.T) {
	good, err := agent.ParseManifest([]byte(`{"$version": 3, "schemaVersion": "1.1", "runtime": {"type": "docker", "settings": {}},
		"modules": {}}`))
	if err != nil {
		t.Fatal(err)
	}
	_, rejected := agent.ParseManifest([]byte(`{"$version": 4, "schemaVersion": "9.0", "modules": {}}`))
	d := New(Options{})
	a := &runner{d: d, manifest: good, manifestErr: rejected,
		rec: &agent.Reconciler{Engine: &engineStub{}}}
	for range 2 { // the loop applies again and again
		a.apply(context.Background(), nil)
	}
	if dep := d.status.Deployment; dep.Code != 412 || dep.Version != 4 {
		t.Errorf("deployment status %+v, want the rejected document's 412 for version 4", dep)
	}
}

// A provisioning that failed before it succeeded (as a reprovision while
// DPS is away) leaves the runtime running, not "provisioning failed".
func TestProvisionRecoversTheRunningState(t *testing.T) {
	d := New(Options{})
	ids := &identity.Manager{Config: &config.Config{}}
	tries := 0
	get := func(context.Context) (*identity.Device, error) {
		if tries++; tries == 1 {
			signal(d.reprovCh) // try again at once, not after the backoff
			return nil, errors.New("DPS is unreachable")
		}
		return &identity.Device{DeviceID: "edge-1", HubHostName: "hub.test", Provisioned: time.Now()}, nil
	}
	if _, err := d.provision(context.Background(), ids, get); err != nil {
		t.Fatal(err)
	}
	if tries != 2 || d.status.State != "running" {
		t.Errorf("after %d tries the state is %q, want running", tries, d.status.State)
	}
}
