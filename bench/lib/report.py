"""The Markdown table and the chart of one benchmark run."""

from __future__ import annotations

import math
import os
from xml.sax.saxutils import escape

from workloads import TARGETS

ORDER = ["A", "B", "none", "writethrough", "writeback"]
COLORS = {"A": "#4d4d4d", "B": "#a6a6a6", "none": "#1f77b4", "writethrough": "#2ca02c", "writeback": "#d62728"}
RSS_LIMIT_MIB = 256


def fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "—"
    if unit == "MiB/s" or abs(x) < 100:
        return f"{x:,.1f}"
    return f"{x:,.0f}"


def fmt_us(x: float | None) -> str:
    if x is None:
        return "—"
    if x >= 10000:
        return f"{x / 1000:,.1f} ms"
    return f"{x:,.0f} µs" if x >= 100 else f"{x:,.1f} µs"


def ratio(cells, w, k) -> float | None:
    c, a = cells.get((w, k)), cells.get((w, "A"))
    if not c or not a or c["value"] is None or not a["value"]:
        return None
    return c["value"] / a["value"]


def target_status(cells, wkey, mode):
    """(target text, measured ratio, met?) for one target cell; met None = not measured."""
    t = TARGETS.get(wkey, {}).get(mode)
    if t is None:
        return None
    r = ratio(cells, wkey, mode)
    if t == "none":
        ref = ratio(cells, wkey, "none")
        text = "≥ the `none` figure" + (f" ({ref:.2f}×)" if ref is not None else "")
        met = None if r is None or ref is None else r >= ref
    else:
        text = f"≥ {t:.2f}×"
        met = None if r is None else r >= t
    return text, r, met


