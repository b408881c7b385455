#!/usr/bin/env python3
"""Control-plane table benchmark: rebuild and swap Maglev tables into the real BPF maps,
and the share of established flows that move when a member joins or leaves.

    sudo python3 bench/table_bench.py [--backends 100] [--runs 3] [--flows 200000] \
        [--json docs/img/table_bench.json] [--quick] [--baseline REV [--pairs 3]]

With ``--baseline REV`` it times only the build side by side: this tree's path (the
backend sets of ``meshlb.backends`` from the members' metadata, then
``meshlb.forwarding.plan``) against ``meshlb/forwarding.py`` as it was at git revision
REV (its ``plan(vips, usable, serving)``, loaded from ``git show`` as a module of its
own), on 1000 VIPs x ``--backends`` members and on the distinct-sets case, alternating
which goes first, each followed by the same set_backends, translate and swap into one
loaded balancer, with translated tables shared among VIPs as table sync shares them.
Ratios are new / old per pair.

Rebuild + swap follows the agent's own path (meshlb/agent/tables.py, TableSync.rebuild): plan the
tables with ``meshlb.forwarding.plan`` (cold: its table cache is cleared first), write
each VIP's backends (``Balancer.set_backend``), translate member indices to backend ids,
and swap the tables in with ``Balancer.set_vip_tables``, as the agent does (a fresh inner array filled with
one batch update, then one update of the outer map). The balancer is loaded but not
attached (no pins, no interface): the maps are the real kernel maps the XDP program
reads. Two backend layouts are timed: every VIP served by the same 100 members (the
usual meshlb case: one Maglev build, shared) and, for 1 and 100 VIPs, a distinct
backend set per VIP (worst case: one build per VIP). Ring size is the default, 65537.

Flow movement: N members (3, 10, 100) back one VIP; ``--flows`` random client flows
(random source address and port to the VIP) are hashed with the data plane's own flow
hash (``balancer.flow_hash``; tests/bpf/test_balancer_forward.py checks it against the
XDP program bit for bit) onto the plan's table before and after one member leaves or
joins. Without conntrack, that is exactly which backend each flow would reach; the
share that changes is what moves (conntrack keeps established flows on their backend
until they end, so this is the worst case). Maglev's ideal is 1/N for a leave (only the
leaver's flows) and 1/(N+1) for a join.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshlb import backends, forwarding  # noqa: E402
from meshlb.cluster.membership import MemberView  # noqa: E402
from meshlb.cluster.messages import MemberMeta, Status  # noqa: E402
from meshlb.config import VipConfig  # noqa: E402
from meshlb.dataplane import layouts as L  # noqa: E402
from meshlb.dataplane.balancer import NO_BACKEND, Balancer, flow_hash  # noqa: E402

RING = L.MLB_DEFAULT_RING


def vip_specs(n: int) -> list[VipConfig]:
    return [VipConfig(address=ipaddress.ip_address(f"10.{100 + i // 250}.{i % 250}.1"), port=80) for i in range(n)]


def serving_shared(specs: list[VipConfig], n_backends: int) -> dict[str, tuple[tuple[str, ...], int]]:
    keys = tuple(s.key for s in specs)
    return {f"mix{i:03d}": (keys, 100) for i in range(n_backends)}


def serving_distinct(specs: list[VipConfig], n_backends: int) -> dict[str, tuple[tuple[str, ...], int]]:
    """Each VIP its own member names: no table can be shared or reused."""
    return {f"v{v}-mix{i:03d}": ((s.key,), 100) for v, s in enumerate(specs) for i in range(n_backends)}


def members_for(serving) -> list[MemberView]:
    """The members whose metadata says what ``serving`` says (the view the agent reads)."""
    return [MemberView(name, (f"10.200.{i // 250}.{i % 250 + 1}", 7946), Status.ALIVE, 1,
                       MemberMeta(vips=keys, weight=w), 0.0) for i, (name, (keys, w)) in enumerate(serving.items())]


def load_baseline(rev: str):
    """meshlb/forwarding.py at git revision ``rev``, as a module of its own."""
    import importlib.util
    import subprocess

    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:meshlb/forwarding.py"], check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("forwarding_baseline", loader=None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    exec(compile(src, f"{rev}:meshlb/forwarding.py", "exec"), mod.__dict__)
    return mod


def member_addr(name: str, idx: int) -> str:
    return f"10.200.{idx // 250}.{idx % 250 + 1}"


def plan_new(specs: list[VipConfig], serving, members: list[MemberView] | None = None):
    """The agent's planning now: backend sets from the view, then the tables."""
    sets = backends.backend_sets(specs, members if members is not None else members_for(serving), ())
    return forwarding.plan(specs, {k: s.chosen() for k, s in sets.items()})


