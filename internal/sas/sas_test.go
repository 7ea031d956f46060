package sas

import (
	"encoding/base64"
	"errors"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"
)

var key = []byte("0123456789abcdef0123456789abcdef")

func TestBuildParseVerify(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	tok := Build(key, "0ne00000001/registrations/dev-1", "registration", now.Add(time.Hour))
	p, err := Parse(tok)
	if err != nil {
		t.Fatal(err)
	}
	if p.KeyName != "registration" || !p.AudienceIs("0NE00000001/registrations/DEV-1") {
		t.Fatalf("parsed %+v", p)
	}
	if err := p.Verify(now, []byte("wrong"), key); err != nil {
		t.Fatalf("secondary key should verify: %v", err)
	}
	if err := p.Verify(now, []byte("wrong")); !errors.Is(err, ErrSignature) {
		t.Fatalf("wrong key: %v", err)
	}
	if err := p.Verify(now.Add(2*time.Hour), key); !errors.Is(err, ErrExpired) {
		t.Fatalf("expired: %v", err)
	}
}

// Clients encode sr differently and sign the text they send.
func TestClientEncodings(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	se := now.Add(time.Minute).Unix()
	aud := "hub.example/devices/d1"
	for _, sr := range []string{
		url.QueryEscape(aud),                  // %2F
		strings.ToLower(url.QueryEscape(aud)), // %2f
		aud,                                   // raw
		strings.ToLower(url.QueryEscape("HUB.example/devices/d1")), // lowercased
	} {
		sig := base64.StdEncoding.EncodeToString(Sign(key, sr, se))
		// fields out of order, no skn, sig not escaped (raw '+' '/' '=')
		tok := "SharedAccessSignature se=" + strconv.FormatInt(se, 10) + "&sig=" + sig + "&sr=" + sr
		p, err := Parse(tok)
		if err != nil {
			t.Fatalf("%s: %v", sr, err)
		}
		if err := p.Verify(now, key); err != nil {
			t.Fatalf("%s: %v", sr, err)
		}
		if !p.AudienceIs(aud) {
			t.Fatalf("%s: audience %q", sr, p.Audience)
		}
	}
}

// The C# SDK URL-encodes the device (and module) ID in the resource, then
// the whole resource again, and signs that text: IDs with characters that
// encoding changes decode twice to the identity they name.
func TestDoubleEncodedAudience(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	se := now.Add(time.Minute).Unix()
	for _, id := range []string{"a:b", "a@b", "a#b", "a$b", "a+b", "a%b", "a,b", "a=b", "a'b", "a?b", "plain"} {
		sr := url.QueryEscape("hub.example/devices/" + url.QueryEscape(id) + "/modules/" + url.QueryEscape(id))
		tok := "SharedAccessSignature sr=" + sr + "&sig=" + url.QueryEscape(base64.StdEncoding.EncodeToString(Sign(key, sr, se))) + "&se=" + strconv.FormatInt(se, 10)
		p, err := Parse(tok)
		if err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		want := "hub.example/devices/" + id + "/modules/" + id
		if !p.AudienceIs(want) || !p.AudienceIsExactly(want) {
			t.Errorf("%s: audience %q does not match %q", id, p.Audience, want)
		}
		if err := p.Verify(now, key); err != nil {
			t.Errorf("%s: %v", id, err)
		}
		if p.AudienceIs("hub.example/devices/" + id + "x/modules/" + id) {
			t.Errorf("%s: audience %q matches another device", id, p.Audience)
		}
	}
}

func TestParseErrors(t *testing.T) {
	for tok, want := range map[string]string{
		"SharedAccessSignature sig=AAAA&se=1":                "no sr",
		"SharedAccessSignature sr=a&se=1":                    "no sig",
		"SharedAccessSignature sr=a&sig=AAAA":                "no se",
		"SharedAccessSignature sr=a&sig=AAAA&se=x":           "not a Unix time",
		"SharedAccessSignature sr=a&sig=!!&se=1":             "not base64",
		"SharedAccessSignature sr=%zz&sig=AA&se=1":           "URL-encoded",
		"SharedAccessSignature sr":                           "no '='",
		"Bearer abc":                                         "not a SharedAccessSignature",
		"SharedAccessSignature " + strings.Repeat("a", 5000): "longer than",
	} {
		if _, err := Parse(tok); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%.40q) = %v, want error containing %q", tok, err, want)
		}
	}
}

func TestDeriveDeviceKey(t *testing.T) {
	// Value computed with the documented formula by an independent tool (openssl dgst -sha256 -hmac).
	group, _ := base64.StdEncoding.DecodeString("c2VjcmV0LWdyb3VwLWtleS0wMTIzNDU2Nzg5YWJjZGVm")
	got := base64.StdEncoding.EncodeToString(DeriveDeviceKey(group, "device-01"))
	if want := "imrmeYNtVE8LF8FSyQAj3EiNiL8+1rDyv1FoWpvgxi4="; got != want {
		t.Fatalf("derived key %q, want %q", got, want)
	}
}

