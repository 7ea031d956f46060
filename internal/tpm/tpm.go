// Package tpm is the device side of TPM 2.0 attestation: it reaches the TPM
// through a tpm2-tss TCTI string, provisions the endorsement and storage
// root keys, imports the activation blob of the provisioning service and
// signs with the imported identity key (shared/PROTOCOL.md §1).
package tpm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/hatchery/hatchery/internal/attest"
)

const (
	EKHandle            = 0x81010001
	SRKHandle           = 0x81000001
	DefaultAuthKeyIndex = 0x100
)

// IdentityHandle is the persistent handle of the identity (HMAC) key for
// the config's auth_key_index.
func IdentityHandle(authKeyIndex uint32) uint32 { return 0x81000000 + authKeyIndex }

// CheckAuthKeyIndex refuses an auth_key_index outside the persistent range
// (0x81000000-0x817FFFFF) or at the EK or SRK, which an identity key would
// replace, changing the device's identity.
func CheckAuthKeyIndex(i uint32) error {
	if h := IdentityHandle(i); i > 0x7FFFFF || h == EKHandle || h == SRKHandle {
		return fmt.Errorf("auth_key_index 0x%x: want 0 to 0x7fffff, other than 0x1 (the SRK) and 0x10001 (the EK)", i)
	}
	return nil
}

// maxBuffer is TPM2B_MAX_BUFFER's capacity on PC-client TPMs; longer HMAC
// input goes through a sequence.
const maxBuffer = 1024

// Device is an open TPM. Its methods are safe for concurrent use; each runs
// its TPM commands without interleaving with the others.
type Device struct {
	mu  sync.Mutex
	tpm transport.TPMCloser
}

// Open parses a tpm2-tss TCTI string ("" or "device" for /dev/tpmrm0,
// "device:PATH", "swtpm:host=H,port=P", "mssim:host=H,port=P") and connects.
func Open(tcti string) (*Device, error) {
	c, err := parseTCTI(tcti)
	if err != nil {
		return nil, err
	}
	t, err := c.open()
	if err != nil {
		return nil, err
	}
	return &Device{tpm: t}, nil
}

func (d *Device) Close() error { return d.tpm.Close() }

// EndorsementKey returns the EK's TPM2B_PUBLIC (what `tpm2_readpublic -c
// 0x81010001 -o ek.pub` writes). Like the seed script, it creates and
// persists the EK and the SRK when there is no EK yet.
func (d *Device) EndorsementKey() ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	pub, created, err := d.primary(tpm2.TPMRHEndorsement, tpm2.RSAEKTemplate, EKHandle)
	if err != nil {
		return nil, fail("endorsement key", err)
	}
	if created {
		if _, _, err := d.primary(tpm2.TPMRHOwner, tpm2.RSASRKTemplate, SRKHandle); err != nil {
			return nil, fail("storage root key", err)
		}
	}
	return pub, nil
}

// EKCertIndex is the NV index of the RSA EK certificate (TCG EK Credential
// Profile), where TPM makers store the certificate they issued.
const EKCertIndex = 0x01c00002

// EndorsementCertificate returns the EK certificate (DER) its maker stored
// in NV, without the padding or TCG header makers put around it, or nil
// when there is none.
func (d *Device) EndorsementCertificate() ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	pub, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(EKCertIndex)}.Execute(d.tpm)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return nil, nil
	}
	if err != nil {
		return nil, fail("reading the EK certificate's NV index", err)
	}
	nv, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, fail("reading the EK certificate's NV index", err)
	}
	index := tpm2.AuthHandle{Handle: tpm2.TPMHandle(EKCertIndex), Name: pub.NVName, Auth: tpm2.PasswordAuth(nil)}
	var cert []byte
	for off := uint16(0); off < nv.DataSize; {
		n := min(nv.DataSize-off, maxNVRead)
		rsp, err := tpm2.NVRead{AuthHandle: index, NVIndex: tpm2.NamedHandle{Handle: index.Handle, Name: index.Name}, Size: n, Offset: off}.Execute(d.tpm)
		if err != nil {
			return nil, fail("reading the EK certificate", err)
		}
		cert = append(cert, rsp.Data.Buffer...)
		off += uint16(len(rsp.Data.Buffer))
		if len(rsp.Data.Buffer) == 0 {
			break
		}
	}
	// Contents that are no certificate go as they are: the service says
	// what is wrong with them, and an individual enrollment needs none.
	if der, err := attest.EKCertificateDER(cert); err == nil {
		return der, nil
	}
	return cert, nil
}

