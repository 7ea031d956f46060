#!/usr/bin/env bash
# Installs what the test suite needs: swtpm and tpm2-tools (Debian), the Moby
# engine (Debian's docker.io, started here when not running), PostgreSQL
# (the tests start their own clusters) and the official
# Azure IoT Node SDKs (npm, from test/interop/package-lock.json), with
# openssl to make the X.509 devices' certificates they use.
# Without root or apt it says what is missing; tests needing it then skip
# locally and fail under CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in swtpm:swtpm swtpm_setup:swtpm-tools tpm2_createek:tpm2-tools dockerd:docker.io docker-registry:docker-registry htpasswd:apache2-utils openssl:openssl; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  need+=(nodejs npm)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "missing: ${need[*]} (install them: sudo apt-get install ${need[*]})" >&2
  fi
fi

if command -v npm >/dev/null 2>&1 && [ -f test/interop/package-lock.json ] && [ ! -d test/interop/node_modules ]; then
  (cd test/interop && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
fi

# The engine: started in the background when its socket does not answer.
if command -v dockerd >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && ! docker version >/dev/null 2>&1; then
  mkdir -p /var/log
  nohup dockerd --host unix:///var/run/docker.sock >/var/log/hatchery-test-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker version >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker version >/dev/null 2>&1 || echo "dockerd did not start: see /var/log/hatchery-test-dockerd.log" >&2
fi
