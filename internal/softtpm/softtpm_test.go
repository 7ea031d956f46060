package softtpm

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/provisioning"
)

var _ provisioning.TPM = (*TPM)(nil)

func TestActivation(t *testing.T) {
	keys, err := NewKeys()
	if err != nil {
		t.Fatal(err)
	}
	dev := New(keys)
	ek, _ := dev.EndorsementKey()
	srk, _ := dev.StorageRootKey()
	// The service's parser takes both public areas as a TPM's.
	for _, pub := range [][]byte{ek, srk} {
		if _, err := attest.ParsePublic(pub); err != nil {
			t.Fatal(err)
		}
	}
	const handle = 0x81000100
	if _, err := dev.HMAC(handle, []byte("x")); !errors.Is(err, tpm2.TPMRCHandle) {
		t.Fatalf("HMAC before import: %v", err)
	}
	key := []byte("0123456789abcdef0123456789abcdef")
	blob, err := attest.ActivationBlob(ek, srk, key, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if err := dev.ImportActivationBlob(blob, handle); err != nil {
		t.Fatal(err)
	}
	got, _ := dev.HMAC(handle, []byte("data"))
	want := hmac.New(sha256.New, key)
	want.Write([]byte("data"))
	if !bytes.Equal(got, want.Sum(nil)) {
		t.Fatal("HMAC with the imported key differs")
	}

	// A blob for another device, or altered anywhere, is refused.
	other, _ := NewKeys()
	otherEK, _ := New(other).EndorsementKey()
	otherSRK, _ := New(other).StorageRootKey()
	foreign, _ := attest.ActivationBlob(otherEK, otherSRK, key, rand.Reader)
	if err := dev.ImportActivationBlob(foreign, handle); err == nil {
		t.Fatal("a blob for another TPM was imported")
	}
	for _, at := range []int{10, 300, 700, len(blob) - 20} {
		bad := bytes.Clone(blob)
		bad[at] ^= 1
		if err := dev.ImportActivationBlob(bad, handle); err == nil {
			t.Errorf("a blob altered at byte %d was imported", at)
		}
	}
	if err := dev.ImportActivationBlob(blob[:100], handle); err == nil {
		t.Error("a truncated blob was imported")
	}
}