// maxNVRead is a size every TPM reads in one TPM2_NV_Read (MAX_NV_BUFFER_SIZE
// is at least 512).
const maxNVRead = 512

// StorageRootKey returns the SRK's TPM2B_PUBLIC, creating and persisting the
// SRK under the owner hierarchy when absent.
func (d *Device) StorageRootKey() ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	pub, _, err := d.primary(tpm2.TPMRHOwner, tpm2.RSASRKTemplate, SRKHandle)
	return pub, fail("storage root key", err)
}

// primary returns the public area of the key persisted at handle, first
// creating it from template in hierarchy when the handle is empty, and
// whether it did. go-tpm's templates are the TCG ones of PROTOCOL.md §1
// (RSA-2048, AES-128-CFB, 256 zero bytes of unique), which tpm2_createek
// uses too: the same TPM gives the same EK either way.
func (d *Device) primary(hierarchy tpm2.TPMHandle, template tpm2.TPMTPublic, handle uint32) ([]byte, bool, error) {
	pub, _, err := d.readPublic(handle)
	if !errors.Is(err, tpm2.TPMRCHandle) {
		return pub, false, err
	}
	created, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: hierarchy, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(template),
	}.Execute(d.tpm)
	if err != nil {
		return nil, false, fmt.Errorf("creating the key: %w", err)
	}
	defer d.flush(created.ObjectHandle)
	if err := d.evictControl(tpm2.NamedHandle{Handle: created.ObjectHandle, Name: created.Name}, handle); err != nil {
		return nil, false, err
	}
	return sized(created.OutPublic.Bytes()), true, nil
}

// readPublic returns the TPM2B_PUBLIC and Name of the object at handle.
func (d *Device) readPublic(handle uint32) ([]byte, tpm2.TPM2BName, error) {
	rsp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(handle)}.Execute(d.tpm)
	if err != nil {
		return nil, tpm2.TPM2BName{}, fmt.Errorf("reading the public key at 0x%08x: %w", handle, err)
	}
	return sized(rsp.OutPublic.Bytes()), rsp.Name, nil
}

// evictControl makes the loaded object obj persistent at handle or, when
// obj is the persistent object at handle, evicts it.
func (d *Device) evictControl(obj tpm2.NamedHandle, handle uint32) error {
	_, err := tpm2.EvictControl{
		Auth:             tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		ObjectHandle:     obj,
		PersistentHandle: tpm2.TPMHandle(handle),
	}.Execute(d.tpm)
	if err != nil {
		return fmt.Errorf("TPM2_EvictControl at 0x%08x: %w", handle, err)
	}
	return nil
}

// flush frees a transient object; a failure only costs a slot until the
// next TPM reset, so it is ignored.
func (d *Device) flush(h tpm2.TPMHandle) {
	tpm2.FlushContext{FlushHandle: h}.Execute(d.tpm)
}

// ImportActivationBlob activates the provisioning service's challenge
// (PROTOCOL.md §1 "Activating the challenge", blob layout §2): it recovers
// the inner wrap key with the EK and SRK, imports the HMAC key under the
// SRK and persists it at handle, replacing what was there.
func (d *Device) ImportActivationBlob(blob []byte, handle uint32) error {
	// Guard the keys this package provisions: evicting one would change
	// the device's identity for good.
	if handle == EKHandle || handle == SRKHandle || handle>>24 != 0x81 {
		return fmt.Errorf("identity key handle 0x%08x: want a persistent handle 0x81xxxxxx other than the EK's and the SRK's", handle)
	}
	p, err := splitBlob(blob)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return fail("activating the challenge", d.importBlob(p, handle))
}

