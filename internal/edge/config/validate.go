package config

import (
	"cmp"
	"encoding/base64"
	"errors"
	"fmt"
	"github.com/hatchery/hatchery/internal/dnsname"
	"github.com/hatchery/hatchery/internal/tpm"
	"net"
	"net/url"
	"reflect"
	"regexp"
	"slices"
	"strings"

	"github.com/hatchery/hatchery/internal/sas"
)

// enums are the values of the keys that take one of a set; Azure compares
// them case-sensitively, and so do we.
var enums = map[string][]string{
	"auto_reprovisioning_mode": {string(Dynamic), string(AlwaysOnStartup), string(OnErrorOnly)},
	"source":                   {string(SourceDPS), string(SourceManual), string(SourceNone)},
	"method":                   {string(MethodTPM), string(MethodSymmetricKey), string(MethodX509), string(MethodSAS)},
	"imagePullPolicy":          {"on-create", "never"},
	"type":                     {"docker"},
}

var (
	attestationMethods = []string{string(MethodTPM), string(MethodSymmetricKey), string(MethodX509)}
	authMethods        = []string{string(MethodSAS), string(MethodX509)}
	// tlsVersions are the spellings Azure IoT Edge accepts, lower-cased.
	tlsVersions = []string{"tls", "tls1", "tls10", "tls1.0", "tls1_0", "tlsv10",
		"tls11", "tls1.1", "tls1_1", "tlsv11", "tls12", "tls1.2", "tls1_2", "tlsv12"}

	// IoT Hub's rules for device IDs and host names, as Azure IoT Edge checks them.
	deviceIDPattern = regexp.MustCompile(`^[A-Za-z0-9\-:.+%_#*?!(),=@;$']{1,128}$`)
	hubHostPattern  = regexp.MustCompile(`^[a-zA-Z0-9_\-.]+$`)
	networkPattern  = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`)
)

// maxKeyIndex is the last offset in the persistent handle range.
const maxKeyIndex = 0x7F_FF_FF

// maxErrors bounds the errors reported for one file, as compilers do: past
// a few, the rest are mostly consequences, and explaining each costs.
const maxErrors = 20

// checker collects the errors and warnings of one file.
type checker struct {
	pos       *positions
	errs      []*Error
	truncated bool
	warns     []Warning
	seen      map[string]bool // unknown keys already reported
}

func newChecker(file string) *checker {
	return &checker{pos: &positions{file: file, at: map[string]Pos{}}, seen: map[string]bool{}}
}

func (ck *checker) errorAt(at Pos, format string, args ...any) {
	if ck.full() {
		ck.truncated = true
		return
	}
	ck.errs = append(ck.errs, &Error{at, fmt.Sprintf(format, args...)})
}

func (ck *checker) full() bool { return len(ck.errs) >= maxErrors }

func (ck *checker) warnAt(at Pos, format string, args ...any) {
	ck.warns = append(ck.warns, Warning{at, fmt.Sprintf(format, args...)})
}

func (ck *checker) errorf(path, format string, args ...any) {
	ck.errorAt(ck.pos.pos(path), format, args...)
}

// result returns c, or the errors in file order.
func (ck *checker) result(c *Config) (*Config, []Warning, error) {
	slices.SortStableFunc(ck.warns, func(a, b Warning) int { return cmp.Compare(a.Line, b.Line) })
	if len(ck.errs) == 0 {
		return c, ck.warns, nil
	}
	slices.SortStableFunc(ck.errs, func(a, b *Error) int { return cmp.Compare(a.Line, b.Line) })
	errs := make([]error, len(ck.errs))
	for i, e := range ck.errs {
		errs[i] = e
	}
	if ck.truncated {
		errs = append(errs, &Error{Pos{File: ck.pos.file}, "too many errors"})
	}
	return nil, ck.warns, errors.Join(errs...)
}

// validate checks c as a whole, whatever file format it came from, and fills
// in the defaults that depend on other settings.
func (ck *checker) validate(c *Config) {
	ck.placeholders("", reflect.ValueOf(c).Elem())
	ck.hostname("hostname", c.Hostname)
	ck.hostname("parent_hostname", c.ParentHostname)
	ck.fileRef("trust_bundle_cert", c.TrustBundleCert)
	ck.enum("auto_reprovisioning_mode", string(c.AutoReprovisioningMode))
	if c.Homedir != "" && !strings.HasPrefix(c.Homedir, "/") {
		ck.errorf("homedir", "homedir %q must be an absolute path", c.Homedir)
	}
	ck.provisioning(&c.Provisioning)
	ck.tpm(&c.TPM)
	ck.agent(&c.Agent)
	ck.uri("connect.workload_uri", c.Connect.WorkloadURI, "unix", "http")
	ck.uri("connect.management_uri", c.Connect.ManagementURI, "unix", "http")
	ck.uri("listen.workload_uri", c.Listen.WorkloadURI, "unix", "fd", "http")
	ck.uri("listen.management_uri", c.Listen.ManagementURI, "unix", "fd", "http")
	if v := c.Listen.MinTLSVersion; v != "" && !slices.Contains(tlsVersions, strings.ToLower(v)) {
		ck.errorf("listen.min_tls_version", `min_tls_version %q is not valid: write "tls1.0", "tls1.1" or "tls1.2"`, v)
	}
	ck.mobyURI(c.MobyRuntime.URI)
	ck.network(c.MobyRuntime.Network)
	if c.ParentHostname != "" {
		ck.errorf("parent_hostname", "%s: nested edge is not supported; a Hatchery edge device connects to its hub directly, so remove it", ck.pos.name("parent_hostname"))
	}
	if !ck.pos.yaml { // a 1.1 config.yaml had to have them
		for _, u := range unused {
			if ck.pos.has(u.path) {
				ck.warnAt(ck.pos.pos(u.path), "%s is an Azure IoT Edge setting that Hatchery does not use (%s); it is ignored", u.path, u.why)
			}
		}
	}
}

// unused are the settings that Hatchery checks, so that an Azure
// config.toml stays valid, but does not act on, with why.
var unused = []struct{ path, why string }{
	{"hostname", "modules reach the hub directly, not a gateway on this device"},
	{"homedir", "the runtime keeps its state in directories of its own"},
	{"agent", "the edge agent runs inside iotedged, not as a container"},
	{"connect", "iotedged serves its APIs on sockets of its own"},
	{"listen", "iotedged serves its APIs on sockets of its own"},
}

// placeholders are the template's stand-ins for values only the user knows,
// which would otherwise pass for real ones until DPS or the hub refused them.
var placeholders = []string{"DPS_ID_SCOPE_HERE", "SCOPE_ID_HERE", "REGISTRATION_ID_HERE", "HUB_HOST_NAME", "DEVICE_ID"}

// isPlaceholder says whether v is placeholder p, or holds it as a value of
// a connection string ("HostName=HUB_HOST_NAME;…"): a real value that only
// contains it (registration_id = "MY_DEVICE_ID_1") is not one.
func isPlaceholder(v, p string) bool {
	return v == p || strings.Contains(v, "="+p+";") || strings.HasSuffix(v, "="+p)
}

func (ck *checker) placeholders(path string, v reflect.Value) {
	switch v.Kind() {
	case reflect.Struct:
		for f, fv := range v.Fields() {
			ck.placeholders(join(path, tagName(f, "toml")), fv)
		}
	case reflect.String:
		for _, p := range placeholders {
			if isPlaceholder(v.String(), p) {
				ck.errorf(path, "%s is still the template's %s: replace it with your own value", ck.pos.name(path), p)
				return
			}
		}
	}
}

func (ck *checker) provisioning(p *Provisioning) {
	if p.Source == "" {
		if len(setKeys(p)) > 0 || ck.pos.has("provisioning") {
			ck.errorf("provisioning", `%s has no source: add %s, or "manual" or "none"`,
				ck.pos.table("provisioning"), ck.pos.assign("provisioning.source", `"dps"`))
			return
		}
		p.Source = SourceNone
	}
	if !ck.enum("provisioning.source", string(p.Source)) {
		return
	}
	switch p.Source {
	case SourceNone:
		ck.only("provisioning", p, "source")
		ck.warnAt(ck.pos.pos("provisioning"), "no provisioning is configured: the device will not connect to an IoT hub; "+
			"uncomment one of the [provisioning] blocks of the template")
	case SourceDPS:
		ck.only("provisioning", p, "source", "global_endpoint", "id_scope", "payload", "attestation")
		ck.dps(p)
	case SourceManual:
		if p.ConnectionString != "" {
			ck.only("provisioning", p, "source", "connection_string")
			if err := checkConnectionString(p.ConnectionString); err != nil {
				ck.errorf("provisioning.connection_string", "%v", err)
			}
			return
		}
		ck.only("provisioning", p, "source", "iothub_hostname", "device_id", "authentication")
		ck.manual(p)
	}
}

func (ck *checker) dps(p *Provisioning) {
	if p.GlobalEndpoint == "" {
		p.GlobalEndpoint = DefaultGlobalEndpoint
	}
	if u, err := url.Parse(p.GlobalEndpoint); err != nil || u.Scheme != "https" || u.Host == "" {
		ck.errorf("provisioning.global_endpoint", "global_endpoint %q must be an https URL: write %s",
			p.GlobalEndpoint, ck.pos.assign("provisioning.global_endpoint", quote(DefaultGlobalEndpoint)))
	}
	if p.IDScope == "" {
		ck.errorf("provisioning.id_scope", "%s needs the ID scope of the provisioning service: add %s under %s",
			ck.pos.assign("provisioning.source", `"dps"`), ck.pos.assign("provisioning.id_scope", `"<ID scope>"`), ck.pos.table("provisioning"))
	}
	if p.Payload.URI != "" {
		ck.fileRef("provisioning.payload.uri", p.Payload.URI)
	}
	a := &p.Attestation
	const at = "provisioning.attestation"
	if *a == (Attestation{}) && !ck.pos.has(at) {
		ck.errorf("provisioning", "%s needs %s, for example:%s",
			ck.pos.assign("provisioning.source", `"dps"`), ck.pos.table(at), example(ck.pos.yaml))
		return
	}
	if a.Method == "" {
		ck.errorf(at, `%s needs a method: add %s, or "symmetric_key" or "x509"`, ck.pos.table(at), ck.pos.assign(at+".method", `"tpm"`))
		return
	}
	if !ck.enumOf(at+".method", string(a.Method), attestationMethods) {
		return
	}
	if a.RegistrationID == "" && a.Method != MethodX509 {
		ck.errorf(at+".registration_id", "%s needs the device's registration ID: add %s under %s%s",
			ck.pos.assign(at+".method", quote(string(a.Method))), ck.pos.assign(at+".registration_id", `"<registration ID>"`),
			ck.pos.table(at), tpmHint(a.Method))
	}
	switch a.Method {
	case MethodTPM:
		ck.only(at, a, "method", "registration_id")
	case MethodSymmetricKey:
		ck.only(at, a, "method", "registration_id", "symmetric_key")
		ck.symmetricKey(at+".symmetric_key", a.SymmetricKey)
	case MethodX509:
		ck.only(at, a, "method", "registration_id", "identity_cert", "identity_pk")
		ck.x509(at, a.IdentityCert, a.IdentityPK)
	}
}

func tpmHint(m Method) string {
	if m == MethodTPM {
		return " ('iotedge tpm provision-info' prints it)"
	}
	return ""
}

// example is a DPS attestation block in the file's syntax.
func example(yaml bool) string {
	if yaml {
		return "\n  attestation:\n    method: \"tpm\"\n    registration_id: \"<registration ID>\""
	}
	return "\n[provisioning.attestation]\nmethod = \"tpm\"\nregistration_id = \"<registration ID>\""
}

func (ck *checker) manual(p *Provisioning) {
	switch {
	case p.IoTHubHostname == "":
		ck.errorf("provisioning.iothub_hostname", "%s needs %s, or %s alone", ck.pos.assign("provisioning.source", `"manual"`),
			ck.pos.assign("provisioning.iothub_hostname", `"<hub>.azure-devices.net"`),
			ck.pos.assign("provisioning.connection_string", `"HostName=...;DeviceId=...;SharedAccessKey=..."`))
	case !hubHostPattern.MatchString(p.IoTHubHostname):
		ck.errorf("provisioning.iothub_hostname", "iothub_hostname %q is not a host name", p.IoTHubHostname)
	}
	switch {
	case p.DeviceID == "":
		ck.errorf("provisioning.device_id", "%s needs %s", ck.pos.assign("provisioning.source", `"manual"`),
			ck.pos.assign("provisioning.device_id", `"<device ID>"`))
	case !deviceIDPattern.MatchString(p.DeviceID):
		ck.errorf("provisioning.device_id", "device_id %q has characters IoT Hub does not allow in a device ID", p.DeviceID)
	}
	const at = "provisioning.authentication"
	a := &p.Authentication
	if a.Method == "" {
		ck.errorf(at, `%s needs a method: add %s, or "x509"`, ck.pos.table(at), ck.pos.assign(at+".method", `"sas"`))
		return
	}
	if !ck.enumOf(at+".method", string(a.Method), authMethods) {
		return
	}
	if a.Method == MethodSAS {
		ck.only(at, a, "method", "device_id_pk")
		ck.symmetricKey(at+".device_id_pk", a.DeviceIDPK)
		return
	}
	ck.only(at, a, "method", "identity_cert", "identity_pk")
	ck.x509(at, a.IdentityCert, a.IdentityPK)
}

// only reports the keys set in the struct *v (at path) that are not in keys.
func (ck *checker) only(path string, v any, keys ...string) {
	// keys[0] is the key that selects which others apply.
	sel := reflect.ValueOf(v).Elem().Field(0).String()
	for _, k := range setKeys(v) {
		if !slices.Contains(keys, k) {
			ck.errorf(path+"."+k, "%s does not apply with %s: remove it (%s takes %s)", ck.pos.name(path+"."+k),
				ck.pos.assign(path+"."+keys[0], quote(sel)), ck.pos.table(path), strings.Join(keys, ", "))
		}
	}
}

// setKeys returns the names of the fields of *v that are not zero.
func setKeys(v any) []string {
	var keys []string
	for f, fv := range reflect.ValueOf(v).Elem().Fields() {
		if !fv.IsZero() {
			keys = append(keys, tagName(f, "toml"))
		}
	}
	return keys
}

func (ck *checker) symmetricKey(path string, k SymmetricKey) {
	switch {
	case k.Value != "" && k.URI != "":
		ck.errorf(path, "%s has both value and uri: keep one", ck.pos.name(path))
	case k.Value != "":
		if b, err := base64.StdEncoding.DecodeString(k.Value); err != nil || len(b) == 0 {
			ck.errorf(path, "the value of %s is not a base64 key (such as the primary key IoT Hub or DPS shows)", ck.pos.name(path))
		}
	case k.URI != "":
		ck.fileRef(path+".uri", k.URI)
	default:
		ck.errorf(path, `%s is missing: add %s, or { uri = "file:///path/to/key" }`,
			ck.pos.name(path), ck.pos.assign(path, `{ value = "<base64 key>" }`))
	}
}

func (ck *checker) x509(path, cert, key string) {
	for _, f := range [...]struct{ key, ref string }{{"identity_cert", cert}, {"identity_pk", key}} {
		if f.ref == "" {
			ck.errorf(path+"."+f.key, "%s needs %s", ck.pos.assign(path+".method", `"x509"`),
				ck.pos.assign(path+"."+f.key, `"file:///path/to/file.pem"`))
		}
		ck.fileRef(path+"."+f.key, f.ref)
	}
}

// fileRef checks a reference to a local file: a file:// URI or a path, which
// must be absolute because the runtime's working directory is not the user's.
func (ck *checker) fileRef(path, ref string) {
	name := ck.pos.name(path)
	u, err := url.Parse(ref)
	switch {
	case ref == "":
	case err == nil && u.Scheme == "file":
		if u.Opaque != "" || (u.Host != "" && u.Host != "localhost") || !strings.HasPrefix(u.Path, "/") {
			p := strings.TrimPrefix(strings.TrimPrefix(ref, "file:"), "//")
			ck.errorf(path, "%s %q is not an absolute file URI: write %s (three slashes)",
				name, ref, ck.pos.assign(path, quote("file:///"+strings.TrimLeft(p, "/"))))
		}
	case err == nil && u.Scheme == "pkcs11":
		ck.errorf(path, "%s: Hatchery does not support PKCS#11 URIs; use a file:// URI", name)
	case err == nil && u.Scheme != "":
		ck.errorf(path, "%s %q must be a file:// URI or an absolute path", name, ref)
	case !strings.HasPrefix(ref, "/"):
		ck.errorf(path, "%s %q is a relative path: write an absolute path or a URI such as %s", name, ref, quote("file:///"+ref))
	}
}

// hostname warns of a name that is not a host name: Hatchery does not use
// hostname, and a 1.1 config.yaml had to have one, often the machine's
// name with an underscore in it.
func (ck *checker) hostname(path, h string) {
	if h != "" && net.ParseIP(h) == nil && !(len(h) <= 253 && dnsname.Valid(strings.TrimSuffix(h, "."))) {
		ck.warnAt(ck.pos.pos(path), "%s %q is not a valid host name (letters, digits, '-' and '.')", ck.pos.name(path), h)
	}
}

func (ck *checker) uri(path, s string, schemes ...string) {
	if s == "" {
		return
	}
	u, err := url.Parse(s)
	switch {
	case err != nil || !slices.Contains(schemes, u.Scheme):
		ck.errorf(path, "%s %q must be a %s:// URI", ck.pos.name(path), s, strings.Join(schemes, ":// or "))
	case u.Scheme == "unix" && !strings.HasPrefix(u.Path, "/"):
		ck.errorf(path, "%s %q must name an absolute socket path, such as unix:///var/run/docker.sock", ck.pos.name(path), s)
	case u.Scheme != "unix" && u.Host == "":
		ck.errorf(path, "%s %q has no host", ck.pos.name(path), s)
	}
}

// network checks moby_runtime.network. The runtime creates a plain bridge
// network, or uses the one of that name the engine has: an IPv6 network
// or IPAM settings that it would not apply are refused, not ignored, as
// modules would run without the addresses the user asked for.
func (ck *checker) network(n MobyNetwork) {
	const path = "moby_runtime.network"
	if !networkPattern.MatchString(n.Name) {
		ck.errorf(path, "network %q is not a valid Docker network name (letters, digits, _ . -)", n.Name)
		return
	}
	if n.IPv6 || n.IPAM != nil {
		ck.errorf(path, "%s: the runtime does not create IPv6 networks or apply ipam settings; create the network yourself "+
			"(docker network create --ipv6 --subnet <subnet> %s), then leave only its name here (%s): the runtime uses the network the engine has",
			ck.pos.name(path), n.Name, ck.pos.assign(path, fmt.Sprintf("%q", n.Name)))
	}
}

// mobyURI checks moby_runtime.uri: the runtime reaches the engine through
// its unix socket only, so an Azure config.toml's tcp:// engine is refused
// here rather than when the daemon starts.
func (ck *checker) mobyURI(s string) {
	const path = "moby_runtime.uri"
	if u, err := url.Parse(s); err == nil && slices.Contains([]string{"tcp", "http", "https"}, u.Scheme) {
		ck.errorf(path, "%s %q: the runtime reaches the Moby engine only through its unix socket; write uri = \"unix:///var/run/docker.sock\" (dockerd listens there by default; with -H tcp://..., add -H unix:///var/run/docker.sock)", ck.pos.name(path), s)
		return
	}
	ck.uri(path, s, "unix")
}

func (ck *checker) tpm(t *TPM) {
	if t.AuthKeyIndex > maxKeyIndex {
		ck.errorf("tpm.auth_key_index", "auth_key_index 0x%X is out of range: it is an offset from 0x81000000 and must be %s",
			uint32(t.AuthKeyIndex), describe(keyIndexType))
	} else if err := tpm.CheckAuthKeyIndex(uint32(t.AuthKeyIndex)); err != nil {
		ck.errorf("tpm.auth_key_index", "%v: aziot-tpmd refuses it", err)
	}
	if err := checkTCTI(t.TCTI); err != nil {
		ck.errorf("tpm.tcti", "%v", err)
	}
}

// checkTCTI checks a tpm2-tss TCTI string with the tpm package's own parser,
// before the runtime tries to open it.
func checkTCTI(s string) error {
	name, conf, _ := strings.Cut(s, ":")
	switch {
	case name == "tabrmd":
		return fmt.Errorf("tcti %q: Hatchery cannot use the tpm2-abrmd resource manager; "+
			`use tcti = "device" (the kernel's resource manager, /dev/tpmrm0)`, s)
	case name == "device" && conf != "" && !strings.HasPrefix(conf, "/"):
		return fmt.Errorf("tcti %q: the device must be an absolute path, as in \"device:/dev/tpmrm0\"", s)
	}
	return tpm.CheckTCTI(s)
}

