"""``ppm demo``: a seeded shop, end to end on the embedded default (no servers).

What it does today: simulates a shop, decodes every wire record (malformed ones become dead
letters in ``dead_letters.jsonl``), and encodes a sample of the arriving items with the
pretrained encoders. The Feast pipeline (issue #3) and the ranker (issue #4) are not built
yet, and the report says so rather than pretending.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ppm.config import Config
from ppm.events import Action, DeadLetter, ItemEvent, ItemOp, decode

NOT_YET = "streaming into Feast and training the ranker are not implemented yet (issues #3, #4)"


@dataclass
class DemoReport:
    figures: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        f = self.figures
        return "\n".join(
            [
                "ppm demo (embedded)",
                f"  simulated        {f['days']:g} days, {f['users']:,} users, seed {f['seed']}",
                f"  item events      {f['item_events']:,} ({f['items']:,} items)",
                f"  behavior events  {f['behavior_events']:,}; "
                f"{f['fresh_impression_share']:.1%} of impressions on items < 1 day old",
                f"  dead letters     {f['dead_letters']:,} (reasons in {f['dead_letter_file']})",
                f"  encoded sample   {f['items_encoded']:,} items at "
                f"{f['encode_items_per_s']:.0f} items/s -> {f['embedding_dim']}-d vectors, "
                f"{f['encoder_version']}",
                f"  not done         {NOT_YET}",
            ]
        )


def run_demo(cfg: Config, quick: bool = False, out_dir: Path | None = None) -> DemoReport:
    """Simulate, decode and encode a sample; return the figures (see ``DemoReport``)."""
    from tqdm import tqdm

    from encoders.item_encoder import ItemEncoder
    from streams.shop_simulator import ShopSimulator

    sim_cfg = cfg.simulator.model_copy(
        update={"malformed_share": max(cfg.simulator.malformed_share, 0.005)}
        | ({"days": 1.0, "n_users": 300, "initial_items": 200, "items_per_day": 100}
           if quick else {})
    )
    sample_size = 64 if quick else 256
    out = out_dir or cfg.data_dir / "demo"
    out.mkdir(parents=True, exist_ok=True)
    dead_file = out / "dead_letters.jsonl"

    counts = {"item": 0, "behavior": 0, "dead": 0, "impressions": 0, "fresh_impressions": 0}
    first_seen: dict[str, datetime] = {}
    sample: list[ItemEvent] = []
    simulator = ShopSimulator(sim_cfg)
    with dead_file.open("wb") as dead_out:
        for line_no, (kind, raw) in enumerate(
            tqdm(simulator.records(), desc="simulate+decode", unit=" ev", mininterval=0.5)
        ):
            event = decode(raw, kind, f"demo:{kind}:{line_no}", cfg.contracts,
                           cfg.images.max_bytes)
            if isinstance(event, DeadLetter):
                counts["dead"] += 1
                dead_out.write(event.to_json() + b"\n")
                continue
            counts[kind] += 1
            if isinstance(event, ItemEvent):
                first_seen.setdefault(event.item_id, event.event_time)
                if event.op is ItemOp.UPSERT and len(sample) < sample_size:
                    sample.append(event)
            elif event.action is Action.IMPRESSION:
                counts["impressions"] += 1
                seen = first_seen.get(event.item_id)
                if seen is not None and event.event_time - seen < timedelta(days=1):
                    counts["fresh_impressions"] += 1

    encoder = ItemEncoder.from_config(cfg)
    started = time.perf_counter()
    embeddings = encoder.encode(sample)
    elapsed = time.perf_counter() - started

    return DemoReport(
        {
            "days": sim_cfg.days,
            "users": sim_cfg.n_users,
            "seed": sim_cfg.seed,
            "items": len(first_seen),
            "item_events": counts["item"],
            "behavior_events": counts["behavior"],
            "dead_letters": counts["dead"],
            "dead_letter_file": str(dead_file),
            "fresh_impression_share": counts["fresh_impressions"] / max(counts["impressions"], 1),
            "items_encoded": len(embeddings.item_ids),
            "encode_items_per_s": len(embeddings.item_ids) / elapsed if elapsed else 0.0,
            "embedding_dim": encoder.dim,
            "encoder_version": embeddings.encoder_version,
            "pipeline": NOT_YET,
        }
    )
