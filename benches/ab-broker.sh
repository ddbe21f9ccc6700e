#!/bin/bash
# Side-by-side broker figures for two builds of `keel` (docs/benchmarks.md, "One path").
#
#   benches/ab-broker.sh single  BEFORE_BIN AFTER_BIN [ROUNDS]   rows A-E, one `keel broker`
#   benches/ab-broker.sh cluster BEFORE_BIN AFTER_BIN [ROUNDS]   rows F, O, O4, `keel up`
#
# Runs alternate (before, after, before, ...), each on a fresh data directory after dropping
# the page cache (needs root for that). Prints "TAG ROW records/s p99-ms" lines.
set -u
MODE=$1; BEFORE=$2; AFTER=$3; ROUNDS=${4:-3}
DIR=${KEEL_AB_DIR:-/tmp/keel-ab}

fresh() { rm -rf "$DIR"; mkdir -p "$DIR"; sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
row() { # TAG ROW BIN args...
  local tag=$1 row=$2 bin=$3; shift 3
  echo "$tag $row $("$bin" bench "$@" --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(int(d["records_per_sec"]), d["latency_ms"]["p99"])')"
}
wait_up() { for _ in $(seq 1 100); do "$1" topic list >/dev/null 2>&1 && return; sleep 0.3; done; }

single() { # BIN TAG
  fresh
  "$1" broker --id 1 --data-dir "$DIR/d" --listen 127.0.0.1:29292 --metrics-listen 127.0.0.1:29392 >"$DIR/broker.log" 2>&1 &
  local pid=$!
  export KEEL_BROKERS=127.0.0.1:29292
  wait_up "$1"
  row "$2" A "$1" produce --topic a1 --records 3000000 --acks leader --config flush.messages=10000000
  row "$2" B "$1" produce --topic b1 --producers 4 --partitions 4 --records 8000000 --acks leader --config flush.messages=10000000
  row "$2" C "$1" consume --topic a1 --records 3000000
  row "$2" D "$1" produce --topic d1 --records 2000000 --acks all
  sync
  row "$2" E "$1" e2e --topic e1 --records 250000 --rate 50000 --acks all
  kill "$pid"; wait "$pid" 2>/dev/null
}

cluster() { # BIN TAG
  fresh
  "$1" up --data-dir "$DIR/kb" --base-port 25292 >"$DIR/up.log" 2>&1 &
  local pid=$!
  export KEEL_BROKERS=127.0.0.1:25292
  wait_up "$1"; sleep 1
  row "$2" F "$1" produce --topic f1 --records 3000000
  row "$2" O "$1" produce --topic c1 --config flush.messages=1000000 --records 4000000
  row "$2" O4 "$1" produce --topic c4 --config flush.messages=1000000 --producers 4 --partitions 4 --records 4000000
  kill -INT "$pid"; wait "$pid" 2>/dev/null
}

for _ in $(seq 1 "$ROUNDS"); do
  "$MODE" "$BEFORE" before
  "$MODE" "$AFTER" after
done
