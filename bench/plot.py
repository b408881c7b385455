#!/usr/bin/env python3
"""Plots for docs/benchmarks.md from the JSON the lab and table benches write.

    python3 bench/plot.py [--img docs/img]

Reads docs/img/lab_bench.json (bench/lab_bench.py) and docs/img/table_bench.json
(bench/table_bench.py), whichever exist, and writes PNGs next to them:
lab_throughput.png, lab_latency.png (and *_x3.png from a lab_bench_x3.json, if present),
table_rebuild.png, flow_movement.png; hop_share.png from docs/img/hop_share.json
(bench/hop_share.py).
Needs matplotlib (``pip install matplotlib``); nothing else in meshlb does.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"meshlb dr": "#1f77b4", "meshlb nat": "#6baed6", "direct": "#7f7f7f", "direct x3": "#bcbcbc",
          "haproxy": "#d62728", "nft dnat": "#ff7f0e"}


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def lab_plots(data: dict, img: Path, suffix: str = "") -> list[Path]:
    runs = data["comparison"]["runs"]
    modes = [(m, t) for m, t in (("keepalive", "keep-alive"), ("close", "connection per request")) if m in runs]
    targets = list(runs["keepalive"])
    out = []

    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes) + 0.5, 4), squeeze=False)
    for ax, (mode, title) in zip(axes[0], modes):
        meds, lo, hi = [], [], []
        for t in targets:
            rps = [r["rps"] for r in runs[mode][t]]
            m = _med(rps)
            meds.append(m)
            lo.append(m - min(rps))
            hi.append(max(rps) - m)
        x = range(len(targets))
        ax.bar(x, meds, yerr=[lo, hi], capsize=4, color=[COLORS.get(t, "#999") for t in targets])
        ax.set_xticks(list(x), targets, rotation=20)
        ax.set_title(f"{title}: requests/s (median, min-max)")
        ax.set_ylabel("requests/s")
        for i, m in enumerate(meds):
            ax.text(i, m, f"{m / 1000:.1f}k", ha="center", va="bottom", fontsize=8)
    a = data["args"]
    fig.suptitle(f"wrk -t2 -c{a['conns']} -d{a['duration']}s, {a['rounds']} interleaved rounds, "
                 f"3 mixes (nginx), {data.get('cpus')} CPUs")
    fig.tight_layout()
    p = img / f"lab_throughput{suffix}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)

    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes) + 0.5, 4), squeeze=False)
    for ax, (mode, title) in zip(axes[0], modes):
        x = list(range(len(targets)))
        p50 = [_med([r["p50_ms"] for r in runs[mode][t] if r["p50_ms"] is not None]) for t in targets]
        p99 = [_med([r["p99_ms"] for r in runs[mode][t] if r["p99_ms"] is not None]) for t in targets]
        w = 0.38
        ax.bar([i - w / 2 for i in x], p50, w, label="p50", color="#4c72b0")
        ax.bar([i + w / 2 for i in x], p99, w, label="p99", color="#dd8452")
        ax.set_yscale("log")
        ax.set_xticks(x, targets, rotation=20)
        ax.set_ylabel("ms (log)")
        ax.set_title(f"{title}: latency (median of rounds)")
        ax.legend()
    fig.tight_layout()
    p = img / f"lab_latency{suffix}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)
    return out


def table_plots(data: dict, img: Path) -> list[Path]:
    out = []
    fig, ax = plt.subplots(figsize=(8, 4))
    labels, stages = [], ["plan", "set_backends", "translate", "swap"]
    vals = {s: [] for s in stages}
    for r in data["tables"]:
        labels.append(f"{r['vips']} VIP{'s' if r['vips'] > 1 else ''}\n{'distinct sets' if r['distinct'] else 'shared set'}")
        for s in stages:
            vals[s].append(_med([x[s] for x in r["samples"]]))
    bottom = [0.0] * len(labels)
    for s, c in zip(stages, ["#4c72b0", "#55a868", "#c44e52", "#8172b2"]):
        ax.bar(range(len(labels)), vals[s], bottom=bottom, label=s, color=c)
        bottom = [b + v for b, v in zip(bottom, vals[s])]
    for i, b in enumerate(bottom):
        ax.text(i, b, f"{b:.2f} s", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"Rebuild + swap into the BPF maps, {data['args']['backends']} backends, ring {data['ring']}")
    ax.legend()
    fig.tight_layout()
    p = img / "table_rebuild.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)

    fig, ax = plt.subplots(figsize=(7, 4))
    ns = [m["n"] for m in data["movement"]]
    x = list(range(len(ns)))
    w = 0.2
    for off, key, ideal, label, c in ((-1.5, "leave", "ideal_leave", "leave", "#c44e52"),
                                     (0.5, "join", "ideal_join", "join", "#4c72b0")):
        meas = [_med(m[key]) for m in data["movement"]]
        ideals = [m[ideal] for m in data["movement"]]
        ax.bar([i + off * w for i in x], meas, w, label=f"{label}: measured", color=c)
        ax.bar([i + (off + 1) * w for i in x], ideals, w, label=f"{label}: ideal", color=c, alpha=0.35)
    ax.set_yscale("log")
    ax.set_xticks(x, [f"N={n}" for n in ns])
    ax.set_ylabel("share of flows moved (log)")
    ax.set_title(f"Flows moved when one member leaves or joins ({data['args']['flows']} flows)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = img / "flow_movement.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)
    return out


def hop_share_plot(data: dict, img: Path) -> list[Path]:
    """Ratio to one backend reached directly against the share of flows that cross a
    second mix (bench/hop_share.py)."""
    summ = {int(n): v for n, v in data["summary"].items()}
    sizes = sorted(summ)
    x = [100 * summ[n]["second_hop_share"] for n in sizes]
    fig, ax = plt.subplots(figsize=(6, 4))
    for vip, dx in (("meshlb dr", -0.8), ("meshlb nat", 0.8)):
        med = [summ[n]["ratio_med"][vip] for n in sizes]
        lo = [m - summ[n]["ratio_min"][vip] for m, n in zip(med, sizes)]
        hi = [summ[n]["ratio_max"][vip] - m for m, n in zip(med, sizes)]
        ax.errorbar([v + dx for v in x], med, yerr=[lo, hi], fmt="o-", capsize=4, color=COLORS[vip], label=vip)
    ax.axhline(0.9, color="#999", ls="--", lw=1, label="goal 0.9x")
    ax.axhline(1.0, color="#ccc", lw=1)
    ax.set_xticks(x, [f"{n} mix{'es' if n > 1 else ''}\n{v:.0f} %" for n, v in zip(sizes, x)])
    ax.set_xlabel("share of VIP flows that cross a second mix")
    ax.set_ylabel("req/s against one backend directly")
    a = data["args"]
    ax.set_title(f"keep-alive, {a['passes']} labs x {a['rounds']} rounds per size (median, min-max)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = img / "hop_share.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img", default=str(ROOT / "docs" / "img"))
    args = ap.parse_args(argv)
    img = Path(args.img)
    img.mkdir(parents=True, exist_ok=True)
    written = []
    for name, suffix in (("lab_bench.json", ""), ("lab_bench_x3.json", "_x3")):
        lab = img / name
        if lab.exists():
            written += lab_plots(json.loads(lab.read_text()), img, suffix)
    hops = img / "hop_share.json"
    if hops.exists():
        written += hop_share_plot(json.loads(hops.read_text()), img)
    tab = img / "table_bench.json"
    if tab.exists():
        written += table_plots(json.loads(tab.read_text()), img)
    for p in written:
        print(p)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