def write(out: str, data: dict, workloads, cells: dict, log) -> str:
    info = data["info"]
    systems = data["systems"]
    keys = [k for k in ORDER if k in systems]
    m = info["machine"]
    p = info["params"]
    L: list[str] = []
    title = "full run" if info["mode"] == "full" else "quick run (smoke check, not for publishing)"
    L.append(f"# Sheepdog benchmark: {title}, {info['started']}")
    L.append("")
    L.append(f"- Command: `{info['command']}` (took {info['elapsed_s'] // 60} min {info['elapsed_s'] % 60} s)")
    L.append(f"- Commit: {info['git']}")
    L.append(f"- Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB memory, Linux {m['kernel']}; scratch disk {m['disk']}")
    L.append(f"- Load average (1, 5, 15 min) at start: {info['load_start']}; at end: {info.get('load_end', '?')}. "
             "Anything else running on the host shows up as noise.")
    t = info["tools"]
    L.append(f"- Tools: {t['fio']}, {t['qemu-nbd']}, {t['nbdkit']}")
    L.append(f"- Method: every cell is the median of {p['reps']} repetition(s); within a repetition every system runs a "
             "workload back to back, in an order rotated per repetition, so drift hits all of them alike. "
             f"Each run: fio's nbd engine (one NBD connection, one job), {p['ramp_s']:g} s ramp then {p['runtime_s']:g} s measured "
             f"(sustained QD32 randwrite: {p['sustained_ramp_s']:g} s + {p['sustained_runtime_s']:g} s; the QD32 burst: "
             f"{p['burst']} written from the start, no ramp). "
             f"Every disk is {p['size']}, prefilled with sequential 1 MiB writes and a flush before the runs.")
    L.append("- Systems:")
    for k in keys:
        s = systems[k]
        if k in ("A", "B"):
            L.append(f"  - **{s['label']}** — {s['note']}; `{s['uri']}`")
        else:
            extra = s["note"] if s["available"] else f"**{s['why_not']}**"
            L.append(f"  - **{k}** — {p['nodes']}-node local cluster on this host, copies {p['copies']}, "
                     f"served by node 0's gateway as `{s['uri']}`" + (f"; {extra}" if extra else ""))
    L.append("")
    if data.get("fatal"):
        L.append(f"> **The run was aborted:** {data['fatal']}. The figures below are partial.")
        L.append("")
    if data["failures"]:
        L.append("> **Failures** (the harness exits non-zero):")
        for f in data["failures"]:
            L.append(f"> - {f}")
        L.append("")
    if not keys:
        path = os.path.join(out, "results.md")
        with open(path, "w") as f:
            f.write("\n".join(L))
        return path
    chart = draw_chart(out, workloads, cells, keys, systems, log)
    if chart:
        L.append(f"![IOPS, p99 latency and ratio to baseline A per workload and mode]({chart})")
        L.append("")

    def na(k):
        return "n/a" if not systems[k]["available"] else "—"

    def head(second="unit"):
        L.append(f"| workload | {second} | " + " | ".join(systems[k]["label"] for k in keys) + " |")
        L.append("|---|---|" + "---|" * len(keys))

    L.append("## Throughput (ratio to baseline A)")
    L.append("")
    head()
    for w in workloads:
        row = [w.title, w.unit]
        for k in keys:
            c = cells.get((w.key, k))
            if c is None or c["value"] is None:
                row.append(na(k) if c is None else "failed")
                continue
            r = ratio(cells, w.key, k)
            row.append(fmt(c["value"], w.unit) + ("" if k == "A" or r is None else f" ({r:.2f}×)"))
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    unav = [k for k in keys if not systems[k]["available"]]
    for k in unav:
        L.append(f"n/a in **{k}**: {systems[k]['why_not']}")
        L.append("")
    L.append(f"`4K randwrite QD32 (burst)` writes {p['burst']} (half the write-back dirty limit) from the start, with no "
             "ramp; `(sustained)` runs longer, with a ramp meant to fill the write-back cache to its dirty limit, and only "
             "on A, `none` and `writeback` (the write-back table below shows whether the limit was reached). "
             "`4K write+flush QD1` is fio's `fsync=1`: every write is followed by an NBD FLUSH.")
    L.append("")

    L.append("## Latency: mean / p99")
    L.append("")
    head("I/O")
    for w in workloads:
        row = [w.title, "write+flush" if w.fsync else ("write" if w.is_write else "read")]
        for k in keys:
            c = cells.get((w.key, k))
            if c is None or c["lat_mean_us"] is None:
                row.append(na(k) if c is None else "failed")
                continue
            row.append(f"{fmt_us(c['lat_mean_us'])} / {fmt_us(c['lat_p99_us'])}")
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    L.append("Latency is fio's total latency (submission to completion) per I/O. For `4K write+flush QD1` the mean is "
             "the mean write latency plus the mean FLUSH latency (the time of one durable write) and the p99 is the "
             "FLUSH's; the write's own figures are in results.json.")
    L.append("")

    L.append("## Targets (issue 6, ratio to baseline A measured side by side)")
    L.append("")
    L.append("| workload | mode | target | measured | |")
    L.append("|---|---|---|---|---|")
    for w in workloads:
        for mode in ("writeback", "none", "writethrough"):
            if mode not in systems:
                continue
            st = target_status(cells, w.key, mode)
            if st is None:
                continue
            text, r, met = st
            if not systems[mode]["available"]:
                verdict, meas = "not measured (mode not available)", "n/a"
            else:
                meas = "—" if r is None else f"{r:.2f}×"
                verdict = "not measured" if met is None else ("met" if met else "**missed**")
            L.append(f"| {w.title} | {mode} | {text} | {meas} | {verdict} |")
    L.append("")
    L.append("Physical limits: the three replicas of the cluster share this host's one disk and its cores with fio and "
             "each other, so every replicated write costs three writes (and in `writethrough` and on FLUSH, three "
             "syncs) where baseline A does one; a ratio near 1/3 on a disk- or sync-bound cell is at the physical limit. "
             "Reads and page-cache writes are CPU-bound here: fio, the gateway and the replicas share the cores "
             "(CPU cost per GiB below). Baseline B is the NBD protocol's ceiling on this host.")
    L.append("")

    L.append("## CPU and memory")
    L.append("")
    L.append("CPU seconds (user + system) per GiB moved, median per cell, counted inside fio's measured window: "
             "of all sheep processes for the cluster modes, of the server process for the baselines.")
    L.append("")
    head()
    for w in workloads:
        row = [w.title, "CPU s/GiB"]
        for k in keys:
            c = cells.get((w.key, k))
            row.append(na(k) if c is None else fmt(c["cpu_s_per_gib"]) if c["cpu_s_per_gib"] is not None else "—")
        L.append("| " + " | ".join(row) + " |")
    mc = data["mode_cpu"]
    row = ["all workloads", "CPU s/GiB"]
    for k in keys:
        row.append(f"{mc[k]['cpu_s_per_gib']:.2f} ({mc[k]['cpu_s']:.1f} s / {mc[k]['gib']:.1f} GiB)" if k in mc else na(k))
    L.append("| " + " | ".join(row) + " |")
    L.append("")
    if data["peak_rss_kib"]:
        nodes = sorted({n for d in data["peak_rss_kib"].values() for n in d})
        how = ("VmHWM, reset before each run with /proc/PID/clear_refs" if data["peak_rss_reset_per_run"]
               else "VmHWM since the process started (resetting it failed), so modes run later include earlier peaks")
        L.append(f"Peak resident memory of each sheep process during the runs of each mode (prefill, runs, verify; {how}), "
                 "with the peaks of its anonymous and file-backed parts sampled every 0.1 s. One cluster serves all three "
                 "modes and node 0 is the gateway of every VDI, so memory a process keeps from another mode's runs shows "
                 f"up in this mode's peak too. Target: at most {RSS_LIMIT_MIB} MiB each.")
        L.append("")
        L.append("| mode | " + " | ".join(f"{n} peak (anon / file)" for n in nodes) + f" | ≤ {RSS_LIMIT_MIB} MiB |")
        L.append("|---|" + "---|" * (len(nodes) + 1))
        for k in keys:
            d = data["peak_rss_kib"].get(k)
            if not d:
                continue
            mx = max(x["hwm"] for x in d.values()) / 1024
            cells_ = []
            for n in nodes:
                x = d.get(n, {"hwm": 0, "anon": 0, "file": 0})
                cells_.append(f"{x['hwm'] / 1024:.0f} MiB ({x['anon'] / 1024:.0f} / {x['file'] / 1024:.0f})")
            L.append(f"| {k} | " + " | ".join(cells_) + f" | {'yes' if mx <= RSS_LIMIT_MIB else '**no**'} |")
        L.append("")

    wb = [r for r in data["runs"] if r["system"] == "writeback" and r.get("cache")]
    if wb:
        L.append("## The write-back cache during the runs")
        L.append("")
        L.append("From `dog vdi cache info bench-wb --json` on the gateway, polled every 0.5 s during each run: counter "
                 "changes over the run (median over the repetitions) and the peaks during the measured part of unpushed data "
                 "(what the dirty limit bounds: writes wait when it is reached) and of all dirty data (pushed data "
                 "stays dirty until a sync; it is bounded by the cache size). *Written around*: large writes sent "
                 "straight to the replicas (a long sequential stream, or dirty data at its limit).")
        L.append("")
        L.append("| workload | hit ratio | misses | evictions | backpressure waits | pushed | written around | "
                 "peak unpushed / limit | peak dirty |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for w in workloads:
            rs = [r["cache"] for r in wb if r["workload"] == w.key]
            if not rs:
                continue

            def med(f, rs=rs):
                xs = sorted(c.get(f, 0) for c in rs)
                return xs[len(xs) // 2]
            hits, misses = med("hits"), med("misses")
            hr = f"{hits / (hits + misses):.1%}" if hits + misses else "—"
            lim = rs[0].get("dirty_limit", 0)
            pdirty = med("peak_dirty_measured")
            punpushed = med("peak_unpushed_measured")
            L.append(f"| {w.title} | {hr} | {misses:,} | {med('evictions'):,} | {med('backpressure_waits'):,} | "
                     f"{med('pushed_bytes') / 2**20:,.0f} MiB | {med('written_around_bytes') / 2**20:,.0f} MiB | "
                     f"{punpushed / 2**20:,.0f} / {lim / 2**20:,.0f} MiB | "
                     f"{pdirty / 2**20:,.0f} MiB |")
        L.append("")

    if data["prefill"]:
        L.append("## Prefill")
        L.append("")
        L.append("Sequential 1 MiB writes QD8 over the whole empty disk, then one FLUSH (one run each, not interleaved).")
        L.append("")
        L.append("| system | MiB/s | seconds | CPU s/GiB |")
        L.append("|---|---|---|---|")
        for k in keys:
            d = data["prefill"].get(k)
            if d:
                L.append(f"| {systems[k]['label']} | {d['mibps']:.1f} | {d['seconds']:.1f} | {d['cpu_s_per_gib']:.2f} |")
        L.append("")

    L.append("## Verify pass")
    L.append("")
    L.append(f"Per system, {p['verify_size']} of 4 KiB random writes at QD16 in the middle of the disk, each block carrying "
             "a crc32c header, then read back and checked by fio (`verify=crc32c`, `do_verify=1`, `verify_fatal=1`). "
             "For the cluster modes the same blocks are then read back and checked once more through node 1's gateway "
             "(fio `verify_only`), after node 0 released the VDI, so they come from the replicas rather than node 0's "
             "cache. Any error fails the harness.")
    L.append("")
    L.append("| system | written | read back and checked | checked through node 1 | result |")
    L.append("|---|---|---|---|---|")
    for k in keys:
        v = data["verify"].get(k)
        if v is None:
            L.append(f"| {systems[k]['label']} | — | — | — | {'n/a' if not systems[k]['available'] else 'not run'} |")
            continue
        res = "0 errors" if v["ok"] else f"**FAILED**: {v['error']}"
        n1 = f"{v['verified_node1'] / 2**20:.0f} MiB" if "verified_node1" in v else "—"
        L.append(f"| {systems[k]['label']} | {v['written'] / 2**20:.0f} MiB | {v['verified'] / 2**20:.0f} MiB | {n1} | {res} |")
    L.append("")

    L.append("## Every repetition")
    L.append("")
    L.append("| workload | system | unit | values in run order | max / min | MiB moved per run (median) |")
    L.append("|---|---|---|---|---|---|")
    for w in workloads:
        for k in keys:
            c = cells.get((w.key, k))
            if not c:
                continue
            vals = c["values"]
            spread = f"{max(vals) / min(vals):.2f}" if vals and min(vals) > 0 else "—"
            failed = f" + {c['failed']} failed" if c["failed"] else ""
            moved = f"{c['bytes'] / 2**20:,.0f}" if c.get("bytes") else "—"
            L.append(f"| {w.title} | {systems[k]['label']} | {w.unit} | {', '.join(fmt(v, w.unit) for v in vals)}{failed} | {spread} | {moved} |")
    L.append("")
    L.append("Raw fio JSON of every run: `raw/rep<N>-<workload>-<system>.json` (and `prefill-*`, `verify-*`); "
             "parsed figures: `results.json`; the harness's log: `bench.log`.")
    L.append("")
    path = os.path.join(out, "results.md")
    with open(path, "w") as f:
        f.write("\n".join(L))
    return path


# -- chart ---------------------------------------------------------------------------------


def chart_series(workloads, cells, keys):
    labels = [w.title for w in workloads]
    iops = {k: [(cells.get((w.key, k)) or {}).get("iops") for w in workloads] for k in keys}
    p99 = {k: [(cells.get((w.key, k)) or {}).get("lat_p99_us") for w in workloads] for k in keys}
    # B (the protocol ceiling) would dwarf the modes in the ratio panel; it is in the others.
    rat = {k: [ratio(cells, w.key, k) for w in workloads] for k in keys if k not in ("A", "B")}
    tgt = {}
    for w in workloads:
        for mode, t in TARGETS.get(w.key, {}).items():
            if isinstance(t, float) or isinstance(t, int):
                tgt[(w.title, mode)] = float(t)
    return labels, iops, p99, rat, tgt


def draw_chart(out, workloads, cells, keys, systems, log) -> str | None:
    keys = [k for k in keys if systems[k]["available"]]
    if not keys:
        return None
    try:
        return draw_matplotlib(out, workloads, cells, keys, systems)
    except ImportError:
        log("matplotlib not importable: drawing the chart as a plain SVG")
    except Exception as e:  # noqa: BLE001
        log(f"matplotlib chart failed ({e}): drawing a plain SVG")
    return draw_svg(out, workloads, cells, keys, systems)


def draw_matplotlib(out, workloads, cells, keys, systems) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, iops, p99, rat, tgt = chart_series(workloads, cells, keys)
    n, ns = len(labels), len(keys)
    width = 0.8 / ns
    fig, axes = plt.subplots(3, 1, figsize=(13, 13), sharex=True)
    panels = [
        (axes[0], iops, "IOPS (log; 1M workloads: IOPS = MiB/s)", True, keys),
        (axes[1], p99, "p99 latency, µs (log; write+flush: FLUSH p99)", True, keys),
        (axes[2], rat, "ratio to baseline A (black: issue 6 targets)", False, [k for k in keys if k not in ("A", "B")]),
    ]
    for ax, series, ylabel, logy, ks in panels:
        for i, k in enumerate(keys):
            if k not in ks:
                continue
            xs = [j + (i - (ns - 1) / 2) * width for j in range(n)]
            vals = [v if v is not None else 0 for v in series[k]]
            ax.bar(xs, vals, width, label=systems[k]["label"], color=COLORS[k])
            if ax is axes[2]:
                for j, x in enumerate(xs):
                    t = tgt.get((labels[j], k))
                    if t is not None:
                        ax.plot([x - width / 2, x + width / 2], [t, t], color="black", linewidth=2.5)
                    v = series[k][j]
                    if v is not None:
                        ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[2].axhline(1.0, color="#4d4d4d", linewidth=0.8, linestyle="--")
    top = max([v for k in rat for v in rat[k] if v is not None] + list(tgt.values()) + [1.0])
    axes[2].set_ylim(0, top * 1.25)
    axes[0].legend(ncol=min(5, ns), fontsize=9, loc="upper center", bbox_to_anchor=(0.5, 1.18))
    axes[2].set_xticks(range(n))
    axes[2].set_xticklabels(labels, rotation=20, ha="right")
    fig.suptitle("Sheepdog (3-node local cluster, copies 3) vs baselines, fio nbd engine", y=0.995)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "chart.png"), dpi=90)
    plt.close(fig)
    return "chart.png"


