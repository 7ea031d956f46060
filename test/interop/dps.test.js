// Interop: the official Azure IoT Node.js SDKs, unmodified, against Hatchery's
// provisioning service and hub. Run through `go test ./test/interop/` (see interop_test.go).
//
// The sections run in order and share state: enrollments are created with the service
// SDK, devices register with the device SDK, the hub registry is read with the hub SDK.
'use strict';

const { describe, it, before } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');

const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Http: ProvisioningHttp } = require('azure-iot-provisioning-device-http');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { Registry } = require('azure-iothub');

const h = require('./helpers');

const REGISTER_MS = 45000; // a whole device registration (PUT + polling)
const TEST_MS = 60000;

const info = h.loadInfo();
const suffix = h.uniqueSuffix();
// A real TPM2B_PUBLIC of an RSA EK, made with swtpm + `tpm2_createek -c 0x81010001 -G rsa -u ek.pub`.
const ekB64 = fs.readFileSync(path.join(__dirname, 'testdata', 'ek.b64'), 'utf8').trim();

const tpmId = `interop-tpm-${suffix}`;
const edgeId = `interop-edge-${suffix}`;
const edgeDeviceId = `interop-edge-device-${suffix}`;
const groupId = `interop-group-${suffix}`;
const groupDeviceRegId = `interop-group-member-${suffix}`;

const edgeKeys = { primaryKey: h.randomKey(), secondaryKey: h.randomKey() };
const groupKeys = { primaryKey: h.randomKey(64), secondaryKey: h.randomKey(64) };
const edgeTagsInitial = { environment: 'interop', site: { building: 7, floor: '2' } };
const edgeTags = { environment: 'interop', site: { building: 7, floor: '3' }, ring: 'canary' };
const edgeDesired = { telemetryInterval: 30 };
const groupTags = { fleet: 'group-derived', region: 'lab' };

// Filled as the tests go.
const { state, need } = h.steps();
const { call } = h;

let svc;
let registry;

before(() => {
  svc = ProvisioningServiceClient.fromConnectionString(info.provisioningServiceConnectionString);
  registry = Registry.fromConnectionString(info.hubConnectionString);
});

async function mustRefuse(what, fn, expectedStatus) {
  const err = await h.rejection(call(what, fn), what);
  assert.ok(!/no answer within/.test(err.message), `${what}: ${err.message}`);
  assert.equal(h.statusOf(err), expectedStatus, `${what}: expected HTTP ${expectedStatus}, got ${h.describeError(err)}`);
  return err;
}

function register(registrationId, key, payload) {
  const security = new SymmetricKeySecurityClient(registrationId, key);
  const client = ProvisioningDeviceClient.create(h.bareHost(info.provisioningHost), info.idScope, new ProvisioningHttp(), security);
  if (payload !== undefined) client.setProvisioningPayload(payload);
  return h.within(REGISTER_MS, `register ${registrationId}`, () => client.register());
}

function assertDate(value, what) {
  assert.ok(typeof value === 'string' && !Number.isNaN(Date.parse(value)), `${what}: not a date: ${JSON.stringify(value)}`);
}

