// Package packaging tests the Debian packages that scripts/build-deb.sh
// builds from this directory, hatchery (the service and CLI) and
// hatchery-iotedge (the device runtime): their contents, control fields
// and maintainer scripts (this file), their systemd units (units_test.go),
// and the packages installed for real, on an overlay of this machine's
// root, with and without a running systemd (install_test.go).
package packaging

import (
	"bufio"
	"bytes"
	"cmp"
	"crypto/md5"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/hatchery/hatchery/internal/testutil"
)

// testVersion is the version the tests build the packages with.
const testVersion = "1.5.0~test1"

// debPackage is what one package must hold.
type debPackage struct {
	name     string
	commands []string          // in /usr/bin
	version  []string          // a command and its arguments printing "… VERSION"
	files    map[string]string // path in the package -> source in the repository
	conffile string
	control  map[string]string
	depends  []string
}

var packages = []debPackage{
	{
		name:     "hatchery",
		commands: []string{"hatchery"},
		version:  []string{"hatchery", "--version"},
		files: map[string]string{
			"lib/systemd/system/hatchery.service":  "packaging/systemd/hatchery.service",
			"etc/default/hatchery":                 "packaging/default/hatchery",
			"usr/share/doc/hatchery/README.Debian": "packaging/debian/hatchery/README.Debian",
		},
		conffile: "/etc/default/hatchery",
		control:  map[string]string{"Section": "net", "Suggests": "postgresql"},
		depends:  []string{"adduser", "init-system-helpers"}, // deb-systemd-invoke
	},
	{
		name:     "hatchery-iotedge",
		commands: []string{"iotedge", "iotedged", "aziot-tpmd"},
		version:  []string{"iotedge", "version"},
		files: map[string]string{
			"etc/aziot/config.toml.edge.template":          "packaging/config.toml.edge.template",
			"lib/systemd/system/aziot-tpmd.service":        "packaging/systemd/aziot-tpmd.service",
			"lib/systemd/system/iotedged.service":          "packaging/systemd/iotedged.service",
			"lib/udev/rules.d/70-hatchery-aziottpm.rules":  "packaging/udev/70-hatchery-aziottpm.rules",
			"usr/share/doc/hatchery-iotedge/README.Debian": "packaging/debian/hatchery-iotedge/README.Debian",
		},
		conffile: "/etc/aziot/config.toml.edge.template",
		control:  map[string]string{"Section": "admin", "Recommends": "tpm2-tools"},
		depends:  []string{"adduser", "docker.io | moby-engine | docker-ce"},
	},
}

var (
	debDir  string // the tests' scratch directory, removed by TestMain
	debOnce sync.Once
	debPath map[string]string // package -> .deb
	debErr  error
)

func TestMain(m *testing.M) {
	var err error
	if debDir, err = os.MkdirTemp("", "hatchery-deb-test"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(debDir)
	os.Exit(code)
}

// repoRoot is the repository: the tests run in packaging/.
func repoRoot(t testing.TB) string {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// buildDeb builds the packages once for all the tests and returns the
// path of pkg's.
func buildDeb(t testing.TB, pkg string) string {
	t.Helper()
	testutil.Require(t, "dpkg-deb", "dpkg")
	debOnce.Do(func() {
		cmd := exec.Command(filepath.Join(repoRoot(t), "scripts", "build-deb.sh"), filepath.Join(debDir, "out"))
		cmd.Env = append(os.Environ(), "VERSION="+testVersion)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			debErr = fmt.Errorf("scripts/build-deb.sh: %v\n%s%s", err, out, stderr.Bytes())
			return
		}
		debPath = map[string]string{}
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if name, _, ok := strings.Cut(filepath.Base(l), "_"); ok && strings.HasSuffix(l, ".deb") {
				debPath[name] = l
			}
		}
	})
	if debErr != nil {
		t.Fatal(debErr)
	}
	p, ok := debPath[pkg]
	if !ok {
		t.Fatalf("scripts/build-deb.sh printed no path of a %s .deb: %v", pkg, debPath)
	}
	return p
}

// extracted returns a directory holding pkg's files (dpkg-deb -x).
func extracted(t testing.TB, pkg string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "root")
	testutil.Run(t, exec.Command("dpkg-deb", "-x", buildDeb(t, pkg), dir))
	return dir
}

// debArch is Debian's name for the architecture the tests build for.
func debArch() string {
	goarch := cmp.Or(os.Getenv("GOARCH"), runtime.GOARCH)
	if a, ok := map[string]string{"386": "i386", "arm": "armhf", "ppc64le": "ppc64el", "mips64le": "mips64el"}[goarch]; ok {
		return a
	}
	return goarch
}

func TestDebFileName(t *testing.T) {
	for _, p := range packages {
		want := fmt.Sprintf("%s_%s_%s.deb", p.name, testVersion, debArch())
		if got := filepath.Base(buildDeb(t, p.name)); got != want {
			t.Errorf("package file %s, want %s", got, want)
		}
	}
}

// entry is a line of dpkg-deb -c.
type entry struct{ mode, owner string }