def rebuild_and_swap(lb: Balancer, specs: list[VipConfig], serving, vip_ids: dict[str, int],
                     planner=None, share: bool = False) -> dict[str, float]:
    """One full rebuild as the agent does it; returns seconds per stage. ``planner``:
    (specs, serving) -> plans, cold (its table cache cleared first); default this
    tree's. ``share``: VIPs whose plans share a table and backend ids share one
    translated list, as table sync does (the data plane then fills one array for all)."""
    forwarding._table.cache_clear()
    members = members_for(serving)  # the view exists before a rebuild starts
    t0 = time.perf_counter()
    plans = planner(specs, serving) if planner is not None else plan_new(specs, serving, members)
    t1 = time.perf_counter()
    backend_ids: dict[str, int] = {}
    t_backends = t_translate = 0.0
    tables: dict[int, list[int]] = {}
    translated: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for key, p in plans.items():
        a = time.perf_counter()
        ids = []
        for name in p.backends:
            bid = backend_ids.get(name)
            if bid is None:
                bid = backend_ids[name] = len(backend_ids) % L.MLB_MAX_BACKENDS  # ids wrap: timing only
                lb.set_backend(bid, member_addr(name, bid), 0)  # once per member, as the agent does
            ids.append(bid)
        b = time.perf_counter()
        cache_key = (id(p.table), tuple(ids))
        table = translated.get(cache_key) if share else None
        if table is None:
            table = [ids[i] for i in p.table] if ids else [NO_BACKEND] * len(p.table)
            translated[cache_key] = table
        tables[vip_ids[key]] = table
        c = time.perf_counter()
        t_backends += b - a
        t_translate += c - b
    # all tables in one call, as the agent swaps them (identical tables share one array)
    c = time.perf_counter()
    lb.set_vip_tables(tables)
    t_swap = time.perf_counter() - c
    total = time.perf_counter() - t0
    return {"plan": t1 - t0, "set_backends": t_backends, "translate": t_translate, "swap": t_swap,
            "total": total}


def table_times(n_vips: int, n_backends: int, runs: int, distinct: bool) -> dict:
    specs = vip_specs(n_vips)
    serving = (serving_distinct if distinct else serving_shared)(specs, n_backends)
    lb = Balancer.load()
    try:
        vip_ids = {}
        for i, s in enumerate(specs):
            lb.add_vip(s.address, s.port, s.protocol, s.mode, vip_id=i, ring_size=s.ring_size)
            vip_ids[s.key] = i
        samples = [rebuild_and_swap(lb, specs, serving, vip_ids) for _ in range(runs)]
        # check: the kernel holds what the plan says (one VIP, spot check)
        got = lb.vip_table(0)
        assert got is not None and len(got) == RING
    finally:
        lb.close()
    return {"vips": n_vips, "backends": n_backends, "distinct": distinct, "samples": samples}


# ------------------------------------------------------------------ flow movement
def flow_slots(n_flows: int, seed: int = 1) -> list[int]:
    rnd = random.Random(seed)
    vip = "198.19.0.1"
    slots = []
    for _ in range(n_flows):
        src = f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
        key = L.flow_key(src, rnd.randrange(1024, 65536), vip, 80, L.IPPROTO_TCP)
        slots.append(flow_hash(key) % RING)
    return slots


def owners(members: list[str], slots: list[int]) -> list[str]:
    spec = VipConfig(address=ipaddress.ip_address("198.19.0.1"), port=80)
    p = forwarding.plan_vip(spec, [(m, 1) for m in members])
    return [p.backends[p.table[s]] for s in slots]


def movement(n: int, slots: list[int], trials: int) -> dict:
    members = [f"mix{i}" for i in range(1, n + 1)]
    before = owners(members, slots)
    leave, join = [], []
    picks = members if n <= trials else random.Random(n).sample(members, trials)
    for i, m in enumerate(picks):
        after = owners([x for x in members if x != m], slots)
        leave.append(sum(a != b for a, b in zip(before, after)) / len(slots))
        after = owners(members + [f"new{i}"], slots)
        join.append(sum(a != b for a, b in zip(before, after)) / len(slots))
    # what the flows of the leaver were (must all move), and what moved besides them
    return {"n": n, "leave": leave, "join": join, "ideal_leave": 1 / n, "ideal_join": 1 / (n + 1)}


