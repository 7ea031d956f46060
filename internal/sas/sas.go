// Package sas builds, parses and verifies the shared access signature tokens
// and connection strings of the Azure IoT protocols.
package sas

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"
)

const prefix = "SharedAccessSignature "

// Token is a parsed SAS token. RawAudience is the `sr` value exactly as it
// appeared in the token: that text, not its decoded form, is what clients sign.
type Token struct {
	RawAudience string
	Audience    string // URL-decoded sr
	Signature   []byte
	Expiry      time.Time
	KeyName     string
}

// Parse reads "SharedAccessSignature sr=...&sig=...&se=...[&skn=...]" in any
// field order. The prefix is optional, as some clients omit it.
func Parse(s string) (*Token, error) {
	s = strings.TrimSpace(s)
	if len(s) > 4096 {
		return nil, errors.New("SAS token is longer than 4096 characters")
	}
	if strings.HasPrefix(s, prefix) {
		s = s[len(prefix):]
	} else if strings.HasPrefix(strings.ToLower(s), "bearer ") || strings.HasPrefix(strings.ToLower(s), "basic ") {
		return nil, errors.New("authorization is not a SharedAccessSignature token")
	}
	t := &Token{}
	var haveSig, haveSe, haveSr bool
	for i, field := range strings.Split(s, "&") {
		k, v, ok := strings.Cut(field, "=")
		if !ok { // not quoted: it may be a key sent in the token's place
			return nil, fmt.Errorf("SAS token field %d has no '=': use sr=…&sig=…&se=…", i+1)
		}
		switch k {
		case "sr":
			dec, err := url.PathUnescape(v)
			if err != nil {
				return nil, fmt.Errorf("SAS token: sr is not URL-encoded correctly: %v", err)
			}
			t.RawAudience, t.Audience, haveSr = v, dec, true
		case "sig":
			dec, err := url.PathUnescape(v)
			if err != nil {
				return nil, fmt.Errorf("SAS token: sig is not URL-encoded correctly: %v", err)
			}
			sig, err := base64.StdEncoding.DecodeString(dec)
			if err != nil {
				return nil, fmt.Errorf("SAS token: sig is not base64: %v", err)
			}
			t.Signature, haveSig = sig, true
		case "se":
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n <= 0 {
				return nil, fmt.Errorf("SAS token: se %q is not a Unix time in seconds", v)
			}
			t.Expiry, haveSe = time.Unix(n, 0), true
		case "skn":
			dec, err := url.PathUnescape(v)
			if err != nil {
				return nil, fmt.Errorf("SAS token: skn is not URL-encoded correctly: %v", err)
			}
			t.KeyName = dec
		}
	}
	switch {
	case !haveSr:
		return nil, errors.New("SAS token has no sr (the resource it is for)")
	case !haveSig:
		return nil, errors.New("SAS token has no sig (the signature)")
	case !haveSe:
		return nil, errors.New("SAS token has no se (its expiry time)")
	}
	return t, nil
}

// Sign returns the HMAC-SHA-256 of "audience\nexpiry" under key.
func Sign(key []byte, audience string, expiry int64) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(audience))
	m.Write([]byte{'\n'})
	m.Write([]byte(strconv.FormatInt(expiry, 10)))
	return m.Sum(nil)
}

// Build makes a token for audience, valid until expiry, signed with key, in
// the encoding the Azure SDKs use (sr and sig URL-encoded once).
func Build(key []byte, audience, keyName string, expiry time.Time) string {
	tok, _ := BuildSigned(func(data []byte) ([]byte, error) {
		m := hmac.New(sha256.New, key)
		m.Write(data)
		return m.Sum(nil), nil
	}, audience, keyName, expiry)
	return tok
}

// BuildSigned is Build with the HMAC computed elsewhere, e.g. inside a TPM
// that holds the key.
func BuildSigned(sign func(data []byte) ([]byte, error), audience, keyName string, expiry time.Time) (string, error) {
	sr := url.QueryEscape(audience)
	se := strconv.FormatInt(expiry.Unix(), 10)
	sig, err := sign([]byte(sr + "\n" + se))
	if err != nil {
		return "", fmt.Errorf("signing the SAS token: %w", err)
	}
	tok := prefix + "sr=" + sr + "&sig=" + url.QueryEscape(base64.StdEncoding.EncodeToString(sig)) + "&se=" + se
	if keyName != "" {
		tok += "&skn=" + url.QueryEscape(keyName)
	}
	return tok, nil
}

