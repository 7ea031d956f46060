// Interop: X.509 attestation. Certificates are made with the openssl command
// line as an operator would; enrollments are created with
// azure-iot-provisioning-service; devices register with
// azure-iot-provisioning-device (-http and -mqtt) and azure-iot-security-x509,
// then connect to the assigned hub with the same certificate through
// azure-iot-device-mqtt. Run through `go test ./test/interop/` (see interop_test.go).
//
// The sections run in order and share state.
'use strict';

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Http: ProvisioningHttp } = require('azure-iot-provisioning-device-http');
const { Mqtt: ProvisioningMqtt } = require('azure-iot-provisioning-device-mqtt');
const { X509Security } = require('azure-iot-security-x509');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const { Mqtt: DeviceMqtt } = require('azure-iot-device-mqtt');

const h = require('./helpers');

const REGISTER_MS = 45000;
const TEST_MS = 60000;

const info = h.loadInfo();
const suffix = h.uniqueSuffix();

const individualId = `interop-x509-device-${suffix}`;
const groupId = `interop-x509-group-${suffix}`;
const groupMemberId = `interop-x509-member-${suffix}`;
const strangerId = `interop-x509-stranger-${suffix}`;

const { state, need } = h.steps();
const { sdk } = h;
let dir;
let svc;

function openssl(...args) {
  execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
}

// A P-256 key and a certificate for cn: self-signed, or signed by issuer.
function makeCert(name, cn, { ca = false, issuer } = {}) {
  openssl('ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', `${name}.key`);
  const ext = ca ? 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n'
    : 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n';
  fs.writeFileSync(path.join(dir, `${name}.ext`), ext);
  openssl('req', '-new', '-key', `${name}.key`, '-subj', `/CN=${cn}`, '-out', `${name}.csr`);
  const signer = issuer ? ['-CA', `${issuer}.pem`, '-CAkey', `${issuer}.key`, '-CAcreateserial'] : ['-signkey', `${name}.key`];
  openssl('x509', '-req', '-in', `${name}.csr`, ...signer, '-days', '2', '-extfile', `${name}.ext`, '-out', `${name}.pem`);
  return { cert: fs.readFileSync(path.join(dir, `${name}.pem`), 'utf8'), key: fs.readFileSync(path.join(dir, `${name}.key`), 'utf8') };
}

before(() => {
  svc = ProvisioningServiceClient.fromConnectionString(info.provisioningServiceConnectionString);
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hatchery-x509-'));
});

after(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

function register(registrationId, x509, Transport) {
  const client = ProvisioningDeviceClient.create(h.bareHost(info.provisioningHost), info.idScope, new Transport(),
    new X509Security(registrationId, x509));
  return h.within(REGISTER_MS, `register ${registrationId}`, () => client.register());
}

async function mustRegister(registrationId, x509, Transport) {
  try {
    return await register(registrationId, x509, Transport);
  } catch (err) {
    if (err instanceof assert.AssertionError || /no answer within/.test(err.message)) throw err;
    assert.fail(`register ${registrationId}: ${h.describeError(err)}`);
  }
}

// The provisioned device opens the hub with its certificate, as a device
// application does after provisioning.
async function useHub(result, x509) {
  const client = DeviceClient.fromConnectionString(`HostName=${result.assignedHub};DeviceId=${result.deviceId};x509=true`, DeviceMqtt);
  client.on('error', () => {});
  client.setOptions(x509);
  try {
    await sdk(`open ${result.deviceId} with its certificate`, () => client.open());
    await sdk('sendEvent', () => client.sendEvent(new Message(JSON.stringify({ attestation: 'x509' }))));
  } finally {
    try {
      await h.call('close', () => client.close());
    } catch {
      // the test already failed or the connection is gone
    }
  }
}

describe('X.509 enrollments through azure-iot-provisioning-service', () => {
  it('enrolls a device certificate individually and a root CA as a group', { timeout: TEST_MS }, async () => {
    state.device = makeCert('device', individualId);
    state.root = makeCert('root', `Interop Root ${suffix}`, { ca: true });
    state.member = makeCert('member', groupMemberId, { issuer: 'root' });
    state.stranger = makeCert('stranger', strangerId);

    const { responseBody: e } = await sdk('createOrUpdateIndividualEnrollment(x509)', () =>
      svc.createOrUpdateIndividualEnrollment({
        registrationId: individualId,
        attestation: { type: 'x509', x509: { clientCertificates: { primary: { certificate: state.device.cert } } } },
        capabilities: { iotEdge: true },
        initialTwin: { tags: { attestation: 'x509' } },
      }));
    assert.equal(e.attestation.type, 'x509');
    assert.match(e.attestation.x509.clientCertificates.primary.info.sha256Thumbprint, /^[0-9A-F]{64}$/);
    assert.equal(e.attestation.x509.clientCertificates.primary.info.subjectName, `CN=${individualId}`);
    state.individual = e;

    const { responseBody: g } = await sdk('createOrUpdateEnrollmentGroup(x509)', () =>
      svc.createOrUpdateEnrollmentGroup({
        enrollmentGroupId: groupId,
        attestation: { type: 'x509', x509: { signingCertificates: { primary: { certificate: state.root.cert } } } },
      }));
    assert.equal(g.attestation.x509.signingCertificates.primary.info.subjectName, `CN=Interop Root ${suffix}`);
    state.group = g;
  });
});

describe('registration through azure-iot-security-x509', () => {
  it('registers the individually enrolled device over HTTPS, which then uses the hub', { timeout: TEST_MS }, async () => {
    need('individual', 'create individual enrollment');
    const result = await mustRegister(individualId, state.device, ProvisioningHttp);
    assert.equal(result.status, 'assigned');
    assert.equal(result.deviceId, individualId);
    assert.equal(result.assignedHub, info.hubHostName);
    await useHub(result, state.device);

    const { responseBody: e } = await sdk('getIndividualEnrollment', () => svc.getIndividualEnrollment(individualId));
    assert.equal(e.registrationState.status, 'assigned');
  });

  it('registers a group member over MQTT, which then uses the hub', { timeout: TEST_MS }, async () => {
    need('group', 'create enrollment group');
    const result = await mustRegister(groupMemberId, state.member, ProvisioningMqtt);
    assert.equal(result.status, 'assigned');
    assert.equal(result.deviceId, groupMemberId);
    await useHub(result, state.member);

    const { responseBody: regs } = await sdk('queryRegistrationState(group)', () =>
      svc.getDeviceRegistrationState(groupMemberId));
    assert.equal(regs.x509.enrollmentGroupId, groupId);
  });

  it('refuses a certificate nobody enrolled, over both transports', { timeout: TEST_MS }, async () => {
    need('stranger', 'make certificates');
    for (const Transport of [ProvisioningHttp, ProvisioningMqtt]) {
      const err = await h.rejection(register(strangerId, state.stranger, Transport), `stranger over ${Transport.name}`);
      assert.ok(!/no answer within/.test(err.message), err.message);
      assert.ok(h.statusOf(err) === 401 || err.code === 5 || /Not authorized|Unauthorized/i.test(err.message),
        `stranger over ${Transport.name}: ${h.describeError(err)} (code ${err.code})`);
    }
  });
});
