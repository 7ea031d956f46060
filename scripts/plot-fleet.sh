#!/usr/bin/env bash
# Plots docs/fleet/*.jsonl (written by scripts/fleet-bench.sh) into
# docs/fleet-scale.png: registrations per second, p99 latency and server CPU
# per registration against the number of enrolled devices. Needs python3
# and gnuplot.
set -euo pipefail
cd "$(dirname "$0")/../docs"
tmp=$(mktemp -d)
for f in fleet/sqlite fleet/postgres-1 fleet/postgres-2; do
  python3 -c '
import json, sys
for line in open(sys.argv[1]):
    if line.strip():
        r = json.loads(line)
        print(r["enrolledBefore"], r["registrationsPerSecond"], r["latency"]["p99Ms"], r.get("serverCpuMsPerRegistration", 0))
' "$f.jsonl" >"$tmp/$(basename "$f").dat"
done
gnuplot <<GP
set terminal pngcairo size 1500,450 font "sans,10"
set output "fleet-scale.png"
set multiplot layout 1,3 title "Symmetric-key registrations, simulator and server on one 2-vCPU machine"
set key bottom right
set grid
set xlabel "enrolled devices"
set format x "%.0s%c"
set ylabel "registrations/s"
set yrange [0:*]
plot "$tmp/sqlite.dat" u 1:2 w lp t "SQLite", "$tmp/postgres-1.dat" u 1:2 w lp t "PostgreSQL, 1 replica", "$tmp/postgres-2.dat" u 1:2 w lp t "PostgreSQL, 2 replicas"
set ylabel "p99 latency (ms)"
plot "$tmp/sqlite.dat" u 1:3 w lp t "SQLite", "$tmp/postgres-1.dat" u 1:3 w lp t "PostgreSQL, 1 replica", "$tmp/postgres-2.dat" u 1:3 w lp t "PostgreSQL, 2 replicas"
set ylabel "server CPU per registration (ms)"
plot "$tmp/sqlite.dat" u 1:4 w lp t "SQLite", "$tmp/postgres-1.dat" u 1:4 w lp t "PostgreSQL, 1 replica", "$tmp/postgres-2.dat" u 1:4 w lp t "PostgreSQL, 2 replicas"
unset multiplot
GP
rm -rf "$tmp"
echo "wrote docs/fleet-scale.png"
