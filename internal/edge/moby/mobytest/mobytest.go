// Package mobytest gives tests a real Moby engine and offline-built module
// images. Without an engine answering on the socket a test fails under
// CI=true and is skipped elsewhere.
package mobytest

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/edge/moby"
	"github.com/hatchery/hatchery/internal/testutil"
)

//go:embed testdata/modbin/main.go
var modbinSource []byte

// Env is an engine whose Owner is unique to one test, and what the test
// made on it; everything is removed when the test ends.
type Env struct {
	*moby.Engine
	t        testing.TB
	images   []string
	networks []string
}

// New connects to the engine at $HATCHERY_MOBY_URI or the default socket.
func New(t testing.TB) *Env {
	t.Helper()
	uri := engineURI()
	e, err := moby.New(uri)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := e.Ping(ctx); err != nil {
		testutil.Missing(t, "%v (Debian package docker.io; scripts/install-test-deps.sh starts dockerd)", err)
	}
	e.Owner = "test-" + ID()
	env := &Env{Engine: e, t: t}
	t.Cleanup(env.cleanup)
	return env
}

// ID returns a random suffix that keeps names of concurrent runs apart.
func ID() string {
	b := make([]byte, 4)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Image imports the modbin image as hatchery-test/modbin:<tag> (random
// when tag is "") and returns its reference. Its entrypoint is /modbin; a
// container's Cmd gives modbin's flags.
func (v *Env) Image(tag string) string {
	v.t.Helper()
	if tag == "" {
		tag = ID()
	}
	ref := "hatchery-test/modbin:" + tag
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := v.Import(ctx, ref, bytes.NewReader(rootfs(v.t)), `ENTRYPOINT ["/modbin"]`); err != nil {
		v.t.Fatal(err)
	}
	v.images = append(v.images, ref)
	return ref
}

// Network creates a bridge network with a unique name and returns the name.
func (v *Env) Network() string {
	v.t.Helper()
	name := "hatchery-test-" + ID()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := v.EnsureNetwork(ctx, name); err != nil {
		v.t.Fatal(err)
	}
	v.networks = append(v.networks, name)
	return name
}

// cleanup removes the test's containers, then its networks and images,
// which the containers use.
func (v *Env) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	states, err := v.List(ctx)
	if err != nil {
		v.t.Errorf("cleanup: %v", err)
	}
	for _, s := range states {
		if err := v.Remove(ctx, s.ContainerID); err != nil && !errors.Is(err, moby.ErrNotFound) {
			v.t.Errorf("cleanup: %v", err)
		}
	}
	for _, n := range v.networks {
		if err := v.RemoveNetwork(ctx, n); err != nil && !errors.Is(err, moby.ErrNotFound) {
			v.t.Errorf("cleanup: %v", err)
		}
	}
	for _, ref := range v.images {
		if err := v.RemoveImage(ctx, ref); err != nil && !errors.Is(err, moby.ErrNotFound) {
			v.t.Errorf("cleanup: %v", err)
		}
	}
}

var built struct {
	once sync.Once
	tar  []byte
	err  error
}

// rootfs returns a tarball holding only /modbin, built once per process.
func rootfs(t testing.TB) []byte {
	t.Helper()
	gotool, err := exec.LookPath("go")
	if err != nil {
		testutil.Missing(t, "building the test module image needs the go command on PATH")
	}
	built.once.Do(func() { built.tar, built.err = buildRootfs(gotool) })
	if built.err != nil {
		t.Fatal(built.err)
	}
	return built.tar
}

func buildRootfs(gotool string) ([]byte, error) {
	dir, err := os.MkdirTemp("", "modbin")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	if err := os.WriteFile(filepath.Join(dir, "main.go"), modbinSource, 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module modbin\n\ngo 1.22\n"), 0o644); err != nil {
		return nil, err
	}
	cmd := exec.Command(gotool, "build", "-trimpath", "-ldflags=-s -w", "-o", "modbin", ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOWORK=off", "GOFLAGS=-mod=mod")
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, errors.New("building modbin: " + err.Error() + "\n" + string(out))
	}
	bin, err := os.ReadFile(filepath.Join(dir, "modbin"))
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	now := time.Now()
	for _, h := range []*tar.Header{
		{Name: "tmp/", Typeflag: tar.TypeDir, Mode: 0o1777, ModTime: now},
		{Name: "modbin", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(bin)), ModTime: now},
	} {
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
	}
	if _, err := tw.Write(bin); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
