"""Maglev table generation: build time and disruption, printed as markdown.

    python3 bench/maglev_bench.py [--backends 100] [--size 65537] [--runs 5] [--quick]

Build time is measured cold: each VIP gets its own backend set (names salted with the
VIP) so no table can be reused, which is the worst case for the agent. When VIPs share a
backend set, which is the usual case in meshlb where every mix backs every VIP, the agent
builds one table per distinct set and the cost is that of a single VIP.

Disruption is the share of slots whose backend changes when one member leaves or joins;
the ideal is the member's weight share, 1/N with equal weights (only the slots of the
member that left, or the slots the newcomer takes). It is measured for several choices of the member, and min/median/max reported.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from meshlb.maglev import Backend, build_table, canonical_names  # noqa: E402


def owners(backends, size):
    names = canonical_names(backends)
    return [names[i] for i in build_table(backends, size)]


def moved(a, b):
    return sum(1 for x, y in zip(a, b) if x != y) / len(a)


def time_vips(n_vips, n_backends, size, runs):
    sets = [[Backend(f"v{v}-mix{i}") for i in range(n_backends)] for v in range(n_vips)]
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        for backends in sets:
            build_table(backends, size)
        samples.append(time.perf_counter() - start)
    return samples


def disruption(n_backends, size, trials, weighted=False):
    def weight(i):
        return 1 + i % 4 if weighted else 1

    base = [Backend(f"mix{i}", weight(i)) for i in range(n_backends)]
    before = owners(base, size)
    leave, join, ideal_leave, ideal_join = [], [], [], []
    total = sum(b.weight for b in base)
    step = max(1, n_backends // trials)
    for k in range(0, n_backends, step)[:trials]:
        rest = base[:k] + base[k + 1 :]
        leave.append(moved(before, owners(rest, size)))
        ideal_leave.append(base[k].weight / total)
        grown = base + [Backend(f"newcomer{k}", weight(k))]
        join.append(moved(before, owners(grown, size)))
        ideal_join.append(weight(k) / (total + weight(k)))
    return leave, join, ideal_leave, ideal_join


def fmt_range(xs, scale=1.0, unit=""):
    xs = [x * scale for x in xs]
    return f"{statistics.median(xs):.3f}{unit} ({min(xs):.3f}-{max(xs):.3f})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", type=int, default=100)
    ap.add_argument("--size", type=int, default=65537)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1 run, skip 1000 VIPs")
    args = ap.parse_args(argv)
    runs = 1 if args.quick else args.runs
    n = args.backends

    print(f"Maglev build, {n} backends, table size {args.size}; "
          f"Python {platform.python_version()} on {platform.machine()}, "
          f"{os.cpu_count()} CPUs; median (min-max) of {runs} run(s)\n")
    print("| VIPs (distinct backend sets) | build time, s | per VIP, ms |")
    print("|---|---|---|")
    for vips in (1, 100, 1000):
        if args.quick and vips == 1000:
            continue
        # 1000 cold builds take most of a minute; one run is enough to show the scale
        r = 1 if vips == 1000 else runs
        s = time_vips(vips, n, args.size, r)
        print(f"| {vips} | {fmt_range(s)} | {fmt_range(s, 1000 / vips)} |")

    print()
    print("| change | backends | ideal share moved (the member's weight share) "
          "| measured share moved | measured / ideal |")
    print("|---|---|---|---|---|")
    trials = 3 if args.quick else 10
    for count in sorted({10, n}):
        for weighted in (False, True):
            leave, join, il, ij = disruption(count, args.size, trials, weighted)
            label = f"{count}{' (weights 1-4)' if weighted else ''}"
            for what, got, ideal in (("leave", leave, il), ("join", join, ij)):
                ratio = [g / i for g, i in zip(got, ideal)]
                print(f"| {what} | {label} | {fmt_range(ideal)} | {fmt_range(got)} "
                      f"| {fmt_range(ratio)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
