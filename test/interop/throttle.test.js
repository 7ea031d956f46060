// Interop: throttling. A device that sends too many requests is answered
// 429 with Retry-After (seen here with plain fetch), and
// azure-iot-provisioning-device over MQTT, which honours it, still
// registers: it waits and tries again. (Its HTTP transport, 1.9.1, turns a
// 429 into an error: its retry branch is unreachable.) Run through
// `go test ./test/interop/`.
'use strict';

const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');

const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Mqtt: ProvisioningMqtt } = require('azure-iot-provisioning-device-mqtt');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');

const h = require('./helpers');

const info = h.loadInfo();
const registrationId = `interop-throttle-${h.uniqueSuffix()}`;
const key = h.randomKey();

// The DPS device token of PROTOCOL.md §3.
function token() {
  const sr = encodeURIComponent(`${info.idScope}/registrations/${registrationId}`);
  const se = Math.floor(Date.now() / 1000) + 3600;
  const sig = crypto.createHmac('sha256', Buffer.from(key, 'base64')).update(`${sr}\n${se}`).digest('base64');
  return `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(sig)}&se=${se}&skn=registration`;
}

describe('throttling', () => {
  it('answers a chatty device 429 with Retry-After, and the SDK registers by waiting', { timeout: 60000 }, async () => {
    const svc = ProvisioningServiceClient.fromConnectionString(info.provisioningServiceConnectionString);
    await h.within(15000, 'create enrollment', () => svc.createOrUpdateIndividualEnrollment({
      registrationId, attestation: { type: 'symmetricKey', symmetricKey: { primaryKey: key, secondaryKey: h.randomKey() } },
    }));

    // Status lookups in a burst, past the device's allowance.
    const url = `https://${h.bareHost(info.provisioningHost)}/${info.idScope}/registrations/${registrationId}?api-version=2019-03-31`;
    const answers = await Promise.all(Array.from({ length: 15 }, () =>
      fetch(url, { method: 'POST', headers: { Authorization: token(), 'Content-Type': 'application/json' } })));
    const throttled = answers.filter((r) => r.status === 429);
    assert.ok(throttled.length > 0, `no 429 among ${answers.map((r) => r.status)}`);
    const retryAfter = Number(throttled[0].headers.get('retry-after'));
    assert.ok(retryAfter >= 1, `Retry-After ${throttled[0].headers.get('retry-after')}`);
    const body = await throttled[0].json();
    assert.equal(body.errorCode, 429001);

    // Right away, while still throttled: the SDK must wait and retry.
    const client = ProvisioningDeviceClient.create(h.bareHost(info.provisioningHost), info.idScope, new ProvisioningMqtt(),
      new SymmetricKeySecurityClient(registrationId, key));
    const result = await h.within(45000, 'register while throttled', () => client.register());
    assert.equal(result.status, 'assigned');
    assert.equal(result.registrationId, registrationId);
  });
});