func (ck *checker) agent(a *Agent) {
	if a.Type != "" {
		ck.enum("agent.type", a.Type)
	}
	if a.ImagePullPolicy != "" {
		ck.enum("agent.imagePullPolicy", a.ImagePullPolicy)
	}
	// An empty table and an absent one mean the same; keep one form so
	// that configurations compare equal.
	if len(a.Env) == 0 {
		a.Env = nil
	}
	if len(a.Config.CreateOptions) == 0 {
		a.Config.CreateOptions = nil
	}
}

// enum checks a key that takes one of enums[name].
func (ck *checker) enum(path, v string) bool {
	return ck.enumOf(path, v, enums[ck.pos.name(path)])
}

func (ck *checker) enumOf(path, v string, allowed []string) bool {
	return ck.enumAt(ck.pos.pos(path), ck.pos.name(path), v, allowed)
}

func (ck *checker) enumAt(at Pos, name, v string, allowed []string) bool {
	if slices.Contains(allowed, v) {
		return true
	}
	quoted := make([]string, len(allowed))
	for i, a := range allowed {
		quoted[i] = quote(a)
	}
	msg := fmt.Sprintf("%s %q is not valid: write one of %s", name, v, strings.Join(quoted, ", "))
	if c := canonical(name, v); c != v && slices.Contains(allowed, c) {
		msg += fmt.Sprintf(" (values are case-sensitive: %s)", quote(c))
	}
	ck.errorAt(at, "%s", msg)
	return false
}

