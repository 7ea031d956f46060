package moby

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/starthint"
)

func TestNewURI(t *testing.T) {
	for _, tc := range []struct{ uri, err string }{
		{"unix:///var/run/docker.sock", ""},
		{"unix:///run/user/1000/docker.sock", ""},
		{"tcp://127.0.0.1:2375", "only unix sockets"},
		{"npipe:////./pipe/docker_engine", "only unix sockets"},
		{"/var/run/docker.sock", "only unix sockets"},
		{"unix://", "absolute socket path"},
		{"unix://host/x.sock", "absolute socket path"},
	} {
		_, err := New(tc.uri)
		if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("New(%q) = %v, want error containing %q", tc.uri, err, tc.err)
		}
	}
}

func TestPingUnreachable(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "docker.sock")
	e, err := New("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	hint := starthint.Service("docker", "dockerd")
	err = e.Ping(context.Background())
	if err == nil || !strings.Contains(err.Error(), sock) || !strings.Contains(err.Error(), hint) {
		t.Fatalf("Ping = %v, want an error naming %s and saying %s", err, sock, hint)
	}
	// Every call explains it, not only Ping.
	if _, err := e.List(context.Background()); err == nil || !strings.Contains(err.Error(), hint) {
		t.Fatalf("List = %v", err)
	}
}

// fakeEngine serves h on a unix socket and returns an Engine for it.
func fakeEngine(t *testing.T, h http.Handler) *Engine {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "e.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	e, err := New("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func TestNegotiate(t *testing.T) {
	for _, tc := range []struct{ engine, want, err string }{
		{"1.41", "1.41", ""},
		{"1.43", "1.43", ""},
		{"1.51", maxAPI, ""},
		{"1.40", "", "needs 1.41 or newer"},
		{"", "", "did not say its API version"},
	} {
		e := fakeEngine(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if tc.engine != "" {
				w.Header().Set("Api-Version", tc.engine)
			}
			w.Write([]byte("OK"))
		}))
		got, err := e.negotiate(context.Background())
		if got != tc.want || tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("engine %q: negotiate = %q, %v; want %q, error containing %q", tc.engine, got, err, tc.want, tc.err)
		}
	}
}

// A pull that fails after it began reports the failure inside a 200
// stream; both kinds must become an error naming image and registry.
func TestPullErrors(t *testing.T) {
	var gotAuth string
	e := fakeEngine(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Api-Version", "1.41")
		switch {
		case r.URL.Path == "/_ping":
		case strings.HasSuffix(r.URL.Path, "/json"):
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprint(w, `{"message":"No such image"}`)
		case strings.HasSuffix(r.URL.Path, "/images/create"):
			gotAuth = r.Header.Get("X-Registry-Auth")
			if strings.Contains(r.URL.Query().Get("fromImage"), "early") {
				w.WriteHeader(http.StatusInternalServerError)
				fmt.Fprint(w, `{"message":"Get https://reg.example:5000/v2/: connection refused"}`)
				return
			}
			fmt.Fprint(w, `{"status":"Pulling from x"}`+"\n"+`{"errorDetail":{"message":"manifest unknown"},"error":"manifest unknown"}`)
		default:
			t.Errorf("unexpected %s %s", r.Method, r.URL)
		}
	}))
	auth := &RegistryAuth{Username: "u", Password: "p", Address: "reg.example:5000"}
	for _, image := range []string{"reg.example:5000/late", "reg.example:5000/early:1"} {
		err := e.Create(context.Background(), ModuleSpec{Name: "m1", Image: image, PullPolicy: "on-create", Auth: auth})
		if err == nil || !strings.Contains(err.Error(), image) || !strings.Contains(err.Error(), "registry reg.example:5000") || !strings.Contains(err.Error(), "as u") {
			t.Errorf("Create(%s) = %v", image, err)
		}
	}
	var a map[string]string
	b, _ := base64.URLEncoding.DecodeString(gotAuth)
	if json.Unmarshal(b, &a) != nil || a["username"] != "u" || a["password"] != "p" || a["serveraddress"] != "reg.example:5000" {
		t.Errorf("X-Registry-Auth = %q", gotAuth)
	}
}

// A name taken by a container this runtime did not make is named as
// such, with how to free it.
func TestCreateNameConflict(t *testing.T) {
	e := fakeEngine(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Api-Version", "1.41")
		switch {
		case r.URL.Path == "/_ping", strings.HasSuffix(r.URL.Path, "/json"):
			fmt.Fprint(w, `{}`)
		case strings.HasSuffix(r.URL.Path, "/containers/create"):
			w.WriteHeader(http.StatusConflict)
			fmt.Fprint(w, `{"message":"Conflict. The container name \"/sensor\" is already in use by container \"0123\"."}`)
		default:
			t.Errorf("unexpected %s %s", r.Method, r.URL)
		}
	}))
	err := e.Create(context.Background(), ModuleSpec{Name: "sensor", Image: "img:1", PullPolicy: "on-create"})
	if err == nil || !strings.Contains(err.Error(), "a container named sensor exists that this runtime did not create") ||
		!strings.Contains(err.Error(), "docker rm -f sensor") {
		t.Errorf("Create = %v", err)
	}
}

