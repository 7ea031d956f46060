// Package hubid holds IoT Hub's rule for device and module IDs: the hub
// enforces it, and the provisioning service checks an enrollment's device
// ID against it before storing the enrollment rather than failing the
// device's registration later.
package hubid

import "regexp"

var pattern = regexp.MustCompile(`^[A-Za-z0-9\-.+%_#*?!(),:=@$']{1,128}$`)

// Rule says what Valid accepts, for error messages.
const Rule = "1 to 128 letters, digits or -.+%_#*?!(),:=@$'"

// Valid reports whether id may name a device or a module.
func Valid(id string) bool { return pattern.MatchString(id) }
