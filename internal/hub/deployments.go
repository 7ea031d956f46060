package hub

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/hub/query"
	"github.com/hatchery/hatchery/internal/periodic"
	"github.com/hatchery/hatchery/internal/store"
	"github.com/hatchery/hatchery/internal/twindoc"
)

// target is a deployment with its condition parsed once.
type target struct {
	*Configuration
	cond *query.Condition
}

// targets loads every deployment ready for matching.
func (s *Service) targets(ctx context.Context) ([]target, error) {
	cs, err := s.configurations(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]target, 0, len(cs))
	for _, c := range cs {
		cond, err := query.ParseCondition(c.TargetCondition)
		if err != nil {
			slog.Warn("deployment has an unusable target condition", "deployment", c.ID, "error", err)
			continue
		}
		out = append(out, target{c, cond})
	}
	return out, nil
}

// applyAll re-evaluates every device against the configurations, after
// one changed.
func (s *Service) applyAll(ctx context.Context) error {
	s.targetMemo.forget() // the sweep evaluates every identity again
	s.publish("configurations", Ref{})
	return s.evaluateAll(ctx, slog.LevelWarn)
}

// configurationSweep is how often EvaluateConfigurations evaluates every
// identity again: the hosted hub re-evaluates configurations about every
// five minutes.
const configurationSweep = 5 * time.Minute

// EvaluateConfigurations evaluates every identity against the
// configurations every s.configurationSweep, until ctx ends, so that one
// a change left behind (a write that failed, a replica that stopped
// halfway) converges. Every replica may run it: evaluating is idempotent.
func (s *Service) EvaluateConfigurations(ctx context.Context) {
	select { // a start has just evaluated what it changed
	case <-ctx.Done():
		return
	case <-time.After(s.configurationSweep):
	}
	periodic.Run(ctx, s.configurationSweep, "evaluating the configurations again; the identities left behind follow at the next evaluation",
		func(ctx context.Context) error {
			return s.evaluateAll(ctx, slog.LevelDebug) // what does not fit a twin was told when it changed
		})
}