// The keys the runtime sets or reads count whatever their case, as they
// do to the engine: createOptions spelled otherwise can neither override
// the image, the labels or the network, nor keep an engine restart
// policy.
func TestCreateBodyWhateverTheCase(t *testing.T) {
	s := ModuleSpec{Name: "m1", Image: "img:1", Network: "azure-iot-edge", ConfigHash: "h",
		CreateOptions: json.RawMessage(`{"image":"other","labels":{"` + OwnerLabel + `":"spoof"},"env":["A=a"],
			"hostConfig":{"restartPolicy":{"Name":"always"},"networkMode":""}}`)}
	body, err := createBody(s, "agent")
	if err != nil {
		t.Fatal(err)
	}
	got, _ := json.Marshal(body)
	want := `{"Env":["A=a"],"HostConfig":{"NetworkMode":"azure-iot-edge"},"Image":"img:1",` +
		`"Labels":{"net.hatchery.edge.config-hash":"h","net.hatchery.edge.module":"m1","net.hatchery.edge.module-version":"","net.hatchery.edge.owner":"agent"}}`
	if string(got) != want {
		t.Errorf("body\n got %s\nwant %s", got, want)
	}
	s.CreateOptions = json.RawMessage(`{"Env":["A=a"],"ENV":["B=b"]}`)
	if _, err := createBody(s, "agent"); err == nil || !strings.Contains(err.Error(), `createOptions has ["ENV" "Env"], which the engine takes for one key: keep one, spelled "Env"`) {
		t.Errorf("two spellings of Env: %v", err)
	}
}

func TestCreateBody(t *testing.T) {
	s := ModuleSpec{
		Name:  "m1",
		Image: "img:1",
		CreateOptions: json.RawMessage(`{"Image":"ignored","Cmd":["-x"],"Env":["A=opt","B=kept"],"Labels":{"l":"v","` + OwnerLabel + `":"spoof"},
			"HostConfig":{"Binds":["/a:/b"],"RestartPolicy":{"Name":"always"},"Memory":9007199254740993}}`),
		Env:        map[string]string{"C": "c", "A": "dep"},
		Labels:     map[string]string{"extra": "1"},
		Network:    "azure-iot-edge",
		ConfigHash: "h",
		Version:    "1.2",
	}
	body, err := createBody(s, "agent")
	if err != nil {
		t.Fatal(err)
	}
	got, _ := json.Marshal(body)
	want := `{"Cmd":["-x"],"Env":["B=kept","A=dep","C=c"],"HostConfig":{"Binds":["/a:/b"],"Memory":9007199254740993,"NetworkMode":"azure-iot-edge"},"Image":"img:1",` +
		`"Labels":{"extra":"1","l":"v","net.hatchery.edge.config-hash":"h","net.hatchery.edge.module":"m1","net.hatchery.edge.module-version":"1.2","net.hatchery.edge.owner":"agent"}}`
	if string(got) != want {
		t.Errorf("body\n got %s\nwant %s", got, want)
	}

	// createOptions' own network mode (host) stays.
	s = ModuleSpec{Name: "m1", Image: "i", Network: "n", CreateOptions: json.RawMessage(`{"HostConfig":{"NetworkMode":"host"}}`)}
	if body, _ := createBody(s, "agent"); body["HostConfig"].(map[string]any)["NetworkMode"] != "host" {
		t.Errorf("NetworkMode = %v", body["HostConfig"])
	}

	for opts, msg := range map[string]string{
		`[]`:                    "must be a JSON object",
		`{"Env":"A=1"}`:         "createOptions.Env",
		`{"Env":[1]}`:           "createOptions.Env",
		`{"Labels":[]}`:         "createOptions.Labels",
		`{"HostConfig":"host"}`: "createOptions.HostConfig",
		`{`:                     "must be a JSON object",
	} {
		_, err := createBody(ModuleSpec{Name: "m1", Image: "i", CreateOptions: json.RawMessage(opts)}, "agent")
		if err == nil || !strings.Contains(err.Error(), msg) || !strings.Contains(err.Error(), "m1") {
			t.Errorf("createOptions %s: error %v, want one containing %q", opts, err, msg)
		}
	}
}

func TestDemux(t *testing.T) {
	var in bytes.Buffer
	frame := func(stream byte, s string) {
		var h [8]byte
		h[0] = stream
		binary.BigEndian.PutUint32(h[4:], uint32(len(s)))
		in.Write(h[:])
		in.WriteString(s)
	}
	frame(1, "out 1\n")
	frame(2, "err 1\n")
	frame(1, "")
	frame(1, "out 2\n")
	var out bytes.Buffer
	if err := demux(&out, &in); err != nil || out.String() != "out 1\nerr 1\nout 2\n" {
		t.Errorf("demux = %q, %v", out.String(), err)
	}
	if err := demux(&out, strings.NewReader("\x01\x00\x00\x00\x00\x00\x00\x09short")); err == nil {
		t.Error("demux of a cut frame: no error")
	}
	if err := demux(&out, strings.NewReader("plain text, a tty stream")); err == nil {
		t.Error("demux of a non-multiplexed stream: no error")
	}
}

