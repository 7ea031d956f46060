package agent

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/hatchery/hatchery/internal/edge/moby"
)

// Kind is what an Action does.
type Kind string

const (
	Create   Kind = "create"   // make the container (not started)
	Start    Kind = "start"    // start it
	Stop     Kind = "stop"     // stop it, keeping the container
	Remove   Kind = "remove"   // stop and remove it
	Recreate Kind = "recreate" // stop, remove and create it anew
)

// Action is one step of a reconcile.
type Action struct {
	Kind   Kind
	Name   string
	Module *Module // the desired module; nil for Remove
	// Restart is, for a Start that restartPolicy asks for, which
	// consecutive restart it is (1, 2, ...); 0 for other starts.
	Restart int
	// Update: a Recreate for a new version of the image the container
	// runs, which must be pulled again (not taken from the engine's copy
	// when the pull fails).
	Update bool
	Reason string
}

func (a Action) String() string { return fmt.Sprintf("%s %s: %s", a.Kind, a.Name, a.Reason) }

// History is what the agent remembers of a module between reconciles,
// which the engine does not keep.
type History struct {
	// Restarts counts consecutive restarts by restartPolicy: the n of the
	// backoff. It goes back to 0 once the module has run HealthyRun.
	Restarts    int
	LastStart   time.Time // the agent's last start attempt, on its clock
	LastRestart time.Time
	Err         string // the last failure applying the module; "" after success
	// Resume: the runtime stopped the module when it shut down, and
	// starts it again as soon as it can.
	Resume bool
	// Version is, for a container without the version label (made by an
	// earlier agent), the version it is taken to be at; HasVersion says
	// whether there is one (Reconciler.Previous).
	Version    string
	HasVersion bool
	// Held is a create or recreate that failed, for want of its image
	// (an old container runs on meanwhile) or in the engine's create;
	// nil when there is none.
	Held *Held
}

// Held is a create or recreate of a module that could not get its image,
// or whose container the engine would not create. It is tried again at
// Retry, Backoff(Fails-1) after the last attempt: an unreachable registry
// is not asked every few seconds, each time holding up the reconcile for
// a connection timeout, nor a registry pulled from every few seconds for
// a create that fails after the pull.
type Held struct {
	For   string // heldKey of the desired module it was for
	Auth  string // authKey of the credentials tried: new ones are tried at once
	Err   string // why
	Fails int
	Retry time.Time
	// Pulled: the image was got and the create failed; the retry creates
	// without pulling again.
	Pulled bool
}

// heldKey names what a recreate of m makes, and how its image is had: a
// change of it is a new recreate.
func heldKey(m *Module) string { return m.ConfigHash() + " " + m.Version + " " + m.ImagePullPolicy }