func (d *Device) importBlob(p blobParts, handle uint32) error {
	_, ekName, err := d.readPublic(EKHandle)
	if err != nil {
		return err
	}
	_, srkName, err := d.readPublic(SRKHandle)
	if err != nil {
		return err
	}
	srk := tpm2.AuthHandle{Handle: SRKHandle, Name: srkName, Auth: tpm2.PasswordAuth(nil)}
	// The EK's authPolicy is PolicySecret(TPM_RH_ENDORSEMENT). The session
	// is flushed whatever happens: one left behind by a failed policy (an
	// endorsement hierarchy with a password) stays in the TPM, and three
	// fill its session memory until it is reset.
	policy, flush, err := tpm2.PolicySession(d.tpm, tpm2.TPMAlgSHA256, 16)
	if err != nil {
		return fmt.Errorf("starting the EK's policy session: %w", err)
	}
	defer flush()
	_, err = tpm2.PolicySecret{
		AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		PolicySession: policy.Handle(),
		NonceTPM:      policy.NonceTPM(),
	}.Execute(d.tpm)
	if err != nil {
		return fmt.Errorf("TPM2_PolicySecret for the EK (an endorsement hierarchy with a password is not supported: clear it with tpm2_changeauth -c e -p OLD): %w", err)
	}
	act, err := tpm2.ActivateCredential{
		ActivateHandle: srk,
		KeyHandle:      tpm2.AuthHandle{Handle: EKHandle, Name: ekName, Auth: policy},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: p.credential},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: p.secret},
	}.Execute(d.tpm)
	if err != nil {
		return fmt.Errorf("TPM2_ActivateCredential (was the blob made for this TPM's EK and SRK?): %w", err)
	}
	public := tpm2.BytesAs2B[tpm2.TPMTPublic](p.public)
	imp, err := tpm2.Import{
		ParentHandle:  srk,
		EncryptionKey: tpm2.TPM2BData{Buffer: act.CertInfo.Buffer},
		ObjectPublic:  public,
		Duplicate:     tpm2.TPM2BPrivate{Buffer: p.duplicate},
		InSymSeed:     tpm2.TPM2BEncryptedSecret{Buffer: p.seed},
		Symmetric: tpm2.TPMTSymDef{
			Algorithm: tpm2.TPMAlgAES,
			KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(128)),
			Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
		},
	}.Execute(d.tpm)
	if err != nil {
		return fmt.Errorf("TPM2_Import: %w", err)
	}
	loaded, err := tpm2.Load{ParentHandle: srk, InPrivate: imp.OutPrivate, InPublic: public}.Execute(d.tpm)
	if err != nil {
		return fmt.Errorf("TPM2_Load: %w", err)
	}
	defer d.flush(loaded.ObjectHandle)
	// Evict the old key, if any: the handle is empty on first provisioning.
	if _, name, err := d.readPublic(handle); err == nil {
		d.evictControl(tpm2.NamedHandle{Handle: tpm2.TPMHandle(handle), Name: name}, handle)
	}
	return d.evictControl(tpm2.NamedHandle{Handle: loaded.ObjectHandle, Name: loaded.Name}, handle)
}

// ErrNoIdentityKey says the TPM holds no key at the identity handle: the
// device has not been provisioned, or the TPM was cleared since, taking
// the key with its storage hierarchy. Provisioning again imports a new one.
var ErrNoIdentityKey = errors.New("the TPM holds no identity key")

// HMAC returns TPM2_HMAC(SHA-256) of data with the persistent key at handle.
// Data longer than one TPM buffer (1024 bytes) goes through an HMAC sequence.
func (d *Device) HMAC(handle uint32, data []byte) ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	sum, err := d.hmac(handle, data)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return nil, fmt.Errorf("%w at 0x%08x: the device has not been provisioned, or the TPM was cleared since (%w)", ErrNoIdentityKey, handle, err)
	}
	return sum, fail(fmt.Sprintf("signing with the identity key at 0x%08x", handle), err)
}

