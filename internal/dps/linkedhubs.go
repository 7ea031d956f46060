package dps

import (
	"context"
	"crypto/subtle"
	"crypto/x509"
	"encoding/json"
	"errors"
	"net/netip"
	"net/url"
	"strings"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/dnsname"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/store"
)

// HiddenKey stands for a linked hub's key in what the API shows; a PUT
// that sends back the connection string so shown keeps the stored key.
const HiddenKey = "<hidden>"

// Redacted is the hub as the API shows it: HiddenKey for its key.
func (h LinkedHub) Redacted() *LinkedHub {
	h.ConnectionString = withKey(h.ConnectionString, HiddenKey)
	return &h
}

// withKey is connString with key for the value of its SharedAccessKey.
func withKey(connString, key string) string {
	parts := strings.Split(connString, ";")
	for i, p := range parts {
		if name, _, ok := strings.Cut(p, "="); ok && strings.EqualFold(strings.TrimSpace(name), "SharedAccessKey") {
			parts[i] = name + "=" + key
		}
	}
	return strings.Join(parts, ";")
}

// hidesKey reports whether connString's key is HiddenKey.
func hidesKey(connString string) bool {
	for p := range strings.SplitSeq(connString, ";") {
		if name, v, ok := strings.Cut(p, "="); ok && strings.EqualFold(strings.TrimSpace(name), "SharedAccessKey") {
			return v == HiddenKey
		}
	}
	return false
}

// PutLinkedHub is the API's LinkHub: a connection string sent back as the
// API shows it (Redacted) keeps the stored key.
func (s *Service) PutLinkedHub(ctx context.Context, host string, h *LinkedHub) (*LinkedHub, error) {
	if h.HostName == "" {
		h.HostName = host
	}
	if !strings.EqualFold(h.HostName, host) {
		return nil, azerr.BadRequest("hostName %q in the body differs from %q in the URL", h.HostName, host)
	}
	if !hidesKey(h.ConnectionString) {
		return h, s.LinkHub(ctx, *h)
	}
	// The key is the stored one's: of the version replaced, not of one
	// read before another write changed it.
	_, h, err := replaceDoc(ctx, s.store, kindLinkedHub, strings.ToLower(host), write{ifMatch: "*"}, h, func(h, old *LinkedHub) error {
		switch {
		case old == nil:
			return azerr.BadRequest("linked hub %s: give its connectionString with the key", host)
		case h.ConnectionString != old.Redacted().ConnectionString:
			return azerr.BadRequest("linked hub %s: give its connectionString with the key to change the connection string", host)
		case old.Endpoint != h.Endpoint || old.CACertificate != h.CACertificate:
			return azerr.BadRequest("linked hub %s: give its connectionString with the key to change its endpoint or CA certificate, which decide where that key's tokens go", host)
		}
		h.ConnectionString = old.ConnectionString
		return checkLinkedHub(h)
	})
	s.hubs.forget()
	if err != nil {
		return nil, err
	}
	return h, nil
}

// LinkHub adds or replaces a linked hub, checking its settings. Its
// connection string must be a registry policy's for that very hub, and its
// endpoint, if any, https: registrations send the hub tokens signed with
// that key.
func (s *Service) LinkHub(ctx context.Context, h LinkedHub) error {
	if err := checkLinkedHub(&h); err != nil {
		return err
	}
	body, _ := json.Marshal(h)
	_, err := s.store.Put(ctx, store.Doc{Kind: kindLinkedHub, ID: strings.ToLower(h.HostName), Body: body}, "")
	s.hubs.forget()
	return err
}

