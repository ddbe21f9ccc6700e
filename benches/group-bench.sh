#!/usr/bin/env bash
# group-bench.sh — the consumer-group figures of docs/benchmarks.md on a fresh local cluster.
#
# Usage: benches/group-bench.sh [KEEL_BINARY] [PAIRS]
#
# Starts `keel up` (three brokers, replication factor 3) in a scratch directory on ports
# 25292-25294, then measures, on that one cluster:
#   1. commit round trips: `keel bench commit` (one member, one commit in flight), 5 runs;
#   2. rebalance after a crash: `keel bench rebalance` with 3 members on 6 partitions and a
#      3000 ms session timeout, 5 crashes;
#   3. group consumption: `keel bench consume --consumers 1` and `--consumers 3` alternated,
#      PAIRS pairs (default 5), each run a fresh group reading 30,000,000 records of 100 bytes
#      of one 6-partition topic, measured from the moment the group is stable.
# Prints one JSON line per run, prefixed by its label. Stops the cluster on exit.
set -euo pipefail

KEEL=${1:-target/release/keel}
PAIRS=${2:-5}
DIR=$(mktemp -d "${TMPDIR:-/tmp}/keel-group-bench.XXXXXX")
B=127.0.0.1:25292

"$KEEL" up --data-dir "$DIR" --base-port 25292 > "$DIR/up.log" 2>&1 &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null; rm -rf "$DIR"' EXIT

for _ in $(seq 1 100); do
    "$KEEL" cluster status --brokers "$B" > /dev/null 2>&1 && break
    sleep 0.2
done

# Create the offsets topic, then let its partitions settle on their preferred leaders (a
# leader hands a partition back to its preferred replica 5 s after it is in sync), so the
# coordinators do not move during the measurements.
"$KEEL" bench commit --topic warmup --records 10 --brokers "$B" --json > /dev/null
sleep 8

for i in 1 2 3 4 5; do
    echo "commit $i $("$KEEL" bench commit --topic bc --records 2000 --brokers "$B" --json)"
done

echo "rebalance $("$KEEL" bench rebalance --topic rb --partitions 6 --consumers 3 --rounds 5 \
    --session-timeout-ms 3000 --brokers "$B" --json)"

# The same for the data topic: `keel bench produce` sends to the leaders it was told, so let
# them settle first.
"$KEEL" topic create gc --partitions 6 --config flush.messages=1000000 --brokers "$B"
sleep 8
"$KEEL" bench produce --topic gc --producers 3 --records 30000000 --brokers "$B" --json > /dev/null
for i in $(seq 1 "$PAIRS"); do
    if (( i % 2 )); then order="1 3"; else order="3 1"; fi
    for c in $order; do
        echo "consume-$c $i $("$KEEL" bench consume --topic gc --records 30000000 \
            --consumers "$c" --brokers "$B" --json)"
    done
done
