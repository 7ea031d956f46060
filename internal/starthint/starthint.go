// Package starthint says how to start a service the runtime needs: with
// systemctl where systemd runs the machine, else in the foreground, as on
// containers and development machines without it.
package starthint

import "os"

// Service is "start it with …" for unit, or for the command foreground
// where there is no systemd.
func Service(unit, foreground string) string {
	if Systemd() {
		return "start it with `sudo systemctl start " + unit + "`"
	}
	return "start it (there is no systemd here): `sudo " + foreground + " &`"
}

// Systemd reports whether systemd runs this machine.
func Systemd() bool {
	_, err := os.Stat("/run/systemd/system")
	return err == nil
}
