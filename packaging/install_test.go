package packaging

// The packages installed for real, without touching this machine: dpkg
// runs in a chroot on an overlay of / (writes land in a scratch directory)
// in a private mount namespace. TestInstallWithoutSystemd runs the
// maintainer scripts as on a machine without systemd;
// TestSeedFlowUnderSystemd boots systemd in its own namespaces (pid, mount,
// network: only loopback) on such an overlay and runs the seed's steps
// against the installed units: a swtpm TPM, the hatchery service as the
// package starts it, `iotedge config apply`, `system status` and `system
// logs`, an upgrade, `system stop` and a purge.
// Both need root (mount, chroot, namespaces).

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/testutil"
)

// overlaySetup mounts an overlay of / at $w/root, with $w/upper taking the
// writes, and copies the packages there as /hatchery-test/{hatchery,
// iotedge}.deb. It runs in a private mount namespace: the mounts vanish
// with it.
const overlaySetup = `set -eu
w=$1
mount --make-rprivate /
mkdir -p "$w/upper" "$w/work" "$w/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$w/upper,workdir=$w/work" "$w/root"
r=$w/root
mkdir -p "$r/hatchery-test"
cp "$w/hatchery.deb" "$w/iotedge.deb" "$r/hatchery-test/"
mount -t proc proc "$r/proc"
mount -t tmpfs -o mode=0755 tmpfs "$r/run"
`

// requireRoot skips, or fails under CI=true, without root.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		testutil.Missing(t, "installing the package in a scratch root needs root (mount, chroot): run the tests as root")
	}
	for _, c := range []string{"unshare", "chroot", "nsenter"} {
		testutil.Require(t, c, "util-linux")
	}
}

