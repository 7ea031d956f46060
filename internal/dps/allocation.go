package dps

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/netip"
	"net/url"
	"strings"

	"github.com/hatchery/hatchery/internal/azerr"
)

// Allocation policies, as spelled on the wire.
const (
	PolicyHashed     = "hashed"
	PolicyStatic     = "static"
	PolicyGeoLatency = "geoLatency"
	PolicyCustom     = "custom"
)

// allocation is what choosing a hub for one registration needs.
type allocation struct {
	policy  string
	hubs    []string // the enrollment's iotHubs; empty: the linked hubs that apply allocation policies
	static  string   // the enrollment's iotHubHostName
	webhook *CustomAllocationDefinition
	// For the custom webhook: the enrollment as stored, and the device.
	enrollment      any
	enrollmentField string // individualEnrollment or enrollmentGroup
	runtime         deviceRuntimeContext
	deviceID        string
	addr            netip.Addr // the device's address, for geoLatency
}

// allocated is the outcome: the hub and, from a custom webhook, the
// initial twin and payload it chose.
type allocated struct {
	hub     *LinkedHub
	twin    *InitialTwin
	payload json.RawMessage
}

// allocate chooses the hub for a registration by the enrollment's policy.
func (s *Service) allocate(ctx context.Context, a allocation) (*allocated, error) {
	cands, err := s.candidates(ctx, a)
	if err != nil {
		return nil, err
	}
	switch a.policy {
	case PolicyStatic:
		if len(cands) != 1 {
			return nil, azerr.New(400209, "NoLinkedHub", "static allocation needs exactly one hub: set iotHubHostName (or a single iotHubs entry) to a linked hub")
		}
		return &allocated{hub: cands[0]}, nil
	case PolicyGeoLatency:
		return &allocated{hub: weightedHash(a.deviceID, nearest(cands, a.addr))}, nil
	case PolicyCustom:
		return s.custom(ctx, a, cands)
	}
	return &allocated{hub: weightedHash(a.deviceID, cands)}, nil
}

// PinnedHub is the hub an enrollment's iotHubHostName, the older way to
// name one hub, pins its devices to: under static allocation, and under
// the default (hashed) when no iotHubs are named; "" when it pins none.
func PinnedHub(policy, iotHubHostName string, iotHubs []string) string {
	if policy == PolicyStatic || (policy == PolicyHashed && len(iotHubs) == 0) {
		return iotHubHostName
	}
	return ""
}

// candidates are the linked hubs the enrollment may use.
func (s *Service) candidates(ctx context.Context, a allocation) ([]*LinkedHub, error) {
	hubs, err := s.cachedHubs(ctx)
	if err != nil {
		return nil, err
	}
	named := a.hubs
	if pinned := PinnedHub(a.policy, a.static, a.hubs); pinned != "" {
		named = []string{pinned}
	}
	var out []*LinkedHub
	for _, h := range hubs {
		switch {
		case len(named) > 0:
			for _, n := range named {
				if strings.EqualFold(h.HostName, n) {
					out = append(out, h)
				}
			}
		case h.ApplyAllocationPolicy:
			out = append(out, h)
		}
	}
	if len(out) == 0 {
		return nil, azerr.New(400209, "NoLinkedHub", "no linked IoT hub fits the enrollment: link one with `hatchery hub link` or fix iotHubHostName/iotHubs")
	}
	return out, nil
}

// weightedHash spreads devices over hubs in proportion to their allocation
// weights (rendezvous hashing), so a device's retries land on the same hub
// and adding a hub moves only the devices it takes.
func weightedHash(deviceID string, hubs []*LinkedHub) *LinkedHub {
	var best *LinkedHub
	bestScore := math.Inf(-1)
	for _, h := range hubs {
		f := fnv.New64a()
		f.Write([]byte(deviceID))
		f.Write([]byte{0})
		f.Write([]byte(strings.ToLower(h.HostName)))
		u := (float64(mix(f.Sum64())>>11) + 0.5) / (1 << 53) // uniform in (0, 1)
		score := -float64(max(h.AllocationWeight, 1)) / math.Log(u)
		if score > bestScore {
			best, bestScore = h, score
		}
	}
	return best
}

// mix spreads FNV's output over all 64 bits (the splitmix64 finalizer):
// names differing in their last byte otherwise share their high bits.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

// nearest keeps the hubs with the lowest configured latency to addr: each
// hub's latency is that of its most specific network containing addr.
// Without a known address or any matching entry, all hubs stay.
func nearest(hubs []*LinkedHub, addr netip.Addr) []*LinkedHub {
	if !addr.IsValid() {
		return hubs
	}
	var out []*LinkedHub
	best := math.MaxInt
	for _, h := range hubs {
		ms, ok := h.latencyTo(addr)
		switch {
		case !ok:
		case ms < best:
			out, best = []*LinkedHub{h}, ms
		case ms == best:
			out = append(out, h)
		}
	}
	if len(out) == 0 {
		return hubs
	}
	return out
}

func (h *LinkedHub) latencyTo(addr netip.Addr) (int, bool) {
	bits, ms, found := -1, 0, false
	for network, lat := range h.LatencyMs {
		p, err := netip.ParsePrefix(network)
		if err == nil && p.Contains(addr.Unmap()) && p.Bits() > bits {
			bits, ms, found = p.Bits(), lat, true
		}
	}
	return ms, found
}

// deviceRuntimeContext is the device as the custom allocation webhook sees it.
type deviceRuntimeContext struct {
	RegistrationID        string          `json:"registrationId"`
	CurrentIoTHubHostName string          `json:"currentIotHubHostName,omitempty"`
	CurrentDeviceID       string          `json:"currentDeviceId,omitempty"`
	TPM                   *TPMAttestation `json:"tpm,omitempty"`
	X509                  *X509Result     `json:"x509,omitempty"`
	SymmetricKey          *SymKeyResult   `json:"symmetricKey,omitempty"`
	Payload               json.RawMessage `json:"payload,omitempty"`
}

