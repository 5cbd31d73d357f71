"""The fio workloads, the fio command lines, and the parsing of fio's JSON output."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time


@dataclasses.dataclass(frozen=True)
class Workload:
    key: str  # file-name-safe id
    title: str  # as in the table
    rw: str  # fio rw=
    bs: str
    iodepth: int
    unit: str  # "IOPS" or "MiB/s": the figure the table shows and ratios are taken of
    fsync: bool = False  # a FLUSH after every write
    sustained: bool = False  # longer run, past the write-back dirty limit
    burst: bool = False  # a fixed number of bytes (within the dirty limit), no ramp
    # Systems the workload runs on (None: all). The sustained run is only meaningful for
    # the write-back cache and its comparison (none), plus baseline A for the ratio.
    systems: tuple[str, ...] | None = None

    @property
    def is_write(self) -> bool:
        return "write" in self.rw

    @property
    def is_random(self) -> bool:
        return self.rw.startswith("rand")


WORKLOADS: list[Workload] = [
    Workload("randwrite-4k-qd1", "4K randwrite QD1", "randwrite", "4k", 1, "IOPS"),
    Workload("randwrite-4k-qd32", "4K randwrite QD32 (burst)", "randwrite", "4k", 32, "IOPS", burst=True),
    Workload("randread-4k-qd1", "4K randread QD1 (hot)", "randread", "4k", 1, "IOPS"),
    Workload("randread-4k-qd32", "4K randread QD32 (hot)", "randread", "4k", 32, "IOPS"),
    Workload("seqwrite-1m-qd8", "1M seq write QD8", "write", "1M", 8, "MiB/s"),
    Workload("seqread-1m-qd8", "1M seq read QD8", "read", "1M", 8, "MiB/s"),
    Workload("randwrite-4k-flush-qd1", "4K write+flush QD1", "randwrite", "4k", 1, "IOPS", fsync=True),
    Workload(
        "randwrite-4k-qd32-sustained",
        "4K randwrite QD32 (sustained)",
        "randwrite",
        "4k",
        32,
        "IOPS",
        sustained=True,
        systems=("A", "none", "writeback"),
    ),
]

# Targets from issue 6: ratio to baseline A, per workload and mode. "none" as a value
# means "at least the `none` figure of the same workload".
TARGETS: dict[str, dict[str, float | str]] = {
    "randwrite-4k-qd1": {"writeback": 1.0, "none": 0.5},
    "randwrite-4k-qd32": {"writeback": 0.9, "none": 0.35},
    "randwrite-4k-qd32-sustained": {"writeback": "none"},
    "randread-4k-qd1": {"writeback": 1.0, "none": 0.6},
    "randread-4k-qd32": {"writeback": 0.9, "none": 0.5},
    "seqwrite-1m-qd8": {"writeback": 0.5, "none": 0.3, "writethrough": 0.2},
    "randwrite-4k-flush-qd1": {"writeback": 0.5, "none": 0.5, "writethrough": 0.5},
}


def fio_cmd(uri: str, name: str, out: str, extra: list[str]) -> list[str]:
    return [
        "fio",
        f"--name={name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--output-format=json",
        f"--output={out}",
    ] + extra


def workload_args(w: Workload, ramp: float, runtime: float, burst_bytes: int = 0) -> list[str]:
    a = [f"--rw={w.rw}", f"--bs={w.bs}", f"--iodepth={w.iodepth}", "--lat_percentiles=1"]
    if w.burst:
        # A burst: this many bytes from the start (no ramp), `runtime` only as a cap.
        a += [f"--io_size={burst_bytes}", f"--runtime={runtime:g}s"]
    else:
        a += ["--time_based", f"--runtime={runtime:g}s", f"--ramp_time={ramp:g}s"]
    if w.is_random:
        a += ["--norandommap", "--randrepeat=0"]
    if w.fsync:
        a += ["--fsync=1"]
    return a


def prefill_args() -> list[str]:
    # Sequential 1 MiB writes over the whole export (fio takes the size from the NBD
    # server), then one FLUSH, so every mode starts from the same durable, written disk.
    return ["--rw=write", "--bs=1M", "--iodepth=8", "--end_fsync=1"]


def verify_args(offset: str, size: str) -> list[str]:
    return [
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        f"--offset={offset}",
        f"--size={size}",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_dump=0",
    ]


@dataclasses.dataclass
class FioRun:
    ok: bool
    error: str
    json: dict | None
    wall_start: float
    wall_end: float


def run_fio(cmd: list[str], out: str, timeout: float, log) -> FioRun:
    """Runs fio; the JSON lands in `out`. Never raises for a failed or hung fio."""
    t0 = time.time()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, text=True)
        t1 = time.time()
        text = p.stdout
        rc = p.returncode
    except subprocess.TimeoutExpired as e:
        t1 = time.time()
        so = e.stdout
        text = (so.decode(errors="replace") if isinstance(so, bytes) else (so or ""))
        return FioRun(False, f"fio did not finish within {timeout:.0f} s (hung?); output: {text.strip()[-400:]}", None, t0, t1)
    d = None
    err = ""
    try:
        with open(out) as f:
            raw = f.read()
        # fio may print notices before the JSON document.
        i = raw.find("{")
        d = json.loads(raw[i:]) if i >= 0 else None
    except (OSError, ValueError) as e:
        err = f"no fio JSON ({e})"
    if rc != 0:
        err = f"fio exited {rc}: {text.strip()[-600:]}"
    elif d is not None and d["jobs"][0].get("error", 0):
        err = f"fio job error {d['jobs'][0]['error']}: {text.strip()[-600:]}"
    elif d is None and not err:
        err = "no fio JSON"
    # Keep fio's notices (e.g. "connected to NBD server") out of the stored JSON.
    if d is not None:
        with open(out, "w") as f:
            json.dump(d, f, indent=1)
            f.write("\n")
    if text.strip() and log is not None and err:
        log(text.strip()[-1000:])
    return FioRun(err == "", err, d, t0, t1)


def summarize(w: Workload, d: dict) -> dict:
    """The figures of one run: throughput, latency (µs), bytes moved, runtime."""
    j = d["jobs"][0]
    s = j["write"] if w.is_write else j["read"]
    lat = s["lat_ns"]
    pct = lat.get("percentile", {})
    mean_us = lat["mean"] / 1000.0
    p99_us = pct.get("99.000000", 0) / 1000.0
    r = {
        "iops": s["iops"],
        "mibps": s["bw_bytes"] / 2**20,
        "lat_mean_us": mean_us,
        "lat_p99_us": p99_us,
        "bytes": j["read"]["io_bytes"] + j["write"]["io_bytes"],
        "runtime_s": j.get("job_runtime", 0) / 1000.0 or None,
    }
    if w.fsync and "sync" in j:
        # Each I/O is a write then a FLUSH: the latency of a durable write is the sum of
        # the means; the p99 shown is the FLUSH's (the write's p99 is kept too).
        sl = j["sync"]["lat_ns"]
        r["write_lat_mean_us"] = mean_us
        r["write_lat_p99_us"] = p99_us
        r["flush_lat_mean_us"] = sl["mean"] / 1000.0
        r["flush_lat_p99_us"] = sl.get("percentile", {}).get("99.000000", 0) / 1000.0
        r["lat_mean_us"] = mean_us + r["flush_lat_mean_us"]
        r["lat_p99_us"] = r["flush_lat_p99_us"]
    r["value"] = r["iops"] if w.unit == "IOPS" else r["mibps"]
    return r


def raw_name(rep: int, w: Workload, system: str) -> str:
    return os.path.join("raw", f"rep{rep}-{w.key}-{system}.json")
