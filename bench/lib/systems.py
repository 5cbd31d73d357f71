"""The systems under test: the two baselines and the local cluster's modes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import threading
import time

from procmon import alive


@dataclasses.dataclass
class System:
    key: str  # "A", "B", "none", "writethrough", "writeback"
    label: str  # column heading
    uri: str = ""
    pids: list[int] = dataclasses.field(default_factory=list)  # server processes
    available: bool = True
    why_not: str = ""  # when not available
    is_cluster: bool = False
    note: str = ""


def port_free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # As the servers bind (tokio, qemu-nbd and nbdkit set SO_REUSEADDR): connections of
    # an earlier run in TIME_WAIT do not make a port busy, a listener does.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_port(port: int, pid: int | None, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pid is not None and not alive(pid):
            raise RuntimeError(f"process {pid} exited before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class Processes:
    """Background servers this harness started; each pid is also written to
    WORK/pids/NAME.pid so that bench/run.sh can stop them if this process is killed."""

    def __init__(self, work: str):
        self.dir = os.path.join(work, "pids")
        os.makedirs(self.dir, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], log: str) -> subprocess.Popen:
        f = open(log, "ab")
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        f.close()
        self.procs[name] = p
        with open(os.path.join(self.dir, name + ".pid"), "w") as pf:
            pf.write(str(p.pid))
        return p

    def stop_all(self) -> None:
        for name, p in list(self.procs.items()):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            try:
                os.unlink(os.path.join(self.dir, name + ".pid"))
            except OSError:
                pass
            del self.procs[name]


class Dog:
    def __init__(self, binary: str, addr: str, log):
        self.binary = binary
        self.addr = addr
        self.log = log

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [self.binary, "-a", self.addr, *args]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
        self.log("$ dog " + " ".join(args) + f"  -> exit {p.returncode}" + (f": {p.stderr.strip()}" if p.returncode else ""))
        if check and p.returncode != 0:
            raise RuntimeError(f"dog {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
        return p


class CacheWatch:
    """Polls `dog vdi cache info NAME --json` on the gateway during a run: the counters
    before and after, and the peaks of dirty and of unpushed bytes."""

    FIELDS = ("hits", "misses", "evictions", "backpressure_waits", "pushes", "pushed_bytes", "flushes", "push_failures",
              "written_around_bytes")

    def __init__(self, dog: Dog, name: str, interval: float = 0.5):
        self.dog = dog
        self.name = name
        self.interval = interval
        self.first: dict | None = None
        self.last: dict | None = None
        self.peak_dirty = 0
        self.dirty_limit = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _info(self) -> dict | None:
        try:
            p = subprocess.run([self.dog.binary, "-a", self.dog.addr, "vdi", "cache", "info", self.name, "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=10)
            if p.returncode != 0:
                return None
            for c in json.loads(p.stdout).get("caches", []):
                if c.get("name") == self.name:
                    return c
        except (subprocess.SubprocessError, ValueError, OSError):
            return None
        return None

    def _sample(self) -> None:
        c = self._info()
        if c is None:
            return
        if self.first is None:
            self.first = c
        self.last = c
        unpushed = c.get("unpushed_bytes", c.get("dirty_bytes", 0))
        self.samples.append((time.time(), c.get("dirty_bytes", 0), unpushed))
        self.peak_dirty = max(self.peak_dirty, c.get("dirty_bytes", 0))
        self.dirty_limit = c.get("dirty_limit", 0)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def summary(self, t0: float | None = None) -> dict:
        """Counter deltas over the run; peak dirty bytes (after t0 when given, e.g. the
        end of the ramp)."""
        out = {"dirty_limit": self.dirty_limit, "peak_dirty": self.peak_dirty}
        if t0 is not None:
            out["peak_dirty_measured"] = max((d for t, d, _ in self.samples if t >= t0), default=0)
            out["peak_unpushed_measured"] = max((u for t, _, u in self.samples if t >= t0), default=0)
        if self.first and self.last:
            for k in self.FIELDS:
                out[k] = self.last.get(k, 0) - self.first.get(k, 0)
        return out


class Cluster:
    def __init__(self, dog_bin: str, work: str, nodes: int, copies: int, port: int, nbd_port: int, log):
        self.dog_bin = dog_bin
        self.dir = os.path.join(work, "cluster")
        self.nodes = nodes
        self.copies = copies
        self.port = port
        self.nbd_port = nbd_port
        self.log = log
        self.dog = Dog(dog_bin, f"127.0.0.1:{port}", log)
        self.up_done = False

    def up(self, cache_args: list[str]) -> bool:
        """Starts the cluster, with the write-back cache options if this dog knows them.
        Returns whether the cache options were accepted."""
        base = [
            self.dog_bin, "local", "up", "--dir", self.dir, "--nodes", str(self.nodes),
            "--copies", str(self.copies), "--port", str(self.port),
            "--nbd-port", str(self.nbd_port), "--no-demo",
        ]
        self.up_done = True  # even a failed `up` may have started nodes: always `down`
        for args in ([cache_args, []] if cache_args else [[]]):
            cmd = base + args
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
            self.log("$ " + " ".join(cmd) + "\n" + p.stdout.strip())
            if p.returncode == 0:
                return bool(args)
            if args and "unexpected argument" in p.stdout:
                continue  # a dog from before the cache: run without it
            raise RuntimeError(f"dog local up failed: {p.stdout.strip()}")
        raise RuntimeError("dog local up failed")

    def down(self) -> None:
        if not self.up_done or not os.path.exists(os.path.join(self.dir, "local.json")):
            return
        p = subprocess.run([self.dog_bin, "local", "down", "--dir", self.dir],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
        self.log("$ dog local down: " + p.stdout.strip())
        self.up_done = False

    def pids(self) -> list[int]:
        out = []
        for i in range(self.nodes):
            try:
                with open(os.path.join(self.dir, f"node{i}", "sheep.pid")) as f:
                    out.append(int(f.read().strip()))
            except (OSError, ValueError):
                pass
        return out

    def uri(self, vdi: str) -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}/{vdi}"

    def log_tails(self, lines: int = 200) -> dict[str, str]:
        out = {}
        for i in range(self.nodes):
            p = os.path.join(self.dir, f"node{i}", "sheep.log")
            try:
                with open(p, errors="replace") as f:
                    out[f"node{i}"] = "".join(f.readlines()[-lines:])
            except OSError:
                pass
        return out