// custom asks the enrollment's webhook which hub to use (PROTOCOL.md §4).
func (s *Service) custom(ctx context.Context, a allocation, cands []*LinkedHub) (*allocated, error) {
	if a.webhook == nil || a.webhook.WebhookURL == "" {
		return nil, azerr.BadRequest("custom allocation needs customAllocationDefinition.webhookUrl on the enrollment")
	}
	names := make([]string, len(cands))
	for i, h := range cands {
		names[i] = h.HostName
	}
	body, _ := json.Marshal(map[string]any{
		a.enrollmentField:      withoutSecrets(a.enrollment),
		"deviceRuntimeContext": a.runtime,
		"linkedHubs":           names,
	})
	// What the device and the logs see names the webhook without its query,
	// where function keys travel.
	where := webhookName(a.webhook.WebhookURL)
	fail := func(format string, args ...any) error {
		return azerr.New(400207, "CustomAllocationFailed", "custom allocation webhook %s: "+format, append([]any{where}, args...)...)
	}
	timeout := s.WebhookTimeoutOrDefault()
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(wctx, http.MethodPost, a.webhook.WebhookURL, bytes.NewReader(body))
	if err != nil {
		return nil, fail("the URL is not usable")
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := s.webhookClient().Do(req)
	if err != nil && errors.Is(ctx.Err(), context.Canceled) {
		// The device hung up: not the webhook's failure (assign records
		// nothing of it).
		return nil, fmt.Errorf("custom allocation webhook %s: the device's request ended: %w", where, context.Cause(ctx))
	}
	if err != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		// The request's own bound came first: still the webhook's slowness.
		return nil, fail("no answer before the registration request timed out")
	}
	if err != nil && errors.Is(wctx.Err(), context.DeadlineExceeded) {
		return nil, fail("no answer within %s", timeout)
	}
	if err != nil {
		return nil, fail("unreachable (%v)", errors.Unwrap(err))
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fail("reading the answer: %v", err)
	}
	if resp.StatusCode/100 != 2 {
		slog.Warn("custom allocation webhook failed", "webhook", where, "status", resp.StatusCode, "answer", fmt.Sprintf("%.200s", raw))
		return nil, fail("answered HTTP %d", resp.StatusCode)
	}
	var out struct {
		IoTHubHostName string          `json:"iotHubHostName"`
		InitialTwin    *InitialTwin    `json:"initialTwin"`
		Payload        json.RawMessage `json:"payload"`
	}
	if err := json.Unmarshal(raw, &out); err != nil {
		return nil, fail(`the answer is not JSON of the shape {"iotHubHostName": "...", "initialTwin": {...}, "payload": ...}: %v`, err)
	}
	if out.IoTHubHostName == "" {
		return nil, fail("the answer names no iotHubHostName")
	}
	h := hubNamed(cands, out.IoTHubHostName)
	if h == nil {
		return nil, fail("it chose %q, which is not among the enrollment's linked hubs %v", out.IoTHubHostName, names)
	}
	if out.InitialTwin != nil {
		if err := checkTwin(out.InitialTwin); err != nil {
			return nil, fail("%v", azerr.As(err).Message)
		}
	}
	return &allocated{hub: h, twin: out.InitialTwin, payload: out.Payload}, nil
}

// isLinked reports whether host is a linked hub: in the cached list, or,
// linked lately on another replica, in the store.
func (s *Service) isLinked(ctx context.Context, host string) (bool, error) {
	for _, list := range []func(context.Context) ([]*LinkedHub, error){s.cachedHubs, s.LinkedHubs} {
		hubs, err := list(ctx)
		if err != nil {
			return false, err
		}
		if hubNamed(hubs, host) != nil {
			return true, nil
		}
	}
	return false, nil
}

// hubNamed is the hub of hubs with the host name host, in any case; nil if none.
func hubNamed(hubs []*LinkedHub, host string) *LinkedHub {
	for _, h := range hubs {
		if strings.EqualFold(h.HostName, host) {
			return h
		}
	}
	return nil
}

// webhookName is a webhook's URL without query and fragment.
func webhookName(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	u.RawQuery, u.Fragment, u.User = "", "", nil
	return u.String()
}

// withoutSecrets is an enrollment as a webhook sees it: its attestation
// reduced to the type, as the hosted service sends it, since a group key
// would let the receiver derive every device's key.
func withoutSecrets(e any) any {
	switch v := e.(type) {
	case *Enrollment:
		c := *v
		c.Attestation = Attestation{Type: v.Attestation.Type}
		return &c
	case *EnrollmentGroup:
		c := *v
		c.Attestation = Attestation{Type: v.Attestation.Type}
		return &c
	}
	return e
}

func (s *Service) webhookClient() *http.Client {
	var c http.Client
	if s.Webhooks != nil {
		c = *s.Webhooks
	}
	c.CheckRedirect = keepHTTPS
	return &c
}

// keepHTTPS follows a webhook's redirects only where they stay on https:
// its URL may carry a key (?code=), which a redirect to plain http would
// send in clear.
func keepHTTPS(req *http.Request, via []*http.Request) error {
	switch {
	case len(via) >= 10:
		return errors.New("stopped after 10 redirects")
	case via[0].URL.Scheme == "https" && req.URL.Scheme != "https":
		return fmt.Errorf("it redirects to %s, not https: give the webhook's https URL", webhookName(req.URL.String()))
	}
	return nil
}
