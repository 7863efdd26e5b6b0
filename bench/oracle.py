"""The simulator's oracle: the best click AUC any model can reach, and what content adds to it.

For the fair world (simulator v2) at content_signal 0, 0.5 and 1, over a few seeds: the click
AUC of the true click probability (``p_click``) and of an oracle blind to the content-only
attributes (``p_click_structured``), on every impression, and the click rate. Run
``python bench/oracle.py [--preset fair]``; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ppm.config import Config
from streams.sources.shop_simulator import ShopSimulator
from trainer.metrics import auc

SMALL_V2 = {"world": "v2", "n_users": 500, "days": 2.0, "initial_items": 200,
            "items_per_day": 150, "sessions_per_user_per_day": 2.0}
"""The default world: the fair world at the size of ``tests/test_shop_simulator.py``'s."""


def clicked(sim: ShopSimulator, request_ids: list[str], item_ids: list[str]) -> np.ndarray:
    """Per impression (request_id, item_id): whether the wire records hold a click for it."""
    clicks = set()
    for kind, line in sim.records():
        if kind == "behavior" and b'"action":"click"' in line:
            record = json.loads(line)
            clicks.add((record["request_id"], record["item_id"]))
    return np.array([key in clicks for key in zip(request_ids, item_ids, strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="a config preset for the world (e.g. fair) instead "
                        "of the small v2 world")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()

    cfg = Config()
    world = (cfg.with_preset(args.preset).simulator if args.preset
             else cfg.simulator.model_copy(update=SMALL_V2))
    started = time.perf_counter()
    rows = []
    for signal in (0.0, 0.5, 1.0):
        for seed in range(1, args.seeds + 1):
            sim = ShopSimulator(world.model_copy(update={"content_signal": signal, "seed": seed}))
            oracle = sim.oracle()
            labels = clicked(sim, oracle.request_id.tolist(), oracle.item_id.tolist())
            rows.append({"content_signal": signal, "seed": seed, "impressions": len(oracle),
                         "ctr": round(float(labels.mean()), 4),
                         "auc": round(auc(labels, oracle.p_click.to_numpy()), 4),
                         "auc_structured": round(auc(labels,
                                                     oracle.p_click_structured.to_numpy()), 4)})
            print(rows[-1])
    print(json.dumps({"world": world.model_dump(mode="json", exclude={"start"}), "rows": rows,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