// checkConnectionString checks a device connection string as IoT Edge's
// manual provisioning takes it.
func checkConnectionString(s string) error {
	const want = "expected HostName=<hub host name>;DeviceId=<device ID>;SharedAccessKey=<base64 key>"
	cs, err := sas.ParseConnectionString(s)
	switch {
	case err != nil:
		return fmt.Errorf("invalid connection_string: %v; %s", err, want)
	case cs.KeyName != "":
		return fmt.Errorf("connection_string is a service connection string (it has SharedAccessKeyName): use the connection string of the IoT Edge device; %s", want)
	case cs.ModuleID != "":
		return fmt.Errorf("connection_string is a module's (it has ModuleId): use the connection string of the device itself; %s", want)
	case !hubHostPattern.MatchString(cs.HostName):
		return fmt.Errorf("connection_string: HostName %q is not a host name; %s", cs.HostName, want)
	case !deviceIDPattern.MatchString(cs.DeviceID):
		return fmt.Errorf("connection_string: DeviceId %q has characters IoT Hub does not allow; %s", cs.DeviceID, want)
	}
	return nil
}

// FromConnectionString returns the configuration of a device provisioned
// manually with its connection string, as 'iotedge config mp' writes it.
func FromConnectionString(cs string) (*Config, error) {
	if err := checkConnectionString(cs); err != nil { // including an empty one
		return nil, err
	}
	c := Default()
	c.Provisioning = Provisioning{Source: SourceManual, ConnectionString: strings.TrimSpace(cs)}
	ck := newChecker("")
	ck.validate(c)
	c, _, err := ck.result(c)
	return c, err
}