// authKey is a digest of the registry credentials d gives for m's image.
func authKey(d *Manifest, m *Module) string {
	b, _ := json.Marshal(registryAuth(d.Runtime.RegistryCredentials, m.Image))
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// held returns h's held create or recreate if it is for m as desired now.
func held(m *Module, h *History) *Held {
	if h == nil || h.Held == nil || h.Held.For != heldKey(m) {
		return nil
	}
	return h.Held
}

// Restart timing, as Azure IoT Edge's agent does it.
const (
	BackoffBase = 10 * time.Second
	BackoffMax  = 300 * time.Second
	HealthyRun  = 10 * time.Minute
)

// Backoff is the wait before restart n+1, after n consecutive restarts:
// 10 s × 2^n, at most 300 s.
func Backoff(n int) time.Duration {
	if n >= 5 { // 10 s × 2^5 > 300 s; also keeps the shift from overflowing
		return BackoffMax
	}
	return min(BackoffBase<<n, BackoffMax)
}

// Values of a module's reported runtimeStatus.
const (
	RuntimeUnknown = "unknown"
	RuntimeBackoff = "backoff"
	RuntimeRunning = "running"
	RuntimeStopped = "stopped"
	RuntimeFailed  = "failed"
)

// plan returns the actions that bring the engine's containers (current:
// this agent's only) to the desired manifest at time now: removals first,
// then each module in startup order. It changes nothing; the caller
// records starts and restarts in hist. A nil manifest plans nothing.
func plan(desired *Manifest, current []moby.ModuleState, hist map[string]*History, now time.Time) []Action {
	if desired == nil {
		return nil
	}
	var acts []Action
	cur := map[string]moby.ModuleState{}
	current = slices.Clone(current)
	slices.SortFunc(current, func(a, b moby.ModuleState) int { return strings.Compare(a.Name, b.Name) })
	for _, st := range current {
		if _, ok := desired.Modules[st.Name]; !ok {
			acts = append(acts, Action{Kind: Remove, Name: st.Name, Reason: "not in the deployment"})
			continue
		}
		cur[st.Name] = st
	}
	for _, m := range desired.Ordered() {
		st, ok := cur[m.Name]
		h := hist[m.Name]
		if hd := held(m, h); hd != nil && hd.Auth == authKey(desired, m) && now.Before(hd.Retry) {
			if ok {
				acts = append(acts, keep(m, st, h, now)...) // its recreate waits
			}
			continue
		}
		acts = append(acts, planModule(m, st, ok, h, now)...)
	}
	return acts
}

func planModule(m *Module, st moby.ModuleState, exists bool, h *History, now time.Time) []Action {
	act := func(k Kind, reason string) Action { return Action{Kind: k, Name: m.Name, Module: m, Reason: reason} }
	var acts []Action
	// A new version is how a deployment asks for an update, say to pull
	// its tag again. A container without the label predates versions.
	version, hasVersion := st.Version, st.HasVersion
	if !hasVersion && h != nil {
		version, hasVersion = h.Version, h.HasVersion
	}
	newVersion := exists && hasVersion && version != m.Version
	// Only the image the container runs must come from the registry: a
	// new one may be a copy loaded on the device, as for a new module,
	// and one pinned by digest is the image the engine has, if it has it.
	update := newVersion && moby.SameImage(st.Image, m.Image) && !strings.Contains(m.Image, "@")
	switch {
	case !exists:
		acts = append(acts, act(Create, "new module"))
	case st.ConfigHash != m.ConfigHash():
		acts = append(acts, act(Recreate, "its image, createOptions or env changed"))
		acts[0].Update = update
	case newVersion:
		acts = append(acts, act(Recreate, "its version changed"))
		acts[0].Update = update
	case st.State == "dead":
		acts = append(acts, act(Recreate, "the engine marked its container dead"))
	default:
		return keep(m, st, h, now)
	}
	if m.Status == StatusRunning {
		acts = append(acts, act(Start, "status is running"))
	}
	return acts
}

// keep plans a module whose container stays as it is: it is stopped,
// started, resumed or restarted as status and restartPolicy say.
func keep(m *Module, st moby.ModuleState, h *History, now time.Time) []Action {
	act := func(k Kind, reason string) Action { return Action{Kind: k, Name: m.Name, Module: m, Reason: reason} }
	switch {
	case st.State == "dead": // cannot be started; only a recreate helps
		return nil
	case m.Status == StatusStopped:
		if active(st.State) {
			return []Action{act(Stop, "status is stopped")}
		}
		return nil
	case neverStarted(st):
		return []Action{act(Start, "status is running")}
	case h != nil && h.Resume && !active(st.State):
		return []Action{act(Start, "the runtime stopped it when it shut down")}
	}
	return restart(m, st, h, now)
}

// restart applies restartPolicy to a module that has run.
func restart(m *Module, st moby.ModuleState, h *History, now time.Time) []Action {
	if !wantsRestart(m.RestartPolicy, st) {
		return nil
	}
	n := 0
	if h != nil && !ranLong(st, now) {
		n = h.Restarts
	}
	// The wait runs from the later of the exit and the agent's last
	// attempt (a start that failed leaves no exit time).
	from := st.FinishedAt
	if st.State == "running" { // unhealthy
		from = st.StartedAt
	}
	if h != nil && h.LastStart.After(from) {
		from = h.LastStart
	}
	if now.Before(from.Add(Backoff(n))) {
		return nil
	}
	start := Action{Kind: Start, Name: m.Name, Module: m, Restart: n + 1,
		Reason: fmt.Sprintf("restartPolicy %s: restart %d, as it %s", m.RestartPolicy, n+1, cause(st))}
	if st.State == "running" {
		return []Action{{Kind: Stop, Name: m.Name, Module: m, Reason: "unhealthy; restartPolicy on-unhealthy"}, start}
	}
	return []Action{start}
}

// wantsRestart says whether restartPolicy restarts a module in state st.
func wantsRestart(policy string, st moby.ModuleState) bool {
	switch {
	case st.State == "running":
		return policy == OnUnhealthy && st.Health == "unhealthy"
	case st.State == "exited", st.State == "created" && !neverStarted(st):
	default:
		return false
	}
	switch policy {
	case Always:
		return true
	case OnFailure, OnUnhealthy: // Azure's OnUnhealthy covers failures, not clean exits
		return failed(st)
	}
	return false
}

// Status is a module's reported runtimeStatus and a description of it; st
// is nil when the module has no container.
func Status(m *Module, st *moby.ModuleState, h *History) (status, description string) {
	desc := func(s string) string {
		if h != nil && h.Err != "" {
			return h.Err
		}
		if hd := held(m, h); hd != nil { // the old container's state, with why it is still the old one
			return hd.Err
		}
		return s
	}
	switch {
	case st == nil && h != nil && h.Err != "":
		return RuntimeFailed, h.Err
	case st == nil && held(m, h) != nil:
		return RuntimeFailed, held(m, h).Err
	case st == nil:
		return RuntimeUnknown, "no container yet"
	case st.State == "running" && st.Health == "unhealthy":
		return RuntimeRunning, desc("running, unhealthy")
	case st.State == "running":
		return RuntimeRunning, desc("running")
	case st.State == "dead":
		return RuntimeFailed, desc("the engine marked its container dead")
	case neverStarted(*st):
		return RuntimeStopped, desc("created, not started")
	case st.State != "exited" && st.State != "created":
		return RuntimeUnknown, desc("its container is " + st.State)
	case m.Status == StatusStopped:
		return RuntimeStopped, desc("stopped")
	case wantsRestart(m.RestartPolicy, *st):
		return RuntimeBackoff, desc(fmt.Sprintf("it %s; restartPolicy %s restarts it", cause(*st), m.RestartPolicy))
	case failed(*st):
		return RuntimeFailed, desc("it " + cause(*st))
	}
	return RuntimeStopped, desc("it " + cause(*st))
}

// neverStarted: a container just created (a failed start leaves "created"
// too, but with an exit code or error).
func neverStarted(st moby.ModuleState) bool {
	return st.State == "created" && st.StartedAt.IsZero() && !failed(st)
}

func failed(st moby.ModuleState) bool { return st.ExitCode != 0 || st.Error != "" }

func active(state string) bool {
	return state == "running" || state == "restarting" || state == "paused"
}

// ranLong: the module's last run lasted HealthyRun, which ends a run of
// restarts.
func ranLong(st moby.ModuleState, now time.Time) bool {
	if st.StartedAt.IsZero() {
		return false
	}
	end := st.FinishedAt
	if st.State == "running" || end.Before(st.StartedAt) {
		end = now
	}
	return end.Sub(st.StartedAt) >= HealthyRun
}

func cause(st moby.ModuleState) string {
	if st.Error != "" {
		return "failed to start: " + st.Error
	}
	if st.State == "running" {
		return "is unhealthy"
	}
	return fmt.Sprintf("exited with code %d", st.ExitCode)
}
