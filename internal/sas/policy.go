package sas

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"time"
)

// Policy is a shared access policy of a service (provisioningserviceowner,
// iothubowner, ...): a key name and two keys.
type Policy struct {
	KeyName      string `json:"keyName"`
	PrimaryKey   string `json:"primaryKey"`
	SecondaryKey string `json:"secondaryKey"`
	Rights       string `json:"rights"`
}

// Rights of hub policies, as Azure names them.
const (
	RegistryRead   = "RegistryRead"
	RegistryWrite  = "RegistryWrite" // includes RegistryRead
	ServiceConnect = "ServiceConnect"
	DeviceConnect  = "DeviceConnect"
	// AllRights is what changing the hub's trusted CA certificates needs:
	// the hosted hub lets no shared access policy do that (it is its
	// management plane); here only a policy with every right may.
	AllRights = RegistryWrite + ", " + ServiceConnect + ", " + DeviceConnect
	// TwinQuery is what querying twins needs: Azure lets back ends that
	// work with twins (ServiceConnect) query them too.
	TwinQuery = RegistryRead + " or " + ServiceConnect
	// JobWrite is what scheduling or cancelling a job needs: both kinds of
	// job, twin updates and direct methods, do ServiceConnect's work.
	JobWrite = ServiceConnect
	// JobRead is what reading jobs needs: in Azure, either right.
	JobRead = TwinQuery
)

// Grants reports whether the policy's rights include right: each of a
// comma-separated list of rights, each of which may be alternatives
// ("RegistryRead or ServiceConnect").
func (p *Policy) Grants(right string) bool {
	for r := range strings.SplitSeq(right, ",") {
		if !slices.ContainsFunc(strings.Split(r, " or "), func(alt string) bool { return p.grants(strings.TrimSpace(alt)) }) {
			return false
		}
	}
	return true
}

func (p *Policy) grants(right string) bool {
	for r := range strings.SplitSeq(p.Rights, ",") {
		r = strings.TrimSpace(r)
		if strings.EqualFold(r, right) || right == RegistryRead && strings.EqualFold(r, RegistryWrite) {
			return true
		}
	}
	return false
}

// NewPolicy makes a policy with two fresh 32-byte keys.
func NewPolicy(name, rights string) Policy {
	return Policy{KeyName: name, PrimaryKey: NewKey(), SecondaryKey: NewKey(), Rights: rights}
}

// NewKey returns a fresh base64 32-byte key.
func NewKey() string { return NewKeyOf(32) }

// NewKeyOf returns a fresh base64 key of n bytes.
func NewKeyOf(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return base64.StdEncoding.EncodeToString(b)
}

// Keys decodes a policy's or device's base64 keys, skipping empty ones.
func Keys(b64 ...string) [][]byte {
	out := make([][]byte, 0, len(b64))
	for _, k := range b64 {
		if k == "" {
			continue
		}
		if key, err := base64.StdEncoding.DecodeString(k); err == nil {
			out = append(out, key)
		}
	}
	return out
}

// AuthorizeService checks a service-API Authorization header for a request
// to path: a token for host, naming one of policies by skn. A path in sr
// narrows the token to what lies under it, segment by segment, as in Azure
// (sr=HOST/devices/d1 reaches /devices/d1 and /devices/d1/modules/m, not
// /devices/d2).
func AuthorizeService(header, host, path string, policies []Policy, now time.Time) (*Policy, error) {
	if header == "" {
		return nil, fmt.Errorf("no Authorization header: send a SharedAccessSignature made from a shared access policy's connection string")
	}
	tok, err := Parse(header)
	if err != nil {
		return nil, err
	}
	// The scope is compared exactly: the policy's key signs for every
	// device, so the path alone tells d1 from D1.
	aud, scope := splitResource(tok.Audience)
	if want, _ := splitResource(host); aud != want && stripPort(aud) != want {
		return nil, fmt.Errorf("%w: sr=%q but this service is %q", ErrAudience, tok.Audience, host)
	}
	if req := strings.Trim(path, "/"); scope != "" && req != scope && !strings.HasPrefix(req, scope+"/") {
		return nil, fmt.Errorf("%w: sr=%q reaches only what lies under /%s, not %s", ErrAudience, tok.Audience, scope, path)
	}
	for i := range policies {
		p := &policies[i]
		if !strings.EqualFold(p.KeyName, tok.KeyName) {
			continue
		}
		if err := tok.Verify(now, Keys(p.PrimaryKey, p.SecondaryKey)...); err != nil {
			return nil, err
		}
		return p, nil
	}
	return nil, fmt.Errorf("SAS token names shared access policy %q, which does not exist here", tok.KeyName)
}

func stripPort(h string) string {
	if u, err := url.Parse("//" + h); err == nil && u.Hostname() != "" {
		return u.Hostname()
	}
	return h
}