func TestConnectionString(t *testing.T) {
	cs, err := ParseConnectionString("HostName=h.example;SharedAccessKeyName=iothubowner;SharedAccessKey=" + base64.StdEncoding.EncodeToString(key))
	if err != nil {
		t.Fatal(err)
	}
	if cs.HostName != "h.example" || cs.KeyName != "iothubowner" || string(cs.Key) != string(key) {
		t.Fatalf("%+v", cs)
	}
	again, err := ParseConnectionString(cs.String())
	if err != nil || again.String() != cs.String() {
		t.Fatalf("round trip: %v %v", again, err)
	}
	if p := PolicyConnectionString("h.example", "iothubowner", base64.StdEncoding.EncodeToString(key)); p != cs.String() {
		t.Fatalf("PolicyConnectionString: %q, want %q", p, cs.String())
	}
	for _, bad := range []string{"", "HostName=h", "HostName=h;SharedAccessKey=!!", "SharedAccessKey=AAAA;SharedAccessKeyName=x", "HostName=h;SharedAccessKey=AAAA", "junk",
		"HostName=h;SharedAccessKeyName=x;SharedAccessKey=AAAA"} { // a 3-byte key
		if _, err := ParseConnectionString(bad); err == nil {
			t.Errorf("ParseConnectionString(%q) accepted", bad)
		}
	}
}

// TestErrorsDoNotEchoKeys: a key pasted where a token or a Key=Value part
// belongs must not reach the error, which may be logged.
func TestErrorsDoNotEchoKeys(t *testing.T) {
	k := strings.TrimRight(base64.StdEncoding.EncodeToString(key), "=")
	if _, err := Parse("SharedAccessSignature " + k); err == nil || strings.Contains(err.Error(), k) {
		t.Errorf("Parse error %v", err)
	}
	if _, err := ParseConnectionString("HostName=h;DeviceId=d;" + k); err == nil || strings.Contains(err.Error(), k) {
		t.Errorf("ParseConnectionString error %v", err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add(Build(key, "a/b", "registration", time.Unix(2e9, 0)))
	f.Add("SharedAccessSignature sr=a&sig=&se=1")
	f.Add("sr=%&sig=%%&se=-1&skn=%")
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := Parse(s)
		if err == nil {
			_ = tok.Verify(time.Unix(0, 0), key)
			// A token's resource is its own, exactly and whatever the case
			// of its letters.
			upper := strings.Map(func(r rune) rune {
				if 'a' <= r && r <= 'z' {
					return r - 'a' + 'A'
				}
				return r
			}, tok.Audience)
			if !tok.AudienceIsExactly(tok.Audience) || !tok.AudienceIs(upper) {
				t.Errorf("%q is not its own resource", tok.Audience)
			}
		}
	})
}

func FuzzParseConnectionString(f *testing.F) {
	f.Add("HostName=h;DeviceId=d;SharedAccessKey=AAAA")
	f.Fuzz(func(t *testing.T, s string) { _, _ = ParseConnectionString(s) })
}

// A path in sr narrows a service token to what lies under it, segment by
// segment; a token for the host reaches everything.
func TestAuthorizeServiceScope(t *testing.T) {
	now := time.Now()
	p := NewPolicy("iothubowner", "RegistryWrite")
	key, _ := base64.StdEncoding.DecodeString(p.PrimaryKey)
	tok := func(sr string) string { return Build(key, sr, p.KeyName, now.Add(time.Minute)) }
	for _, c := range []struct {
		sr, path string
		ok       bool
	}{
		{"hub.example", "/devices/d1", true},
		{"hub.example/", "/devices/d1", true},
		{"hub.example/devices/d1", "/devices/d1", true},
		{"hub.example/devices/d1", "/devices/d1/modules/m1", true},
		{"Hub.Example/devices/d1", "/devices/d1", true},
		{"hub.example/devices/d1", "/devices/D1", false},
		{"hub.example/Devices/d1", "/devices/d1", false},
		{"hub.example/devices/d1", "/devices/d2", false},
		{"hub.example/devices/d1", "/devices/d10", false},
		{"hub.example/devices/d1", "/twins/d1", false},
		{"hub.example/devices", "/enrollments/x", false},
		{"hub.example/devices", "/devices", true},        // the twin query's resource
		{"hub.example/devices/query", "/devices", false}, // a device named "query" is not the twin query
	} {
		_, err := AuthorizeService(tok(c.sr), "hub.example", c.path, []Policy{p}, now)
		if (err == nil) != c.ok {
			t.Errorf("sr=%s for %s: %v", c.sr, c.path, err)
		}
	}
}
