// Interop: the official Azure IoT Node.js SDKs, unmodified, against Hatchery's IoT hub.
// Run through `go test ./test/interop/` (see interop_test.go).
//
// azure-iothub drives the service side (registry, twins, queries, direct methods,
// configurations); azure-iot-device with the azure-iot-device-mqtt transport is the
// device (MQTT over TLS on 8883, hard-coded by the SDK). Two service calls have no SDK
// path because Hatchery has no AMQP: the device-to-cloud event stream
// (GET /events) and cloud-to-device messages (POST /devices/{id}/messages/deviceBound),
// both made here over HTTPS with a SAS token of the iothubowner policy.
//
// The sections run in order and share state.
'use strict';

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const https = require('node:https');

const { Registry, Client: ServiceClient } = require('azure-iothub');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');

const h = require('./helpers');

const EVENT_MS = 10000; // a device-side event (desired patch, method, C2D message) to arrive
const TEST_MS = 60000;
const API_VERSION = '2021-04-12';

const info = h.loadInfo();
const suffix = h.uniqueSuffix();
const hubHost = info.hubHostName;
const owner = parseConnectionString(info.hubConnectionString);

const roundTripId = `interop-hub-roundtrip-${suffix}`;
const deviceId = `interop-hub-device-${suffix}`;
const stagingId = `interop-hub-staging-${suffix}`;
const edgeId = `interop-hub-edge-${suffix}`;
const deploymentId = `interop-deploy-${suffix}`;

const deviceKeys = { primaryKey: h.randomKey(), secondaryKey: h.randomKey() };
const edgeKeys = { primaryKey: h.randomKey(), secondaryKey: h.randomKey() };

// Filled as the tests go.
const { state, need } = h.steps();
const { call, sdk } = h;

let registry;
let service;

before(() => {
  registry = Registry.fromConnectionString(info.hubConnectionString);
  service = ServiceClient.fromConnectionString(info.hubConnectionString);
});

async function mustRefuse(what, fn, expectedStatus) {
  const err = await h.rejection(call(what, fn), what);
  assert.ok(!/no answer within/.test(err.message), `${what}: ${err.message}`);
  assert.equal(h.statusOf(err), expectedStatus, `${what}: expected HTTP ${expectedStatus}, got ${h.describeError(err)}`);
  return err;
}

function parseConnectionString(cs) {
  const out = {};
  for (const part of cs.split(';')) {
    const i = part.indexOf('=');
    if (i > 0) out[part.slice(0, i)] = part.slice(i + 1);
  }
  assert.ok(out.HostName && out.SharedAccessKeyName && out.SharedAccessKey, `not a hub policy connection string: ${cs}`);
  return out;
}

// A service token of the connection string's policy (iothubowner), in the SAS format
// the hub SDKs make: sr=<urlencoded host>&sig=<urlencoded base64 HMAC-SHA256(key, sr+"\n"+se)>&se=&skn=.
function serviceToken(ttlSeconds = 3600) {
  const sr = encodeURIComponent(owner.HostName);
  const se = Math.floor(Date.now() / 1000) + ttlSeconds;
  const sig = crypto.createHmac('sha256', Buffer.from(owner.SharedAccessKey, 'base64')).update(`${sr}\n${se}`, 'utf8').digest('base64');
  return `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(sig)}&se=${se}&skn=${encodeURIComponent(owner.SharedAccessKeyName)}`;
}

