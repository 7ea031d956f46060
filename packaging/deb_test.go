// Package packaging tests the Debian package that scripts/build-deb.sh
// builds from this directory: its contents, control fields and maintainer
// scripts (this file), its systemd units (units_test.go), and the package
// installed for real, on an overlay of this machine's root, with and
// without a running systemd (install_test.go).
package packaging

import (
	"bufio"
	"bytes"
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

// testVersion is the version the tests build the package with.
const testVersion = "1.5.0~test1"

var (
	debDir  string // the tests' scratch directory, removed by TestMain
	debOnce sync.Once
	debPath string
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

// buildDeb builds the package once for all the tests and returns its path.
func buildDeb(t testing.TB) string {
	t.Helper()
	testutil.Require(t, "dpkg-deb", "dpkg")
	debOnce.Do(func() {
		cmd := exec.Command(filepath.Join(repoRoot(t), "scripts", "build-deb.sh"), filepath.Join(debDir, "out"))
		cmd.Env = append(os.Environ(), "VERSION="+testVersion)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		switch {
		case err != nil:
			debErr = fmt.Errorf("scripts/build-deb.sh: %v\n%s%s", err, out, stderr.Bytes())
		case !strings.HasSuffix(lines[len(lines)-1], ".deb"):
			debErr = fmt.Errorf("scripts/build-deb.sh printed %q: want the .deb's path last", out)
		default:
			debPath = lines[len(lines)-1]
		}
	})
	if debErr != nil {
		t.Fatal(debErr)
	}
	return debPath
}

// extracted returns a directory holding the package's files (dpkg-deb -x).
func extracted(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "root")
	testutil.Run(t, exec.Command("dpkg-deb", "-x", buildDeb(t), dir))
	return dir
}

// debArch is Debian's name for the architecture the tests build for.
func debArch() string {
	goarch := cmpOr(os.Getenv("GOARCH"), runtime.GOARCH)
	if a, ok := map[string]string{"386": "i386", "arm": "armhf", "ppc64le": "ppc64el", "mips64le": "mips64el"}[goarch]; ok {
		return a
	}
	return goarch
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func TestDebFileName(t *testing.T) {
	want := fmt.Sprintf("hatchery-iotedge_%s_%s.deb", testVersion, debArch())
	if got := filepath.Base(buildDeb(t)); got != want {
		t.Errorf("package file %s, want %s", got, want)
	}
}

// entry is a line of dpkg-deb -c.
type entry struct{ mode, owner string }

func TestDebContents(t *testing.T) {
	out := testutil.Run(t, exec.Command("dpkg-deb", "-c", buildDeb(t)))
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
	files := map[string]string{
		"./usr/bin/iotedge":                              "-rwxr-xr-x",
		"./usr/bin/iotedged":                             "-rwxr-xr-x",
		"./usr/bin/aziot-tpmd":                           "-rwxr-xr-x",
		"./lib/systemd/system/aziot-tpmd.service":        "-rw-r--r--",
		"./lib/systemd/system/iotedged.service":          "-rw-r--r--",
		"./lib/udev/rules.d/70-hatchery-aziottpm.rules":  "-rw-r--r--",
		"./etc/aziot/config.toml.edge.template":          "-rw-r--r--",
		"./usr/share/doc/hatchery-iotedge/copyright":     "-rw-r--r--",
		"./usr/share/doc/hatchery-iotedge/README.Debian": "-rw-r--r--",
	}
	for path, mode := range files {
		e, ok := got[path]
		switch {
		case !ok:
			t.Errorf("%s is not in the package", path)
		case e.mode != mode || e.owner != "root/root":
			t.Errorf("%s: %s %s, want %s root/root", path, e.mode, e.owner, mode)
		}
	}
	for path, e := range got {
		if _, ok := files[path]; ok {
			continue
		}
		if e.mode != "drwxr-xr-x" || e.owner != "root/root" {
			t.Errorf("%s: %s %s: want only the files above and directories drwxr-xr-x root/root", path, e.mode, e.owner)
		}
	}
	// config.toml is the operator's: the package ships only the template.
	if _, ok := got["./etc/aziot/config.toml"]; ok {
		t.Error("the package ships /etc/aziot/config.toml")
	}
}

// The packaged files are the ones in the source tree.
func TestDebFilesAreTheSources(t *testing.T) {
	root, dir := repoRoot(t), extracted(t)
	for src, dst := range map[string]string{
		"packaging/config.toml.edge.template":       "etc/aziot/config.toml.edge.template",
		"packaging/systemd/aziot-tpmd.service":      "lib/systemd/system/aziot-tpmd.service",
		"packaging/systemd/iotedged.service":        "lib/systemd/system/iotedged.service",
		"packaging/udev/70-hatchery-aziottpm.rules": "lib/udev/rules.d/70-hatchery-aziottpm.rules",
		"packaging/debian/README.Debian":            "usr/share/doc/hatchery-iotedge/README.Debian",
	} {
		want, err := os.ReadFile(filepath.Join(root, src))
		if err != nil {
			t.Fatal(err)
		}
		if got, err := os.ReadFile(filepath.Join(dir, dst)); err != nil || !bytes.Equal(got, want) {
			t.Errorf("/%s differs from %s (%v)", dst, src, err)
		}
	}
	// The binaries carry the package's version.
	out := testutil.Run(t, exec.Command(filepath.Join(dir, "usr/bin/iotedge"), "version"))
	if got := strings.TrimSpace(string(out)); got != "iotedge "+testVersion {
		t.Errorf("iotedge version: %q, want %q", got, "iotedge "+testVersion)
	}
	copyright, err := os.ReadFile(filepath.Join(dir, "usr/share/doc/hatchery-iotedge/copyright"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",
		"Upstream-Name: Hatchery", "github.com/google/go-tpm", "github.com/spf13/cobra"} {
		if !bytes.Contains(copyright, []byte(want)) {
			t.Errorf("copyright lacks %q", want)
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
	f := controlFields(t, buildDeb(t))
	for k, want := range map[string]string{
		"Package":      "hatchery-iotedge",
		"Version":      testVersion,
		"Architecture": debArch(),
		"Recommends":   "tpm2-tools",
		"Section":      "admin",
		"Priority":     "optional",
	} {
		if f[k] != want {
			t.Errorf("%s: %q, want %q", k, f[k], want)
		}
	}
	deps := strings.Split(f["Depends"], ", ")
	for _, want := range []string{"adduser", "docker.io | moby-engine | docker-ce"} {
		if !slices.Contains(deps, want) {
			t.Errorf("Depends: %q, want %q in it", f["Depends"], want)
		}
	}
	for _, want := range []string{"aziot-edge", "aziot-identity-service"} {
		if !strings.Contains(f["Conflicts"], want) {
			t.Errorf("Conflicts: %q, want %s: it installs the same files and units", f["Conflicts"], want)
		}
	}
	if f["Maintainer"] == "" || !strings.HasPrefix(f["Description"], "Hatchery IoT Edge runtime") {
		t.Errorf("Maintainer %q, Description %q", f["Maintainer"], f["Description"])
	}
	if n, err := strconv.Atoi(f["Installed-Size"]); err != nil || n < 1000 {
		t.Errorf("Installed-Size: %q, want the size of the binaries in KiB", f["Installed-Size"])
	}
}

func TestDebControlArea(t *testing.T) {
	deb := buildDeb(t)
	out := string(testutil.Run(t, exec.Command("dpkg-deb", "-I", deb)))
	// "    2095 bytes,    60 lines   *  postinst             #!/bin/sh"
	for _, s := range []string{"postinst", "prerm", "postrm"} {
		found := false
		for _, l := range strings.Split(out, "\n") {
			f := strings.Fields(l)
			if len(f) >= 7 && f[5] == s {
				found = true
				if f[4] != "*" || f[6] != "#!/bin/sh" {
					t.Errorf("dpkg-deb -I: %q: want an executable #!/bin/sh script", strings.TrimSpace(l))
				}
			}
		}
		if !found {
			t.Errorf("the package has no %s:\n%s", s, out)
		}
	}

	ctrl := filepath.Join(t.TempDir(), "DEBIAN")
	testutil.Run(t, exec.Command("dpkg-deb", "-e", deb, ctrl))
	if b, _ := os.ReadFile(filepath.Join(ctrl, "conffiles")); string(b) != "/etc/aziot/config.toml.edge.template\n" {
		t.Errorf("conffiles: %q, want the template", b)
	}
	root := repoRoot(t)
	for _, s := range []string{"postinst", "prerm", "postrm"} {
		want, _ := os.ReadFile(filepath.Join(root, "packaging", "debian", s))
		if got, err := os.ReadFile(filepath.Join(ctrl, s)); err != nil || !bytes.Equal(got, want) {
			t.Errorf("the package's %s differs from packaging/debian/%s (%v)", s, s, err)
		}
	}

	// md5sums lists every file with its checksum.
	sums, err := os.ReadFile(filepath.Join(ctrl, "md5sums"))
	if err != nil {
		t.Fatal(err)
	}
	dir := extracted(t)
	listed := 0
	for _, l := range strings.Split(strings.TrimSpace(string(sums)), "\n") {
		sum, path, ok := strings.Cut(l, "  ")
		if !ok {
			t.Fatalf("md5sums line %q", l)
		}
		b, err := os.ReadFile(filepath.Join(dir, path))
		if err != nil {
			t.Errorf("md5sums: %v", err)
			continue
		}
		if h := md5.Sum(b); hex.EncodeToString(h[:]) != sum {
			t.Errorf("md5sums: %s does not match", path)
		}
		listed++
	}
	if listed != 9 {
		t.Errorf("md5sums lists %d files, want 9", listed)
	}
}

func TestMaintainerScriptsSyntax(t *testing.T) {
	shells := []string{"sh"}
	for _, sh := range []string{"dash", "bash"} {
		if _, err := exec.LookPath(sh); err == nil {
			shells = append(shells, sh)
		}
	}
	for _, s := range []string{"postinst", "prerm", "postrm"} {
		path := filepath.Join(repoRoot(t), "packaging", "debian", s)
		for _, sh := range shells {
			if out, err := exec.Command(sh, "-n", path).CombinedOutput(); err != nil {
				t.Errorf("%s -n %s: %v\n%s", sh, s, err, out)
			}
		}
		// dpkg calls them with these arguments; an unknown one is an error.
		if out, err := exec.Command("sh", path, "no-such-action").CombinedOutput(); err == nil {
			t.Errorf("%s no-such-action succeeded: %s", s, out)
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