// evaluateAll evaluates every device, then every module, against the
// configurations, a page of records at a time and each identity under its
// own lock only while it is evaluated. One that cannot be written does not
// hold the others back: it returns, after them all, the first such
// failure, and at once when the database is out of reach. What does not
// fit a twin is logged at misfit.
func (s *Service) evaluateAll(ctx context.Context, misfit slog.Level) error {
	var failed int
	var first error
	ts, err := s.targets(ctx)
	if err != nil {
		return err
	}
	for _, kind := range []string{kindDevice, kindModule} {
		err := s.eachRecord(ctx, kind, func(r *record) error {
			if len(ts) == 0 && len(r.Configurations) == 0 {
				return nil // nothing to apply, nothing to take back
			}
			ref := Ref{Device: r.Device.DeviceID, Module: r.Device.ModuleID}
			if len(ts) == 0 && ref.Module == "$edgeAgent" && r.Device.ManagedBy == "iotEdge" {
				// Its statuses are its device's deployments', which the
				// device's evaluation writes: one that read them before
				// another replica took the last deployment back may have
				// written them here after, and the device, with none of
				// its own left, was passed by above.
				ref.Module = ""
			}
			// What does not fit one twin (layers merging past a
			// module twin's size) stays off that twin only.
			err := s.evaluate(ctx, ref, true)
			switch {
			case err == nil, azerr.HasStatus(err, 404): // deleted meanwhile
			case ctx.Err() != nil, store.Unavailable(err):
				return err
			case azerr.As(err).Status() >= 500:
				failed++
				if first == nil {
					first = err
				}
				slog.Debug("evaluating the configurations", "device", r.Device.DeviceID, "module", r.Device.ModuleID, "error", err)
			default:
				slog.Log(ctx, misfit, "configurations do not fit a twin; it keeps what it had", "device", r.Device.DeviceID, "module", r.Device.ModuleID, "error", err)
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	if first != nil {
		return fmt.Errorf("%d of the identities could not be brought in line with the configurations; the first: %w", failed, first)
	}
	return nil
}

// reapply re-evaluates one device after its identity or tags changed.
func (s *Service) reapply(ctx context.Context, r Ref) {
	if err := s.evaluate(ctx, r, false); err != nil && !azerr.HasStatus(err, 404) { // a device deleted meanwhile has nothing to apply
		slog.Warn("applying configurations failed", "device", r.Device, "error", err)
	}
}

// evaluatingKey marks the context of a device's evaluation (its device
// ID): what the evaluation writes needs no evaluation of its own.
type evaluatingKey struct{}

// evaluate brings one identity in line with the configurations; with
// none, only when sweep says the last one may have just gone. It runs on
// every tag change, registrations with initial tags among them, so it
// reads the configurations from a short memory (targetMemo). Evaluations
// of one device take turns, each reading the configurations and the
// record once it has its turn: one begun before a configuration changed
// (a sweep's, a tag change's) cannot write after one begun since, and so
// leave the device evaluated against what no longer holds.
func (s *Service) evaluate(ctx context.Context, r Ref, sweep bool) error {
	if dev, _ := ctx.Value(evaluatingKey{}).(string); dev == r.Device {
		return nil
	}
	m := stripe(s.evalLocks[:], r.Device)
	m.Lock()
	defer m.Unlock()
	ctx = context.WithValue(ctx, evaluatingKey{}, r.Device)
	cs, err := s.targetMemo.get(ctx, r, s.targets)
	if err != nil || (len(cs) == 0 && !sweep) {
		return err
	}
	rec, _, err := s.load(ctx, r)
	switch {
	case err != nil:
		return err
	case r.Module != "":
		return s.applyToModule(ctx, rec, cs)
	}
	return s.applyTo(ctx, rec, cs)
}

// applyTo brings one device in line with the configurations that target
// it — an edge device's module twins with its deployments (edgeDesired),
// any device's own desired properties with its device configuration —
// and then records each configuration's status on it: Applied only where
// what the configuration gives is in place. The deployments' statuses go
// on its $edgeAgent twin too: the hosted hub keeps them there, and the
// deployment metrics' queries read them there.
func (s *Service) applyTo(ctx context.Context, rec *record, ts []target) error {
	doc := rec.twinDoc()
	dev := Ref{Device: rec.Device.DeviceID}
	deployments := map[string]ConfigStatus{}
	var edgeErr error
	if rec.Device.Capabilities.IoTEdge {
		modules, err := edgeDesired(doc, ts, deployments)
		if err != nil {
			return err
		}
		if edgeErr = s.setModules(ctx, dev.Device, modules); edgeErr != nil {
			if azerr.As(edgeErr).Status() >= 500 {
				return edgeErr
			}
			// The device does not hold the deployments' merged modules.
			for id, st := range deployments {
				if st.Status == "Applied" {
					deployments[id] = ConfigStatus{Status: "Targeted"}
				}
			}
		}
	}
	status := maps.Clone(deployments)
	own, applied, err := configured(doc, ts, status, (*Configuration).forDevices)
	if err != nil {
		return err
	}
	ownErr := s.applyOwn(ctx, dev, rec, own, applied, status)
	if ownErr != nil && azerr.As(ownErr).Status() >= 500 {
		return ownErr
	}
	// A device no longer an edge device drops its deployments' statuses,
	// on $edgeAgent's twin as on its own: $edgeAgent's first, as the
	// device's own say whether there is still something to drop.
	if rec.Device.Capabilities.IoTEdge || !maps.Equal(status, rec.Configurations) {
		agent := Ref{Device: dev.Device, Module: "$edgeAgent"}
		switch cur, _, err := s.load(ctx, agent); {
		case azerr.HasStatus(err, 404):
		case err != nil:
			return err
		default:
			if err := s.recordStatus(ctx, agent, cur, deployments); err != nil {
				return err
			}
		}
	}
	if err := s.recordStatus(ctx, dev, rec, status); err != nil {
		return err
	}
	return cmp.Or(edgeErr, ownErr)
}

// setModules gives an edge device's modules their identities and the
// desired properties they are to have, replacing only those: module
// configurations target module twins by their tags.
func (s *Service) setModules(ctx context.Context, device string, desired map[string]map[string]any) error {
	if err := s.ensureModules(ctx, device, desired); err != nil {
		return err
	}
	for _, mod := range slices.Sorted(maps.Keys(desired)) {
		m := Ref{Device: device, Module: mod}
		cur, _, err := s.load(ctx, m)
		if err != nil {
			return err
		}
		if jsonEqual(cur.Desired, desired[mod]) {
			continue
		}
		if err := s.replaceDesired(ctx, m, desired[mod]); err != nil {
			return err
		}
	}
	return nil
}

// applyOwn sets what a device or module configuration gives one twin; a
// configuration that does not fit the twin (past its size once merged) is
// then only Targeted.
func (s *Service) applyOwn(ctx context.Context, r Ref, rec *record, own map[string]any, applied string, status map[string]ConfigStatus) error {
	if own == nil || contains(rec.Desired, own) {
		return nil
	}
	_, err := s.UpdateTwin(ctx, r, "", &TwinPatch{Properties: &DesiredPatch{Desired: own}}, false)
	if err != nil && azerr.As(err).Status() < 500 {
		status[applied] = ConfigStatus{Status: "Targeted"}
	}
	return err
}

// recordStatus keeps the configurations' statuses on twin r, last read as
// rec.
func (s *Service) recordStatus(ctx context.Context, r Ref, rec *record, status map[string]ConfigStatus) error {
	if maps.Equal(status, rec.Configurations) {
		return nil
	}
	_, err := s.update(ctx, r, func(r *record) error { r.Configurations = status; return nil })
	return err
}

// applyToModule brings one module twin in line with the module
// configurations that target it. Modules of IoT Edge deployments
// (managedBy iotEdge) are the deployments' alone, as in the hosted hub.
func (s *Service) applyToModule(ctx context.Context, rec *record, ts []target) error {
	if rec.Device.ManagedBy == "iotEdge" {
		return nil
	}
	status := map[string]ConfigStatus{}
	own, applied, err := configured(rec.twinDoc(), ts, status, (*Configuration).forModules)
	if err != nil {
		return err
	}
	r := Ref{Device: rec.Device.DeviceID, Module: rec.Device.ModuleID}
	ownErr := s.applyOwn(ctx, r, rec, own, applied, status)
	if ownErr != nil && azerr.As(ownErr).Status() >= 500 {
		return ownErr
	}
	if err := s.recordStatus(ctx, r, rec, status); err != nil {
		return err
	}
	return ownErr
}

// outranks reports whether configuration a wins over b on a device both
// target: the higher priority, then the newer.
func outranks(a, b *Configuration) bool {
	return a.Priority > b.Priority || (a.Priority == b.Priority && a.CreatedTimeUtc.After(b.CreatedTimeUtc))
}

// configured is what the highest-ranked configuration of a kind (device
// or module configurations) targeting the twin doc sets in its desired
// properties, as a merge patch (nil for none), and that configuration's
// ID; status says which configurations target it and which applies.
func configured(doc map[string]any, ts []target, status map[string]ConfigStatus, of func(*Configuration) bool) (map[string]any, string, error) {
	var best *Configuration
	for _, t := range ts {
		c := t.Configuration
		if !of(c) || !t.cond.Match(doc) {
			continue
		}
		status[c.ID] = ConfigStatus{Status: "Targeted"}
		if best == nil || outranks(c, best) {
			best = c
		}
	}
	if best == nil {
		return nil, "", nil
	}
	status[best.ID] = ConfigStatus{Status: "Applied"}
	content := best.Content.DeviceContent
	if best.forModules() {
		content = best.Content.ModuleContent
	}
	patch, err := contentPatch(content)
	if err != nil {
		return nil, "", fmt.Errorf("configuration %s: %w", best.ID, err)
	}
	return patch, best.ID, nil
}

// contentPatch is a device or module configuration's content as a merge
// patch of desired properties.
func contentPatch(content map[string]json.RawMessage) (map[string]any, error) {
	patch := map[string]any{}
	for _, k := range slices.Sorted(maps.Keys(content)) {
		var v any
		if err := twindoc.Unmarshal(content[k], &v); err != nil {
			return nil, fmt.Errorf("%s: %w", k, err)
		}
		setPath(patch, desiredPath(k), v)
	}
	return patch, nil
}

// contains reports whether doc already holds every value of patch.
func contains(doc, patch map[string]any) bool {
	for k, v := range patch {
		if sub, ok := v.(map[string]any); ok {
			have, ok := doc[k].(map[string]any)
			if !ok || !contains(have, sub) {
				return false
			}
		} else if !jsonEqual(doc[k], v) {
			return false
		}
	}
	return true
}

// edgeDesired computes what the deployments targeting an edge device's
// twin doc give its modules — the highest-ranked base deployment with
// every matching layered one on top, in priority order — and says in
// status which target it and which apply.
func edgeDesired(doc map[string]any, ts []target, status map[string]ConfigStatus) (map[string]map[string]any, error) {
	var base *Configuration
	var layers []*Configuration
	for _, t := range ts {
		c := t.Configuration
		if !c.forEdge() || !t.cond.Match(doc) {
			continue
		}
		status[c.ID] = ConfigStatus{Status: "Targeted"}
		if c.layered() {
			layers = append(layers, c)
		} else if base == nil || outranks(c, base) {
			base = c
		}
	}
	desired := map[string]map[string]any{}
	if base == nil {
		return desired, nil
	}
	status[base.ID] = ConfigStatus{Status: "Applied"}
	for mod, entries := range base.Content.ModulesContent {
		var m map[string]any
		if err := twindoc.Unmarshal(entries["properties.desired"], &m); err != nil {
			return nil, fmt.Errorf("deployment %s, module %s: %w", base.ID, mod, err)
		}
		desired[mod] = m
	}
	sort.SliceStable(layers, func(i, j int) bool { return layers[i].Priority < layers[j].Priority })
	for _, l := range layers {
		status[l.ID] = ConfigStatus{Status: "Applied"}
		for mod, entries := range l.Content.ModulesContent {
			if desired[mod] == nil {
				desired[mod] = map[string]any{}
			}
			for _, k := range slices.Sorted(maps.Keys(entries)) {
				var v any
				if err := twindoc.Unmarshal(entries[k], &v); err != nil {
					return nil, fmt.Errorf("deployment %s, module %s: %w", l.ID, mod, err)
				}
				setPath(desired[mod], desiredPath(k), v)
			}
		}
	}
	return desired, nil
}

// ensureModules gives an edge device an identity for each module its
// deployment names — those with module twin content and those the
// $edgeAgent manifest runs — as the hosted runtime creates them.
func (s *Service) ensureModules(ctx context.Context, device string, desired map[string]map[string]any) error {
	names := slices.Collect(maps.Keys(desired))
	if mods, ok := desired["$edgeAgent"]["modules"].(map[string]any); ok {
		names = append(names, slices.Collect(maps.Keys(mods))...)
	}
	for _, mod := range names {
		m := Ref{Device: device, Module: mod}
		if _, err := s.GetIdentity(ctx, m); err == nil {
			continue
		} else if !azerr.HasStatus(err, 404) {
			return err
		}
		if _, err := s.PutIdentity(ctx, m, "", &Device{ManagedBy: "iotEdge"}); err != nil && azerr.As(err).Status() != 409 {
			return err
		}
	}
	return nil
}

// setPath sets doc[a][b]... = v, creating objects on the way.
func setPath(doc map[string]any, path []string, v any) {
	if len(path) == 1 && path[0] == "" {
		if m, ok := v.(map[string]any); ok {
			maps.Copy(doc, m)
		}
		return
	}
	for _, p := range path[:len(path)-1] {
		sub, ok := doc[p].(map[string]any)
		if !ok {
			sub = map[string]any{}
			doc[p] = sub
		}
		doc = sub
	}
	doc[path[len(path)-1]] = v
}

// ApplyContent sets one edge device's module twins directly, as
// `az iot edge set-modules` does; deployments may later override it.
func (s *Service) ApplyContent(ctx context.Context, device string, c *ConfigContent) error {
	if err := checkContent(c, false); err != nil {
		return err
	}
	rec, _, err := s.load(ctx, Ref{Device: device})
	if err != nil {
		return err
	}
	if !rec.Device.Capabilities.IoTEdge {
		return azerr.BadRequest("device %q is not an IoT Edge device: create it with capabilities.iotEdge = true", device)
	}
	desired := map[string]map[string]any{}
	for mod, entries := range c.ModulesContent {
		var d map[string]any
		if err := twindoc.Unmarshal(entries["properties.desired"], &d); err != nil {
			return azerr.BadRequest("modulesContent.%s.properties.desired: %v", mod, err)
		}
		desired[mod] = d
	}
	return s.setModules(ctx, device, desired)
}

// configurationsChanged forgets the configurations evaluate remembers, and
// evaluates again, in the background, the identities it evaluated lately:
// the configurations may have changed, through another replica, before
// their records were written and after that replica's sweep passed them by.
func (s *Service) configurationsChanged() {
	refs := s.targetMemo.forget()
	if len(refs) == 0 {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		for i, r := range refs {
			if ctx.Err() != nil {
				slog.Warn("evaluating again the identities evaluated before another replica changed the configurations took too long; the rest wait for their next change",
					"evaluated", i, "left", len(refs)-i)
				return
			}
			// The last configuration may be what went: its statuses
			// are to be taken back all the same.
			if err := s.evaluate(ctx, r, true); err != nil && !azerr.HasStatus(err, 404) {
				slog.Warn("applying configurations failed", "device", r.Device, "error", err)
			}
		}
	}()
}

// targetMemo keeps the configurations, ready for matching, for
// targetMemoTTL: evaluate runs on every tag change. A change through this
// replica forgets them at once, one through another when its signal comes.
type targetMemo struct {
	mu  sync.Mutex
	ts  []target
	at  time.Time
	gen int // counts forgets, so that a load begun before one is not kept
	ok  bool
	// used says when each identity was last evaluated against the memo,
	// over the last targetMemoUse: forget hands them back.
	used   map[Ref]time.Time
	pruned time.Time
}

const (
	targetMemoTTL = 2 * time.Second
	// targetMemoUse covers the memo's life, the signal's way from another
	// replica and writing a record after evaluating it.
	targetMemoUse = 5 * time.Second
)

// get is the configurations, to evaluate r against.
func (m *targetMemo) get(ctx context.Context, r Ref, load func(context.Context) ([]target, error)) ([]target, error) {
	now := time.Now()
	m.mu.Lock()
	if m.used == nil {
		m.used = map[Ref]time.Time{}
	}
	m.used[r] = now
	if now.Sub(m.pruned) > targetMemoUse {
		for u, at := range m.used {
			if now.Sub(at) > targetMemoUse {
				delete(m.used, u)
			}
		}
		m.pruned = now
	}
	if m.ok && now.Sub(m.at) < targetMemoTTL {
		defer m.mu.Unlock()
		return m.ts, nil
	}
	gen := m.gen
	m.mu.Unlock()
	ts, err := load(ctx)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	if m.gen == gen {
		m.ts, m.at, m.ok = ts, time.Now(), true
	}
	m.mu.Unlock()
	return ts, nil
}

// forget drops the configurations, and returns the identities evaluated
// against the memo over the last targetMemoUse.
func (m *targetMemo) forget() []Ref {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.gen++
	m.ok = false
	var recent []Ref
	for r, at := range m.used {
		if time.Since(at) <= targetMemoUse {
			recent = append(recent, r)
		}
	}
	clear(m.used)
	return recent
}
