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
# Needs go, PostgreSQL's server binaries (Debian's postgresql; runuser when
# root), jq, bc, taskset (util-linux), python3 and gnuplot (for
# scripts/plot-fleet.sh), and root for tpm-cpu; it checks them first.
# Takes about ten minutes; PARTS chooses some of: sqlite postgres-1
# postgres-2 totals tpm-cpu. The ports are FLEET_HTTPS_PORT (9443),
# FLEET_MQTT_PORT (9883), FLEET_HTTPS_PORT2 and FLEET_MQTT_PORT2 (9444, 9884:
# the second replica), FLEET_PG_PORT (55432) and FLEET_FLOOR_PORT (9445).
set -euo pipefail
parts=" ${PARTS:-sqlite postgres-1 postgres-2 totals tpm-cpu} "
want() { [[ $parts == *" $1 "* ]]; }
https_port=${FLEET_HTTPS_PORT:-9443} mqtt_port=${FLEET_MQTT_PORT:-9883}
https_port2=${FLEET_HTTPS_PORT2:-9444} mqtt_port2=${FLEET_MQTT_PORT2:-9884}
pg_port=${FLEET_PG_PORT:-55432} floor_port=${FLEET_FLOOR_PORT:-9445}

# What the chosen parts need, checked now rather than after minutes of
# measuring. need CMD PACKAGE: CMD, from Debian's PACKAGE.
missing=()
need() { command -v "$1" >/dev/null || missing+=("$1 ($2)"); }
need go golang-go
need python3 python3
need gnuplot gnuplot-nox # scripts/plot-fleet.sh, at the end
if want totals; then need bc bc; fi
if want tpm-cpu; then need jq jq; need taskset util-linux; fi
if want postgres-1 || want postgres-2; then
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=("PostgreSQL's initdb (postgresql)")
fi
if ((${#missing[@]})); then
  printf 'fleet-bench: missing %s\n' "${missing[@]}" >&2
  echo "fleet-bench: install the Debian packages named in parentheses" >&2
  exit 1
fi
if want tpm-cpu && [ "$(id -u)" != 0 ]; then
  echo "fleet-bench: PARTS tpm-cpu puts the server in a CPU cgroup, which needs root: run as root, or leave tpm-cpu out of PARTS" >&2
  exit 1
fi
cd "$(dirname "$0")/.."
out=docs/fleet
mkdir -p "$out"
bindir=$(mktemp -d)
bin=$bindir/hatchery
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "${pgdata:-}" ] && run_pg pg_ctl -D "$pgdata" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work" "$bindir" ${pgdir:+"$pgdir"}
}
trap cleanup EXIT
go build -o "$bin" ./cmd/hatchery

# measure OUT CMD…: CMD's output into OUT, which is replaced only if CMD
# succeeds; if it fails, prints its standard error and ends the script.
measure() {
  local dest=$1; shift
  if ! "$@" >"$work/measure.out" 2>"$work/measure.err"; then
    echo "failed: $*" >&2
    cat "$work/measure.err" >&2
    exit 1
  fi
  mv "$work/measure.out" "$dest"
}

run_pg() { # a PostgreSQL program as the postgres user when root
  local prog=$1; shift
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$pgbin/$prog" "$@"; else "$pgbin/$prog" "$@"; fi
}

start_pg() {
  pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  pgdir=$(mktemp -d /tmp/hatchery-bench-pg-XXXX)
  [ "$(id -u)" = 0 ] && chown postgres "$pgdir"
  pgdata=$pgdir/data
  run_pg initdb -D "$pgdata" -U postgres --auth=trust --no-instructions >/dev/null
  run_pg pg_ctl -D "$pgdata" -l "$pgdir/log" -w -o "-h 127.0.0.1 -p $pg_port -k $pgdir -c max_connections=300" start >/dev/null
  run_pg psql -h 127.0.0.1 -p "$pg_port" -U postgres -qc "CREATE DATABASE $1" >/dev/null
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

# growth NAME SIM-FLAGS…: 1k, then up to 100k enrolled devices, one line per
# step; docs/fleet/NAME.jsonl is replaced once every step is done.
growth() {
  local name=$1; shift
  local lines=$work/$name.jsonl
  : >"$lines"
  local step=0
  for n in 1000 9000 10000 10000 10000 10000 10000 10000 10000 10000 10000; do
    step=$((step + 1))
    measure "$work/step.json" "$bin" fleet simulate "$@" --devices "$n" --concurrency 64 --x25519 --prefix "g$step-" -o json
    tr -d '\n' <"$work/step.json" >>"$lines"
    echo >>"$lines"
  done
  mv "$lines" "$out/$name.jsonl"
}

# SQLite, one server.
if want sqlite; then
  serve "$work/sqlite" "$https_port" "$mqtt_port"
  growth sqlite --data-dir "$work/sqlite"
  stop_all
fi

# PostgreSQL, one replica, then two on a fresh database.
if want postgres-1 || want postgres-2; then
  start_pg fleet1
fi
if want postgres-1; then
  serve "$work/pg1" "$https_port" "$mqtt_port" --database "postgres://postgres@127.0.0.1:$pg_port/fleet1"
  HATCHERY_DATABASE=postgres://postgres@127.0.0.1:$pg_port/fleet1 growth postgres-1 --data-dir "$work/pg1"
  stop_all
fi
if want postgres-2; then
  run_pg psql -h 127.0.0.1 -p "$pg_port" -U postgres -qc "CREATE DATABASE fleet2" >/dev/null
  db=postgres://postgres@127.0.0.1:$pg_port/fleet2
  serve "$work/pg2a" "$https_port" "$mqtt_port" --database "$db"
  mkdir -p "$work/pg2b" && cp -a "$work/pg2a/tls" "$work/pg2b/"
  serve "$work/pg2b" "$https_port2" "$mqtt_port2" --database "$db"
  HATCHERY_DATABASE=$db growth postgres-2 --data-dir "$work/pg2a" --replicas "https://127.0.0.1:$https_port,https://127.0.0.1:$https_port2"
  stop_all
fi

# TPM registrations: the server on a vCPU of its own at the rate the
# simulator on the other can drive, then saturated within a CPU quota of
# 25 %; and the same for scripts/httpsfloor, which only moves the bytes of
# a TPM registration over HTTPS, the floor under any Go server's figure.
if want tpm-cpu; then
  floor=$bindir/httpsfloor
  go build -o "$floor" ./scripts/httpsfloor
  tpm_fleet() { # DIR OUT [taskset prefix…]
    local dir=$1 json=$2; shift 2
    measure "$json" "$@" "$bin" fleet simulate --data-dir "$dir" --devices 3000 --attestation tpm --concurrency 32 --key-pool 8 \
      --x25519 --server-pid "${pids[0]}" -o json
  }
  floor_serve() {
    ${server_cpu:+taskset -c "$server_cpu"} "$floor" -serve -addr "127.0.0.1:$floor_port" -cert "$work/floor.der" &
    pids+=($!)
    for _ in $(seq 100); do [ -s "$work/floor.der" ] && return; sleep 0.1; done
    echo "httpsfloor did not start" >&2; exit 1
  }
  floor_clients() { # OUT RATE [taskset prefix…] (RATE 0: as fast as it answers)
    local json=$1 rate=$2; shift 2
    measure "$json" "$@" "$floor" -addr "127.0.0.1:$floor_port" -cert "$work/floor.der" -server-pid "${pids[0]}" -rate "$rate"
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
  server_cpu=1 serve "$work/tpm-pinned" "$https_port" "$mqtt_port"
  tpm_fleet "$work/tpm-pinned" "$out/tpm-cpu-pinned.json" taskset -c 0
  stop_all
  server_cpu=1 floor_serve
  floor_clients "$out/floor-pinned.json" "$(jq .registrationsPerSecond "$out/tpm-cpu-pinned.json")" taskset -c 0
  stop_all
  serve "$work/tpm-cpu" "$https_port" "$mqtt_port"
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
serve "$work/big" "$https_port" "$mqtt_port"
start=$(date +%s.%N)
measure "$out/100k.json" "$bin" fleet simulate --data-dir "$work/big" --devices 100000 --concurrency 128 --x25519 -o json
echo "{\"wallSeconds\": $(echo "$(date +%s.%N) - $start" | bc)}" >"$out/100k-wall.json"
# 1,000 registrations/s, open loop.
measure "$out/rate-1000.json" "$bin" fleet simulate --data-dir "$work/big" --devices 20000 --concurrency 256 --rate 1000 --x25519 --prefix r- -o json
# 10,000 TPM devices, from key generation to the last registration.
start=$(date +%s.%N)
measure "$out/tpm-10k.json" "$bin" fleet simulate --data-dir "$work/big" --devices 10000 --attestation tpm --concurrency 8 --x25519 --prefix t- -o json
echo "{\"wallSeconds\": $(echo "$(date +%s.%N) - $start" | bc)}" >"$out/tpm-10k-wall.json"
stop_all

scripts/plot-fleet.sh