// An HTTPS call to the hub's service API with the owner token; resolves to {status, headers, body}.
function hubRequest(method, path, { headers = {}, body } = {}) {
  return call(`${method} ${path}`, () => new Promise((resolve, reject) => {
    const req = https.request({
      host: hubHost, port: 443, method, path, agent: false,
      headers: { Authorization: serviceToken(), ...headers },
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('error', reject);
    if (body !== undefined) req.write(body);
    req.end();
  }));
}

// The device's events from the hub's event stream (JSON lines).
async function deviceEvents(id) {
  const res = await hubRequest('GET', `/events?device=${encodeURIComponent(id)}&api-version=${API_VERSION}`);
  assert.equal(res.status, 200, `GET /events: HTTP ${res.status}: ${res.body}`);
  return res.body.split('\n').filter((l) => l.trim() !== '').map((l, i) => {
    try {
      return JSON.parse(l);
    } catch (err) {
      assert.fail(`GET /events line ${i + 1} is not JSON (${err.message}): ${l}`);
    }
  });
}

function deviceConnectionString(id, key) {
  return `HostName=${hubHost};DeviceId=${id};SharedAccessKey=${key}`;
}

async function openDevice(id, key) {
  const client = DeviceClient.fromConnectionString(deviceConnectionString(id, key), Mqtt);
  client.on('error', () => {}); // surfaced through the calls below instead
  await sdk(`open ${id} over MQTT`, () => client.open());
  return client;
}

async function closeDevice(client) {
  if (!client) return;
  try {
    await sdk('close device client', () => client.close());
  } catch {
    // the test already failed or the connection is gone
  }
}

// Resolves with the first value pushed into a waiter that satisfies pred, or fails after ms.
function waiter(what, pred) {
  let resolve;
  const seen = [];
  const promise = new Promise((r) => { resolve = r; });
  return {
    seen,
    push(v) {
      seen.push(v);
      if (pred(v)) resolve(v);
    },
    wait(ms = EVENT_MS) {
      return h.within(ms, `${what} (seen so far: ${JSON.stringify(seen)})`, () => promise);
    },
  };
}

// Pushes one round trip through the device's MQTT connection, so that subscriptions
// the SDK sent before it (the server handles a connection's packets in order) are in place.
async function roundTrip(client) {
  await sdk('client.getTwin (round trip)', () => client.getTwin());
}

describe('device registry and twins through azure-iothub', () => {
  it('creates and gets a device', { timeout: TEST_MS }, async () => {
    const keys = { primaryKey: h.randomKey(), secondaryKey: h.randomKey() };
    const { responseBody: created } = await sdk('Registry.create', () => registry.create({
      deviceId: roundTripId, status: 'enabled', authentication: { symmetricKey: keys },
    }));
    assert.equal(created.deviceId, roundTripId);
    assert.equal(created.status, 'enabled');
    assert.equal(created.authentication.symmetricKey.primaryKey, keys.primaryKey);
    assert.equal(created.authentication.symmetricKey.secondaryKey, keys.secondaryKey);
    assert.ok(created.etag, `no etag in ${JSON.stringify(created)}`);
    assert.ok(created.generationId, `no generationId in ${JSON.stringify(created)}`);

    await mustRefuse('Registry.create of an existing device', () => registry.create({ deviceId: roundTripId }), 409);

    const { responseBody: got } = await sdk('Registry.get', () => registry.get(roundTripId));
    assert.equal(got.deviceId, roundTripId);
    assert.equal(got.authentication.symmetricKey.primaryKey, keys.primaryKey);
    assert.equal(got.etag, created.etag);
    assert.equal(got.connectionState, 'Disconnected');
    state.roundTrip = got;
  });

  it('updates the device with Registry.update (If-Match: "*")', { timeout: TEST_MS }, async () => {
    const got = need('roundTrip', 'create device');
    const change = JSON.parse(JSON.stringify(got));
    change.status = 'disabled';
    change.statusReason = 'interop';
    const { responseBody: updated } = await sdk('Registry.update', () => registry.update(change));
    assert.equal(updated.status, 'disabled');
    assert.equal(updated.authentication.symmetricKey.primaryKey, got.authentication.symmetricKey.primaryKey, 'update lost the keys');
    assert.ok(updated.etag && updated.etag !== got.etag, `etag did not change on update: ${got.etag} -> ${updated.etag}`);
    assert.equal(updated.generationId, got.generationId);

    const { responseBody: after } = await sdk('Registry.get after update', () => registry.get(roundTripId));
    assert.equal(after.status, 'disabled');
    assert.equal(after.etag, updated.etag);
  });

  it('deletes the device with Registry.delete (If-Match: "*")', { timeout: TEST_MS }, async () => {
    need('roundTrip', 'create device');
    await sdk('Registry.delete', () => registry.delete(roundTripId));
    await mustRefuse('Registry.get of a deleted device', () => registry.get(roundTripId), 404);
  });

  it('creates the devices the later sections use', { timeout: TEST_MS }, async () => {
    const { responseBody: d } = await sdk('Registry.create(device)', () => registry.create({
      deviceId, status: 'enabled', authentication: { symmetricKey: deviceKeys },
    }));
    assert.equal(d.authentication.symmetricKey.primaryKey, deviceKeys.primaryKey);
    assert.ok(!d.capabilities || !d.capabilities.iotEdge);
    state.device = d;

    await sdk('Registry.create(staging)', () => registry.create({ deviceId: stagingId }));
    state.staging = true;
  });

  it('creates, updates and removes devices in bulk, reporting the ones that fail', { timeout: TEST_MS }, async () => {
    const ids = [1, 2, 3].map((n) => `interop-hub-bulk-${n}-${suffix}`);
    const { responseBody: added } = await sdk('Registry.addDevices', () => registry.addDevices(ids.map((deviceId) => ({ deviceId }))));
    assert.equal(added.isSuccessful, true, `addDevices: ${JSON.stringify(added)}`);
    const { responseBody: again } = await sdk('Registry.addDevices (again)', () => registry.addDevices([{ deviceId: ids[0] }]));
    assert.equal(again.isSuccessful, false);
    assert.equal(again.errors[0].deviceId, ids[0]);
    assert.equal(again.errors[0].errorCode, 'DeviceAlreadyExists', `errors: ${JSON.stringify(again.errors)}`);

    const { responseBody: d1 } = await sdk('Registry.get(bulk 1)', () => registry.get(ids[0]));
    const { responseBody: updated } = await sdk('Registry.updateDevices (force)', () =>
      registry.updateDevices([{ ...d1, status: 'disabled' }], true));
    assert.equal(updated.isSuccessful, true, `updateDevices: ${JSON.stringify(updated)}`);
    const { responseBody: got } = await sdk('Registry.get(bulk 1) after the update', () => registry.get(ids[0]));
    assert.equal(got.status, 'disabled');
    assert.equal(got.authentication.symmetricKey.primaryKey, d1.authentication.symmetricKey.primaryKey);
    const { responseBody: stale } = await sdk('Registry.updateDevices (stale etag)', () =>
      registry.updateDevices([{ ...d1, status: 'enabled' }], false));
    assert.equal(stale.isSuccessful, false, `a stale etag: ${JSON.stringify(stale)}`);

    const { responseBody: removed } = await sdk('Registry.removeDevices', () => registry.removeDevices(ids.map((deviceId) => ({ deviceId })), true));
    assert.equal(removed.isSuccessful, true, `removeDevices: ${JSON.stringify(removed)}`);
    await mustRefuse('Registry.get of a device removed in bulk', () => registry.get(ids[1]), 404);
  });

  it('lists devices and counts them with Registry.list and getRegistryStatistics', { timeout: TEST_MS }, async () => {
    need('staging', 'create the devices');
    const { responseBody: list } = await sdk('Registry.list', () => registry.list());
    const ids = list.map((d) => d.deviceId);
    assert.ok(ids.includes(deviceId) && ids.includes(stagingId), `Registry.list gave ${JSON.stringify(ids)}`);
    const { responseBody: stats } = await sdk('Registry.getRegistryStatistics', () => registry.getRegistryStatistics());
    assert.ok(stats.totalDeviceCount >= 2 && stats.totalDeviceCount === stats.enabledDeviceCount + stats.disabledDeviceCount,
      `statistics ${JSON.stringify(stats)}`);
  });

  it('updates twin tags with Registry.updateTwin and Twin.update', { timeout: TEST_MS }, async () => {
    need('device', 'create device');
    const { responseBody: t0 } = await sdk('Registry.getTwin', () => registry.getTwin(deviceId));
    assert.equal(t0.deviceId, deviceId);
    assert.ok(t0.etag, `no twin etag in ${JSON.stringify(t0)}`);

    const { responseBody: t1 } = await sdk('Registry.updateTwin(tags)', () =>
      registry.updateTwin(deviceId, { tags: { environment: 'prod', site: { building: 4 } } }, t0.etag));
    assert.equal(t1.tags.environment, 'prod');
    assert.equal(t1.tags.site.building, 4);
    assert.ok(t1.etag && t1.etag !== t0.etag, `twin etag did not change: ${t0.etag} -> ${t1.etag}`);

    await mustRefuse('Registry.updateTwin with a stale etag', () =>
      registry.updateTwin(deviceId, { tags: { environment: 'must-not-be-stored' } }, t0.etag), 412);

    // Twin.update patches with the twin's own etag.
    const { responseBody: twin } = await sdk('Registry.getTwin', () => registry.getTwin(deviceId));
    await sdk('Twin.update(tags)', () => twin.update({ tags: { site: { floor: '2' }, owner: 'interop' } }));

    const { responseBody: t2 } = await sdk('Registry.getTwin after Twin.update', () => registry.getTwin(deviceId));
    assert.deepEqual(t2.tags, { environment: 'prod', site: { building: 4, floor: '2' }, owner: 'interop' });

    need('staging', 'create staging device');
    const { responseBody: s } = await sdk('Registry.getTwin(staging)', () => registry.getTwin(stagingId));
    await sdk('Registry.updateTwin(staging)', () => registry.updateTwin(stagingId, { tags: { environment: 'staging' } }, s.etag));
    state.tagged = true;
  });

  it('queries twins by tag with createQuery and nextAsTwin', { timeout: TEST_MS }, async () => {
    need('tagged', 'tag the devices');
    const query = registry.createQuery("SELECT * FROM devices WHERE tags.environment = 'prod'", 1);
    const found = new Map();
    let pages = 0;
    while (query.hasMoreResults) {
      assert.ok(pages < 1000, `query never ends (last continuation token ${JSON.stringify(query.continuationToken)})`);
      const { result: page } = await sdk(`twin query page ${pages + 1}`, () => query.nextAsTwin());
      pages++;
      assert.ok(Array.isArray(page), `query page is not an array: ${JSON.stringify(page)}`);
      assert.ok(page.length <= 1, `page size 1, got ${page.length} twins`);
      for (const twin of page) {
        assert.equal(typeof twin.update, 'function', 'nextAsTwin did not give Twin objects');
        assert.equal(twin.tags.environment, 'prod', `query returned a twin with tags ${JSON.stringify(twin.tags)}`);
        assert.ok(!found.has(twin.deviceId), `twin ${twin.deviceId} returned twice`);
        found.set(twin.deviceId, twin);
      }
    }
    assert.ok(found.has(deviceId), `device ${deviceId} missing from the query: ${[...found.keys()]}`);
    assert.ok(!found.has(stagingId), 'the staging device matched tags.environment = \'prod\'');
    assert.equal(found.get(deviceId).tags.site.floor, '2');
  });
});

describe('device client over MQTT (azure-iot-device + azure-iot-device-mqtt)', () => {
  let client;

  after(() => closeDevice(client));

  it('opens with a device connection string', { timeout: TEST_MS }, async () => {
    need('device', 'create device');
    client = await openDevice(deviceId, deviceKeys.primaryKey);
    const { responseBody: d } = await sdk('Registry.get after open', () => registry.get(deviceId));
    assert.equal(d.connectionState, 'Connected');
    state.client = client;
  });

  it('sends telemetry that arrives in the event stream with its properties', { timeout: TEST_MS }, async () => {
    need('client', 'open the device client');
    const marker = crypto.randomUUID();
    const body = { temperature: 21.5, humidity: 40, marker };
    const msg = new Message(JSON.stringify(body));
    msg.messageId = `mid-${marker}`;
    msg.contentType = 'application/json';
    msg.contentEncoding = 'utf-8';
    msg.properties.add('severity', 'high');
    msg.properties.add('unit name', 'celsius & co/1');
    await sdk('client.sendEvent', () => client.sendEvent(msg));

    const events = await deviceEvents(deviceId);
    const ev = events.find((e) => e.body && e.body.marker === marker);
    assert.ok(ev, `telemetry with marker ${marker} not in GET /events?device=${deviceId}: ${JSON.stringify(events)}`);
    assert.equal(ev.deviceId, deviceId);
    assert.ok(Number.isInteger(ev.sequenceNumber) && ev.sequenceNumber > 0, `sequenceNumber ${ev.sequenceNumber}`);
    assert.deepEqual(ev.body, body);
    assert.equal(ev.properties.severity, 'high', `properties: ${JSON.stringify(ev.properties)}`);
    assert.equal(ev.properties['unit name'], 'celsius & co/1', `properties: ${JSON.stringify(ev.properties)}`);
    assert.ok(Object.values(ev.properties).includes(msg.messageId), `message ID not among the properties: ${JSON.stringify(ev.properties)}`);

    const others = await deviceEvents(stagingId);
    assert.equal(others.length, 0, `?device=${stagingId} returned another device's events: ${JSON.stringify(others)}`);
  });

  it('reports properties that the service reads back', { timeout: TEST_MS }, async () => {
    need('client', 'open the device client');
    const twin = await sdk('client.getTwin', () => client.getTwin());
    assert.equal(typeof twin.properties.reported.update, 'function');
    assert.equal(typeof twin.properties.desired.$version, 'number', `desired: ${JSON.stringify(twin.properties.desired)}`);
    const patch = { firmware: { version: '1.2.3', channel: 'stable' }, telemetryInterval: 5 };
    await sdk('twin.properties.reported.update', () => new Promise((resolve, reject) =>
      twin.properties.reported.update(patch, (err) => (err ? reject(err) : resolve()))));

    const { responseBody: t } = await sdk('Registry.getTwin after reported update', () => registry.getTwin(deviceId));
    assert.deepEqual(t.properties.reported.firmware, patch.firmware, `reported: ${JSON.stringify(t.properties.reported)}`);
    assert.equal(t.properties.reported.telemetryInterval, 5);
    assert.ok(t.properties.reported.$version >= 1, `reported: ${JSON.stringify(t.properties.reported)}`);

    // A null removes a reported property.
    await sdk('twin.properties.reported.update(null)', () => new Promise((resolve, reject) =>
      twin.properties.reported.update({ telemetryInterval: null }, (err) => (err ? reject(err) : resolve()))));
    const { responseBody: t2 } = await sdk('Registry.getTwin after removing a reported property', () => registry.getTwin(deviceId));
    assert.ok(!('telemetryInterval' in t2.properties.reported), `reported: ${JSON.stringify(t2.properties.reported)}`);
    assert.deepEqual(t2.properties.reported.firmware, patch.firmware);
    state.twin = twin;
  });

  it('receives a desired-property patch the service makes', { timeout: TEST_MS }, async () => {
    const twin = need('twin', 'get the device twin');
    const value = 1000 + crypto.randomInt(100000);
    const patches = waiter('properties.desired event with the new value', (p) => p && p.interval === value);
    twin.on('properties.desired', (p) => patches.push(JSON.parse(JSON.stringify(p))));
    await roundTrip(client); // the desired subscription is in place

    const { responseBody: t } = await sdk('Registry.getTwin', () => registry.getTwin(deviceId));
    const { responseBody: updated } = await sdk('Registry.updateTwin(desired)', () =>
      registry.updateTwin(deviceId, { properties: { desired: { interval: value, mode: { name: 'eco' } } } }, t.etag));
    assert.equal(updated.properties.desired.interval, value);

    const patch = await patches.wait();
    assert.deepEqual(patch.mode, { name: 'eco' });
    assert.equal(patch.$version, updated.properties.desired.$version, `patch ${JSON.stringify(patch)} vs twin ${JSON.stringify(updated.properties.desired)}`);
    assert.equal(twin.properties.desired.interval, value, 'the device twin did not merge the patch');
  });

  it('answers a direct method', { timeout: TEST_MS }, async () => {
    need('client', 'open the device client');
    const requests = [];
    client.onDeviceMethod('reboot', (request, response) => {
      requests.push({ methodName: request.methodName, payload: request.payload });
      response.send(200, { rebooted: true, echo: request.payload }, () => {});
    });
    client.onDeviceMethod('fail', (request, response) => {
      response.send(418, { reason: 'teapot' }, () => {});
    });
    await roundTrip(client); // the method subscription is in place

    const payload = { delay: 3, reason: 'interop' };
    const { result } = await sdk('Client.invokeDeviceMethod(reboot)', () =>
      service.invokeDeviceMethod(deviceId, { methodName: 'reboot', payload, responseTimeoutInSeconds: 10 }));
    assert.equal(result.status, 200, `result: ${JSON.stringify(result)}`);
    assert.deepEqual(result.payload, { rebooted: true, echo: payload });
    assert.deepEqual(requests, [{ methodName: 'reboot', payload }]);

    const { result: failed } = await sdk('Client.invokeDeviceMethod(fail)', () =>
      service.invokeDeviceMethod(deviceId, { methodName: 'fail', payload: null, responseTimeoutInSeconds: 10 }));
    assert.equal(failed.status, 418, `result: ${JSON.stringify(failed)}`);
    assert.deepEqual(failed.payload, { reason: 'teapot' });

    await mustRefuse('Client.invokeDeviceMethod on a device that is not connected', () =>
      service.invokeDeviceMethod(stagingId, { methodName: 'reboot', payload: {}, responseTimeoutInSeconds: 5 }), 404);
  });

  it('records the Plug and Play model a device announces, for a device ID with a "?" too', { timeout: TEST_MS }, async () => {
    need('device', 'create device');
    const id = `pnp?-${suffix}`;
    const { responseBody: d } = await sdk('Registry.create (Plug and Play)', () => registry.create({ deviceId: id }));
    const pnp = DeviceClient.fromConnectionString(deviceConnectionString(id, d.authentication.symmetricKey.primaryKey), Mqtt);
    pnp.on('error', () => {});
    try {
      await sdk('setOptions({ modelId })', () => pnp.setOptions({ modelId: 'dtmi:com:example:Thermostat;1' }));
      await sdk('open the Plug and Play device', () => pnp.open());
      const { responseBody: twin } = await sdk('Registry.getTwin (Plug and Play)', () => registry.getTwin(id));
      assert.equal(twin.modelId, 'dtmi:com:example:Thermostat;1');
      const { responseBody: plain } = await sdk('Registry.getTwin', () => registry.getTwin(deviceId));
      assert.equal(plain.modelId, '', 'a device that announced no model');
    } finally {
      await closeDevice(pnp);
    }
  });

  // Every message the device receives, in order, as {messageId, body, properties, to, msg}.
  const c2d = { received: [], waiters: [] };

  function awaitC2D(what, pred) {
    const w = waiter(what, pred);
    for (const m of c2d.received) w.push(m);
    c2d.waiters.push(w);
    return w.wait();
  }

  async function sendC2D(n, props) {
    const headers = { 'Content-Type': 'application/json', 'iothub-contenttype': 'application/json', 'iothub-messageid': `c2d-${n}-${suffix}`,
      'iothub-correlationid': `corr-${n}` };
    for (const [k, v] of Object.entries(props)) headers[`iothub-app-${k}`] = v;
    const res = await hubRequest('POST', `/devices/${encodeURIComponent(deviceId)}/messages/deviceBound?api-version=${API_VERSION}`,
      { headers, body: JSON.stringify({ n, command: 'blink' }) });
    assert.ok(res.status >= 200 && res.status < 300, `POST deviceBound: HTTP ${res.status}: ${res.body}`);
  }

  it('receives cloud-to-device messages queued over HTTPS and completes them', { timeout: TEST_MS }, async () => {
    need('client', 'open the device client');
    client.on('message', (msg) => {
      const m = {
        messageId: msg.messageId,
        body: JSON.parse(msg.data.toString('utf8')),
        properties: Object.fromEntries(msg.properties.propertyList.map((p) => [p.key, p.value])),
        to: msg.to,
        correlationId: msg.correlationId,
        contentType: msg.contentType,
      };
      Object.defineProperty(m, 'msg', { value: msg }); // not in JSON dumps
      c2d.received.push(m);
      for (const w of c2d.waiters) w.push(m);
    });

    await sendC2D(1, { color: 'blue', priority: 'high' });
    const m1 = await awaitC2D('cloud-to-device message 1', (m) => m.body.n === 1);
    assert.equal(m1.messageId, `c2d-1-${suffix}`);
    // It expires an hour after it was sent, unless the sender said otherwise.
    const expires = Date.parse(m1.msg.expiryTimeUtc) - Date.now();
    assert.ok(expires > 50 * 60e3 && expires <= 60 * 60e3, `expiryTimeUtc: ${m1.msg.expiryTimeUtc}`);
    assert.deepEqual(m1.body, { n: 1, command: 'blink' });
    assert.equal(m1.properties.color, 'blue', `properties: ${JSON.stringify(m1.properties)}`);
    assert.equal(m1.properties.priority, 'high', `properties: ${JSON.stringify(m1.properties)}`);
    assert.equal(m1.to, `/devices/${deviceId}/messages/deviceBound`);
    // System properties sent as the service API's headers reach the device as such.
    assert.equal(m1.correlationId, 'corr-1');
    assert.equal(m1.contentType, 'application/json');
    const completed = await sdk('client.complete', () => client.complete(m1.msg));
    assert.equal(completed && completed.constructor.name, 'MessageCompleted', `client.complete gave ${JSON.stringify(completed)}`);

    await sendC2D(2, { color: 'red' });
    const m2 = await awaitC2D('cloud-to-device message 2', (m) => m.body.n === 2);
    assert.equal(m2.properties.color, 'red');
    await sdk('client.complete', () => client.complete(m2.msg));

    // Give a redelivery a moment to show up: each message is delivered once.
    await new Promise((r) => setTimeout(r, 500));
    assert.deepEqual(c2d.received.map((m) => m.body.n), [1, 2], `deliveries: ${JSON.stringify(c2d.received)}`);
    state.c2d = true;
  });

  it('receives cloud-to-device properties that need encoding in the topic', { timeout: TEST_MS }, async () => {
    need('c2d', 'receive cloud-to-device messages');
    // Spaces, '&', '/', '%' and '+' in an application property value.
    const label = 'deep blue & green/50% + 1';
    await sendC2D(3, { label });
    const m3 = await awaitC2D('cloud-to-device message 3 (property value with a space)', (m) => m.body.n === 3);
    assert.equal(m3.properties.label, label, `properties: ${JSON.stringify(m3.properties)}`);
    await sdk('client.complete', () => client.complete(m3.msg));
  });
});

describe('device client over HTTPS (azure-iot-device + azure-iot-device-http)', () => {
  const { Http } = require('azure-iot-device-http');
  let client;
  after(() => closeDevice(client));

  it('sends a batch whose messages arrive as events of their own', { timeout: TEST_MS }, async () => {
    need('staging', 'create the staging device');
    const { responseBody: d } = await sdk('Registry.get(staging)', () => registry.get(stagingId));
    client = DeviceClient.fromConnectionString(deviceConnectionString(stagingId, d.authentication.symmetricKey.primaryKey), Http);
    client.on('error', () => {});
    await sdk('open over HTTPS', () => client.open());
    const a = new Message('first');
    a.properties.add('n', '1');
    await sdk('client.sendEventBatch', () => client.sendEventBatch([a, new Message('second')]));
    const events = await deviceEvents(stagingId);
    assert.equal(events.length, 2, `events: ${JSON.stringify(events)}`);
    assert.equal(Buffer.from(events[0].bodyBase64, 'base64').toString(), 'first');
    assert.equal(events[0].properties.n, '1', `properties: ${JSON.stringify(events[0].properties)}`);
    assert.equal(Buffer.from(events[1].bodyBase64, 'base64').toString(), 'second');
    state.httpClient = true;
  });

  it('receives a cloud-to-device message, abandons it, and completes it when it comes again', { timeout: TEST_MS }, async () => {
    need('httpClient', 'open the HTTPS device client');
    const received = [];
    const next = (n) => h.within(EVENT_MS, `cloud-to-device message ${n} over HTTPS (got ${received.length})`,
      () => new Promise((resolve) => {
        const check = () => (received.length >= n ? resolve(received[n - 1]) : setTimeout(check, 50));
        check();
      }));
    client.on('message', (msg) => received.push(msg));
    const res = await hubRequest('POST', `/devices/${encodeURIComponent(stagingId)}/messages/deviceBound?api-version=${API_VERSION}`,
      { headers: { 'iothub-messageid': `http-c2d-${suffix}`, 'iothub-correlationid': 'corr-http', 'iothub-app-color': 'green' }, body: 'ping' });
    assert.ok(res.status >= 200 && res.status < 300, `POST deviceBound: HTTP ${res.status}: ${res.body}`);
    const m1 = await next(1);
    assert.equal(m1.messageId, `http-c2d-${suffix}`);
    assert.equal(m1.correlationId, 'corr-http');
    assert.equal(m1.data.toString(), 'ping');
    assert.ok(m1.properties.propertyList.some((p) => p.value === 'green'), `properties: ${JSON.stringify(m1.properties)}`);
    await sdk('client.abandon', () => client.abandon(m1));
    const m2 = await next(2);
    assert.equal(m2.messageId, m1.messageId, 'the abandoned message did not come again');
    await sdk('client.complete', () => client.complete(m2));
    await mustRefuse('client.complete of a settled message', () => client.complete(m2), 412);
  });
});

describe('a device client that renews its token (azure-iot-device SharedAccessKeyAuthenticationProvider)', () => {
  const { SharedAccessKeyAuthenticationProvider } = require('azure-iot-device');
  const renewingId = `interop-hub-renewing-${suffix}`;
  let client;
  after(() => closeDevice(client));

  // The SDK connects with CleanSession 0 and renews its token by
  // reconnecting without subscribing again; the hub closes a connection
  // whose token expired. Its twin, methods and cloud-to-device messages
  // must keep working across renewals: the hub resumes the session.
  it('keeps its twin, methods and cloud-to-device messages across token renewals', { timeout: TEST_MS }, async () => {
    const keys = { primaryKey: h.randomKey(), secondaryKey: h.randomKey() };
    await sdk('Registry.create(renewing)', () => registry.create({ deviceId: renewingId, authentication: { symmetricKey: keys } }));
    // 6 s tokens, renewed 3 s before they expire.
    const auth = SharedAccessKeyAuthenticationProvider.fromConnectionString(deviceConnectionString(renewingId, keys.primaryKey), 6, 3);
    let renewals = 0;
    auth.on('newTokenAvailable', () => renewals++);
    client = DeviceClient.fromAuthenticationProvider(auth, Mqtt);
    client.on('error', () => {});
    await sdk('open with a renewing token', () => client.open());
    const twin = await sdk('client.getTwin', () => client.getTwin());
    const value = crypto.randomInt(1000000);
    const patches = waiter('desired patch after renewals', (p) => p && p.renewed === value);
    twin.on('properties.desired', (p) => patches.push(JSON.parse(JSON.stringify(p))));
    client.onDeviceMethod('ping', (request, response) => response.send(200, { pong: true }, () => {}));
    const messages = waiter('cloud-to-device message after renewals', (m) => m === `after-${value}`);
    client.on('message', (msg) => {
      messages.push(msg.data.toString('utf8'));
      client.complete(msg, () => {});
    });
    await roundTrip(client);

    await new Promise((r) => setTimeout(r, 10000)); // past an expiry, through two renewals
    assert.ok(renewals >= 2, `${renewals} token renewals in 10 s`);

    const { result } = await sdk('Client.invokeDeviceMethod after renewals', () =>
      service.invokeDeviceMethod(renewingId, { methodName: 'ping', payload: null, responseTimeoutInSeconds: 10 }));
    assert.equal(result.status, 200, `result: ${JSON.stringify(result)}`);
    await sdk('Registry.updateTwin after renewals', () => registry.updateTwin(renewingId, { properties: { desired: { renewed: value } } }, '*'));
    await patches.wait();
    const res = await hubRequest('POST', `/devices/${encodeURIComponent(renewingId)}/messages/deviceBound?api-version=${API_VERSION}`,
      { headers: { 'Content-Type': 'text/plain' }, body: `after-${value}` });
    assert.ok(res.status >= 200 && res.status < 300, `POST deviceBound: HTTP ${res.status}: ${res.body}`);
    await messages.wait();
    await sdk('reported patch after renewals', () => new Promise((resolve, reject) =>
      twin.properties.reported.update({ renewed: value }, (err) => (err ? reject(err) : resolve()))));
  });
});

describe('device client over MQTT over WebSocket on 443 (azure-iot-device-mqtt MqttWs)', () => {
  const { MqttWs } = require('azure-iot-device-mqtt');
  let client;
  after(() => closeDevice(client));

  it('connects, reads its twin and sends telemetry', { timeout: TEST_MS }, async () => {
    need('staging', 'create the staging device');
    const { responseBody: d } = await sdk('Registry.get(staging)', () => registry.get(stagingId));
    client = DeviceClient.fromConnectionString(deviceConnectionString(stagingId, d.authentication.symmetricKey.primaryKey), MqttWs);
    client.on('error', () => {});
    await sdk('open over MQTT over WebSocket', () => client.open());
    const { responseBody: connected } = await sdk('Registry.get after open', () => registry.get(stagingId));
    assert.equal(connected.connectionState, 'Connected');
    const twin = await sdk('client.getTwin over WebSocket', () => client.getTwin());
    assert.equal(twin.properties.desired.$version >= 1, true, `twin ${JSON.stringify(twin.properties.desired)}`);
    const marker = crypto.randomUUID();
    await sdk('client.sendEvent over WebSocket', () => client.sendEvent(new Message(JSON.stringify({ marker }))));
    const events = await deviceEvents(stagingId);
    assert.ok(events.some((e) => e.body && e.body.marker === marker), `telemetry over WebSocket missing: ${JSON.stringify(events)}`);
  });

  it('refuses a wrong key with UnauthorizedError', { timeout: TEST_MS }, async () => {
    need('staging', 'create the staging device');
    const bad = DeviceClient.fromConnectionString(deviceConnectionString(stagingId, Buffer.alloc(32, 7).toString('base64')), MqttWs);
    bad.on('error', () => {});
    const err = await h.rejection(call('open over WebSocket with a wrong key', () => bad.open()), 'open with a wrong key');
    assert.equal(err.constructor.name, 'UnauthorizedError', `got ${h.describeError(err)}`);
  });
});

describe('edge deployments through azure-iothub configurations', () => {
  const edgeAgentDesired = {
    schemaVersion: '1.1',
    runtime: { type: 'docker', settings: { minDockerVersion: 'v1.25', loggingOptions: '', registryCredentials: {} } },
    systemModules: {
      edgeAgent: { type: 'docker', settings: { image: 'mcr.microsoft.com/azureiotedge-agent:1.4', createOptions: '{}' } },
      edgeHub: {
        type: 'docker', status: 'running', restartPolicy: 'always',
        settings: { image: 'mcr.microsoft.com/azureiotedge-hub:1.4', createOptions: '{"HostConfig":{"PortBindings":{"443/tcp":[{"HostPort":"443"}]}}}' },
      },
    },
    modules: {
      SimulatedTemperatureSensor: {
        version: '1.0', type: 'docker', status: 'running', restartPolicy: 'always',
        settings: { image: 'mcr.microsoft.com/azureiotedge-simulated-temperature-sensor:1.4', createOptions: '{}' },
      },
    },
  };
  const edgeHubDesired = {
    schemaVersion: '1.1',
    routes: { upstream: 'FROM /messages/* INTO $upstream' },
    storeAndForwardConfiguration: { timeToLiveSecs: 7200 },
  };

  it('creates an edge device tagged prod', { timeout: TEST_MS }, async () => {
    const { responseBody: d } = await sdk('Registry.create(edge)', () => registry.create({
      deviceId: edgeId, status: 'enabled', capabilities: { iotEdge: true }, authentication: { symmetricKey: edgeKeys },
    }));
    assert.equal(d.capabilities.iotEdge, true);
    const { responseBody: t } = await sdk('Registry.getTwin(edge)', () => registry.getTwin(edgeId));
    await sdk('Registry.updateTwin(edge tags)', () => registry.updateTwin(edgeId, { tags: { environment: 'prod' } }, t.etag));
    state.edge = d;
  });

  it('adds a deployment that reaches the $edgeAgent and $edgeHub module twins', { timeout: TEST_MS }, async () => {
    need('edge', 'create edge device');
    const configuration = {
      id: deploymentId,
      labels: { suite: 'interop' },
      content: {
        modulesContent: {
          $edgeAgent: { 'properties.desired': edgeAgentDesired },
          $edgeHub: { 'properties.desired': edgeHubDesired },
        },
      },
      targetCondition: "tags.environment='prod'",
      priority: 10,
    };
    const { responseBody: added } = await sdk('Registry.addConfiguration', () => registry.addConfiguration(configuration));
    assert.equal(added.id, deploymentId);
    assert.ok(added.etag, `no etag in ${JSON.stringify(added)}`);

    const { responseBody: c } = await sdk('Registry.getConfiguration', () => registry.getConfiguration(deploymentId));
    assert.equal(c.id, deploymentId);
    assert.equal(c.targetCondition, configuration.targetCondition);
    assert.equal(c.priority, 10);
    assert.deepEqual(c.labels, { suite: 'interop' });
    assert.deepEqual(c.content.modulesContent.$edgeAgent['properties.desired'], edgeAgentDesired);
    assert.deepEqual(c.content.modulesContent.$edgeHub['properties.desired'], edgeHubDesired);
    assert.equal(c.systemMetrics.results.targetedCount, 1, `systemMetrics: ${JSON.stringify(c.systemMetrics)}`);
    assert.equal(c.systemMetrics.results.appliedCount, 1, `systemMetrics: ${JSON.stringify(c.systemMetrics)}`);

    const { responseBody: agent } = await sdk('Registry.getModuleTwin($edgeAgent)', () => registry.getModuleTwin(edgeId, '$edgeAgent'));
    assert.equal(agent.deviceId, edgeId);
    assert.equal(agent.moduleId, '$edgeAgent');
    for (const [k, v] of Object.entries(edgeAgentDesired)) {
      assert.deepEqual(agent.properties.desired[k], v, `$edgeAgent desired.${k}: ${JSON.stringify(agent.properties.desired)}`);
    }
    const { responseBody: edgeHub } = await sdk('Registry.getModuleTwin($edgeHub)', () => registry.getModuleTwin(edgeId, '$edgeHub'));
    for (const [k, v] of Object.entries(edgeHubDesired)) {
      assert.deepEqual(edgeHub.properties.desired[k], v, `$edgeHub desired.${k}: ${JSON.stringify(edgeHub.properties.desired)}`);
    }

    // The non-edge prod device is not targeted.
    const { responseBody: plain } = await sdk('Registry.getTwin(device)', () => registry.getTwin(deviceId));
    assert.ok(!plain.configurations || !plain.configurations[deploymentId], `a non-edge device is targeted: ${JSON.stringify(plain.configurations)}`);
    state.deployment = c;
  });

  it('removes the deployment', { timeout: TEST_MS }, async () => {
    need('deployment', 'add deployment');
    await sdk('Registry.removeConfiguration', () => registry.removeConfiguration(deploymentId));
    await mustRefuse('Registry.getConfiguration of a removed deployment', () => registry.getConfiguration(deploymentId), 404);
  });
});

describe('refusals on the MQTT endpoint', () => {
  it('refuses a wrong key with UnauthorizedError, not a hang', { timeout: TEST_MS }, async () => {
    need('device', 'create device');
    for (const [id, key, what] of [
      [deviceId, h.randomKey(), 'registered device, wrong key'],
      [`interop-hub-unknown-${suffix}`, h.randomKey(), 'unregistered device'],
    ]) {
      const client = DeviceClient.fromConnectionString(deviceConnectionString(id, key), Mqtt);
      client.on('error', () => {});
      try {
        const err = await h.rejection(call(`open (${what})`, () => client.open()), what);
        assert.ok(!/no answer within/.test(err.message), `${what}: ${err.message}`);
        assert.equal(err.name, 'UnauthorizedError', `${what}: ${err.name}: ${err.message}`);
      } finally {
        await closeDevice(client);
      }
    }
  });

  it('refuses a device the service disabled', { timeout: TEST_MS }, async () => {
    need('device', 'create device');
    // The key works while the device is enabled.
    const before = await openDevice(deviceId, deviceKeys.secondaryKey);
    await closeDevice(before);

    const { responseBody: d } = await sdk('Registry.get', () => registry.get(deviceId));
    d.status = 'disabled';
    const { responseBody: disabled } = await sdk('Registry.update(status disabled)', () => registry.update(d));
    assert.equal(disabled.status, 'disabled');

    const client = DeviceClient.fromConnectionString(deviceConnectionString(deviceId, deviceKeys.primaryKey), Mqtt);
    client.on('error', () => {});
    try {
      const err = await h.rejection(call('open a disabled device', () => client.open()), 'disabled device');
      assert.ok(!/no answer within/.test(err.message), err.message);
      assert.equal(err.name, 'UnauthorizedError', `${err.name}: ${err.message}`);
    } finally {
      await closeDevice(client);
    }
  });
});

describe('device configurations through azure-iothub (automatic device management)', () => {
  const cfgDeviceId = `interop-hub-cfg-${suffix}`;
  const configurationId = `interop-fw-${suffix}`.toLowerCase();

  it('sets the desired properties of the devices a configuration targets', { timeout: TEST_MS }, async () => {
    await sdk('Registry.create(configured device)', () => registry.create({ deviceId: cfgDeviceId }));
    const { responseBody: t } = await sdk('Registry.getTwin(configured device)', () => registry.getTwin(cfgDeviceId));
    await sdk('Registry.updateTwin(tag)', () => registry.updateTwin(cfgDeviceId, { tags: { fleet: `fw-${suffix}` } }, t.etag));
    await sdk('Registry.addConfiguration(deviceContent)', () => registry.addConfiguration({
      id: configurationId, schemaVersion: '1.0', priority: 10,
      targetCondition: `tags.fleet = 'fw-${suffix}'`,
      content: { deviceContent: { 'properties.desired.firmware': { version: '1.2.3' } } },
    }));
    const { responseBody: twin } = await sdk('Registry.getTwin after the configuration', () => registry.getTwin(cfgDeviceId));
    assert.deepEqual(twin.properties.desired.firmware, { version: '1.2.3' }, `desired ${JSON.stringify(twin.properties.desired)}`);
    const { responseBody: c } = await sdk('Registry.getConfiguration', () => registry.getConfiguration(configurationId));
    assert.equal(c.systemMetrics.results.appliedCount, 1, `metrics ${JSON.stringify(c.systemMetrics)}`);
    await sdk('Registry.removeConfiguration', () => registry.removeConfiguration(configurationId));
  });
});

describe('jobs through azure-iothub JobClient', () => {
  it('schedules a twin update for the devices a condition selects, and reports it completed', { timeout: TEST_MS }, async () => {
    const { JobClient } = require('azure-iothub');
    const jobs = JobClient.fromConnectionString(info.hubConnectionString);
    const jobDeviceId = `interop-hub-job-${suffix}`;
    await sdk('Registry.create(job device)', () => registry.create({ deviceId: jobDeviceId }));
    const { responseBody: t } = await sdk('Registry.getTwin(job device)', () => registry.getTwin(jobDeviceId));
    await sdk('Registry.updateTwin(job tag)', () => registry.updateTwin(jobDeviceId, { tags: { wave: `w-${suffix}` } }, t.etag));

    const jobId = `interop-job-${suffix}`;
    await sdk('JobClient.scheduleTwinUpdate', () => jobs.scheduleTwinUpdate(jobId, `tags.wave = 'w-${suffix}'`,
      { etag: '*', properties: { desired: { maintenance: { window: 'sunday' } } } }));
    let job;
    await h.within(EVENT_MS, `job ${jobId} completed (last: ${JSON.stringify(job)})`, async () => {
      for (;;) {
        ({ jobStatus: job } = await sdk('JobClient.getJob', () => jobs.getJob(jobId)));
        if (job.status === 'completed' || job.status === 'failed') return;
        await new Promise((r) => setTimeout(r, 100));
      }
    });
    assert.equal(job.status, 'completed', JSON.stringify(job));
    assert.equal(job.deviceJobStatistics.deviceCount, 1, JSON.stringify(job));
    assert.equal(job.deviceJobStatistics.succeededCount, 1, JSON.stringify(job));
    const { responseBody: twin } = await sdk('Registry.getTwin after the job', () => registry.getTwin(jobDeviceId));
    assert.deepEqual(twin.properties.desired.maintenance, { window: 'sunday' });

    const query = jobs.createQuery('scheduleUpdateTwin', 'completed');
    const { result: page } = await sdk('JobClient query', () => query.next());
    assert.ok(page.some((j) => j.jobId === jobId), `query gave ${JSON.stringify(page)}`);
  });
});
