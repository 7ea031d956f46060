// Shared helpers for the interop tests. The Go harness (interop_test.go) starts
// `hatchery serve` on port 443 and passes the output of `hatchery info --output json`
// in HATCHERY_INFO; NODE_EXTRA_CA_CERTS makes Node trust the server's local CA.
'use strict';

const assert = require('node:assert/strict');
const crypto = require('node:crypto');

function loadInfo() {
  const raw = process.env.HATCHERY_INFO;
  if (!raw) {
    throw new Error('HATCHERY_INFO is not set: run these tests through `go test ./test/interop/` ' +
      '(or export HATCHERY_INFO="$(hatchery info --output json)" and NODE_EXTRA_CA_CERTS=<data-dir>/tls/ca.pem)');
  }
  const info = JSON.parse(raw);
  for (const k of ['idScope', 'provisioningHost', 'provisioningServiceConnectionString', 'hubHostName', 'hubConnectionString']) {
    assert.ok(info[k], `HATCHERY_INFO has no ${k}: ${raw}`);
  }
  return info;
}

// The device SDK wants a bare host name ("global.azure-devices-provisioning.net");
// accept either that or a URL in the info output.
function bareHost(hostOrUrl) {
  return /^[a-z]+:\/\//i.test(hostOrUrl) ? new URL(hostOrUrl).hostname : hostOrUrl;
}

// A suffix that keeps IDs unique if the tests run twice against one server.
function uniqueSuffix() {
  return Date.now().toString(36) + '-' + crypto.randomBytes(3).toString('hex');
}

function randomKey(bytes = 32) {
  return crypto.randomBytes(bytes).toString('base64');
}

// Device key of a symmetric-key enrollment group member (PROTOCOL.md §3):
// base64(HMAC-SHA-256(base64decode(groupKey), registrationId)).
function deriveDeviceKey(groupKey, registrationId) {
  return crypto.createHmac('sha256', Buffer.from(groupKey, 'base64')).update(registrationId, 'utf8').digest('base64');
}

// Runs fn (returning a promise) and fails with a clear message if it neither
// resolves nor rejects within ms, so that a server that never answers is a
// failure, not a hang.
async function within(ms, what, fn) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([fn(), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

// How long one SDK or HTTPS call may take.
const CALL_MS = 15000;

// One SDK or HTTPS call, bounded by CALL_MS.
function call(what, fn) {
  return within(CALL_MS, what, fn);
}

// An SDK call that must succeed; a failure names what the server answered.
async function sdk(what, fn) {
  try {
    return await call(what, fn);
  } catch (err) {
    if (err instanceof assert.AssertionError || /no answer within/.test(err.message)) throw err;
    assert.fail(`${what}: ${describeError(err)}`);
  }
}

// What the steps of a test file hand on to later ones: state, and need,
// which fails a step whose earlier step did not leave what it needs.
function steps() {
  const state = {};
  const need = (key, what) => {
    assert.ok(state[key] !== undefined, `depends on an earlier step that failed: ${what}`);
    return state[key];
  };
  return { state, need };
}

// Awaits a promise that must reject, and returns the error.
async function rejection(promise, what) {
  try {
    const value = await promise;
    assert.fail(`${what}: expected an error, got success: ${JSON.stringify(value && value.responseBody !== undefined ? value.responseBody : value)}`);
  } catch (err) {
    if (err instanceof assert.AssertionError) throw err;
    return err;
  }
}

// HTTP status carried by an error of azure-iot-http-base's RestApiClient.
function statusOf(err) {
  return err && err.response && err.response.statusCode;
}

// Describes an SDK error with what the server sent, for assertion messages.
function describeError(err) {
  const status = statusOf(err);
  const body = err && (err.responseBody !== undefined ? err.responseBody : err.result);
  return `${err && err.name}: ${err && err.message}` +
    (status ? ` (HTTP ${status})` : '') +
    (body !== undefined ? ` body=${typeof body === 'string' ? body : JSON.stringify(body)}` : '');
}

module.exports = {
  loadInfo, bareHost, uniqueSuffix, randomKey, deriveDeviceKey, within, CALL_MS, call, sdk, steps, rejection, statusOf, describeError,
};
