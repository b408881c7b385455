"""What one eviction costs the cluster protocol, in microseconds of Python, with no
network and no kernel: three real ``Node``s behind real ``Wire``s (encryption
included) exchange datagrams in memory. One node publishes evictions in batches of
256, as an agent does with a batch of socket closes, and gossips them; the two others
receive them.

    python3 bench/eviction_cost.py [--evictions 20000] [--runs 5] [--json FILE]

Each tree publishes as its agent does: flow records in runs (Node.publish_eviction_records)
where the protocol has them, FlowTuples one message each (Node.publish_evictions) before.
Reports, per eviction, the median over runs of: ``publish`` (the publishing call),
``gossip`` (the origin's ticks that put them into datagrams) and ``receive`` (both
receivers' handle_datagram and ticks, so two receipts). Compare two trees side by side
with ``--tree``:  python3 bench/eviction_cost.py --tree /path/to/other/checkout
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 256


def measure(n: int) -> dict[str, float]:
    from meshlb.cluster import node as node_mod
    from meshlb.cluster.node import EvictionReceived, FlowTuple
    # each tree as its agent publishes: flow records in runs where the protocol has them
    runs_cls = getattr(node_mod, "EvictionsReceived", None)
    by_records = hasattr(node_mod.Node, "publish_eviction_records")
    from meshlb.cluster.sim import NodeSpec, real_node_factory

    key = os.urandom(32)
    addrs = [(f"10.0.0.{i + 1}", 7946) for i in range(3)]
    now = 1000.0
    nodes = [real_node_factory(NodeSpec(
        index=i, name=f"mix{i + 1}", address=addrs[i], key=key, label="bench", epoch=1 + i,
        incarnation=1, rng=random.Random(i), now=now, peers=tuple(a for a in addrs if a != addrs[i]),
        group=False, preset="lan", max_datagram=1400)) for i in range(3)]
    by_addr = dict(zip(addrs, nodes))

    def deliver(sender: int, t: float) -> int:
        got = 0
        for o in nodes[sender].take_outgoing():
            dst = by_addr.get(o.dest)
            if dst is not None:
                dst.handle_datagram(t, o.data, addrs[sender])
        for n in nodes:
            for e in n.take_events():
                if type(e) is EvictionReceived:
                    got += 1
                elif runs_cls is not None and type(e) is runs_cls:
                    got += len(e.records)
        return got

    for n_ in nodes:
        n_.join(now)
    for _ in range(200):  # join and settle
        now += 0.05
        for i, n_ in enumerate(nodes):
            n_.tick(now)
            deliver(i, now)
    assert all(len(n_.members()) == 3 for n_ in nodes), "cluster did not form"

    flows = [FlowTuple(f"198.18.{1 + i // 250 % 4}.{i % 250 + 1}", 10000 + i % 50000, "198.19.0.3", 8080, 6)
             for i in range(n)]
    if by_records:
        from meshlb.cluster.messages import flow_record
        items = [flow_record(f) for f in flows]
        publish = lambda node, batch, t: node.publish_eviction_records(batch, t)  # noqa: E731
    else:
        items = flows
        publish = lambda node, batch, t: node.publish_evictions(batch, t)  # noqa: E731
    spent = {"publish": 0.0, "gossip": 0.0, "receive": 0.0}
    received = 0
    for b in range(0, n, BATCH):
        t0 = time.perf_counter()
        publish(nodes[0], items[b:b + BATCH], now)
        spent["publish"] += time.perf_counter() - t0
        for _ in range(3):  # a few gossip rounds: every eviction goes out
            now += 0.05
            t0 = time.perf_counter()
            nodes[0].tick(now)
            out = nodes[0].take_outgoing()
            t1 = time.perf_counter()
            spent["gossip"] += t1 - t0
            for o in out:
                dst = by_addr.get(o.dest)
                if dst is not None:
                    dst.handle_datagram(now, o.data, addrs[0])
            for i in (1, 2):
                nodes[i].tick(now)
                received += deliver(i, now)
            spent["receive"] += time.perf_counter() - t1
    assert received == 2 * n, f"{received} receipts of {n} evictions by 2 peers"
    return {k: v / n * 1e6 for k, v in spent.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evictions", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tree", help="also measure this checkout, interleaved, and report ratios")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.evictions)))
        return 0
    trees = {"this": str(ROOT)}
    if args.tree:
        trees["other"] = str(Path(args.tree).resolve())
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(args.runs):
        for name, tree in trees.items():
            # a fresh interpreter per run and tree: no cache or heap carried over
            out = subprocess.run([sys.executable, __file__, "--one", "--evictions", str(args.evictions)],
                                 check=True, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": tree}, cwd=tree).stdout
            results[name].append(json.loads(out))
    summary = {name: {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
               for name, runs in results.items()}
    for name, s in summary.items():
        print(f"{name:6s} us per eviction: " + ", ".join(f"{k} {v}" for k, v in s.items()))
    if "other" in summary:
        print("this / other: " + ", ".join(f"{k} {summary['this'][k] / summary['other'][k]:.2f}"
                                           for k in summary["this"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": results, "median": summary},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
