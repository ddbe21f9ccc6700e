#!/usr/bin/env bash
# machine-limits.sh — measure this machine's raw limits so Keel benchmark
# figures can be quoted beside them.
#
# Usage: benches/machine-limits.sh [--json] [SCRATCH_PARENT_DIR]
#
#   SCRATCH_PARENT_DIR  directory under which a temporary scratch dir is made
#                       (default: ${TMPDIR:-/tmp}). Put it on the same
#                       filesystem as the one the benchmark writes to, or the
#                       disk figures are meaningless. Needs ~2.1 GiB free.
#   --json              print one JSON object instead of the text report.
#
# Needs only bash, coreutils (dd, sync, mktemp, df), python3. No network
# (the TCP test uses 127.0.0.1 only). Takes roughly 30-90 s.
#
# Every metric is the median of 3 runs. Units: GB = 1e9 bytes.
#   memcpy_gbps                single-thread memcpy of a 256 MiB buffer
#                              (bytes copied / s; each byte is read once and
#                              written once). NOT `dd if=/dev/zero of=/dev/null`,
#                              which only clears a user buffer and never copies.
#   pagecache_write_fresh_gbps dd 2 GiB (1 MiB blocks) into a new file, no fsync
#   pagecache_write_overwrite_gbps  same, over an existing 2 GiB file
#                              (conv=notrunc); no block allocation needed
#   fdatasync_4k_ops           4 KiB O_APPEND write + fdatasync per op, ops/s
#                              (each run: 3000 ops or 5 s, whichever is first)
#   fdatasync_4k_p50_us        p50 latency of one write+fdatasync, microseconds
#   tcp_loopback_gbps          one TCP stream on 127.0.0.1, ~2 GiB in 1 MiB sends
#
# Between page-cache runs the file is fsync'd (untimed) so dirty-page
# throttling from a previous run does not leak into the next one.
set -euo pipefail

export LC_ALL=C

json=0
parent=""
for arg in "$@"; do
    case "$arg" in
        --json) json=1 ;;
        -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "machine-limits.sh: unknown option: $arg" >&2; exit 2 ;;
        *)
            if [[ -n "$parent" ]]; then
                echo "machine-limits.sh: only one directory argument allowed" >&2; exit 2
            fi
            parent="$arg" ;;
    esac
done
parent="${parent:-${TMPDIR:-/tmp}}"

if [[ ! -d "$parent" || ! -w "$parent" ]]; then
    echo "machine-limits.sh: not a writable directory: $parent" >&2; exit 2
fi

need_kib=$(( 2200 * 1024 ))
avail_kib=$(df -Pk "$parent" | awk 'NR==2 {print $4}')
if (( avail_kib < need_kib )); then
    echo "machine-limits.sh: need ~2.2 GiB free under $parent, have $(( avail_kib / 1024 )) MiB" >&2
    exit 1
fi

scratch=$(mktemp -d "$parent/keel-machine-limits.XXXXXX")
cleanup() { rm -rf -- "$scratch"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "machine-limits: $*" >&2; }

# median of exactly the numbers given as arguments
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {
    if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2] + a[NR/2+1]) / 2 }'; }