describe('enrollments through azure-iot-provisioning-service', () => {
  it('creates a TPM individual enrollment', { timeout: TEST_MS }, async () => {
    const { responseBody: e } = await call('createOrUpdateIndividualEnrollment(tpm)', () =>
      svc.createOrUpdateIndividualEnrollment({
        registrationId: tpmId,
        attestation: { type: 'tpm', tpm: { endorsementKey: ekB64 } },
        provisioningStatus: 'enabled',
      }));
    assert.equal(e.registrationId, tpmId);
    assert.equal(e.attestation.type, 'tpm');
    assert.equal(e.attestation.tpm.endorsementKey, ekB64);
    assert.equal(e.provisioningStatus, 'enabled');
    assert.ok(e.etag, `no etag in ${JSON.stringify(e)}`);
    assertDate(e.createdDateTimeUtc, 'createdDateTimeUtc');
    assertDate(e.lastUpdatedDateTimeUtc, 'lastUpdatedDateTimeUtc');
    state.tpm = e;
  });

  it('gets the TPM enrollment and its attestation mechanism', { timeout: TEST_MS }, async () => {
    const created = need('tpm', 'create TPM enrollment');
    const { responseBody: e } = await call('getIndividualEnrollment(tpm)', () => svc.getIndividualEnrollment(tpmId));
    assert.equal(e.registrationId, tpmId);
    assert.equal(e.attestation.type, 'tpm');
    assert.equal(e.attestation.tpm.endorsementKey, ekB64);
    assert.equal(e.etag, created.etag);

    const { responseBody: m } = await call('getIndividualEnrollmentAttestationMechanism(tpm)', () =>
      svc.getIndividualEnrollmentAttestationMechanism(tpmId));
    assert.equal(m.type, 'tpm');
    assert.equal(m.tpm.endorsementKey, ekB64);
  });

  it('creates a symmetric-key individual enrollment with iotEdge and an initial twin', { timeout: TEST_MS }, async () => {
    const { responseBody: e } = await call('createOrUpdateIndividualEnrollment(symmetricKey)', () =>
      svc.createOrUpdateIndividualEnrollment({
        registrationId: edgeId,
        deviceId: edgeDeviceId,
        attestation: { type: 'symmetricKey', symmetricKey: edgeKeys },
        capabilities: { iotEdge: true },
        initialTwin: { tags: edgeTagsInitial, properties: { desired: edgeDesired } },
        provisioningStatus: 'enabled',
      }));
    assert.equal(e.registrationId, edgeId);
    assert.equal(e.deviceId, edgeDeviceId);
    assert.equal(e.attestation.type, 'symmetricKey');
    assert.equal(e.attestation.symmetricKey.primaryKey, edgeKeys.primaryKey);
    assert.equal(e.attestation.symmetricKey.secondaryKey, edgeKeys.secondaryKey);
    assert.equal(e.capabilities.iotEdge, true);
    assert.deepEqual(e.initialTwin.tags, edgeTagsInitial);
    assert.equal(e.initialTwin.properties.desired.telemetryInterval, edgeDesired.telemetryInterval);
    assert.ok(e.etag, `no etag in ${JSON.stringify(e)}`);
    state.edgeCreated = e;
  });

  it('updates the enrollment with its etag, and refuses the stale etag', { timeout: TEST_MS }, async () => {
    need('edgeCreated', 'create symmetric-key enrollment');
    const { responseBody: current } = await call('getIndividualEnrollment(edge)', () => svc.getIndividualEnrollment(edgeId));
    assert.equal(current.etag, state.edgeCreated.etag);
    assert.equal(current.attestation.symmetricKey.primaryKey, undefined, 'a read shows no keys');
    const { responseBody: mech } = await call('getIndividualEnrollmentAttestationMechanism(edge)', () =>
      svc.getIndividualEnrollmentAttestationMechanism(edgeId));
    assert.equal(mech.symmetricKey.primaryKey, edgeKeys.primaryKey);
    const staleEtag = current.etag;

    const update = JSON.parse(JSON.stringify(current));
    update.initialTwin.tags = edgeTags;
    const { responseBody: updated } = await call('createOrUpdateIndividualEnrollment(edge, If-Match)', () =>
      svc.createOrUpdateIndividualEnrollment(update));
    assert.deepEqual(updated.initialTwin.tags, edgeTags);
    assert.equal(updated.initialTwin.properties.desired.telemetryInterval, edgeDesired.telemetryInterval);
    assert.equal(updated.capabilities.iotEdge, true);
    assert.equal(updated.attestation.symmetricKey.primaryKey, edgeKeys.primaryKey);
    assert.ok(updated.etag && updated.etag !== staleEtag, `etag did not change on update: ${staleEtag} -> ${updated.etag}`);

    const stale = JSON.parse(JSON.stringify(current));
    stale.initialTwin.tags = { environment: 'must-not-be-stored' };
    await mustRefuse('createOrUpdateIndividualEnrollment with a stale etag', () =>
      svc.createOrUpdateIndividualEnrollment(stale), 412);
    delete stale.etag;
    await mustRefuse('createOrUpdateIndividualEnrollment of an existing enrollment without an etag', () =>
      svc.createOrUpdateIndividualEnrollment(stale), 409);

    const { responseBody: after } = await call('getIndividualEnrollment(edge)', () => svc.getIndividualEnrollment(edgeId));
    assert.deepEqual(after.initialTwin.tags, edgeTags, 'a refused update changed the enrollment');
    assert.equal(after.etag, updated.etag);
    state.edge = after;
  });

  it('creates and gets a symmetric-key enrollment group', { timeout: TEST_MS }, async () => {
    const { responseBody: g } = await call('createOrUpdateEnrollmentGroup', () =>
      svc.createOrUpdateEnrollmentGroup({
        enrollmentGroupId: groupId,
        attestation: { type: 'symmetricKey', symmetricKey: groupKeys },
        initialTwin: { tags: groupTags },
        provisioningStatus: 'enabled',
      }));
    assert.equal(g.enrollmentGroupId, groupId);
    assert.equal(g.attestation.type, 'symmetricKey');
    assert.equal(g.attestation.symmetricKey.primaryKey, groupKeys.primaryKey);
    assert.ok(g.etag, `no etag in ${JSON.stringify(g)}`);

    const { responseBody: got } = await call('getEnrollmentGroup', () => svc.getEnrollmentGroup(groupId));
    assert.equal(got.enrollmentGroupId, groupId);
    assert.equal(got.attestation.type, 'symmetricKey');
    assert.equal(got.attestation.symmetricKey.primaryKey, undefined, 'a read shows no keys: the attestation mechanism does');
    assert.deepEqual(got.initialTwin.tags, groupTags);
    assert.equal(got.etag, g.etag);
    state.group = got;

    // The SDK posts to /enrollmentgroups/… in lower case, which the hosted service accepts too.
    const { responseBody: mech } = await call('getEnrollmentGroupAttestationMechanism',
      () => svc.getEnrollmentGroupAttestationMechanism(groupId));
    assert.equal(mech.type, 'symmetricKey');
    assert.equal(mech.symmetricKey.primaryKey, groupKeys.primaryKey);
  });

  it('queries individual enrollments page by page', { timeout: TEST_MS }, async () => {
    need('tpm', 'create TPM enrollment');
    need('edge', 'create symmetric-key enrollment');
    const query = svc.createIndividualEnrollmentQuery({ query: '*' }, 1);
    const seen = new Map();
    let pages = 0;
    while (query.hasMoreResults) {
      assert.ok(pages < 1000, `query never ends (last continuation token ${JSON.stringify(query.continuationToken)})`);
      // In promise form Query.next() must be given the token: next() with no argument restarts.
      const { responseBody: page } = await call(`individual enrollment query page ${pages + 1}`, () => query.next(query.continuationToken));
      pages++;
      assert.ok(Array.isArray(page), `query page is not an array: ${JSON.stringify(page)}`);
      assert.ok(page.length <= 1, `x-ms-max-item-count 1, got ${page.length} items`);
      for (const e of page) {
        assert.ok(!seen.has(e.registrationId), `enrollment ${e.registrationId} returned twice`);
        seen.set(e.registrationId, e);
      }
    }
    assert.ok(seen.has(tpmId), `TPM enrollment ${tpmId} missing from query: ${[...seen.keys()]}`);
    assert.ok(seen.has(edgeId), `enrollment ${edgeId} missing from query: ${[...seen.keys()]}`);
    assert.equal(seen.get(tpmId).attestation.type, 'tpm');
    assert.equal(seen.get(edgeId).deviceId, edgeDeviceId);
  });

  it('queries enrollment groups', { timeout: TEST_MS }, async () => {
    need('group', 'create enrollment group');
    const query = svc.createEnrollmentGroupQuery({ query: '*' });
    const ids = [];
    let pages = 0;
    while (query.hasMoreResults) {
      assert.ok(pages < 1000, 'group query never ends');
      const { responseBody: page } = await call('enrollment group query', () => query.next(query.continuationToken));
      pages++;
      assert.ok(Array.isArray(page), `query page is not an array: ${JSON.stringify(page)}`);
      ids.push(...page.map((g) => g.enrollmentGroupId));
    }
    assert.ok(ids.includes(groupId), `group ${groupId} missing from query: ${ids}`);
  });

  it('creates and deletes enrollments in bulk, reporting the ones that fail', { timeout: TEST_MS }, async () => {
    const ids = [0, 1, 2].map((i) => `interop-bulk-${i}-${suffix}`);
    // The SDK's promise form of this call never settles (it answers only a
    // callback), so the test uses the callback form.
    const bulk = (op) => new Promise((resolve, reject) =>
      svc.runBulkEnrollmentOperation(op, (err, result) => (err ? reject(err) : resolve({ responseBody: result }))));
    const enrollment = (registrationId) => ({ registrationId, attestation: { type: 'symmetricKey', symmetricKey: { primaryKey: h.randomKey(), secondaryKey: h.randomKey() } } });
    const { responseBody: created } = await call('runBulkEnrollmentOperation(create)', () =>
      bulk({ mode: 'create', enrollments: ids.map(enrollment) }));
    assert.equal(created.isSuccessful, true, JSON.stringify(created));
    const { responseBody: again } = await call('runBulkEnrollmentOperation(create existing)', () =>
      bulk({ mode: 'create', enrollments: [enrollment(ids[0])] }));
    assert.equal(again.isSuccessful, false);
    assert.equal(again.errors.length, 1);
    assert.equal(again.errors[0].registrationId, ids[0]);
    assert.equal(again.errors[0].errorCode, 409203);
    const { responseBody: deleted } = await call('runBulkEnrollmentOperation(delete)', () =>
      bulk({ mode: 'delete', enrollments: ids.map(enrollment) }));
    assert.equal(deleted.isSuccessful, true, JSON.stringify(deleted));
    await mustRefuse('getIndividualEnrollment of a bulk-deleted enrollment', () => svc.getIndividualEnrollment(ids[1]), 404);
  });

  it('deletes the TPM enrollment: a stale etag is refused, the current one works', { timeout: TEST_MS }, async () => {
    const created = need('tpm', 'create TPM enrollment');
    await mustRefuse('deleteIndividualEnrollment with a wrong etag', () =>
      svc.deleteIndividualEnrollment(tpmId, '"00000000-0000-0000-0000-000000000000"'), 412);
    await call('getIndividualEnrollment(tpm) after refused delete', () => svc.getIndividualEnrollment(tpmId));

    await call('deleteIndividualEnrollment(enrollment with etag)', () => svc.deleteIndividualEnrollment(created));
    await mustRefuse('getIndividualEnrollment of a deleted enrollment', () => svc.getIndividualEnrollment(tpmId), 404);
  });
});