def draw_svg(out, workloads, cells, keys, systems) -> str:
    """A plain SVG version of the chart, for hosts without matplotlib."""
    labels, iops, p99, rat, tgt = chart_series(workloads, cells, keys)
    n, ns = len(labels), len(keys)
    W, left, right, ph, gap, top = 1100, 80, 20, 240, 70, 60
    H = top + 3 * (ph + gap) + 10
    group = (W - left - right) / n
    bw = group * 0.8 / ns
    S = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14">Sheepdog (3-node local cluster, copies 3) vs baselines, fio nbd engine</text>']
    for i, k in enumerate(keys):
        x = left + i * 200
        S.append(f'<rect x="{x}" y="30" width="12" height="12" fill="{COLORS[k]}"/><text x="{x + 16}" y="40">{escape(systems[k]["label"])}</text>')
    panels = [(iops, "IOPS (log)", True, keys), (p99, "p99 latency µs (log)", True, keys),
              (rat, "ratio to A (lines: targets)", False, [k for k in keys if k not in ("A", "B")])]
    for pi, (series, ylabel, logy, ks) in enumerate(panels):
        y0 = top + pi * (ph + gap)
        vals = [v for k in ks for v in series.get(k, []) if v]
        if not vals:
            continue
        if logy:
            lo = 10 ** math.floor(math.log10(min(vals)))
            hi = 10 ** math.ceil(math.log10(max(vals)))
            hi = hi if hi > lo else lo * 10

            def ypos(v, lo=lo, hi=hi, y0=y0):
                return y0 + ph - ph * (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
            ticks = [10 ** e for e in range(int(math.log10(lo)), int(math.log10(hi)) + 1)]
        else:
            hi = max(max(vals), max(tgt.values(), default=1), 1.0) * 1.1

            def ypos(v, hi=hi, y0=y0):
                return y0 + ph - ph * v / hi
            ticks = [x / 2 for x in range(0, int(hi * 2) + 1)]
        S.append(f'<text x="12" y="{y0 + ph / 2}" transform="rotate(-90 12 {y0 + ph / 2})" text-anchor="middle">{escape(ylabel)}</text>')
        for tv in ticks:
            y = ypos(tv)
            S.append(f'<line x1="{left}" x2="{W - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/><text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{tv:g}</text>')
        S.append(f'<line x1="{left}" x2="{left}" y1="{y0}" y2="{y0 + ph}" stroke="black"/><line x1="{left}" x2="{W - right}" y1="{y0 + ph}" y2="{y0 + ph}" stroke="black"/>')
        for i, k in enumerate(keys):
            if k not in ks:
                continue
            for j, v in enumerate(series[k]):
                x = left + j * group + group * 0.1 + i * bw
                if v:
                    y = ypos(v)
                    S.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{y0 + ph - y:.1f}" fill="{COLORS[k]}"><title>{escape(systems[k]["label"])} {escape(labels[j])}: {v:.4g}</title></rect>')
                if pi == 2 and (labels[j], k) in tgt:
                    y = ypos(tgt[(labels[j], k)])
                    S.append(f'<line x1="{x:.1f}" x2="{x + bw:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="black" stroke-width="2"/>')
        if pi == 2:
            y = ypos(1.0)
            S.append(f'<line x1="{left}" x2="{W - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#444" stroke-dasharray="4 3"/>')
    yl = top + 3 * (ph + gap) - gap + 16
    for j, lab in enumerate(labels):
        x = left + (j + 0.5) * group
        first, _, rest = lab.partition(" (")
        S.append(f'<text x="{x:.1f}" y="{yl}" text-anchor="middle" font-size="10">{escape(first)}'
                 + (f'<tspan x="{x:.1f}" dy="12">({escape(rest)}</tspan>' if rest else "") + "</text>")
    S.append("</svg>")
    with open(os.path.join(out, "chart.svg"), "w") as f:
        f.write("\n".join(S))
    return "chart.svg"
