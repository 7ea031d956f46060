package starthint

import (
	"strings"
	"testing"
)

// The hint names the unit under systemd, the command otherwise.
func TestService(t *testing.T) {
	got := Service("aziot-tpmd", "aziot-tpmd --tcti device")
	want := "`sudo aziot-tpmd --tcti device &`"
	if Systemd() {
		want = "`sudo systemctl start aziot-tpmd`"
	}
	if !strings.HasSuffix(got, want) {
		t.Errorf("Service = %q, want it to end in %q", got, want)
	}
}