func (d *Device) hmac(handle uint32, data []byte) ([]byte, error) {
	_, name, err := d.readPublic(handle)
	if err != nil {
		return nil, err
	}
	key := tpm2.AuthHandle{Handle: tpm2.TPMHandle(handle), Name: name, Auth: tpm2.PasswordAuth(nil)}
	if len(data) <= maxBuffer {
		rsp, err := tpm2.Hmac{Handle: key, Buffer: tpm2.TPM2BMaxBuffer{Buffer: data}, HashAlg: tpm2.TPMAlgSHA256}.Execute(d.tpm)
		if err != nil {
			return nil, fmt.Errorf("TPM2_HMAC: %w", err)
		}
		return rsp.OutHMAC.Buffer, nil
	}
	start, err := tpm2.HmacStart{Handle: key, HashAlg: tpm2.TPMAlgSHA256}.Execute(d.tpm)
	if err != nil {
		return nil, fmt.Errorf("TPM2_HMAC_Start: %w", err)
	}
	seq := tpm2.AuthHandle{Handle: start.SequenceHandle, Auth: tpm2.PasswordAuth(nil)}
	for len(data) > maxBuffer {
		if _, err := (tpm2.SequenceUpdate{SequenceHandle: seq, Buffer: tpm2.TPM2BMaxBuffer{Buffer: data[:maxBuffer]}}).Execute(d.tpm); err != nil {
			d.flush(start.SequenceHandle)
			return nil, fmt.Errorf("TPM2_SequenceUpdate: %w", err)
		}
		data = data[maxBuffer:]
	}
	rsp, err := tpm2.SequenceComplete{SequenceHandle: seq, Buffer: tpm2.TPM2BMaxBuffer{Buffer: data}, Hierarchy: tpm2.TPMRHNull}.Execute(d.tpm)
	if err != nil {
		d.flush(start.SequenceHandle)
		return nil, fmt.Errorf("TPM2_SequenceComplete: %w", err)
	}
	return rsp.Result.Buffer, nil
}

// blobParts are the parts A..E of an activation blob (PROTOCOL.md §2),
// without their size prefixes except public, which TPM2_Import takes as the
// TPMT_PUBLIC inside E.
type blobParts struct {
	credential, secret, duplicate, seed, public []byte
}

// splitBlob splits an activation blob into its TPM2B parts. The trailing
// TPM2B_DATA (F) is optional here: devices must accept what any service sends.
func splitBlob(blob []byte) (blobParts, error) {
	p, err := attest.SplitBlob(blob)
	return blobParts{p[0], p[1], p[2], p[3], p[4]}, err
}

// sized prefixes b with its u16 size, making a TPM2B.
func sized(b []byte) []byte {
	return append(binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(b)), uint16(len(b))), b...)
}

// fail says what failed, and names the dictionary-attack lockout, which a
// user cannot guess from the TPM's answer alone.
func fail(what string, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, tpm2.TPMRCLockout):
		return fmt.Errorf("%s: the TPM is in dictionary-attack lockout (TPM_RC_LOCKOUT) after too many failed authorizations: "+
			"wait for the lockout to expire, or clear it with `tpm2_dictionarylockout --clear-lockout`: %w", what, err)
	case errors.Is(err, tpm2.TPMRCObjectMemory), errors.Is(err, tpm2.TPMRCSessionMemory), errors.Is(err, tpm2.TPMRCMemory):
		// Only without a resource manager do other programs' objects stay.
		return fmt.Errorf("%s: the TPM has no room to load another object or session: another program left its own loaded "+
			"(/dev/tpmrm0 flushes a program's objects when it exits; over /dev/tpm0 or a simulator, "+
			"`tpm2_flushcontext --transient-object` and `tpm2_flushcontext --loaded-session` free them): %w", what, err)
	default:
		return fmt.Errorf("%s: %w", what, err)
	}
}