describe('registration through azure-iot-provisioning-device + -http + azure-iot-security-symmetric-key', () => {
  it('provisions the individual (edge) enrollment, not echoing its payload', { timeout: TEST_MS }, async () => {
    need('edge', 'create and update symmetric-key enrollment');
    const payload = { purpose: 'interop', nested: { n: 42, list: [1, 'two', null] } };
    const result = await register(edgeId, edgeKeys.primaryKey, payload);
    assert.equal(result.registrationId, edgeId);
    assert.equal(result.status, 'assigned');
    assert.equal(result.assignedHub, info.hubHostName);
    assert.equal(result.deviceId, edgeDeviceId);
    assert.equal(result.payload, undefined, 'only a custom allocation webhook\'s payload comes back');
    state.edgeResult = result;
  });

  it('provisions a device of the enrollment group with its derived key', { timeout: TEST_MS }, async () => {
    need('group', 'create enrollment group');
    const payload = { member: groupDeviceRegId };
    const result = await register(groupDeviceRegId, h.deriveDeviceKey(groupKeys.primaryKey, groupDeviceRegId), payload);
    assert.equal(result.registrationId, groupDeviceRegId);
    assert.equal(result.status, 'assigned');
    assert.equal(result.assignedHub, info.hubHostName);
    assert.equal(result.deviceId, groupDeviceRegId, 'a group device without a deviceId gets its registration ID');
    assert.equal(result.payload, undefined, 'only a custom allocation webhook\'s payload comes back');
    state.groupResult = result;
  });

  it('refuses a wrong key with an error, not a hang', { timeout: TEST_MS }, async () => {
    need('edge', 'create symmetric-key enrollment');
    for (const [regId, key, what] of [
      [edgeId, h.randomKey(), 'individual enrollment, random key'],
      [groupDeviceRegId, groupKeys.primaryKey, 'group member signing with the group key itself'],
    ]) {
      const err = await h.rejection(register(regId, key), what);
      assert.ok(!/no answer within/.test(err.message), `${what}: ${err.message}`);
      assert.equal(h.statusOf(err), 401, `${what}: expected HTTP 401, got ${h.describeError(err)}`);
      assert.equal(err.name, 'UnauthorizedError', `${what}: ${h.describeError(err)}`);
    }
  });
});