def rng(xs: list[float], scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    xs = [x * scale for x in xs]
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def side_by_side(rev: str, n_backends: int, pairs: int) -> dict:
    """This tree's build against forwarding.py at ``rev``, alternating, into the same
    kernel maps; 1000 VIPs over one set and 100 VIPs with a set each."""
    base = load_baseline(rev)

    def old_planner(specs, serving):
        base._table.cache_clear()
        return base.plan(specs, list(serving), serving)

    out = {"rev": rev, "cases": []}
    for n_vips, distinct in ((1000, False), (100, True)):
        specs = vip_specs(n_vips)
        serving = (serving_distinct if distinct else serving_shared)(specs, n_backends)
        lb = Balancer.load()
        try:
            vip_ids = {}
            for i, s in enumerate(specs):
                lb.add_vip(s.address, s.port, s.protocol, s.mode, vip_id=i, ring_size=s.ring_size)
                vip_ids[s.key] = i
            samples = []
            for k in range(pairs):
                order = ("old", "new") if k % 2 == 0 else ("new", "old")
                pair = {}
                for which in order:
                    pair[which] = rebuild_and_swap(lb, specs, serving, vip_ids,
                                                   old_planner if which == "old" else None, share=True)
                samples.append(pair)
                print(f"  {n_vips} VIPs {'distinct' if distinct else 'shared'} pair {k + 1}: "
                      f"plan old {pair['old']['plan']:.3f} new {pair['new']['plan']:.3f} s, "
                      f"total old {pair['old']['total']:.3f} new {pair['new']['total']:.3f} s", flush=True)
            # the same tables either way
            assert {k: p.digest for k, p in old_planner(specs, serving).items()} == \
                {k: p.digest for k, p in plan_new(specs, serving).items()}
        finally:
            lb.close()
        out["cases"].append({"vips": n_vips, "backends": n_backends, "distinct": distinct, "samples": samples})
    return out


def print_side_by_side(res: dict) -> None:
    print(f"\nBuild side by side: this tree (meshlb.backends + forwarding.plan) / forwarding.py at "
          f"{res['rev']}; median (min-max) seconds over {len(res['cases'][0]['samples'])} pairs\n")
    print("| VIPs | backend sets | plan, old | plan, new | plan new / old | total, old | total, new | total new / old |")
    print("|---|---|---|---|---|---|---|---|")
    for c in res["cases"]:
        s = c["samples"]
        col = lambda w, k: rng([x[w][k] for x in s])  # noqa: E731
        ratio = lambda k: rng([x["new"][k] / x["old"][k] for x in s], fmt="{:.2f}")  # noqa: E731
        print(f"| {c['vips']} | {'one per VIP' if c['distinct'] else 'shared'} | {col('old', 'plan')} | "
              f"{col('new', 'plan')} | {ratio('plan')} | {col('old', 'total')} | {col('new', 'total')} | "
              f"{ratio('total')} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--flows", type=int, default=200_000)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--json", default=str(ROOT / "docs" / "img" / "table_bench.json"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--baseline", metavar="REV", help="time the build side by side with forwarding.py at REV")
    ap.add_argument("--pairs", type=int, default=3)
    args = ap.parse_args(argv)
    if args.baseline:
        res = side_by_side(args.baseline, args.backends, args.pairs)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
        print_side_by_side(res)
        return 0
    if args.quick:
        args.runs, args.flows, args.trials = 1, 20_000, 2
    out: dict = {"args": vars(args), "python": platform.python_version(), "cpus": os.cpu_count(),
                 "kernel": os.uname().release, "ring": RING, "tables": [], "movement": []}
    cases = [(1, False), (100, False), (1000, False), (1, True), (100, True)]
    if args.quick:
        cases = [(1, False), (100, False), (1, True)]
    for n_vips, distinct in cases:
        runs = args.runs if n_vips < 1000 else 1  # ~2 min per run
        r = table_times(n_vips, args.backends, runs, distinct)
        out["tables"].append(r)
        tot = [s["total"] for s in r["samples"]]
        print(f"tables: {n_vips} VIPs x {args.backends} backends {'distinct' if distinct else 'shared'}: "
              f"{rng(tot)} s", flush=True)
    slots = flow_slots(args.flows)
    for n in (3, 10, 100):
        m = movement(n, slots, args.trials)
        out["movement"].append(m)
        print(f"movement N={n}: leave {rng(m['leave'])} (ideal {m['ideal_leave']:.3f}), "
              f"join {rng(m['join'])} (ideal {m['ideal_join']:.3f})", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))

    print(f"\nRebuild + swap into the kernel maps, {args.backends} backends, ring {RING}; "
          f"Python {out['python']}, {out['cpus']} CPUs; median (min-max) seconds\n")
    print("| VIPs | backend sets | runs | plan (Maglev) | set backends | translate | swap (fill + replace) | total | swap per VIP, ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in out["tables"]:
        s = r["samples"]
        col = lambda k: rng([x[k] for x in s])  # noqa: E731
        per = rng([x["swap"] / r["vips"] for x in s], 1000, "{:.1f}")
        print(f"| {r['vips']} | {'one per VIP' if r['distinct'] else 'shared'} | {len(s)} | {col('plan')} | "
              f"{col('set_backends')} | {col('translate')} | {col('swap')} | {col('total')} | {per} |")
    print(f"\nFlows moved, {args.flows} random flows, one VIP; median (min-max) over {args.trials} choices of the member\n")
    print("| N | leave: moved | ideal 1/N | moved / ideal | join: moved | ideal 1/(N+1) | moved / ideal |")
    print("|---|---|---|---|---|---|---|")
    for m in out["movement"]:
        print(f"| {m['n']} | {rng(m['leave'])} | {m['ideal_leave']:.3f} | {rng([x / m['ideal_leave'] for x in m['leave']], fmt='{:.2f}')} "
              f"| {rng(m['join'])} | {m['ideal_join']:.3f} | {rng([x / m['ideal_join'] for x in m['join']], fmt='{:.2f}')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