// scratch returns a directory for an overlay, with the packages in it.
func scratch(t *testing.T) string {
	t.Helper()
	w, err := os.MkdirTemp(debDir, "overlay")
	if err != nil {
		t.Fatal(err)
	}
	for pkg, name := range map[string]string{"hatchery": "hatchery.deb", "hatchery-iotedge": "iotedge.deb"} {
		b, err := os.ReadFile(buildDeb(t, pkg))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(w, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return w
}

// keyValues parses the key=value lines of out.
func keyValues(out []byte) map[string]string {
	kv := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok && !strings.ContainsAny(k, " \t") {
			kv[k] = v
		}
	}
	return kv
}

func TestInstallWithoutSystemd(t *testing.T) {
	requireRoot(t)
	w := scratch(t)
	hostUsers, _ := os.ReadFile("/etc/passwd")
	steps := `set -eu
cd /hatchery-test
pkg() { dpkg --force-depends "$@" >>dpkg.log 2>&1 || { echo "dpkg $*: failed"; cat dpkg.log; exit 1; }; }
st() { stat -c '%U:%G:%a' "$1" 2>/dev/null || echo absent; }
pkg -i iotedge.deb
echo "user.iotedge=$(getent passwd iotedge | cut -d: -f6,7)"
echo "user.aziottpm=$(getent passwd aziottpm | cut -d: -f6,7)"
echo "groups.iotedge=$(id -nG iotedge)"
echo "groups.aziottpm=$(id -nG aziottpm)"
echo "stat.etc=$(st /etc/aziot)"
echo "stat.template=$(st /etc/aziot/config.toml.edge.template)"
echo "stat.state=$(st /var/lib/aziot/edged)"
echo "stat.udev=$(st /lib/udev/rules.d/70-hatchery-aziottpm.rules)"
# The seed's step, as an earlier package left it (readable by group
# iotedge), and state a daemon running as root left: the next configure
# (here a reinstall) gives config.toml to iotedged alone, aziot-tpmd its
# settings, and the state to the services.
cp /etc/aziot/config.toml.edge.template /etc/aziot/config.toml
chown root:iotedge /etc/aziot/config.toml
chmod 0640 /etc/aziot/config.toml
touch /var/lib/aziot/edged/device_info.json
pkg -i iotedge.deb
echo "reinstall.users=$(grep -c -E '^(iotedge|aziottpm):' /etc/passwd)"
echo "stat.config=$(st /etc/aziot/config.toml)"
echo "stat.tpmd=$(st /etc/aziot/tpmd/config.toml)"
echo "stat.backup=$(st /var/lib/aziot/edged/device_info.json)"
pkg -r hatchery-iotedge
echo "removed.bin=$(st /usr/bin/iotedge)"
echo "removed.template=$(st /etc/aziot/config.toml.edge.template)"
echo "removed.state=$(st /var/lib/aziot/edged)"
pkg -P hatchery-iotedge
echo "purged.template=$(st /etc/aziot/config.toml.edge.template)"
echo "purged.config=$(st /etc/aziot/config.toml)"
echo "purged.tpmd=$(st /etc/aziot/tpmd)"
echo "purged.state=$(st /var/lib/aziot)"
echo "purged.user=$(getent passwd iotedge >/dev/null && echo kept || echo gone)"

# The service: installed, enabled, not started (no systemd runs here).
pkg -i hatchery.deb
echo "user.hatchery=$(getent passwd hatchery | cut -d: -f6,7)"
echo "stat.data=$(st /var/lib/hatchery)"
echo "stat.default=$(st /etc/default/hatchery)"
echo "enabled.hatchery=$(test -L /etc/systemd/system/multi-user.target.wants/hatchery.service && echo yes)"
# State a server left as root goes to the service at the next configure.
touch /var/lib/hatchery/hatchery.db
pkg -i hatchery.deb
echo "stat.db=$(st /var/lib/hatchery/hatchery.db)"
# Root's CLI finds the service's installation (an empty one: no endpoint.json).
echo "cli.dir=$(HOME=/nonexistent hatchery info 2>&1 | grep -o '/var/lib/hatchery' | head -n 1)"
pkg -r hatchery
echo "removed.hatchery=$(st /usr/bin/hatchery)"
echo "removed.data=$(st /var/lib/hatchery)"
pkg -P hatchery
echo "purged.data=$(st /var/lib/hatchery)"
echo "purged.default=$(st /etc/default/hatchery)"
echo "purged.enabled=$(st /etc/systemd/system/multi-user.target.wants/hatchery.service)"
`
	if err := os.WriteFile(filepath.Join(w, "steps.sh"), []byte(steps), 0o755); err != nil {
		t.Fatal(err)
	}
	script := overlaySetup + `mount --rbind /dev "$r/dev"
cp "$w/steps.sh" "$r/hatchery-test/steps.sh"
exec chroot "$r" /bin/sh /hatchery-test/steps.sh
`
	out, err := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", w).CombinedOutput()
	if err != nil {
		if bytes.Contains(out, []byte("mount")) && !bytes.Contains(out, []byte("dpkg")) {
			testutil.Missing(t, "cannot mount an overlay of / here: %v\n%s", err, out)
		}
		t.Fatalf("install in an overlay: %v\n%s", err, out)
	}
	got := keyValues(out)
	for k, want := range map[string]string{
		"user.iotedge":     "/nonexistent:/usr/sbin/nologin",
		"user.aziottpm":    "/nonexistent:/usr/sbin/nologin",
		"groups.aziottpm":  "aziottpm",
		"stat.etc":         "root:root:755",
		"stat.template":    "root:root:644",
		"stat.state":       "iotedge:iotedge:700",
		"stat.udev":        "root:root:644",
		"reinstall.users":  "2",
		"stat.config":      "iotedge:root:600",
		"stat.tpmd":        "root:root:644",
		"stat.backup":      "iotedge:iotedge:644",
		"removed.bin":      "absent",
		"removed.template": "root:root:644", // a conffile stays until purge
		"removed.state":    "iotedge:iotedge:700",
		"purged.template":  "absent",
		"purged.config":    "absent",
		"purged.tpmd":      "absent",
		"purged.state":     "absent",
		"purged.user":      "kept",
		"user.hatchery":    "/nonexistent:/usr/sbin/nologin",
		"stat.data":        "hatchery:hatchery:700",
		"stat.default":     "root:hatchery:640",
		"enabled.hatchery": "yes",
		"stat.db":          "hatchery:hatchery:644",
		"cli.dir":          "/var/lib/hatchery",
		"removed.hatchery": "absent",
		"removed.data":     "hatchery:hatchery:700",
		"purged.data":      "absent",
		"purged.default":   "absent",
		"purged.enabled":   "absent",
	} {
		if got[k] != want {
			t.Errorf("%s: %q, want %q", k, got[k], want)
		}
	}
	// iotedge is in group docker when the group exists.
	wantGroups := "iotedge"
	if _, err := exec.Command("getent", "group", "docker").Output(); err == nil {
		wantGroups = "iotedge docker"
	}
	if got["groups.iotedge"] != wantGroups {
		t.Errorf("groups of iotedge: %q, want %q", got["groups.iotedge"], wantGroups)
	}
	if t.Failed() {
		t.Logf("output:\n%s", out)
	}
	if after, _ := os.ReadFile("/etc/passwd"); !bytes.Equal(after, hostUsers) {
		t.Error("the machine's /etc/passwd changed")
	}
}

// bootedSystemd is systemd running as PID 1 of its own namespaces, on an
// overlay root with the package installed.
type bootedSystemd struct {
	t   *testing.T
	pid int // systemd's PID as this machine sees it
}

// run runs a shell script inside, as root, and returns what it printed.
func (s *bootedSystemd) run(script string) (string, error) {
	cmd := exec.Command("nsenter", "-t", fmt.Sprint(s.pid), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w",
		"/bin/sh", "-c", script)
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8"}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (s *bootedSystemd) must(script string) string {
	s.t.Helper()
	out, err := s.run(script)
	if err != nil {
		s.t.Fatalf("%s: %v\n%s", script, err, out)
	}
	return out
}

// eventually runs script until it succeeds and prints want, for timeout.
func (s *bootedSystemd) eventually(script, want string, timeout time.Duration) string {
	s.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		out, err := s.run(script)
		if err == nil && strings.Contains(out, want) {
			return out
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("%s: after %v: %v\n%s\nwant %q in it", script, timeout, err, out, want)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// cgroup2Root is where the unified cgroup hierarchy is mounted.
func cgroup2Root() string {
	b, _ := os.ReadFile("/proc/self/mounts")
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 2 && f[2] == "cgroup2" {
			return f[1]
		}
	}
	return ""
}

func bootSystemd(t *testing.T, w string, dockerSock bool) *bootedSystemd {
	t.Helper()
	systemd := "/lib/systemd/systemd"
	if _, err := os.Stat(systemd); err != nil {
		testutil.Missing(t, "%s is missing: install the Debian package systemd", systemd)
	}
	cgRoot := cgroup2Root()
	if cgRoot == "" {
		testutil.Missing(t, "no cgroup2 hierarchy is mounted: systemd cannot run in a namespace here")
	}
	// systemd gets a cgroup of its own, which its cgroup namespace makes
	// its root.
	cg := filepath.Join(cgRoot, fmt.Sprintf("hatchery-deb-test-%d", os.Getpid()))
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	bind := ""
	if dockerSock {
		bind = `touch "$r/run/docker.sock"; mount --bind /run/docker.sock "$r/run/docker.sock"` + "\n"
	}
	inner := overlaySetup + `mount -t sysfs sysfs "$r/sys"
mount -t cgroup2 cgroup2 "$r/sys/fs/cgroup"
mount -t tmpfs -o mode=0755 tmpfs "$r/dev"
for d in null zero full random urandom tty; do touch "$r/dev/$d"; mount --bind "/dev/$d" "$r/dev/$d"; done
mkdir "$r/dev/pts" "$r/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$r/dev/pts"
ln -s pts/ptmx "$r/dev/ptmx"; ln -s /proc/self/fd "$r/dev/fd"
` + bind + `ip link set lo up 2>/dev/null || true
echo hatchery-test >"$r/etc/hostname"
chroot "$r" dpkg --force-depends -i /hatchery-test/iotedge.deb >"$w/dpkg.log" 2>&1 || { cat "$w/dpkg.log"; exit 1; }
# Only what the test needs starts: journald. Docker's units are masked (the
# machine's engine, when it runs, is bound in above).
cat >"$r/etc/systemd/system/hatchery-test.target" <<EOF
[Unit]
Description=Hatchery package test
Wants=systemd-journald.service
EOF
for u in docker.service docker.socket containerd.service; do ln -sf /dev/null "$r/etc/systemd/system/$u"; done
exec chroot "$r" /usr/bin/env container=hatchery-test ` + systemd + ` --system --unit=hatchery-test.target --show-status=0 --log-target=journal-or-kmsg
`
	cmd := exec.Command("sh", "-c", `echo $$ >"$1/cgroup.procs" && shift && exec unshare --pid --fork --mount --net --uts --ipc --cgroup --propagation private sh -c "$@"`,
		"sh", cg, inner, "sh", w)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	s := &bootedSystemd{t: t}
	t.Cleanup(func() {
		if s.pid != 0 && t.Failed() {
			journal, _ := s.run("journalctl --no-pager -n 100")
			t.Logf("the journal's last lines:\n%s", journal)
		}
		if s.pid != 0 {
			_, _ = s.run("systemctl poweroff")
			select {
			case <-exited:
			case <-time.After(15 * time.Second):
				_ = syscall.Kill(s.pid, syscall.SIGKILL)
				<-exited
			}
		} else {
			_ = cmd.Process.Kill()
			<-exited
		}
		// The cgroups systemd made are empty now; the deepest go first.
		var dirs []string
		_ = filepath.WalkDir(cg, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			_ = os.Remove(dirs[i])
		}
	})

	// systemd is the child of unshare, whose PID is cmd's.
	deadline := time.Now().Add(30 * time.Second)
	for s.pid == 0 {
		select {
		case err := <-exited:
			exited <- err
			if strings.Contains(out.String(), "mount") {
				testutil.Missing(t, "cannot boot systemd in namespaces here: %v\n%s", err, out.String())
			}
			t.Fatalf("systemd did not start: %v\n%s", err, out.String())
		default:
		}
		children, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", cmd.Process.Pid, cmd.Process.Pid))
		if f := strings.Fields(string(children)); len(f) > 0 {
			var pid int
			fmt.Sscan(f[0], &pid)
			if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); strings.HasSuffix(exe, "/systemd") {
				s.pid = pid
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("systemd did not start in 30s:\n%s", out.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	s.eventually("systemctl is-system-running | grep -E '^(running|degraded)$'", "", 60*time.Second)
	return s
}

// dockerAnswers reports whether the machine's Moby engine answers.
func dockerAnswers() bool {
	c, err := net.DialTimeout("unix", "/run/docker.sock", time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	fmt.Fprint(c, "GET /_ping HTTP/1.0\r\n\r\n")
	b := make([]byte, 64)
	n, _ := c.Read(b)
	return bytes.Contains(b[:n], []byte(" 200 "))
}

func TestSeedFlowUnderSystemd(t *testing.T) {
	requireRoot(t)
	testutil.Require(t, "swtpm", "swtpm")
	w := scratch(t)
	engine := dockerAnswers()
	s := bootSystemd(t, w, engine)

	// A TPM, and the hatchery service as its package installs and starts
	// it (a container image's policy-rc.d, which forbids starting services,
	// is taken out of the overlay): under the machine's host name, which
	// the device here cannot resolve, so /etc/default/hatchery names
	// localhost. Type=notify: once systemctl returns, the CLI finds the
	// server.
	const tcti = "swtpm:host=127.0.0.1,port=2321"
	s.must(`mkdir -p /var/lib/swtpm-test
systemd-run --quiet --unit=swtpm-test swtpm socket --tpm2 --tpmstate dir=/var/lib/swtpm-test \
  --server type=tcp,port=2321,bindaddr=127.0.0.1 --ctrl type=tcp,port=2322,bindaddr=127.0.0.1 \
  --flags not-need-init,startup-clear
rm -rf /root/.local/share/hatchery /usr/sbin/policy-rc.d
dpkg --force-depends -i /hatchery-test/hatchery.deb`)
	if out, _ := s.run("systemctl is-active hatchery"); out != "active\n" {
		t.Errorf("the package did not start its service: %q", out)
	}
	s.must(`sed -i 's/^HATCHERY_SERVE_OPTS=.*/HATCHERY_SERVE_OPTS="--hostname localhost"/' /etc/default/hatchery
systemctl restart hatchery`)
	const hatchery = "hatchery" // as root, on the service's /var/lib/hatchery

	// The seed: the TPM's registration ID and EK, then the enrollment.
	var info struct{ RegistrationID, EndorsementKey string }
	out := s.eventually("iotedge tpm provision-info --output json --tcti "+tcti, "registrationId", 30*time.Second)
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("provision-info: %v\n%s", err, out)
	}
	s.must(fmt.Sprintf("%s enrollment create --attestation-type tpm --registration-id %s --endorsement-key %s --device-id edge-lab-01 --edge-enabled",
		hatchery, info.RegistrationID, info.EndorsementKey))
	var svc struct{ IDScope, ProvisioningHost string }
	if err := json.Unmarshal([]byte(s.must(hatchery+" info --output json")), &svc); err != nil {
		t.Fatal(err)
	}

	// The device: the CA certificate as README.Debian copies it, the
	// template, the DPS-TPM block, config apply.
	s.must(fmt.Sprintf(`%s info --ca-pem | tee /etc/aziot/hatchery-ca.pem >/dev/null
cp /etc/aziot/config.toml.edge.template /etc/aziot/config.toml
cat >>/etc/aziot/config.toml <<EOF
trust_bundle_cert = "file:///etc/aziot/hatchery-ca.pem"

[provisioning]
source = "dps"
global_endpoint = "%s"
id_scope = "%s"

[provisioning.attestation]
method = "tpm"
registration_id = "%s"

[tpm]
tcti = "%s"
EOF`, hatchery, svc.ProvisioningHost, svc.IDScope, info.RegistrationID, tcti))
	if out := s.must("iotedge config apply"); !strings.Contains(out, "Restarting the IoT Edge services") {
		t.Errorf("config apply did not take the systemd path:\n%s", out)
	}
	status := s.eventually("iotedge system status", "Device:       edge-lab-01", 60*time.Second)
	for _, want := range []string{"aziot-tpmd    Running", "iotedged      Running", "provisioned by dps/tpm", "Hub:          connected"} {
		if !strings.Contains(status, want) {
			t.Errorf("system status lacks %q:\n%s", want, status)
		}
	}
	if engine && !strings.Contains(status, "Engine:       reachable") {
		t.Errorf("the engine answers on /run/docker.sock, but not to iotedged (SupplementaryGroups=docker):\n%s", status)
	}
	logs := s.must("iotedge system logs --tail 200")
	for _, want := range []string{"aziot-tpmd serving", "msg=provisioned", "Started iotedged.service"} {
		if !strings.Contains(logs, want) {
			t.Errorf("system logs (the journal) lacks %q:\n%s", want, logs)
		}
	}

	// Who runs what, and who may connect.
	got := keyValues([]byte(s.must(`st() { stat -c '%U:%G:%a' "$1"; }
echo "tpmd.user=$(stat -c %U /proc/$(systemctl show -p MainPID --value aziot-tpmd))"
echo "edged.user=$(stat -c %U /proc/$(systemctl show -p MainPID --value iotedged))"
echo "tpmd.sock=$(st /run/aziot/tpmd.sock)"
echo "mgmt.sock=$(st /var/run/iotedge/mgmt.sock)"
echo "state=$(st /var/lib/aziot/edged)"
echo "config=$(st /etc/aziot/config.toml)"
echo "tpmd.config=$(st /etc/aziot/tpmd/config.toml)"
echo "enabled=$(systemctl is-enabled aziot-tpmd iotedged | tr '\n' ' ')"
echo "hatchery.user=$(stat -c %U /proc/$(systemctl show -p MainPID --value hatchery))"
echo "hatchery.enabled=$(systemctl is-enabled hatchery)"
echo "hatchery.data=$(st /var/lib/hatchery)"
echo "hatchery.db=$(st /var/lib/hatchery/hatchery.db)"
echo "hatchery.ca=$(st /var/lib/hatchery/tls/ca-key.pem)"
setpriv --reuid nobody --regid nogroup --groups "$(getent group iotedge | cut -d: -f3)" iotedge list >/dev/null 2>&1 && echo member=ok || echo member=refused
setpriv --reuid nobody --regid nogroup --clear-groups iotedge list >/dev/null 2>&1 && echo other=ok || echo other=refused
# The device's keys are iotedged's: not the group's, nor aziot-tpmd's.
setpriv --reuid nobody --regid nogroup --groups "$(getent group iotedge | cut -d: -f3)" cat /etc/aziot/config.toml >/dev/null 2>&1 && echo member.config=read || echo member.config=refused
setpriv --reuid aziottpm --regid aziottpm --groups "$(getent group iotedge | cut -d: -f3)" cat /etc/aziot/config.toml >/dev/null 2>&1 && echo tpmd.reads=config || echo tpmd.reads=nothing
setpriv --reuid nobody --regid nogroup --groups "$(getent group iotedge | cut -d: -f3)" iotedge check >/tmp/member-check 2>&1 && echo member.check=ok || echo member.check=failed
grep -q "config.toml is well-formed - skipped" /tmp/member-check && grep -q "sudo iotedge check" /tmp/member-check && echo member.told=sudo
`)))
	for k, want := range map[string]string{
		"tpmd.user":        "aziottpm",
		"edged.user":       "iotedge",
		"tpmd.sock":        "aziottpm:iotedge:660",
		"mgmt.sock":        "iotedge:iotedge:660",
		"state":            "iotedge:iotedge:700",
		"enabled":          "enabled enabled ",
		"hatchery.user":    "hatchery",
		"hatchery.enabled": "enabled",
		"hatchery.data":    "hatchery:hatchery:700",
		"hatchery.db":      "hatchery:hatchery:600",
		"hatchery.ca":      "hatchery:hatchery:600",
		"member":           "ok",
		"other":            "refused",
		"config":           "iotedge:root:600",
		"tpmd.config":      "root:root:644",
		"member.config":    "refused",
		"tpmd.reads":       "nothing",
		"member.check":     "ok",
		"member.told":      "sudo",
	} {
		if got[k] != want {
			t.Errorf("%s: %q, want %q", k, got[k], want)
		}
	}
	if t.Failed() {
		t.Logf("iotedge check as a member of group iotedge:\n%s", s.must("cat /tmp/member-check"))
	}

	// The service's backup, restored as `hatchery backup` says: the
	// enrollment is there, the service serves it.
	out = s.must(hatchery + " backup --to /var/backups/hatchery-test")
	_, restore, _ := strings.Cut(out, "`")
	restore, _, _ = strings.Cut(restore, "`")
	if !strings.Contains(restore, "systemctl stop hatchery") {
		t.Fatalf("backup of /var/lib/hatchery does not say how to restore it in place:\n%s", out)
	}
	s.must(hatchery + " enrollment delete --registration-id " + info.RegistrationID)
	s.must(restore)
	if out := s.must(hatchery + " enrollment list"); !strings.Contains(out, info.RegistrationID) {
		t.Errorf("after the restore, the enrollment is not there:\n%s", out)
	}

	// An upgrade restarts the running services; from a package that had
	// config.toml read by both (group iotedge, and no aziot-tpmd settings
	// of its own), it gives config.toml to iotedged and aziot-tpmd its
	// settings, without which it would not find the TPM.
	s.must("chown root:iotedge /etc/aziot/config.toml && chmod 0640 /etc/aziot/config.toml && rm -r /etc/aziot/tpmd")
	pids := s.must("systemctl show -p MainPID --value aziot-tpmd iotedged")
	s.must("dpkg --force-depends -i /hatchery-test/iotedge.deb")
	s.eventually("systemctl is-active aziot-tpmd iotedged", "active\nactive", 20*time.Second)
	s.eventually("journalctl -u aziot-tpmd -o cat --no-pager _PID=$(systemctl show -p MainPID --value aziot-tpmd) | grep 'aziot-tpmd serving'",
		`tcti="`+tcti+`"`, 20*time.Second)
	if got := s.must("stat -c '%U:%G:%a' /etc/aziot/config.toml /etc/aziot/tpmd/config.toml"); got != "iotedge:root:600\nroot:root:644\n" {
		t.Errorf("after the upgrade, config.toml and aziot-tpmd's settings are %q", got)
	}
	if after := s.must("systemctl show -p MainPID --value aziot-tpmd iotedged"); after == pids {
		t.Errorf("the upgrade did not restart the services: main PIDs %q", strings.Fields(after))
	}

	s.must("iotedge system stop")
	if out, _ := s.run("systemctl is-active aziot-tpmd iotedged"); out != "inactive\ninactive\n" {
		t.Errorf("after system stop: %q", out)
	}

	// A purge removes the units, their enablement and the state.
	s.must("dpkg -P hatchery-iotedge")
	got = keyValues([]byte(s.must(`systemctl cat iotedged.service >/dev/null 2>&1 && echo unit=present || echo unit=gone
ls /etc/systemd/system/multi-user.target.wants/ | grep -q -E 'aziot-tpmd|iotedged' && echo links=present || echo links=gone
test -e /var/lib/aziot && echo state=present || echo state=gone
`)))
	for k, want := range map[string]string{"unit": "gone", "links": "gone", "state": "gone"} {
		if got[k] != want {
			t.Errorf("after purge, %s: %q, want %q", k, got[k], want)
		}
	}

	// The service: an upgrade restarts it (a new main PID, ready again),
	// keeping the operator's /etc/default/hatchery; a purge stops it and
	// removes its state.
	pid := s.must("systemctl show -p MainPID --value hatchery")
	s.must("dpkg --force-depends -i /hatchery-test/hatchery.deb")
	if after := s.must("systemctl show -p MainPID --value hatchery"); after == pid || strings.TrimSpace(after) == "0" {
		t.Errorf("the upgrade did not restart hatchery: main PID %s, then %s", strings.TrimSpace(pid), strings.TrimSpace(after))
	}
	if out := s.must(hatchery + " enrollment list"); !strings.Contains(out, info.RegistrationID) {
		t.Errorf("after the upgrade, the enrollment is gone:\n%s", out)
	}
	if out := s.must("grep ^HATCHERY_SERVE_OPTS /etc/default/hatchery"); !strings.Contains(out, "--hostname localhost") {
		t.Errorf("the upgrade replaced the operator's /etc/default/hatchery: %s", out)
	}
	// Removed (prerm stops it) and installed again: running again, unless
	// policy-rc.d forbids starting services (as container images' does).
	// Disabled by the operator: an upgrade leaves it so.
	s.must("dpkg -r hatchery && printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && dpkg --force-depends -i /hatchery-test/hatchery.deb")
	if out, _ := s.run("systemctl is-active hatchery"); out != "inactive\n" {
		t.Errorf("hatchery installed again under a policy-rc.d that forbids starts: %q, want inactive", out)
	}
	s.must("rm /usr/sbin/policy-rc.d && dpkg -r hatchery && dpkg --force-depends -i /hatchery-test/hatchery.deb")
	if out, _ := s.run("systemctl is-active hatchery"); out != "active\n" {
		t.Errorf("hatchery removed and installed again: %q, want active", out)
	}
	s.must("systemctl disable --now hatchery && dpkg --force-depends -i /hatchery-test/hatchery.deb")
	if out, _ := s.run("systemctl is-active hatchery; systemctl is-enabled hatchery"); out != "inactive\ndisabled\n" {
		t.Errorf("hatchery disabled, then upgraded: %q, want inactive and disabled", out)
	}
	s.must("dpkg -P hatchery")
	got = keyValues([]byte(s.must(`echo "active=$(systemctl is-active hatchery)"
test -e /var/lib/hatchery && echo state=present || echo state=gone
test -e /etc/default/hatchery && echo default=present || echo default=gone
`)))
	for k, want := range map[string]string{"active": "inactive", "state": "gone", "default": "gone"} {
		if got[k] != want {
			t.Errorf("after purging hatchery, %s: %q, want %q", k, got[k], want)
		}
	}
}
