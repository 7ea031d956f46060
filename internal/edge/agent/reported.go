package agent

import (
	"errors"
	"runtime"
	"runtime/debug"
	"time"

	"github.com/hatchery/hatchery/internal/edge/moby"
)

// Reported builds the $edgeAgent reported properties. desired is the
// manifest the modules were reconciled against (the last that parsed; nil
// if none has); err is the outcome of the latest desired document: nil, an
// *Error from ParseManifest (its code and $version are reported), or a
// failure to apply desired (500).
//
// lastDesiredStatus codes, those of Azure's edgeAgent: 200 applied, 400
// invalid manifest, 412 schemaVersion not supported, 417 no deployment,
// 500 failed to apply. (406, "device offline", is the cloud's to report.)
//
// The result is the whole document: a caller sending it as a twin patch
// must set modules that disappeared to null itself.
func Reported(desired *Manifest, current []moby.ModuleState, hist map[string]*History, err error) map[string]any {
	code, desc, version := 200, "", int64(0)
	if desired != nil {
		version = desired.Version
	}
	var me *Error
	switch {
	case errors.As(err, &me):
		code, desc, version = me.Code, me.Error(), me.Version
	case err != nil:
		code, desc = 500, err.Error()
	case desired == nil:
		code, desc = 417, "the device has no deployment manifest yet"
	}
	status := map[string]any{"code": code}
	if desc != "" {
		status["description"] = desc
	}
	rt := map[string]any{
		"type":     "docker",
		"platform": map[string]any{"os": runtime.GOOS, "architecture": runtime.GOARCH},
	}
	rep := map[string]any{
		"schemaVersion":      "1.1",
		"version":            map[string]any{"version": agentVersion()},
		"lastDesiredVersion": version,
		"lastDesiredStatus":  status,
		"runtime":            rt,
		"systemModules":      map[string]any{},
		"modules":            map[string]any{},
	}
	if desired == nil {
		return rep
	}
	// Not registryCredentials: reported properties are readable by anyone
	// with read access to the twin.
	rt["settings"] = map[string]any{"minDockerVersion": desired.Runtime.MinDockerVersion, "loggingOptions": desired.Runtime.LoggingOptions}

	sys := rep["systemModules"].(map[string]any)
	for name, m := range desired.SystemModules {
		e := map[string]any{"type": "docker", "settings": map[string]any{"image": m.Image}}
		if name == "edgeAgent" { // this process
			e["runtimeStatus"] = RuntimeRunning
		} else {
			e["runtimeStatus"] = RuntimeUnknown
			e["statusDescription"] = "not run by this agent"
			e["status"], e["restartPolicy"] = m.Status, m.RestartPolicy
		}
		sys[name] = e
	}

	byName := map[string]moby.ModuleState{}
	for _, st := range current {
		byName[st.Name] = st
	}
	mods := rep["modules"].(map[string]any)
	for name, m := range desired.Modules {
		h := hist[name]
		if h == nil {
			h = &History{}
		}
		st, ok := byName[name]
		var stp *moby.ModuleState
		if ok {
			stp = &st
		}
		rs, d := Status(m, stp, h)
		mods[name] = map[string]any{
			"runtimeStatus":      rs,
			"statusDescription":  d,
			"exitCode":           st.ExitCode,
			"lastStartTimeUtc":   utc(st.StartedAt),
			"lastExitTimeUtc":    utc(st.FinishedAt),
			"restartCount":       h.Restarts,
			"lastRestartTimeUtc": utc(h.LastRestart),
			"status":             m.Status,
			"restartPolicy":      m.RestartPolicy,
			"imagePullPolicy":    m.ImagePullPolicy,
			"version":            m.Version,
			"type":               "docker",
			"settings":           map[string]any{"image": m.Image},
		}
	}
	return rep
}

// utc formats times as Azure's agent does; never is 0001-01-01T00:00:00Z.
func utc(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

func agentVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}