check3() {
    local what=$1; shift
    if (( $# != 3 )); then echo "machine-limits.sh: $what: expected 3 results, got $#" >&2; exit 1; fi
}

fmt2() { awk -v x="$1" 'BEGIN { printf "%.2f", x }'; }
fmt0() { awk -v x="$1" 'BEGIN { printf "%.0f", x }'; }

# Run dd and print bytes/second computed from dd's own byte count and
# elapsed time (more precise than its rounded "GB/s" field).
dd_rate() {
    local out
    out=$(dd "$@" 2>&1 >/dev/null) || { echo "$out" >&2; return 1; }
    # e.g. "2147483648 bytes (2.1 GB, 2.0 GiB) copied, 0.81234 s, 2.6 GB/s"
    awk '/bytes .* copied/ {
        bytes = $1
        for (i = 1; i <= NF; i++) if ($i == "s,") secs = $(i-1)
        if (secs > 0) { printf "%.6f\n", bytes / secs; found = 1 }
    } END { if (!found) exit 1 }' <<<"$out" || { echo "cannot parse dd output: $out" >&2; return 1; }
}

# ---------------------------------------------------------------- 1. memcpy
log "memcpy (3 x 8 copies of 256 MiB)"
memcpy_runs_out=$(python3 - <<'PY'
import time
N = 256 << 20
REPS = 8
src = bytearray(b"\x5a") * N          # touched, so no page faults while timing
dst = bytearray(b"\x00") * N
s, d = memoryview(src), memoryview(dst)
d[:] = s                              # warm-up
for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(REPS):
        d[:] = s                      # contiguous buffer copy -> memcpy
    dt = time.perf_counter() - t0
    print(N * REPS / dt)
PY
)
mapfile -t memcpy_runs <<<"$memcpy_runs_out"
check3 memcpy "${memcpy_runs[@]}"
memcpy=$(median "${memcpy_runs[@]}")

# -------------------------------------------------------- 2. page-cache write
f="$scratch/pagecache"
fresh_runs=()
log "page-cache write, fresh file (3 x 2 GiB)"
for _ in 1 2 3; do
    rm -f -- "$f"
    sync -f "$scratch"                # let the freed blocks settle (untimed)
    fresh_runs+=("$(dd_rate if=/dev/zero of="$f" bs=1M count=2048)")
    sync "$f"                         # untimed: flush so the next run starts clean
done
fresh=$(median "${fresh_runs[@]}")

log "page-cache write, overwrite of existing file (3 x 2 GiB)"
over_runs=()
for _ in 1 2 3; do
    # $f exists, is 2 GiB and fully allocated on disk from the last run
    over_runs+=("$(dd_rate if=/dev/zero of="$f" bs=1M count=2048 conv=notrunc)")
    sync "$f"
done
over=$(median "${over_runs[@]}")
rm -f -- "$f"

# ------------------------------------------------------ 3. 4 KiB + fdatasync
log "4 KiB append + fdatasync (3 x up to 3000 ops / 5 s)"
fsync_runs_out=$(python3 - "$scratch" <<'PY'
import os, sys, time
d = sys.argv[1]
buf = b"\xa5" * 4096
for run in range(3):
    path = os.path.join(d, f"dsync.{run}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    try:
        os.write(fd, buf); os.fdatasync(fd)          # warm-up, creates metadata
        lat = []
        start = time.perf_counter()
        deadline = start + 5.0
        while len(lat) < 3000:
            t0 = time.perf_counter()
            os.write(fd, buf)
            os.fdatasync(fd)
            t1 = time.perf_counter()
            lat.append(t1 - t0)
            if t1 > deadline:
                break
        total = time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(path)
    lat.sort()
    p50 = lat[len(lat) // 2]
    print(f"{len(lat) / total} {p50 * 1e6}")
PY
)
mapfile -t fsync_runs <<<"$fsync_runs_out"
check3 fdatasync "${fsync_runs[@]}"
fsync_ops_runs=(); fsync_p50_runs=()
for line in "${fsync_runs[@]}"; do
    read -r o p <<<"$line"
    fsync_ops_runs+=("$o"); fsync_p50_runs+=("$p")
done
fsync_ops=$(median "${fsync_ops_runs[@]}")
fsync_p50=$(median "${fsync_p50_runs[@]}")

# --------------------------------------------------------- 4. TCP loopback
log "TCP loopback, one stream (3 x 2 GiB in 1 MiB sends)"
# Receiver (this process) listens on an ephemeral port; the sender is a child
# python3 process, so the two ends run on separate cores.
tcp_runs_out=$(python3 - <<'PY'
import os, socket, subprocess, sys, time
CHUNK = 1 << 20
TOTAL = 2048 * CHUNK
SENDER = r"""
import socket, sys
CHUNK = 1 << 20
port, total = int(sys.argv[1]), int(sys.argv[2])
buf = memoryview(bytearray(b"\x3c") * CHUNK)
s = socket.create_connection(("127.0.0.1", port))
for _ in range(total // CHUNK):
    s.sendall(buf)
s.shutdown(socket.SHUT_WR)
s.recv(1)          # wait for receiver's ack before closing
s.close()
"""
buf = bytearray(CHUNK)
mv = memoryview(buf)
for run in range(3):
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    port = ls.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-c", SENDER, str(port), str(TOTAL)])
    try:
        ls.settimeout(30)
        conn, _ = ls.accept()
        conn.settimeout(60)
        got = 0
        n = conn.recv_into(mv)           # clock starts at first byte
        t0 = time.perf_counter()
        first = n
        got = n
        while got < TOTAL:
            n = conn.recv_into(mv)
            if n == 0:
                break
            got += n
        dt = time.perf_counter() - t0
        conn.sendall(b"k")
        conn.close()
    finally:
        ls.close()
        if p.wait(timeout=30) != 0:
            sys.exit("sender failed")
    if got != TOTAL:
        sys.exit(f"short transfer: {got} of {TOTAL} bytes")
    print((got - first) / dt)
PY
)
mapfile -t tcp_runs <<<"$tcp_runs_out"
check3 tcp "${tcp_runs[@]}"
tcp=$(median "${tcp_runs[@]}")

# ------------------------------------------------------------------ report
date_s=$(date -u '+%Y-%m-%dT%H:%M:%SZ')
nproc_s=$(nproc)
kernel=$(uname -r)
cpu=$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo)
cpu=${cpu:-unknown}
load=$(cut -d' ' -f1-3 /proc/loadavg)

memcpy_g=$(fmt2 "$(awk -v x="$memcpy" 'BEGIN{print x/1e9}')")
fresh_g=$(fmt2 "$(awk -v x="$fresh" 'BEGIN{print x/1e9}')")
over_g=$(fmt2 "$(awk -v x="$over" 'BEGIN{print x/1e9}')")
tcp_g=$(fmt2 "$(awk -v x="$tcp" 'BEGIN{print x/1e9}')")
ops=$(fmt0 "$fsync_ops")
p50=$(fmt0 "$fsync_p50")
fs=$(df -PT "$scratch" | awk 'NR==2 {print $2 " " $1}')

if (( json )); then
    DATE="$date_s" NPROC="$nproc_s" KERNEL="$kernel" CPU="$cpu" LOAD="$load" FS="$fs" \
    SCRATCH_PARENT="$parent" \
    M="$memcpy_g" F="$fresh_g" O="$over_g" OPS="$ops" P50="$p50" T="$tcp_g" \
    python3 -c '
import json, os
e = os.environ
print(json.dumps({
    "date_utc": e["DATE"],
    "nproc": int(e["NPROC"]),
    "kernel": e["KERNEL"],
    "cpu_model": e["CPU"],
    "loadavg": e["LOAD"],
    "scratch_fs": e["FS"],
    "scratch_parent": e["SCRATCH_PARENT"],
    "memcpy_gbps": float(e["M"]),
    "pagecache_write_fresh_gbps": float(e["F"]),
    "pagecache_write_overwrite_gbps": float(e["O"]),
    "fdatasync_4k_ops": int(e["OPS"]),
    "fdatasync_4k_p50_us": int(e["P50"]),
    "tcp_loopback_gbps": float(e["T"]),
}))'
else
    echo "date_utc $date_s"
    echo "nproc $nproc_s"
    echo "kernel $kernel"
    echo "cpu_model $cpu"
    echo "loadavg $load"
    echo "scratch_fs $fs ($parent)"
    echo "memcpy_gbps $memcpy_g"
    echo "pagecache_write_fresh_gbps $fresh_g"
    echo "pagecache_write_overwrite_gbps $over_g"
    echo "fdatasync_4k_ops $ops"
    echo "fdatasync_4k_p50_us $p50"
    echo "tcp_loopback_gbps $tcp_g"
fi
