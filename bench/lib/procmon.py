"""CPU time and resident memory of server processes, read from /proc."""

from __future__ import annotations

import bisect
import os
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of a process (all its threads), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces) start after the last ')'.
    rest = s[s.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    if rest[0] == "Z":
        return None
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def status_fields(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k = line.split(":", 1)[0]
                if k in keys:
                    out[k] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


def reset_peak_rss(pid: int) -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0, needs ownership or root)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def alive(pid: int) -> bool:
    return cpu_seconds(pid) is not None


class CpuSampler:
    """Samples the summed CPU time of some processes every `interval` seconds in a
    background thread, so the CPU spent inside fio's measured window (after its ramp)
    can be cut out afterwards."""

    def __init__(self, pids: list[int], interval: float = 0.1):
        self.pids = pids
        self.interval = interval
        self.times: list[float] = []
        self.cpu: list[float] = []
        # pid -> peak of VmRSS, RssAnon and RssFile seen in the samples (KiB)
        self.peak: dict[int, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self):
        t = time.time()
        total = 0.0
        for p in self.pids:
            c = cpu_seconds(p)
            if c is not None:
                total += c
            pk = self.peak.setdefault(p, {})
            for k, v in status_fields(p, ("VmRSS", "RssAnon", "RssFile")).items():
                if v > pk.get(k, 0):
                    pk[k] = v
        self.times.append(t)
        self.cpu.append(total)

    def _loop(self):
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

    def at(self, t: float) -> float:
        """Summed CPU seconds at wall time t, interpolated between samples."""
        ts = self.times
        if not ts:
            return 0.0
        if t <= ts[0]:
            return self.cpu[0]
        if t >= ts[-1]:
            return self.cpu[-1]
        i = bisect.bisect_left(ts, t)
        t0, t1 = ts[i - 1], ts[i]
        c0, c1 = self.cpu[i - 1], self.cpu[i]
        return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1

    def between(self, t0: float, t1: float) -> float:
        return max(0.0, self.at(t1) - self.at(t0))
