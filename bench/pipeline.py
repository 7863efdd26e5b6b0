"""Throughput of the embedded pipeline against the bare encoder, in one run.

Item path: the same batches of simulated items (same batch size) go through the bare
``ItemEncoder.encode`` and through the whole ``ItemEmbedder.process`` (order guard, encode,
offline item log, online push of vectors and ID features to Feast's SQLite store). The two
are interleaved, repeat by repeat, so machine noise hits both; ``ratio`` is pipeline / bare.

Behavior path: simulated behavior events through ``SequenceBuilder`` (with its online writes)
and ``TrainingLogWriter`` (labels, windows, parquet), in batches of
``pipeline.behavior_batch_size``.

Last line: ``{"bare_items_per_s", "pipeline_items_per_s", "ratio", "behavior_events_per_s",
...}``. Goal: ratio >= 0.9; >= 20,000 behavior events/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from ppm.config import Config, SimulatorConfig
from ppm.events import BehaviorEvent, ItemEvent, ItemOp
from streams.sources.shop_simulator import ShopSimulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=256, help="items per repeat")
    parser.add_argument("--batch", type=int, default=64, help="encoder batch size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--behaviors", type=int, default=200_000,
                        help="behavior events (about; a simulated world is sized for it)")
    args = parser.parse_args()

    from encoders.item_encoder import ItemEncoder
    from feature_repo.item_log import ItemLog
    from feature_repo.online_features import OnlineFeatures
    from streams.item_embedder import ItemEmbedder
    from streams.sequence_builder import SequenceBuilder
    from streams.training_log import TrainingLogWriter

    base = Config()
    base = base.model_copy(update={"encoders": base.encoders.model_copy(
        update={"batch_size": args.batch})})
    encoder = ItemEncoder.from_config(base)
    world = ShopSimulator(SimulatorConfig(seed=3, days=1, n_users=50,
                                          initial_items=args.items, items_per_day=0))
    items = [e for e in world.events() if isinstance(e, ItemEvent) and e.op is ItemOp.UPSERT]
    items = items[: args.items]
    batches = [items[i : i + args.batch] for i in range(0, len(items), args.batch)]
    encoder.encode(batches[0])  # warm-up: first passes are slow

    bare_s = pipe_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            started = time.perf_counter()
            for batch in batches:
                encoder.encode(batch)
            bare_s += time.perf_counter() - started

            cfg = base.model_copy(update={"data_dir": Path(tmp) / f"rep{rep}"})
            store = OnlineFeatures.open(cfg)
            store.read_items(["warm-up"])  # the first Feast read opens the SQLite file
            embedder = ItemEmbedder(encoder, store, ItemLog(cfg.paths.item_log))
            started = time.perf_counter()
            for batch in batches:
                result = embedder.process(batch)
                assert result.encoded == len(batch), result  # every item really went through
            pipe_s += time.perf_counter() - started
            print(f"repeat {rep}: bare {bare_s:.2f}s pipeline {pipe_s:.2f}s (cumulative)",
                  file=sys.stderr)

        # Behavior path.
        users = max(100, args.behaviors // 32)  # about 32 events per user over three days
        behavior_world = ShopSimulator(SimulatorConfig(seed=4, days=3, n_users=users))
        behaviors = [e for e in behavior_world.events() if isinstance(e, BehaviorEvent)]
        cfg = base.model_copy(update={"data_dir": Path(tmp) / "behaviors"})
        store = OnlineFeatures.open(cfg)
        sequences = SequenceBuilder.of(cfg, store)
        writer = TrainingLogWriter(
            cfg.paths.training, sequences=sequences, items={},
            attribution_window_s=cfg.pipeline.attribution_window_s,
            window_s=cfg.pipeline.log_window_s,
        )
        size = cfg.pipeline.behavior_batch_size
        started = time.perf_counter()
        for i in range(0, len(behaviors), size):
            batch = behaviors[i : i + size]
            sequences.process(batch)
            writer.process(batch)
        writer.close_all()
        behavior_s = time.perf_counter() - started
        samples = writer.counters["samples_logged"]

    n = len(items) * args.repeats
    bare, pipe = n / bare_s, n / pipe_s
    print(json.dumps({
        "bare_items_per_s": round(bare, 1),
        "pipeline_items_per_s": round(pipe, 1),
        "ratio": round(pipe / bare, 3),
        "behavior_events_per_s": round(len(behaviors) / behavior_s),
        "behavior_events": len(behaviors),
        "samples_logged": samples,
        "batch": args.batch,
        "items": n,
    }))


if __name__ == "__main__":
    main()