// Errors a verifier can tell apart, so callers can answer precisely.
var (
	ErrExpired   = errors.New("SAS token has expired")
	ErrAudience  = errors.New("SAS token is for another resource")
	ErrSignature = errors.New("SAS token signature does not match")
)

// Expired is ErrExpired, saying since when, if the token has expired by now.
func (t *Token) Expired(now time.Time) error {
	if !now.Before(t.Expiry) {
		return fmt.Errorf("%w (se=%d is %s ago): sign a new one", ErrExpired, t.Expiry.Unix(), now.Sub(t.Expiry).Round(time.Second))
	}
	return nil
}

// Verify checks expiry, then the signature under each key (primary, then
// secondary), comparing in constant time. Clients sign the sr text as they
// encoded it; a few sign the decoded form, which is accepted too.
func (t *Token) Verify(now time.Time, keys ...[]byte) error {
	if err := t.Expired(now); err != nil {
		return err
	}
	for _, key := range keys {
		if len(key) == 0 {
			continue
		}
		if hmac.Equal(Sign(key, t.RawAudience, t.Expiry.Unix()), t.Signature) ||
			(t.Audience != t.RawAudience && hmac.Equal(Sign(key, t.Audience, t.Expiry.Unix()), t.Signature)) {
			return nil
		}
	}
	return ErrSignature
}

// AudienceIs reports whether the token's resource is want, comparing
// case-insensitively after URL-decoding and ignoring a trailing slash and a
// leading scheme, as clients differ in all three (Azure's documentation has
// them lower-case the whole resource URI).
func (t *Token) AudienceIs(want string) bool {
	wantHost, wantPath := splitResource(want)
	return t.audienceMatches(func(aud string) bool {
		host, path := splitResource(aud)
		return host == wantHost && strings.EqualFold(path, wantPath)
	})
}

// AudienceIsExactly is AudienceIs with the path compared exactly: for a key
// that signs for several identities (a device's, for its modules), the path
// is all that tells them apart, and IDs may differ by case alone.
func (t *Token) AudienceIsExactly(want string) bool {
	return t.audienceMatches(func(aud string) bool { return SameResource(aud, want) })
}

// audienceMatches tries the decoded sr, then that decoded once more: the
// C# SDK URL-encodes the device and module IDs in the resource and then the
// whole resource again, and Azure accepts both forms. The signature covers
// the sr as sent either way.
func (t *Token) audienceMatches(match func(aud string) bool) bool {
	if match(t.Audience) {
		return true
	}
	twice, err := url.PathUnescape(t.Audience)
	return err == nil && twice != t.Audience && match(twice)
}

// SameResource reports whether two resource URIs name the same resource:
// hosts compared case-insensitively, paths exactly, a scheme and slashes
// around the path ignored.
func SameResource(a, b string) bool {
	hostA, pathA := splitResource(a)
	hostB, pathB := splitResource(b)
	return hostA == hostB && pathA == pathB
}

// splitResource splits a resource URI into its host (lower-cased, without a
// scheme) and its path (without the slashes around it).
func splitResource(s string) (host, path string) {
	s = strings.TrimSpace(s)
	for _, scheme := range []string{"https://", "amqps://"} {
		if len(s) >= len(scheme) && strings.EqualFold(s[:len(scheme)], scheme) {
			s = s[len(scheme):]
		}
	}
	host, path, _ = strings.Cut(s, "/")
	return strings.ToLower(host), strings.Trim(path, "/")
}

// DeriveDeviceKey derives the key of a device in a symmetric-key enrollment
// group: HMAC-SHA-256(groupKey, registrationId).
func DeriveDeviceKey(groupKey []byte, registrationID string) []byte {
	m := hmac.New(sha256.New, groupKey)
	m.Write([]byte(registrationID))
	return m.Sum(nil)
}