func TestRegistry(t *testing.T) {
	for image, want := range map[string]string{
		"alpine":           "docker.io",
		"library/alpine:3": "docker.io",
		"mcr.microsoft.com/azureiotedge-agent:1.4":  "mcr.microsoft.com",
		"localhost:5000/m:1":                        "localhost:5000",
		"localhost/m":                               "localhost",
		"myregistry.azurecr.io/samples/sensor:0.1":  "myregistry.azurecr.io",
		"myregistry.azurecr.io/sensor@sha256:abcd0": "myregistry.azurecr.io",
	} {
		if got := Registry(image); got != want {
			t.Errorf("Registry(%q) = %q, want %q", image, got, want)
		}
	}
	for ref, want := range map[string]string{
		"alpine":            "alpine:latest",
		"alpine:3":          "alpine:3",
		"localhost:5000/m":  "localhost:5000/m:latest",
		"r.io/m@sha256:abc": "r.io/m@sha256:abc",
	} {
		if got := normalize(ref); got != want {
			t.Errorf("normalize(%q) = %q, want %q", ref, got, want)
		}
	}
	for _, c := range []struct {
		a, b string
		same bool
	}{
		{"app", "app:latest", true},
		{"docker.io/library/app:2", "app:2", true},
		{"library/app", "docker.io/app:latest", true},
		{"index.docker.io/library/app:1", "app:1", true},
		{"r.io/app:2", "r.io/app:2", true},
		{"app:2", "app:1", false},
		{"r.io/app:2", "app:2", false},
		{"localhost:5000/app", "localhost:5000/app:2", false},
	} {
		if got := SameImage(c.a, c.b); got != c.same {
			t.Errorf("SameImage(%q, %q) = %v", c.a, c.b, got)
		}
	}
}

func TestSince(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	for in, want := range map[string]string{
		"15m":                  "1699999100",
		"2023-11-14T22:13:20Z": "1700000000",
		"1699999999.5":         "1699999999.5",
		// Azure's iotedge (humantime) spellings
		"1 day":               "1699913600",
		"90 minutes":          "1699994600",
		"1d":                  "1699913600",
		"6h":                  "1699978400",
		"2days 3hours 2 mins": "1699816280",
		"1M":                  "1697369984",
	} {
		if got, err := timeParam("since", in, now); got != want || err != nil {
			t.Errorf("timeParam(since, %q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"yesterday", "1 fortnight", "day", "1d -2h", "99999999999y"} {
		if _, err := timeParam("since", in, now); err == nil {
			t.Errorf("timeParam(since, %q): no error", in)
		}
	}
}

// --until takes --since's forms, and its errors name it.
func TestUntil(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	if got, err := timeParam("until", "1h", now); got != "1699996400" || err != nil {
		t.Errorf("timeParam(until, 1h) = %q, %v", got, err)
	}
	if _, err := timeParam("until", "later", now); err == nil || !strings.HasPrefix(err.Error(), `until "later"`) {
		t.Errorf("timeParam(until, later): %v", err)
	}
}

func TestAPIErrorIs(t *testing.T) {
	err := fmt.Errorf("x: %w", &APIError{Status: 404, Message: "No such container"})
	if !errors.Is(err, ErrNotFound) {
		t.Error("404 is not ErrNotFound")
	}
	if errors.Is(&APIError{Status: 409}, ErrNotFound) {
		t.Error("409 is ErrNotFound")
	}
}

func TestVersionLess(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want bool
	}{{"1.41", "1.44", true}, {"1.44", "1.41", false}, {"1.9", "1.41", true}, {"1.41", "1.41", false}, {"2.0", "1.99", false}} {
		if got := versionLess(tc.a, tc.b); got != tc.want {
			t.Errorf("versionLess(%s, %s) = %v", tc.a, tc.b, got)
		}
	}
}

// createOptions come from the cloud: whatever they hold, merging them must
// not panic, and a merged body always carries the agent's labels.
func FuzzCreateBody(f *testing.F) {
	f.Add([]byte(`{"Env":["A=1"],"Labels":{"x":"y"},"HostConfig":{"Binds":["/a:/b"],"RestartPolicy":{"Name":"always"}}}`), "A", "2")
	f.Add([]byte(`{"Env":null,"HostConfig":null}`), "", "")
	f.Fuzz(func(t *testing.T, opts []byte, key, value string) {
		body, err := createBody(ModuleSpec{Name: "m1", Image: "i", CreateOptions: opts, Env: map[string]string{key: value}, Network: "n"}, "agent")
		if err != nil {
			return
		}
		labels := body["Labels"].(map[string]any)
		if labels[OwnerLabel] != "agent" || labels[ModuleLabel] != "m1" || body["Image"] != "i" {
			t.Fatalf("body %v", body)
		}
		if _, err := json.Marshal(body); err != nil {
			t.Fatalf("body does not marshal: %v", err)
		}
	})
}
