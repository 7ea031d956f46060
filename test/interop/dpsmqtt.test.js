// Interop: device registration over MQTT (port 8883, the transport the Python and
// Embedded C SDKs use) with azure-iot-provisioning-device + -mqtt and
// azure-iot-security-symmetric-key, then the provisioned devices connect to the hub with
// azure-iot-device-mqtt on the same port. Run through `go test ./test/interop/`
// (see interop_test.go).
//
// The sections run in order and share state.
'use strict';

const { describe, it, before } = require('node:test');
const assert = require('node:assert/strict');

const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Mqtt: ProvisioningMqtt } = require('azure-iot-provisioning-device-mqtt');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const { Mqtt: DeviceMqtt } = require('azure-iot-device-mqtt');

const h = require('./helpers');

const REGISTER_MS = 45000; // a whole registration (connect, PUT, polls)
const TEST_MS = 60000;

const info = h.loadInfo();
const suffix = h.uniqueSuffix();

const individualId = `interop-mqtt-individual-${suffix}`;
const individualDeviceId = `interop-mqtt-device-${suffix}`;
const groupId = `interop-mqtt-group-${suffix}`;
const groupMemberId = `interop-mqtt-member-${suffix}`;

const individualKeys = { primaryKey: h.randomKey(), secondaryKey: h.randomKey() };
const groupKeys = { primaryKey: h.randomKey(64), secondaryKey: h.randomKey(64) };

// Filled as the tests go.
const { state, need } = h.steps();
const { call, sdk } = h;

let svc;

before(() => {
  svc = ProvisioningServiceClient.fromConnectionString(info.provisioningServiceConnectionString);
});

function register(registrationId, key, payload) {
  const security = new SymmetricKeySecurityClient(registrationId, key);
  const client = ProvisioningDeviceClient.create(h.bareHost(info.provisioningHost), info.idScope, new ProvisioningMqtt(), security);
  if (payload !== undefined) client.setProvisioningPayload(payload);
  return h.within(REGISTER_MS, `register ${registrationId} over MQTT`, () => client.register());
}

async function mustRegister(registrationId, key, payload) {
  try {
    return await register(registrationId, key, payload);
  } catch (err) {
    if (err instanceof assert.AssertionError || /no answer within/.test(err.message)) throw err;
    assert.fail(`register ${registrationId} over MQTT: ${h.describeError(err)}`);
  }
}

// The provisioned device on the assigned hub, as a device application does it.
async function useHub(result, key) {
  const cs = `HostName=${result.assignedHub};DeviceId=${result.deviceId};SharedAccessKey=${key}`;
  const client = DeviceClient.fromConnectionString(cs, DeviceMqtt);
  client.on('error', () => {}); // surfaced through the calls below instead
  try {
    await sdk(`open ${result.deviceId} on ${result.assignedHub} over MQTT`, () => client.open());
    await sdk('sendEvent', () => client.sendEvent(new Message(JSON.stringify({ provisionedOver: 'mqtt' }))));
    const twin = await sdk('getTwin', () => client.getTwin());
    assert.ok(twin.properties && twin.properties.reported, `twin without reported properties: ${JSON.stringify(twin.properties)}`);
  } finally {
    try {
      await call('close device client', () => client.close());
    } catch {
      // the test already failed or the connection is gone
    }
  }
}

describe('enrollments for MQTT registration', () => {
  it('creates a symmetric-key individual enrollment and a symmetric-key group', { timeout: TEST_MS }, async () => {
    const { responseBody: e } = await sdk('createOrUpdateIndividualEnrollment', () =>
      svc.createOrUpdateIndividualEnrollment({
        registrationId: individualId,
        deviceId: individualDeviceId,
        attestation: { type: 'symmetricKey', symmetricKey: individualKeys },
        provisioningStatus: 'enabled',
      }));
    assert.equal(e.registrationId, individualId);
    state.individual = e;

    const { responseBody: g } = await sdk('createOrUpdateEnrollmentGroup', () =>
      svc.createOrUpdateEnrollmentGroup({
        enrollmentGroupId: groupId,
        attestation: { type: 'symmetricKey', symmetricKey: groupKeys },
        provisioningStatus: 'enabled',
      }));
    assert.equal(g.enrollmentGroupId, groupId);
    state.group = g;
  });
});

describe('registration through azure-iot-provisioning-device + -mqtt + azure-iot-security-symmetric-key', () => {
  it('provisions the individual enrollment, then the device uses the hub', { timeout: TEST_MS }, async () => {
    need('individual', 'create individual enrollment');
    const payload = { transport: 'mqtt', nested: { n: 7, list: ['a', null] } };
    const result = await mustRegister(individualId, individualKeys.primaryKey, payload);
    assert.equal(result.registrationId, individualId);
    assert.equal(result.status, 'assigned');
    assert.equal(result.assignedHub, info.hubHostName);
    assert.equal(result.deviceId, individualDeviceId);
    assert.equal(result.payload, undefined, 'only a custom allocation webhook\'s payload comes back');
    await useHub(result, individualKeys.primaryKey);
  });

  it('provisions a group member with its derived key, then the device uses the hub', { timeout: TEST_MS }, async () => {
    need('group', 'create enrollment group');
    const key = h.deriveDeviceKey(groupKeys.primaryKey, groupMemberId);
    const result = await mustRegister(groupMemberId, key);
    assert.equal(result.registrationId, groupMemberId);
    assert.equal(result.status, 'assigned');
    assert.equal(result.assignedHub, info.hubHostName);
    assert.equal(result.deviceId, groupMemberId, 'a group device without a deviceId gets its registration ID');
    await useHub(result, key);

    const { responseBody: r } = await sdk('getDeviceRegistrationState(group member)', () => svc.getDeviceRegistrationState(groupMemberId));
    assert.equal(r.status, 'assigned');
    assert.equal(r.deviceId, groupMemberId);
  });

  it('refuses a wrong key at CONNECT ("not authorized"), not with a hang', { timeout: TEST_MS }, async () => {
    need('individual', 'create individual enrollment');
    for (const [regId, key, what] of [
      [individualId, h.randomKey(), 'individual enrollment, random key'],
      [groupMemberId, groupKeys.primaryKey, 'group member signing with the group key itself'],
    ]) {
      const err = await h.rejection(register(regId, key), what);
      assert.ok(!/no answer within/.test(err.message), `${what}: ${err.message}`);
      // mqtt.js reports CONNACK 5 as "Connection refused: Not authorized" with code 5.
      assert.ok(err.code === 5 || /Not authorized/i.test(err.message), `${what}: ${h.describeError(err)} (code ${err.code})`);
    }
  });
});