// suggest returns the candidate closest to name, if it is close enough to be
// a likely misspelling. Case, '_' and '-' are disregarded and the words of a
// candidate may come in any order, so "scopeid" finds "id_scope".
func suggest(name string, candidates []string) string {
	n := normalize(name)
	if n == "" || len(n) > 64 {
		return ""
	}
	best, bestD := "", max(2, len(n)/3)+1
	for _, c := range candidates {
		if d := wordsDistance(n, c); d < bestD {
			best, bestD = c, d
		}
	}
	return best
}

func normalize(s string) string {
	return strings.ToLower(strings.NewReplacer("_", "", "-", "").Replace(s))
}

// wordsDistance is the least edit distance from n to the words of c joined
// in any order.
func wordsDistance(n, c string) int {
	words := strings.FieldsFunc(strings.ToLower(c), func(r rune) bool { return r == '_' || r == '-' })
	if len(words) > 4 {
		return levenshtein(n, normalize(c))
	}
	best := len(n) + len(c)
	permute(words, 0, func(w []string) { best = min(best, levenshtein(n, strings.Join(w, ""))) })
	return best
}

func permute(w []string, i int, f func([]string)) {
	if i == len(w) {
		f(w)
		return
	}
	for j := i; j < len(w); j++ {
		w[i], w[j] = w[j], w[i]
		permute(w, i+1, f)
		w[i], w[j] = w[j], w[i]
	}
}

func levenshtein(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			sub := prev[j-1]
			if a[i-1] != b[j-1] {
				sub++
			}
			cur[j] = min(sub, prev[j]+1, cur[j-1]+1)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