describe('hub registry through azure-iothub', () => {
  it('has the edge device with iotEdge and the enrollment primary key', { timeout: TEST_MS }, async () => {
    const result = need('edgeResult', 'provision edge device');
    const { responseBody: device } = await call('Registry.get(edge)', () => registry.get(result.deviceId));
    assert.equal(device.deviceId, edgeDeviceId);
    assert.equal(device.status, 'enabled');
    assert.equal(device.capabilities.iotEdge, true);
    assert.equal(device.authentication.symmetricKey.primaryKey, edgeKeys.primaryKey);
  });

  it('has the edge device twin with the enrollment initial twin', { timeout: TEST_MS }, async () => {
    const result = need('edgeResult', 'provision edge device');
    const { responseBody: twin } = await call('Registry.getTwin(edge)', () => registry.getTwin(result.deviceId));
    assert.equal(twin.deviceId, edgeDeviceId);
    assert.deepEqual(twin.tags, edgeTags);
    assert.equal(twin.properties.desired.telemetryInterval, edgeDesired.telemetryInterval);
  });

  it('has the group device with the derived key and the group initial twin', { timeout: TEST_MS }, async () => {
    const result = need('groupResult', 'provision group device');
    const { responseBody: device } = await call('Registry.get(group device)', () => registry.get(result.deviceId));
    assert.equal(device.deviceId, groupDeviceRegId);
    assert.equal(device.status, 'enabled');
    assert.ok(!device.capabilities.iotEdge, `group without iotEdge gave capabilities ${JSON.stringify(device.capabilities)}`);
    assert.equal(device.authentication.symmetricKey.primaryKey, h.deriveDeviceKey(groupKeys.primaryKey, groupDeviceRegId));

    const { responseBody: twin } = await call('Registry.getTwin(group device)', () => registry.getTwin(result.deviceId));
    assert.equal(twin.deviceId, groupDeviceRegId);
    assert.deepEqual(twin.tags, groupTags);
  });
});

describe('registration state through azure-iot-provisioning-service', () => {
  it('shows the individual enrollment assigned to the device', { timeout: TEST_MS }, async () => {
    need('edgeResult', 'provision edge device');
    const { responseBody: e } = await call('getIndividualEnrollment(edge) after registration', () => svc.getIndividualEnrollment(edgeId));
    assert.ok(e.registrationState, `no registrationState in ${JSON.stringify(e)}`);
    assert.equal(e.registrationState.registrationId, edgeId);
    assert.equal(e.registrationState.status, 'assigned');
    assert.equal(e.registrationState.deviceId, edgeDeviceId);
    assert.equal(e.registrationState.assignedHub, info.hubHostName);
  });

  it('shows the group device registration state', { timeout: TEST_MS }, async () => {
    need('groupResult', 'provision group device');
    const { responseBody: r } = await call('getDeviceRegistrationState(group device)', () => svc.getDeviceRegistrationState(groupDeviceRegId));
    assert.equal(r.registrationId, groupDeviceRegId);
    assert.equal(r.status, 'assigned');
    assert.equal(r.deviceId, groupDeviceRegId);
    assert.equal(r.assignedHub, info.hubHostName);
  });
});