func TestDebContents(t *testing.T) {
	for _, p := range packages {
		out := testutil.Run(t, exec.Command("dpkg-deb", "-c", buildDeb(t, p.name)))
		got := map[string]entry{}
		sc := bufio.NewScanner(bytes.NewReader(out))
		for sc.Scan() {
			// drwxr-xr-x root/root 0 2026-11-24 01:04 ./etc/
			f := strings.Fields(sc.Text())
			if len(f) < 6 {
				t.Fatalf("dpkg-deb -c line %q", sc.Text())
			}
			got[strings.TrimSuffix(f[5], "/")] = entry{f[0], f[1]}
		}
		files := map[string]string{"./usr/share/doc/" + p.name + "/copyright": "-rw-r--r--"}
		for _, c := range p.commands {
			files["./usr/bin/"+c] = "-rwxr-xr-x"
		}
		for path := range p.files {
			files["./"+path] = "-rw-r--r--"
		}
		for path, mode := range files {
			e, ok := got[path]
			switch {
			case !ok:
				t.Errorf("%s: %s is not in the package", p.name, path)
			case e.mode != mode || e.owner != "root/root":
				t.Errorf("%s: %s: %s %s, want %s root/root", p.name, path, e.mode, e.owner, mode)
			}
		}
		for path, e := range got {
			if _, ok := files[path]; ok {
				continue
			}
			if e.mode != "drwxr-xr-x" || e.owner != "root/root" {
				t.Errorf("%s: %s: %s %s: want only the files above and directories drwxr-xr-x root/root", p.name, path, e.mode, e.owner)
			}
		}
	}
}

// What belongs to the operator is not in the packages: the device's
// config.toml, the service's state.
func TestDebLeavesOperatorsFiles(t *testing.T) {
	for pkg, path := range map[string]string{"hatchery-iotedge": "etc/aziot/config.toml", "hatchery": "var/lib/hatchery"} {
		if _, err := os.Lstat(filepath.Join(extracted(t, pkg), path)); err == nil {
			t.Errorf("the package %s ships /%s", pkg, path)
		}
	}
}

// The packaged files are the ones in the source tree.
func TestDebFilesAreTheSources(t *testing.T) {
	root := repoRoot(t)
	for _, p := range packages {
		dir := extracted(t, p.name)
		for dst, src := range p.files {
			want, err := os.ReadFile(filepath.Join(root, src))
			if err != nil {
				t.Fatal(err)
			}
			if got, err := os.ReadFile(filepath.Join(dir, dst)); err != nil || !bytes.Equal(got, want) {
				t.Errorf("/%s differs from %s (%v)", dst, src, err)
			}
		}
		// The binaries carry the package's version.
		out, err := exec.Command(filepath.Join(dir, "usr/bin", p.version[0]), p.version[1:]...).CombinedOutput()
		if f := strings.Fields(string(out)); err != nil || len(f) < 2 || f[len(f)-1] != testVersion {
			t.Errorf("%s: %v %q, want it to end in %s", strings.Join(p.version, " "), err, out, testVersion)
		}
		copyright, err := os.ReadFile(filepath.Join(dir, "usr/share/doc", p.name, "copyright"))
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",
			"Upstream-Name: Hatchery", "github.com/google/go-tpm", "github.com/spf13/cobra"} {
			if !bytes.Contains(copyright, []byte(want)) {
				t.Errorf("%s: copyright lacks %q", p.name, want)
			}
		}
		if bytes.Contains(copyright, []byte("see LICENSE")) || bytes.Contains(copyright, []byte("unknown (")) {
			t.Errorf("%s: copyright has a module whose license was not recognized:\n%s", p.name, copyright)
		}
	}
}

// controlFields parses dpkg-deb -f: "Name: value" with continuation lines.
func controlFields(t *testing.T, deb string) map[string]string {
	t.Helper()
	out := testutil.Run(t, exec.Command("dpkg-deb", "-f", deb))
	fields := map[string]string{}
	var last string
	for _, l := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
		if strings.HasPrefix(l, " ") && last != "" {
			fields[last] += "\n" + l
			continue
		}
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			t.Fatalf("control line %q", l)
		}
		last = k
		fields[k] = strings.TrimSpace(v)
	}
	return fields
}

func TestDebControl(t *testing.T) {
	for _, p := range packages {
		f := controlFields(t, buildDeb(t, p.name))
		want := map[string]string{"Package": p.name, "Version": testVersion, "Architecture": debArch(), "Priority": "optional"}
		for k, v := range p.control {
			want[k] = v
		}
		for k, v := range want {
			if f[k] != v {
				t.Errorf("%s: %s: %q, want %q", p.name, k, f[k], v)
			}
		}
		deps := strings.Split(f["Depends"], ", ")
		for _, d := range p.depends {
			if !slices.Contains(deps, d) {
				t.Errorf("%s: Depends: %q, want %q in it", p.name, f["Depends"], d)
			}
		}
		if f["Maintainer"] == "" || !strings.HasPrefix(f["Description"], "Hatchery") {
			t.Errorf("%s: Maintainer %q, Description %q", p.name, f["Maintainer"], f["Description"])
		}
		if n, err := strconv.Atoi(f["Installed-Size"]); err != nil || n < 1000 {
			t.Errorf("%s: Installed-Size: %q, want the size of the binaries in KiB", p.name, f["Installed-Size"])
		}
	}
	// The device runtime replaces Microsoft's: the same files and units.
	f := controlFields(t, buildDeb(t, "hatchery-iotedge"))
	for _, want := range []string{"aziot-edge", "aziot-identity-service"} {
		if !strings.Contains(f["Conflicts"], want) {
			t.Errorf("Conflicts: %q, want %s: it installs the same files and units", f["Conflicts"], want)
		}
	}
}

