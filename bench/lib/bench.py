#!/usr/bin/env python3
"""Benchmark harness of Sheepdog in Rust (issue 6). Run it through bench/run.sh, which
installs the tools, builds the release binaries and cleans up; see bench/README.md."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import procmon  # noqa: E402
import report  # noqa: E402
from systems import CacheWatch, Cluster, Processes, System, port_free, wait_port  # noqa: E402
from workloads import (  # noqa: E402
    WORKLOADS,
    fio_cmd,
    prefill_args,
    raw_name,
    run_fio,
    summarize,
    verify_args,
    workload_args,
)

MODES = {
    # ramp/runtime in seconds per run; sustained_* for the sustained QD32 randwrite.
    "quick": dict(reps=1, ramp=1, runtime=2, sustained_ramp=2, sustained_runtime=3, verify_size="16M"),
    "full": dict(reps=3, ramp=2, runtime=4, sustained_ramp=8, sustained_runtime=6, verify_size="64M"),
}
SYSTEM_KEYS = ["A", "B", "none", "writethrough", "writeback"]
VDI = {"none": "bench-none", "writethrough": "bench-wt", "writeback": "bench-wb"}


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="bench/run.sh",
        description="Benchmark baselines (qemu-nbd on a raw file, nbdkit memory) and a local "
        "3-node Sheepdog cluster (copies 3) in the none, writethrough and writeback modes "
        "with fio's nbd engine; writes a Markdown table, a chart and the raw fio JSON.",
    )
    m = p.add_mutually_exclusive_group()
    m.add_argument("--quick", action="store_const", const="quick", dest="mode", help="smoke check: 1 repetition, a few seconds per cell")
    m.add_argument("--full", action="store_const", const="full", dest="mode", help="the full run (default): 3 repetitions, about 15 minutes")
    p.add_argument("--reps", type=int, help="repetitions of every cell (medians are reported)")
    p.add_argument("--ramp", type=float, help="fio ramp_time per run, seconds")
    p.add_argument("--runtime", type=float, help="fio runtime per run (after the ramp), seconds")
    p.add_argument("--sustained-ramp", type=float, help="ramp of the sustained QD32 randwrite, seconds")
    p.add_argument("--sustained-runtime", type=float, help="runtime of the sustained QD32 randwrite, seconds")
    p.add_argument("--size", default="1G", help="size of every disk (VDI, raw file, memory disk); at least 1G for published numbers (default 1G)")
    p.add_argument("--cache-size", help="write-back cache of every node (default: twice --size, so the whole VDI stays hot)")
    p.add_argument("--cache-dirty-max", default="256M", help="dirty bytes at which write-back writes wait for pushes (default 256M)")
    p.add_argument("--burst", help="bytes written by the QD32 burst (default: half of --cache-dirty-max)")
    p.add_argument("--verify-size", help="bytes written and verified per mode in the verify pass")
    p.add_argument("--systems", default=",".join(SYSTEM_KEYS), help="comma-separated subset of " + ",".join(SYSTEM_KEYS))
    p.add_argument("--workloads", default=",".join(w.key for w in WORKLOADS), help="comma-separated subset of " + ",".join(w.key for w in WORKLOADS))
    p.add_argument("--cluster-port", type=int, default=7300, help="peer port of node 0 (node i: +i)")
    p.add_argument("--cluster-nbd-port", type=int, default=10950, help="NBD port of node 0 (node i: +i); the exports are served by node 0")
    p.add_argument("--qemu-nbd-port", type=int, default=10990)
    p.add_argument("--nbdkit-port", type=int, default=10991)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--copies", type=int, default=3)
    p.add_argument(
        "--wb-setting",
        default="writethrough-until-flush=off",
        help="KEY=VALUE given to `dog vdi set` on the writeback VDI to switch off "
        "writethrough-until-first-flush (default: writethrough-until-flush=off)",
    )
    p.add_argument("--out", help="results directory (default: bench/results/DATE-full or bench/results/quick/DATE)")
    p.add_argument("--repo", default=os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--command", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.mode = a.mode or "full"
    for k, v in MODES[a.mode].items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.reps < 1:
        p.error("--reps must be at least 1")
    a.systems = [s for s in a.systems.split(",") if s]
    for s in a.systems:
        if s not in SYSTEM_KEYS:
            p.error(f"unknown system {s!r}")
    keys = {w.key for w in WORKLOADS}
    a.workloads = [w for w in a.workloads.split(",") if w]
    for w in a.workloads:
        if w not in keys:
            p.error(f"unknown workload {w!r}")
    if a.cache_size is None:
        a.cache_size = f"{2 * size_bytes(a.size) >> 20}M"
    if a.burst is None:
        a.burst = f"{size_bytes(a.cache_dirty_max) // 2 >> 20}M"
    if "=" not in a.wb_setting:
        p.error("--wb-setting wants KEY=VALUE")
    return a


def size_bytes(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def machine_info(work: str) -> dict:
    def read(p):
        try:
            with open(p) as f:
                return f.read()
        except OSError:
            return ""

    cpu = ""
    for line in read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    try:
        df = subprocess.run(["df", "-hT", work], stdout=subprocess.PIPE, text=True).stdout.splitlines()[-1].split()
        disk = f"{df[0]} ({df[1]}, {df[2]}, {df[4]} free)"
    except Exception:  # noqa: BLE001
        disk = "?"
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "host": platform.node(),
        "disk": disk,
    }


def tool_versions() -> dict:
    out = {}
    for name, cmd in {
        "fio": ["fio", "--version"],
        "qemu-nbd": ["qemu-nbd", "--version"],
        "nbdkit": ["nbdkit", "--version"],
    }.items():
        try:
            out[name] = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout.splitlines()[0].strip()
        except Exception:  # noqa: BLE001
            out[name] = "?"
    return out


def git_rev(repo: str) -> str:
    try:
        rev = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except Exception:  # noqa: BLE001
        return "?"


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


class Bench:
    def __init__(self, a):
        self.a = a
        self.started = datetime.datetime.now(datetime.timezone.utc)
        stamp = self.started.strftime("%Y-%m-%d-%H%M%S")
        if a.out:
            self.out = os.path.abspath(a.out)
        elif a.mode == "quick":
            self.out = os.path.join(a.repo, "bench", "results", "quick", stamp)
        else:
            self.out = os.path.join(a.repo, "bench", "results", f"{stamp}-full")
        os.makedirs(os.path.join(self.out, "raw"), exist_ok=True)
        if a.mode == "quick" and not a.out:
            # Smoke checks are not for committing: only full runs are kept in git.
            ign = os.path.join(a.repo, "bench", "results", "quick", ".gitignore")
            if not os.path.exists(ign):
                with open(ign, "w") as f:
                    f.write("# quick-mode (smoke check) results are not committed\n*\n!.gitignore\n")
        self.work = a.work or os.path.join("/var/tmp", f"sheepdog-bench-{os.getpid()}")
        os.makedirs(self.work, exist_ok=True)
        self.logf = open(os.path.join(self.out, "bench.log"), "a")
        self.procs = Processes(self.work)
        self.dog_bin = os.path.join(a.repo, "target", "release", "dog")
        self.cluster = Cluster(self.dog_bin, self.work, a.nodes, a.copies, a.cluster_port, a.cluster_nbd_port, self.log)
        self.systems: dict[str, System] = {}
        self.workloads = [w for w in WORKLOADS if w.key in a.workloads]
        self.runs: list[dict] = []  # one per fio run
        self.prefill: dict[str, dict] = {}
        self.verify: dict[str, dict] = {}
        self.peak_rss: dict[str, dict[str, dict]] = {}  # mode -> node -> {hwm, anon, file} KiB
        self.hwm_reset_ok = True
        self.failures: list[str] = []
        self.fatal = ""
        self.info = {
            "started": self.started.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "machine": machine_info(self.work),
            "tools": tool_versions(),
            "git": git_rev(a.repo),
            "command": a.command or ("bench/run.sh " + " ".join(sys.argv[1:])).strip(),
            "load_start": loadavg(),
            "mode": a.mode,
            "params": {
                "reps": a.reps, "ramp_s": a.ramp, "runtime_s": a.runtime,
                "sustained_ramp_s": a.sustained_ramp, "sustained_runtime_s": a.sustained_runtime,
                "size": a.size, "verify_size": a.verify_size, "nodes": a.nodes, "copies": a.copies,
                "wb_setting": a.wb_setting, "cache_size": a.cache_size, "cache_dirty_max": a.cache_dirty_max,
                "burst": a.burst,
            },
        }

    # -- logging ----------------------------------------------------------------------
    def log(self, msg: str) -> None:
        self.logf.write(time.strftime("%H:%M:%S ") + msg + "\n")
        self.logf.flush()

    def say(self, msg: str) -> None:
        print("bench: " + msg, flush=True)
        self.log(msg)

    # -- set-up -----------------------------------------------------------------------
    def check_ports(self) -> None:
        a = self.a
        ports = []
        if "A" in a.systems:
            ports.append(a.qemu_nbd_port)
        if "B" in a.systems:
            ports.append(a.nbdkit_port)
        if any(s in a.systems for s in ("none", "writethrough", "writeback")):
            ports += [a.cluster_port + i for i in range(a.nodes)] + [a.cluster_nbd_port + i for i in range(a.nodes)]
        deadline = time.time() + 15  # a port held briefly by something else may come free
        while True:
            busy = [p for p in ports if not port_free(p)]
            if not busy or time.time() > deadline:
                break
            time.sleep(1)
        if busy:
            raise RuntimeError(f"port(s) {busy} already in use on 127.0.0.1; pick others (see --help)")

    def setup(self) -> None:
        a = self.a
        size = a.size
        if "A" in a.systems:
            path = os.path.join(self.work, "disk.raw")
            with open(path, "wb") as f:
                f.truncate(size_bytes(size))
            p = self.procs.start(
                "qemu-nbd",
                ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(a.qemu_nbd_port), "-x", "bench", "--persistent", "--shared=8", path],
                os.path.join(self.work, "qemu-nbd.log"),
            )
            wait_port(a.qemu_nbd_port, p.pid)
            self.systems["A"] = System("A", "A: qemu-nbd raw file", f"nbd://127.0.0.1:{a.qemu_nbd_port}/bench", [p.pid],
                                       note="qemu-nbd, raw file on the same disk as the cluster, default cache (writeback)")
        if "B" in a.systems:
            p = self.procs.start(
                "nbdkit",
                ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(a.nbdkit_port), "memory", size],
                os.path.join(self.work, "nbdkit.log"),
            )
            wait_port(a.nbdkit_port, p.pid)
            self.systems["B"] = System("B", "B: nbdkit memory", f"nbd://127.0.0.1:{a.nbdkit_port}/", [p.pid],
                                       note="nbdkit memory plugin: the protocol-overhead ceiling")
        modes = [m for m in ("none", "writethrough", "writeback") if m in a.systems]
        if not modes:
            return
        self.say(f"starting a {a.nodes}-node local cluster, copies {a.copies} (ports {a.cluster_port}+, nbd {a.cluster_nbd_port}+)")
        cache_on = self.cluster.up(["--cache-size", a.cache_size, f"--sheep-arg=--cache-dirty-max={a.cache_dirty_max}"])
        self.info["params"]["cache_on"] = cache_on
        pids = self.cluster.pids()
        if len(pids) != a.nodes:
            raise RuntimeError(f"found {len(pids)} sheep pid files, expected {a.nodes}")
        dog = self.cluster.dog
        for m in modes:
            s = System(m, m, self.cluster.uri(VDI[m]), pids, is_cluster=True)
            p = dog.run("vdi", "create", VDI[m], size, "--cache", m, check=(m != "writeback"))
            if p.returncode != 0:
                s.available = False
                s.why_not = "not available (cache not built): `dog vdi create --cache writeback` refused: " + (p.stderr.strip().removeprefix("dog: ") or f"exit {p.returncode}")
            elif m == "writeback" and not cache_on:
                s.available = False
                s.why_not = "not available (cache not built): `dog local up` does not take --cache-size"
            elif m == "writeback":
                key, value = a.wb_setting.split("=", 1)
                q = dog.run("vdi", "set", VDI[m], key, value, check=False)
                if q.returncode != 0:
                    s.available = False
                    s.why_not = (f"not available: the VDI was created, but `dog vdi set {VDI[m]} {key} {value}` "
                                 f"(writethrough until the first flush, off) was refused: " + q.stderr.strip().removeprefix("dog: "))
                else:
                    s.note = (f"writethrough-until-first-flush switched off (`dog vdi set {VDI[m]} {key} {value}`); "
                              f"cache {a.cache_size} per node, dirty limit {a.cache_dirty_max}; sequential streams of large "
                              "writes go around the cache after 64M (the default `--cache-sequential-cutoff`)")
            if not s.available:
                self.say(f"{m}: {s.why_not}")
            self.systems[m] = s

    # -- one fio run ------------------------------------------------------------------
    def fio(self, s: System, name: str, out_rel: str, args: list[str], timeout: float) -> dict:
        """Runs fio against system s with CPU sampling of its server processes and, for
        the cluster, the peak RSS of every sheep during the run."""
        out = os.path.join(self.out, out_rel)
        if s.is_cluster:
            dead = [p for p in s.pids if not procmon.alive(p)]
            if dead:
                raise RuntimeError(f"sheep process(es) {dead} are gone; see the sheep logs")
            for p in s.pids:
                self.hwm_reset_ok &= procmon.reset_peak_rss(p)
        self.log(f"fio {name} on {s.key}: {s.uri} {' '.join(args)}")
        watch = CacheWatch(self.cluster.dog, VDI[s.key]) if s.key == "writeback" else None
        with procmon.CpuSampler(s.pids) as cs:
            if watch:
                watch.__enter__()
            try:
                r = run_fio(fio_cmd(s.uri, name, out, args), out, timeout, self.log)
            finally:
                if watch:
                    watch.__exit__(None, None, None)
        res = {"ok": r.ok, "error": r.error, "json": r.json, "t0": r.wall_start, "t1": r.wall_end, "sampler": cs, "cache": watch}
        if s.is_cluster:
            peaks = self.peak_rss.setdefault(s.key, {})
            for i, p in enumerate(s.pids):
                hwm = procmon.status_kib(p, "VmHWM") or 0
                sp = cs.peak.get(p, {})
                node = f"node{i}"
                pk = peaks.setdefault(node, {"hwm": 0, "anon": 0, "file": 0})
                pk["hwm"] = max(pk["hwm"], hwm, sp.get("VmRSS", 0))
                pk["anon"] = max(pk["anon"], sp.get("RssAnon", 0))
                pk["file"] = max(pk["file"], sp.get("RssFile", 0))
        return res

    def do_prefill(self) -> None:
        for k, s in self.systems.items():
            if not s.available:
                continue
            self.say(f"prefill {k}: {self.a.size} of sequential 1 MiB writes + flush")
            t = time.time()
            r = self.fio(s, "prefill", os.path.join("raw", f"prefill-{k}.json"), prefill_args(), timeout=900)
            el = time.time() - t
            if not r["ok"]:
                raise RuntimeError(f"prefill of {k} failed: {r['error']}")
            j = r["json"]["jobs"][0]
            nbytes = j["write"]["io_bytes"]
            if nbytes < size_bytes(self.a.size):
                raise RuntimeError(f"prefill of {k} wrote {nbytes} bytes, less than {self.a.size}")
            cpu = r["sampler"].between(r["t0"], r["t1"])
            self.prefill[k] = {"seconds": el, "mibps": nbytes / 2**20 / el, "cpu_s_per_gib": cpu / (nbytes / 2**30)}

    def do_runs(self) -> None:
        a = self.a
        order_all = [k for k in SYSTEM_KEYS if k in self.systems and self.systems[k].available]
        total = sum(len([k for k in order_all if w.systems is None or k in w.systems]) for w in self.workloads) * a.reps
        n = 0
        t_begin = time.time()
        for rep in range(1, a.reps + 1):
            for wi, w in enumerate(self.workloads):
                keys = [k for k in order_all if w.systems is None or k in w.systems]
                # Interleave: every cell of a workload runs back to back, in an order
                # rotated per repetition and workload so no system is always first.
                rot = (rep - 1 + wi) % len(keys) if keys else 0
                keys = keys[rot:] + keys[:rot]
                if w.sustained:
                    ramp, runtime = a.sustained_ramp, a.sustained_runtime
                elif w.burst:
                    ramp, runtime = 0, max(2 * a.runtime, a.ramp + a.runtime)  # runtime: a cap
                else:
                    ramp, runtime = a.ramp, a.runtime
                for k in keys:
                    n += 1
                    s = self.systems[k]
                    rel = raw_name(rep, w, k)
                    eta = ""
                    if n > 1:
                        left = (time.time() - t_begin) / (n - 1) * (total - n + 1)
                        eta = f", ~{left / 60:.1f} min left"
                    print(f"bench: [{n}/{total}{eta}] rep {rep} {w.title} on {s.label}", flush=True)
                    run = {"rep": rep, "workload": w.key, "system": k, "raw": rel, "ok": False}
                    try:
                        r = self.fio(s, w.key, rel, workload_args(w, ramp, runtime, size_bytes(a.burst)), timeout=ramp + runtime + 90)
                    except RuntimeError as e:
                        run["error"] = str(e)
                        self.failures.append(f"{w.title} on {s.label} rep {rep}: {e}")
                        self.runs.append(run)
                        continue
                    if not r["ok"]:
                        run["error"] = r["error"]
                        self.failures.append(f"{w.title} on {s.label} rep {rep}: {r['error']}")
                        self.say("  FAILED: " + r["error"])
                    else:
                        m = summarize(w, r["json"])
                        win = m["runtime_s"] or runtime
                        cpu = r["sampler"].between(r["t1"] - win, r["t1"])
                        m["cpu_s"] = cpu
                        m["cpu_s_per_gib"] = cpu / (m["bytes"] / 2**30) if m["bytes"] else None
                        if r["cache"] is not None:
                            m["cache"] = r["cache"].summary(r["t1"] - win)
                        run.update(m)
                        run["ok"] = True
                    self.runs.append(run)

    def do_verify(self) -> None:
        a = self.a
        size = size_bytes(a.size)
        vsize = size_bytes(a.verify_size)
        offset = max(0, min(size // 2, size - vsize))
        for k, s in self.systems.items():
            if not s.available:
                continue
            self.say(f"verify {k}: {a.verify_size} of 4K random writes QD16 at offset {offset >> 20} MiB, read back with crc32c")
            rel = os.path.join("raw", f"verify-{k}.json")
            try:
                r = self.fio(s, "verify", rel, verify_args(str(offset), a.verify_size), timeout=600)
            except RuntimeError as e:
                r = {"ok": False, "error": str(e), "json": None}
            v = {"ok": False, "raw": rel, "written": 0, "verified": 0, "error": r["error"]}
            if r["json"]:
                j = r["json"]["jobs"][0]
                v["written"] = j["write"]["io_bytes"]
                v["verified"] = j["read"]["io_bytes"]
                v["fio_error"] = j.get("error", 0)
            v["ok"] = r["ok"] and v["written"] >= vsize and v["verified"] >= vsize
            if r["ok"] and not v["ok"]:
                v["error"] = f"wrote {v['written']} and verified {v['verified']} bytes, expected {vsize}"
            if not v["ok"]:
                self.failures.append(f"verify pass on {s.label}: {v['error']}")
                self.say(f"  VERIFY FAILED on {k}: {v['error']}")
            elif s.is_cluster and a.nodes > 1:
                self.verify_elsewhere(s, v, offset, vsize)
            self.verify[k] = v

    def verify_elsewhere(self, s: System, v: dict, offset: int, vsize: int) -> None:
        """Reads the blocks of the verify pass back through another gateway (node 1), so
        they come from the replicas and not from node 0's cache or memory: once node 0
        has let go of the VDI's lock (pushed and synced), fio's `verify_only` replays the
        same offsets and checks every block's crc32c."""
        a = self.a
        vdi = VDI[s.key]
        deadline = time.time() + 120
        held = True
        while time.time() < deadline:
            p = self.cluster.dog.run("vdi", "lock", "list", "--json", check=False)
            try:
                locks = json.loads(p.stdout) if p.returncode == 0 else None
                if isinstance(locks, dict):  # {"locks": [...]} or a bare list
                    locks = locks.get("locks")
                held = not isinstance(locks, list) or any(isinstance(x, dict) and x.get("name") == vdi for x in locks)
            except ValueError:
                held = True
            if not held:
                break
            time.sleep(0.5)
        if held:
            v["ok"] = False
            v["error"] = "node 0 still held the VDI's lock 120 s after the verify pass ended"
            self.failures.append(f"verify pass on {s.label}: {v['error']}")
            return
        rel = os.path.join("raw", f"verify-{s.key}-node1.json")
        other = System(s.key, s.label, f"nbd://127.0.0.1:{a.cluster_nbd_port + 1}/{vdi}", s.pids, is_cluster=True)
        self.say(f"verify {s.key}: reading the same blocks back through node 1's gateway")
        try:
            r = self.fio(other, "verify", rel, verify_args(str(offset), a.verify_size) + ["--verify_only"], timeout=600)
        except RuntimeError as e:
            r = {"ok": False, "error": str(e), "json": None}
        v["raw_node1"] = rel
        v["verified_node1"] = r["json"]["jobs"][0]["read"]["io_bytes"] if r["json"] else 0
        if not r["ok"] or v["verified_node1"] < vsize:
            v["ok"] = False
            v["error"] = r["error"] or f"node 1 verified {v['verified_node1']} bytes, expected {vsize}"
            self.failures.append(f"verify pass on {s.label} (read back through node 1): {v['error']}")
            self.say(f"  VERIFY FAILED on {s.key} through node 1: {v['error']}")

    # -- results ----------------------------------------------------------------------
    def cells(self) -> dict:
        """(workload, system) -> medians over the successful repetitions."""
        out = {}
        for w in self.workloads:
            for k in self.systems:
                rs = [r for r in self.runs if r["workload"] == w.key and r["system"] == k]
                if not rs:
                    continue
                ok = [r for r in rs if r["ok"]]
                c = {"n": len(ok), "failed": len(rs) - len(ok), "values": [r["value"] for r in ok]}
                for f in ("value", "iops", "mibps", "lat_mean_us", "lat_p99_us", "cpu_s_per_gib", "bytes",
                          "write_lat_mean_us", "write_lat_p99_us", "flush_lat_mean_us", "flush_lat_p99_us"):
                    xs = [r[f] for r in ok if r.get(f) is not None]
                    c[f] = statistics.median(xs) if xs else None
                out[(w.key, k)] = c
        return out

    def finish(self) -> int:
        self.info["load_end"] = loadavg()
        self.info["finished"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        self.info["elapsed_s"] = round(time.time() - self.started.timestamp())
        cells = self.cells()
        mode_cpu = {}
        for k in self.systems:
            ok = [r for r in self.runs if r["system"] == k and r["ok"]]
            b = sum(r["bytes"] for r in ok)
            c = sum(r["cpu_s"] for r in ok)
            if b:
                mode_cpu[k] = {"cpu_s": c, "gib": b / 2**30, "cpu_s_per_gib": c / (b / 2**30)}
        data = {
            "info": self.info,
            "systems": {k: {"label": s.label, "uri": s.uri, "available": s.available, "why_not": s.why_not, "note": s.note} for k, s in self.systems.items()},
            "workloads": [w.__dict__ | {"is_write": w.is_write} for w in self.workloads],
            "cells": {f"{w}|{k}": c for (w, k), c in cells.items()},
            "runs": self.runs,
            "prefill": self.prefill,
            "verify": self.verify,
            "mode_cpu": mode_cpu,
            "peak_rss_kib": self.peak_rss,
            "peak_rss_reset_per_run": self.hwm_reset_ok,
            "failures": self.failures,
            "fatal": self.fatal,
        }
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(data, f, indent=1, default=str)
        md = report.write(self.out, data, self.workloads, cells, self.log)
        if self.a.mode == "full" and not self.a.out and not self.fatal:
            rel = os.path.relpath(md, os.path.join(self.a.repo, "bench", "results"))
            with open(os.path.join(self.a.repo, "bench", "results", "LATEST.md"), "w") as f:
                f.write(f"# Latest full benchmark run\n\n[{rel}]({rel}) ({self.info['started']}).\n")
        self.say(f"results: {md}")
        if self.fatal or self.failures:
            for x in ([self.fatal] if self.fatal else []) + self.failures:
                print("bench: FAILED: " + x, file=sys.stderr)
            return 1
        return 0

    def run(self) -> int:
        try:
            self.check_ports()
            self.setup()
            self.do_prefill()
            self.do_runs()
            self.do_verify()
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
            self.fatal = f"{type(e).__name__}: {e}"
            self.log(traceback.format_exc())
            print(f"bench: aborted: {self.fatal}", file=sys.stderr)
            tails = self.cluster.log_tails()
            if tails:
                d = os.path.join(self.out, "sheep-logs")
                os.makedirs(d, exist_ok=True)
                for n, t in tails.items():
                    with open(os.path.join(d, n + ".log"), "w") as f:
                        f.write(t)
        finally:
            self.say("stopping everything")
            try:
                self.cluster.down()
            except Exception as e:  # noqa: BLE001
                self.log(f"dog local down: {e}")
            self.procs.stop_all()
        if self.failures and not self.fatal:
            tails = self.cluster.log_tails()
            d = os.path.join(self.out, "sheep-logs")
            os.makedirs(d, exist_ok=True)
            for n, t in tails.items():
                with open(os.path.join(d, n + ".log"), "w") as f:
                    f.write(t)
        return self.finish()


def main(argv) -> int:
    a = parse_args(argv)
    # SIGTERM (e.g. from bench/run.sh's caller) unwinds like Ctrl-C so everything stops.
    def on_term(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: let the clean-up finish
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_term)
    if shutil.which("fio") is None:
        print("bench: fio not found (bench/run.sh installs it)", file=sys.stderr)
        return 1
    b = Bench(a)
    print(f"bench: {a.mode} mode: {a.reps} repetition(s), ramp {a.ramp:g} s + {a.runtime:g} s per run; results in {b.out}", flush=True)
    return b.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
