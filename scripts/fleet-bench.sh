#!/usr/bin/env bash
# The fleet benchmarks of docs/benchmarks.md, "Provisioning at fleet scale":
#   - registrations per second, latency and server CPU as the enrolled fleet
#     grows from 1,000 to 100,000 symmetric-key devices, on SQLite, on
#     PostgreSQL with one replica and with two (docs/fleet/*.jsonl, plotted
#     into docs/fleet-scale.png with gnuplot);
#   - a 100,000-device fleet enrolled and provisioned from scratch, a
#     10,000-device TPM fleet, and latency at 1,000 registrations/s.
#   - server CPU per TPM registration, the server on a vCPU of its own and
#     the simulator on the other, then the server saturated inside a quarter
#     of a CPU, as the simulator's RSA work cannot drive it any harder on two
#     vCPUs (needs root for the cgroup); the same for scripts/httpsfloor.
# Needs PostgreSQL's server binaries (Debian's postgresql) and gnuplot; run
# as root or as a user that can run them. Takes about ten minutes; PARTS
# chooses some of: sqlite postgres-1 postgres-2 totals tpm-cpu.
set -euo pipefail
parts=" ${PARTS:-sqlite postgres-1 postgres-2 totals tpm-cpu} "
want() { [[ $parts == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
out=docs/fleet
mkdir -p "$out"
bin=$(mktemp -d)/hatchery
go build -o "$bin" ./cmd/hatchery
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "${pgdata:-}" ] && run_pg pg_ctl -D "$pgdata" -m immediate stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

run_pg() { # a PostgreSQL program as the postgres user when root
  local prog=$1; shift
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$pgbin/$prog" "$@"; else "$pgbin/$prog" "$@"; fi
}

start_pg() {
  pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  local dir; dir=$(mktemp -d /tmp/hatchery-bench-pg-XXXX)
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  pgdata=$dir/data
  run_pg initdb -D "$pgdata" -U postgres --auth=trust --no-instructions >/dev/null
  run_pg pg_ctl -D "$pgdata" -l "$dir/log" -w -o "-h 127.0.0.1 -p 55432 -k $dir -c max_connections=300" start >/dev/null
  run_pg psql -h 127.0.0.1 -p 55432 -U postgres -qc "CREATE DATABASE $1" >/dev/null
}

# serve DIR PORT MQTT [flags…]: a server in the background, once it listens
# (on the CPU $server_cpu only, when set).
serve() {
  local dir=$1 port=$2 mqtt=$3; shift 3
  ${server_cpu:+taskset -c "$server_cpu"} "$bin" serve --data-dir "$dir" --hostname localhost --https-port "$port" --mqtt-port "$mqtt" --log-level error "$@" &
  pids+=($!)
  for _ in $(seq 100); do
    if (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then return; fi
    sleep 0.1
  done
  echo "the server on $port did not start" >&2; exit 1
}

stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  pids=()
}

# growth NAME SIM-FLAGS…: 1k, then up to 100k enrolled devices, one line per step.
growth() {
  local name=$1; shift
  : >"$out/$name.jsonl"
  local step=0
  for n in 1000 9000 10000 10000 10000 10000 10000 10000 10000 10000 10000; do
    step=$((step + 1))
    "$bin" fleet simulate "$@" --devices "$n" --concurrency 64 --x25519 --prefix "g$step-" -o json 2>/dev/null |
      tr -d '\n' >>"$out/$name.jsonl"
    echo >>"$out/$name.jsonl"
  done
}

# SQLite, one server.
if want sqlite; then
  serve "$work/sqlite" 9443 9883
  growth sqlite --data-dir "$work/sqlite"
  stop_all
fi

# PostgreSQL, one replica, then two on a fresh database.
if want postgres-1 || want postgres-2; then
  start_pg fleet1
fi
if want postgres-1; then
  serve "$work/pg1" 9443 9883 --database postgres://postgres@127.0.0.1:55432/fleet1
  HATCHERY_DATABASE=postgres://postgres@127.0.0.1:55432/fleet1 growth postgres-1 --data-dir "$work/pg1"
  stop_all
fi
if want postgres-2; then
  run_pg psql -h 127.0.0.1 -p 55432 -U postgres -qc "CREATE DATABASE fleet2" >/dev/null
  db=postgres://postgres@127.0.0.1:55432/fleet2
  serve "$work/pg2a" 9443 9883 --database "$db"
  mkdir -p "$work/pg2b" && cp -a "$work/pg2a/tls" "$work/pg2b/"
  serve "$work/pg2b" 9444 9884 --database "$db"
  HATCHERY_DATABASE=$db growth postgres-2 --data-dir "$work/pg2a" --replicas https://127.0.0.1:9443,https://127.0.0.1:9444
  stop_all
fi

# TPM registrations: the server on a vCPU of its own at the rate the
# simulator on the other can drive, then saturated within a CPU quota of
# 25 %; and the same for scripts/httpsfloor, which only moves the bytes of
# a TPM registration over HTTPS, the floor under any Go server's figure.
if want tpm-cpu; then
  floor=$(dirname "$bin")/httpsfloor
  go build -o "$floor" ./scripts/httpsfloor
  tpm_fleet() { # DIR OUT [taskset prefix…]
    local dir=$1 json=$2; shift 2
    "$@" "$bin" fleet simulate --data-dir "$dir" --devices 3000 --attestation tpm --concurrency 32 --key-pool 8 \
      --x25519 --server-pid "${pids[0]}" -o json 2>/dev/null >"$json"
  }
  floor_serve() {
    ${server_cpu:+taskset -c "$server_cpu"} "$floor" -serve -cert "$work/floor.der" &
    pids+=($!)
    for _ in $(seq 100); do [ -s "$work/floor.der" ] && return; sleep 0.1; done
    echo "httpsfloor did not start" >&2; exit 1
  }
  floor_clients() { # OUT RATE [taskset prefix…] (RATE 0: as fast as it answers)
    local json=$1 rate=$2; shift 2
    "$@" "$floor" -cert "$work/floor.der" -server-pid "${pids[0]}" -rate "$rate" >"$json"
    rm -f "$work/floor.der"
  }
  quota() { # PID: into a cgroup of a quarter CPU
    if [ -d /sys/fs/cgroup/cpu ]; then # cgroup v1
      cg=/sys/fs/cgroup/cpu/hatchery-bench
      mkdir -p "$cg" && echo 100000 >"$cg/cpu.cfs_period_us" && echo 25000 >"$cg/cpu.cfs_quota_us"
    else # cgroup v2
      cg=/sys/fs/cgroup/hatchery-bench
      mkdir -p "$cg" && echo "25000 100000" >"$cg/cpu.max"
    fi
    echo "$1" >"$cg/cgroup.procs"
  }
  server_cpu=1 serve "$work/tpm-pinned" 9443 9883
  tpm_fleet "$work/tpm-pinned" "$out/tpm-cpu-pinned.json" taskset -c 0
  stop_all
  server_cpu=1 floor_serve
  floor_clients "$out/floor-pinned.json" "$(jq .registrationsPerSecond "$out/tpm-cpu-pinned.json")" taskset -c 0
  stop_all
  serve "$work/tpm-cpu" 9443 9883
  quota "${pids[0]}"
  tpm_fleet "$work/tpm-cpu" "$out/tpm-cpu.json"
  stop_all
  floor_serve
  quota "${pids[0]}"
  floor_clients "$out/floor.json" 0
  stop_all
  rmdir "$cg"
fi

want totals || { scripts/plot-fleet.sh; exit 0; }
# From scratch: 100,000 symmetric-key devices, enrolled and provisioned.
serve "$work/big" 9443 9883
start=$(date +%s.%N)
"$bin" fleet simulate --data-dir "$work/big" --devices 100000 --concurrency 128 --x25519 -o json 2>/dev/null >"$out/100k.json"
echo "{\"wallSeconds\": $(echo "$(date +%s.%N) - $start" | bc)}" >"$out/100k-wall.json"
# 1,000 registrations/s, open loop.
"$bin" fleet simulate --data-dir "$work/big" --devices 20000 --concurrency 256 --rate 1000 --x25519 --prefix r- -o json 2>/dev/null >"$out/rate-1000.json"
# 10,000 TPM devices, from key generation to the last registration.
start=$(date +%s.%N)
"$bin" fleet simulate --data-dir "$work/big" --devices 10000 --attestation tpm --concurrency 8 --x25519 --prefix t- -o json 2>/dev/null >"$out/tpm-10k.json"
echo "{\"wallSeconds\": $(echo "$(date +%s.%N) - $start" | bc)}" >"$out/tpm-10k-wall.json"
stop_all

scripts/plot-fleet.sh
