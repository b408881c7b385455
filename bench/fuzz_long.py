"""Long runs of the reliability fuzzers (tests/reliability/test_fuzz.py runs them
bounded in CI).

    python3 bench/fuzz_long.py --seconds 600            # both targets, 10 min each
    python3 bench/fuzz_long.py --target gossip --seconds 3600 --seed 7

The XDP target needs root (BPF_PROG_TEST_RUN and a private network namespace).
Exit status 1 if any invariant broke; the first failures are printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.reliability.test_fuzz import run_gossip, run_xdp  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=("gossip", "xdp", "both"), default="both")
    ap.add_argument("--seconds", type=float, default=300.0, help="per target")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args()
    failed = False
    if args.target in ("gossip", "both"):
        t0 = time.monotonic()
        fz, target = run_gossip(seconds=args.seconds, seed=args.seed)
        print(f"gossip: seed {args.seed}, {fz.execs} execs in {time.monotonic() - t0:.0f} s, "
              f"{len(fz.coverage)} lines covered ({fz.seed_coverage} by the seeds), corpus {len(fz.corpus)}, "
              f"{len(target.failures)} failures")
        for f in target.failures[:10]:
            print("  ", f[:500])
        failed |= bool(target.failures)
    if args.target in ("xdp", "both"):
        from tests.bpf.harness import fib_netns, loaded

        with fib_netns() as env, loaded(env) as harness:
            t0 = time.monotonic()
            fz, target = run_xdp(harness, seconds=args.seconds, seed=args.seed)
            print(f"xdp: seed {args.seed}, {fz.execs} execs in {time.monotonic() - t0:.0f} s, "
                  f"{len(fz.coverage)} paths covered ({fz.seed_coverage} by the seeds), corpus {len(fz.corpus)}, "
                  f"{len(target.failures)} failures")
            for f in target.failures[:10]:
                print("  ", f[:500])
            failed |= bool(target.failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