// checkLinkedHub checks h, and fills in its host name from its connection
// string when it has none.
func checkLinkedHub(h *LinkedHub) error {
	if h.AllocationWeight < 0 || h.AllocationWeight > 1000 {
		return azerr.BadRequest("allocationWeight %d: use 0 to 1000 (0 counts as 1)", h.AllocationWeight)
	}
	for network, ms := range h.LatencyMs {
		if _, err := netip.ParsePrefix(network); err != nil {
			return azerr.BadRequest("latencyMs: %q is not a network in CIDR form such as 10.1.0.0/16", network)
		}
		if ms < 0 {
			return azerr.BadRequest("latencyMs[%q] = %d: latencies are not negative", network, ms)
		}
	}

	cs, err := sas.ParseConnectionString(h.ConnectionString)
	if err != nil {
		return azerr.BadRequest("linked hub %s: %v", h.HostName, err)
	}
	if h.HostName == "" {
		h.HostName = cs.HostName
	}
	switch {
	case !dnsname.Valid(h.HostName):
		return azerr.BadRequest("linked hub %q: hostName must be a DNS name such as hub1.example.com", h.HostName)
	case !strings.EqualFold(cs.HostName, h.HostName):
		return azerr.BadRequest("linked hub %s: the connection string is for HostName=%s: give this hub's own", h.HostName, cs.HostName)
	case cs.KeyName == "":
		return azerr.BadRequest("linked hub %s: the connection string is a device's: give a registry policy's, with SharedAccessKeyName (e.g. iothubowner)", h.HostName)
	}
	if h.CACertificate != "" && !x509.NewCertPool().AppendCertsFromPEM([]byte(h.CACertificate)) {
		return azerr.BadRequest("linked hub %s: caCertificate holds no PEM certificate: give the CA certificate that signed the hub's TLS certificate", h.HostName)
	}
	if h.Endpoint != "" {
		u, err := url.Parse(h.Endpoint)
		if err != nil || u.Scheme != "https" || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" || strings.Trim(u.Path, "/") != "" {
			return azerr.BadRequest("linked hub %s: endpoint %q must be an https URL of a host and port, such as https://%s:8443", h.HostName, h.Endpoint, h.HostName)
		}
	}
	return nil
}

// UnlinkHub removes a linked hub; devices already there stay.
func (s *Service) UnlinkHub(ctx context.Context, host string) error {
	err := s.store.Delete(ctx, kindLinkedHub, strings.ToLower(host), "")
	s.hubs.forget()
	if errors.Is(err, store.ErrNotFound) {
		return azerr.New(404201, "NotFound", "no linked hub %q: `hatchery hub list` shows them", host)
	}
	return err
}

// KeepOwnHubLinked links own, the hub served by this process, on first
// start. Started again under another host name, that hub keeps its keys
// but not its name: the link carrying its key under the former name moves
// to the new one, with its weight and settings, or every registration to
// it would fail; it returns the former name then. A hub the operator
// unlinked stays unlinked.
func (s *Service) KeepOwnHubLinked(ctx context.Context, own LinkedHub) (former string, err error) {
	hubs, err := s.LinkedHubs(ctx)
	if err != nil {
		return "", err
	}
	if len(hubs) == 0 {
		return "", s.LinkHub(ctx, own)
	}
	ownCS, err := sas.ParseConnectionString(own.ConnectionString)
	if err != nil {
		return "", err
	}
	for _, l := range hubs {
		if strings.EqualFold(l.HostName, own.HostName) {
			return "", nil
		}
	}
	for _, l := range hubs {
		cs, err := sas.ParseConnectionString(l.ConnectionString)
		if err != nil || subtle.ConstantTimeCompare(cs.Key, ownCS.Key) != 1 {
			continue
		}
		moved := *l
		moved.HostName, moved.ConnectionString, moved.Endpoint = own.HostName, own.ConnectionString, own.Endpoint
		if err := s.LinkHub(ctx, moved); err != nil {
			return "", err
		}
		// Another replica starting under the new name may have moved it first.
		if err := s.UnlinkHub(ctx, l.HostName); err != nil && !azerr.HasStatus(err, 404) {
			return "", err
		}
		return l.HostName, nil
	}
	return "", nil
}

// LinkedHubs lists the hubs devices can be assigned to.
func (s *Service) LinkedHubs(ctx context.Context) ([]*LinkedHub, error) {
	hubs, _, err := list[LinkedHub](ctx, s.store, kindLinkedHub, "", 1000, func(*LinkedHub, string) {})
	return hubs, err
}

// cachedHubs are the linked hubs as registrations see them.
func (s *Service) cachedHubs(ctx context.Context) ([]*LinkedHub, error) {
	return s.hubs.get(func() ([]*LinkedHub, error) { return s.LinkedHubs(ctx) })
}