func TestDebControlArea(t *testing.T) {
	root := repoRoot(t)
	for _, p := range packages {
		deb := buildDeb(t, p.name)
		out := string(testutil.Run(t, exec.Command("dpkg-deb", "-I", deb)))
		// "    2095 bytes,    60 lines   *  postinst             #!/bin/sh"
		for _, s := range []string{"postinst", "prerm", "postrm"} {
			found := false
			for _, l := range strings.Split(out, "\n") {
				f := strings.Fields(l)
				if len(f) >= 7 && f[5] == s {
					found = true
					if f[4] != "*" || f[6] != "#!/bin/sh" {
						t.Errorf("%s: dpkg-deb -I: %q: want an executable #!/bin/sh script", p.name, strings.TrimSpace(l))
					}
				}
			}
			if !found {
				t.Errorf("%s has no %s:\n%s", p.name, s, out)
			}
		}

		ctrl := filepath.Join(t.TempDir(), "DEBIAN")
		testutil.Run(t, exec.Command("dpkg-deb", "-e", deb, ctrl))
		if b, _ := os.ReadFile(filepath.Join(ctrl, "conffiles")); string(b) != p.conffile+"\n" {
			t.Errorf("%s: conffiles: %q, want %s", p.name, b, p.conffile)
		}
		for _, s := range []string{"postinst", "prerm", "postrm"} {
			src := filepath.Join("packaging", "debian", p.name, s)
			want, _ := os.ReadFile(filepath.Join(root, src))
			if got, err := os.ReadFile(filepath.Join(ctrl, s)); err != nil || !bytes.Equal(got, want) {
				t.Errorf("%s: the package's %s differs from %s (%v)", p.name, s, src, err)
			}
		}

		// md5sums lists every file with its checksum.
		sums, err := os.ReadFile(filepath.Join(ctrl, "md5sums"))
		if err != nil {
			t.Fatal(err)
		}
		dir := extracted(t, p.name)
		listed := 0
		for _, l := range strings.Split(strings.TrimSpace(string(sums)), "\n") {
			sum, path, ok := strings.Cut(l, "  ")
			if !ok {
				t.Fatalf("md5sums line %q", l)
			}
			b, err := os.ReadFile(filepath.Join(dir, path))
			if err != nil {
				t.Errorf("%s: md5sums: %v", p.name, err)
				continue
			}
			if h := md5.Sum(b); hex.EncodeToString(h[:]) != sum {
				t.Errorf("%s: md5sums: %s does not match", p.name, path)
			}
			listed++
		}
		if want := len(p.commands) + len(p.files) + 1; listed != want { // and copyright
			t.Errorf("%s: md5sums lists %d files, want %d", p.name, listed, want)
		}
	}
}

func TestMaintainerScriptsSyntax(t *testing.T) {
	shells := []string{"sh"}
	for _, sh := range []string{"dash", "bash"} {
		if _, err := exec.LookPath(sh); err == nil {
			shells = append(shells, sh)
		}
	}
	for _, p := range packages {
		for _, s := range []string{"postinst", "prerm", "postrm"} {
			path := filepath.Join(repoRoot(t), "packaging", "debian", p.name, s)
			for _, sh := range shells {
				if out, err := exec.Command(sh, "-n", path).CombinedOutput(); err != nil {
					t.Errorf("%s -n %s: %v\n%s", sh, path, err, out)
				}
			}
			// dpkg calls them with these arguments; an unknown one is an error.
			if out, err := exec.Command("sh", path, "no-such-action").CombinedOutput(); err == nil {
				t.Errorf("%s no-such-action succeeded: %s", path, out)
			}
		}
	}
}

func TestBadVersionIsRefused(t *testing.T) {
	testutil.Require(t, "dpkg-deb", "dpkg")
	cmd := exec.Command(filepath.Join(repoRoot(t), "scripts", "build-deb.sh"), t.TempDir())
	cmd.Env = append(os.Environ(), "VERSION=v1.5")
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "not a Debian version") {
		t.Errorf("VERSION=v1.5: %v\n%s", err, out)
	}
}

func TestUnknownPackageIsRefused(t *testing.T) {
	testutil.Require(t, "dpkg-deb", "dpkg")
	out, err := exec.Command(filepath.Join(repoRoot(t), "scripts", "build-deb.sh"), t.TempDir(), "hatchery-server").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "no package hatchery-server") {
		t.Errorf("build-deb.sh OUTDIR hatchery-server: %v\n%s", err, out)
	}
}
