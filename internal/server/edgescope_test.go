package server

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"strings"
	"testing"
	"time"

	"github.com/hatchery/hatchery/internal/azclient"
	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/hatchery/hatchery/internal/hub"
	"github.com/hatchery/hatchery/internal/sas"
	"github.com/hatchery/hatchery/internal/testutil"
)

// deviceAPI is a registry client authenticated as a device: with a client
// certificate, or with a device-scoped SAS token.
func (e *env) deviceAPI(cert *tls.Certificate, token string) *azclient.Client {
	conf := e.tls.Clone()
	if cert != nil {
		conf.Certificates = []tls.Certificate{*cert}
	}
	return azclient.NewDevice(host, e.ts.URL, "2020-09-30", conf, func(time.Duration) (string, error) { return token, nil })
}

func (e *env) putX509Device(t *testing.T, id string, cert tls.Certificate, edge bool) {
	t.Helper()
	sum := sha256.Sum256(cert.Leaf.Raw)
	tp := hex.EncodeToString(sum[:])
	if err := e.hubAPI.Do(ctx, "PUT", "/devices/"+id, "", &hub.Device{Authentication: hub.Authentication{Type: "selfSigned",
		X509Thumbprint: hub.X509Thumbprint{PrimaryThumbprint: &tp}}, Capabilities: hub.Capabilities{IoTEdge: edge}}, nil); err != nil {
		t.Fatal(err)
	}
}

// An edge device manages its own modules' identities, as the edge runtime
// does for its modules; it cannot touch another device's.
func TestEdgeDeviceScopeModules(t *testing.T) {
	e := newEnv(t)
	addr := e.startMQTT()
	cert := testutil.NewCert(t, "gw-1", false, nil)
	e.putX509Device(t, "gw-1", cert, true)
	leafOnly := testutil.NewCert(t, "leaf-1", false, nil)
	e.putX509Device(t, "leaf-1", leafOnly, false)
	e.newDevice("other", true)

	as := e.deviceAPI
	gw := as(&cert, "")
	var m hub.Device
	if err := gw.Do(ctx, "PUT", "/devices/gw-1/modules/filter", "", &hub.Device{}, &m); err != nil {
		t.Fatalf("module create by its device: %v", err)
	}
	if m.ModuleID != "filter" || m.Authentication.SymmetricKey.PrimaryKey == "" {
		t.Fatalf("module %+v", m)
	}
	var agent hub.Device
	if err := gw.Do(ctx, "GET", "/devices/gw-1/modules/$edgeAgent", "", nil, &agent); err != nil || agent.Authentication.SymmetricKey.PrimaryKey == "" {
		t.Fatalf("$edgeAgent read by its device: %+v %v", agent, err)
	}
	// A token signed with the module's key works on the hub.
	mc, err := e.dial(addr, "gw-1", "filter", m.Authentication.SymmetricKey.PrimaryKey)
	if err != nil {
		t.Fatalf("module with its key: %v", err)
	}
	mc.Close()
	// The agent connects with the device's certificate.
	ac, err := e.dialCert(addr, "gw-1", "$edgeAgent", cert)
	if err != nil {
		t.Fatalf("$edgeAgent with the device certificate: %v", err)
	}
	ac.Close()

	for _, tc := range []struct {
		what   string
		c      *azclient.Client
		path   string
		status int
	}{
		{"another device's modules", gw, "/devices/other/modules/$edgeAgent", 401},
		{"a device that is not an edge device", as(&leafOnly, ""), "/devices/leaf-1/modules", 401},
		{"no credentials", as(nil, ""), "/devices/gw-1/modules", 401},
		{"the device itself (service API only)", gw, "/devices/gw-1", 401},
		{"a token of another device", as(nil, sas.Build([]byte("0123456789abcdef"), host+"/devices/gw-1", "", time.Now().Add(time.Minute))), "/devices/gw-1/modules", 401},
	} {
		err := tc.c.Do(ctx, "GET", tc.path, "", nil, nil)
		if azerr.As(err).Status() != tc.status {
			t.Errorf("%s: %v, want %d", tc.what, err, tc.status)
		}
	}
	// A device-scoped SAS token of an edge device works as well.
	other, _ := e.hub.GetIdentity(ctx, hub.Ref{Device: "other"})
	key := other.Authentication.SymmetricKey.PrimaryKey
	tok := sas.Build(mustBase64(t, key), host+"/devices/other", "", time.Now().Add(time.Minute))
	var mods []hub.Device
	if err := as(nil, tok).Do(ctx, "GET", "/devices/other/modules", "", nil, &mods); err != nil || len(mods) != 2 {
		t.Fatalf("modules by SAS: %v %v", mods, err)
	}
	if !strings.HasPrefix(mods[0].ModuleID, "$edge") {
		t.Fatalf("modules %+v", mods)
	}
}

func mustBase64(t *testing.T, s string) []byte {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
