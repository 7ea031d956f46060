// Interop: Microsoft's Node TPM device stack, unmodified, provisions a device through
// Hatchery with TPM attestation. azure-iot-security-tpm's TpmSecurityClient (on tss.js)
// drives a software TPM (swtpm) that the Go harness starts and names in HATCHERY_SWTPM
// ("host:port" of its command channel); the device half of PROTOCOL.md §1–§3 —
// activating the challenge, importing the key, signing SAS tokens inside the TPM — is
// thus an implementation independent of Hatchery's own.
'use strict';

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');

const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Http: ProvisioningHttp } = require('azure-iot-provisioning-device-http');
const { TpmSecurityClient, TpmAuthenticationProvider } = require('azure-iot-security-tpm');
const { Registry } = require('azure-iothub');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');

const h = require('./helpers');

// The tss.js that azure-iot-security-tpm itself loads (a dependency of it, not of ours).
const tss = require(require.resolve('tss.js', { paths: [path.dirname(require.resolve('azure-iot-security-tpm'))] }));

const REGISTER_MS = 45000; // PUT, 401 challenge, activation in the TPM, PUT, polling, second import
const TEST_MS = 60000;

const info = h.loadInfo();
const swtpm = process.env.HATCHERY_SWTPM;
const skip = swtpm ? false : 'HATCHERY_SWTPM is not set: install swtpm (Debian: apt-get install swtpm) and run through `go test ./test/interop/`';
const deviceId = `interop-tpm-node-${h.uniqueSuffix()}`;

const { state, need } = h.steps();
const { call, sdk } = h;

// A tss.js TPM on swtpm's TCP command channel. swtpm accepts the simulator's
// TPM_SEND_COMMAND framing there but has no simulator platform port (its control
// channel speaks another protocol), so use tss.js's device mode for a TCP resource
// manager, which sends only framed commands; swtpm runs with startup-clear, so no
// power-on or TPM2_Startup is needed. oldTrm off skips the probe for an older,
// longer framing that swtpm would reject.
function swtpmTpm(hostPort) {
  const i = hostPort.lastIndexOf(':');
  const host = hostPort.slice(0, i);
  const port = Number(hostPort.slice(i + 1));
  const tpm = new tss.Tpm(true, host, port);
  tpm.device = new tss.TpmTcpDevice(host, port, true);
  tpm.device.oldTrm = false;
  return tpm;
}

function promised(fn) {
  return new Promise((resolve, reject) => fn((err, v) => (err ? reject(err) : resolve(v))));
}

describe('TPM attestation with azure-iot-security-tpm on swtpm', { skip }, () => {
  let security;
  let svc;
  let registry;

  before(() => {
    security = new TpmSecurityClient(undefined, swtpmTpm(swtpm));
    svc = ProvisioningServiceClient.fromConnectionString(info.provisioningServiceConnectionString);
    registry = Registry.fromConnectionString(info.hubConnectionString);
  });

  after(() => {
    if (state.auth) state.auth.stop(); // its token renewal timer would keep node running
    if (security && security._tpm) security._tpm.close();
  });

  it('reads the EK from the TPM and enrolls it with the service SDK', { timeout: TEST_MS }, async () => {
    const ek = await call('TpmSecurityClient.getEndorsementKey', () => promised((cb) => security.getEndorsementKey(cb)));
    // The SDK's own registration ID: base32 of SHA-256(EK TPM2B_PUBLIC), PROTOCOL.md §1.
    const registrationId = await call('TpmSecurityClient.getRegistrationId', () => promised((cb) => security.getRegistrationId(cb)));
    assert.match(registrationId, /^[a-z2-7]{52}$/);
    const ekB64 = Buffer.from(ek).toString('base64');
    const { responseBody: e } = await sdk('createOrUpdateIndividualEnrollment(tpm)', () =>
      svc.createOrUpdateIndividualEnrollment({
        registrationId,
        deviceId,
        attestation: { type: 'tpm', tpm: { endorsementKey: ekB64 } },
        provisioningStatus: 'enabled',
      }));
    assert.equal(e.registrationId, registrationId);
    assert.equal(e.deviceId, deviceId);
    assert.equal(e.attestation.tpm.endorsementKey, ekB64);
    state.registrationId = registrationId;
  });

  it('registers over HTTPS: activation blob, key import and SAS signing inside the TPM', { timeout: TEST_MS }, async () => {
    const registrationId = need('registrationId', 'enroll the EK');
    const client = ProvisioningDeviceClient.create(h.bareHost(info.provisioningHost), info.idScope, new ProvisioningHttp(), security);
    let result;
    try {
      result = await h.within(REGISTER_MS, `register ${registrationId}`, () => client.register());
    } catch (err) {
      if (/no answer within/.test(err.message)) throw err;
      assert.fail(`register ${registrationId}: ${h.describeError(err)}${err.tpmError ? ` (TPM: ${err.tpmError.message})` : ''}`);
    }
    // Unlike the symmetric-key flow, the TPM flow resolves with the whole operation result.
    assert.equal(result.status, 'assigned', JSON.stringify(result));
    const rs = result.registrationState;
    assert.equal(rs.status, 'assigned', JSON.stringify(rs));
    assert.equal(rs.registrationId, registrationId);
    assert.equal(rs.assignedHub, info.hubHostName);
    assert.equal(rs.deviceId, deviceId);
    state.assignedHub = rs.assignedHub;
  });

  it('the device is in the hub', { timeout: TEST_MS }, async () => {
    need('assignedHub', 'register');
    const { responseBody: d } = await sdk('Registry.get', () => registry.get(deviceId));
    assert.equal(d.deviceId, deviceId);
    assert.equal(d.status, 'enabled');
  });

  it('connects to the hub with SAS tokens signed in the TPM, sends a message and reads its twin', { timeout: TEST_MS }, async () => {
    const hub = need('assignedHub', 'register');
    state.auth = TpmAuthenticationProvider.fromTpmSecurityClient(deviceId, hub, security);
    const client = DeviceClient.fromAuthenticationProvider(state.auth, Mqtt);
    client.on('error', () => {}); // surfaced through the calls below instead
    try {
      await sdk('open over MQTT with TpmAuthenticationProvider', () => client.open());
      await sdk('client.sendEvent', () => client.sendEvent(new Message(JSON.stringify({ from: 'tpm' }))));
      const twin = await sdk('client.getTwin', () => client.getTwin());
      assert.ok(twin.properties && twin.properties.desired, `twin without desired properties: ${JSON.stringify(twin.properties)}`);
    } finally {
      await call('close device client', () => client.close()).catch(() => {});
    }
  });
});
