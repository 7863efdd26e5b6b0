"""Throughput of the shop simulator: about a million behavior events written as JSONL.

Run ``python bench/simulate.py``; the last line printed is one JSON object with the figure
(goal: a million behavior events in under a minute on two cores, writing included).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ppm.config import SimulatorConfig
from streams.sources.shop_simulator import ShopSimulator

GOAL_S = 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-users", type=int, default=34_000,
                        help="34,000 users for 3 days give about a million behavior events")
    parser.add_argument("--days", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()

    config = SimulatorConfig(seed=args.seed, days=args.days, n_users=args.n_users)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        summary = ShopSimulator(config).write_jsonl(Path(out_dir), progress=args.progress)
        megabytes = sum(f.stat().st_size for f in Path(out_dir).iterdir()) / 1e6
    seconds = time.perf_counter() - started
    print(f"{summary}\n{megabytes:.0f} MB written")
    print(json.dumps({
        "behavior_events": summary.behavior_events,
        "seconds": round(seconds, 2),
        "behavior_events_per_s": round(summary.behavior_events / seconds),
        "goal_s": GOAL_S,
    }))


if __name__ == "__main__":
    main()
