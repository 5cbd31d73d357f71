#!/usr/bin/env bash
# The benchmark of the README: one command that installs what it needs, builds the
# release binaries, starts the baselines (qemu-nbd on a local raw file, nbdkit memory)
# and a 3-node local cluster (copies 3) side by side, runs the fio workloads through
# fio's nbd engine, interleaving the systems, and writes a Markdown table, a chart and
# the raw fio JSON under bench/results/.
#
#   bench/run.sh            full mode (about 15 minutes on 2 cores)
#   bench/run.sh --quick    smoke check (a few seconds per cell)
#   bench/run.sh --help     every option (repetitions, durations, ports, sizes)
#
# Everything it starts is stopped, and its scratch directory removed, however it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CMDLINE="bench/run.sh${*:+ $*}"

for a in "$@"; do
    if [ "$a" = "-h" ] || [ "$a" = "--help" ]; then
        exec python3 "$REPO/bench/lib/bench.py" --help
    fi
done

# --- what it needs -----------------------------------------------------------------
need_pkgs=()
for pair in fio:fio nbdkit:nbdkit qemu-nbd:qemu-utils nbdinfo:libnbd-bin; do
    tool=${pair%%:*}; pkg=${pair#*:}
    command -v "$tool" >/dev/null 2>&1 || need_pkgs+=("$pkg")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "bench: installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
if ! fio --enghelp=nbd >/dev/null 2>&1; then
    echo "bench: this fio has no nbd engine (fio built without libnbd)" >&2
    exit 1
fi
# The chart: matplotlib if it can be had, else the harness draws an SVG itself.
if ! python3 -c 'import matplotlib' >/dev/null 2>&1; then
    python3 -m pip install --quiet matplotlib >/dev/null 2>&1 \
        || echo "bench: matplotlib unavailable; the chart will be a plain SVG"
fi

# --- build ---------------------------------------------------------------------------
echo "bench: cargo build --release --bins"
cargo build --release --bins

# --- run, with cleanup whatever happens ----------------------------------------------
WORK=$(mktemp -d "${BENCH_WORKDIR:-/var/tmp}/sheepdog-bench.XXXXXX")
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # The Python side stops what it started; this is the backstop if it was killed.
    if [ -f "$WORK/cluster/local.json" ]; then
        "$REPO/target/release/dog" local down --dir "$WORK/cluster" >/dev/null 2>&1 || true
    fi
    for f in "$WORK"/pids/*.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            sleep 0.5
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT

# The harness runs in the background so that a signal to this script reaches it at once:
# it is told with SIGTERM (a background job of a script ignores SIGINT), stops what it
# started and still writes the table of what it measured.
python3 "$REPO/bench/lib/bench.py" --repo "$REPO" --work "$WORK" --command "$CMDLINE" "$@" &
PY=$!
stop() {
    trap - INT TERM
    kill -TERM "$PY" 2>/dev/null || true
    wait "$PY" 2>/dev/null || true
    exit "$1"
}
trap 'stop 130' INT
trap 'stop 143' TERM
set +e
wait "$PY"
rc=$?
set -e
exit "$rc"
