"""Latency of ``Ranker.rank`` for one user and 200 candidates, features from the embedded store.

Set-up (not timed): a small simulated shop is streamed into a temporary Feast SQLite store
and a ``ppm`` champion is trained on its windows. Then ``--requests`` requests, each for a
random active user and 200 random catalog items, go through ``Ranker.rank``: the online
reads (sequence, items with their 1664-d vectors), the batch build and the model's forward.
As a baseline in the same run, the model's forward alone is timed on the same batch sizes,
so ``overhead_ratio`` (p50 rank / p50 forward) says what the feature path costs.

Last line: ``{"candidates": 200, "p50_ms", "p99_ms", "forward_p50_ms", "overhead_ratio",
...}``. Goal: p99 <= 20 ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()

    import torch

    from ppm.config import Config, SimulatorConfig
    from streams.local_runner import LocalRunner
    from streams.online_features import OnlineFeatures
    from streams.shop_simulator import ShopSimulator
    from trainer.ranker import Ranker
    from trainer.train import IncrementalTrainer

    world = SimulatorConfig(seed=11, days=1.0, n_users=300, initial_items=300,
                            items_per_day=100)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(data_dir=Path(tmp))
        cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(
            update={"warmup_windows": 12, "initial_epochs": 1})})
        print("streaming a small shop and training a champion ...", file=sys.stderr)
        LocalRunner(cfg, resume=False).run(ShopSimulator(world).records(), "bench",
                                           progress=False)
        trainer = IncrementalTrainer(cfg, variant="ppm")
        if trainer.step() is None:
            raise SystemExit("not enough windows to train a champion")
        ranker = Ranker(OnlineFeatures.open(cfg, apply=False), trainer.registry)
        sim = ShopSimulator(world)
        items = sim.catalog["item_id"].tolist()
        users = sim.user_tastes.index.tolist()
        clock = json.loads((Path(tmp) / "summary.json").read_text())["clock"]
        now = int(datetime.fromisoformat(clock).timestamp() * 1e6)
        rng = np.random.default_rng(0)
        requests = [(users[rng.integers(len(users))],
                     list(rng.choice(items, args.candidates, replace=False)))
                    for _ in range(args.requests)]
        for user, candidates in requests[:20]:  # warm-up: first reads and forwards are slow
            ranker.rank(user, candidates, now=now)

        rank_ms, forward_ms = [], []
        champion = trainer.registry.champion()
        model = trainer.registry.load(champion)
        for user, candidates in requests:
            started = time.perf_counter()
            result = ranker.rank(user, candidates, now=now)
            rank_ms.append((time.perf_counter() - started) * 1e3)
            assert len(result.item_ids) == args.candidates
        # Baseline: the forward alone, on a batch of the same shape built by the ranker.
        batch, _ = ranker.build_batch(model, champion.meta["encoder_version"], *requests[0],
                                      now=now)
        with torch.inference_mode():
            for _ in range(len(requests)):
                started = time.perf_counter()
                model(batch)
                forward_ms.append((time.perf_counter() - started) * 1e3)

    p50, p99 = np.percentile(rank_ms, [50, 99])
    f50 = float(np.percentile(forward_ms, 50))
    print(json.dumps({
        "candidates": args.candidates,
        "p50_ms": round(float(p50), 2),
        "p99_ms": round(float(p99), 2),
        "forward_p50_ms": round(f50, 2),
        "overhead_ratio": round(float(p50) / f50, 2),
        "requests": args.requests,
        "goal_p99_ms": 20,
    }))


if __name__ == "__main__":
    main()
