"""Training throughput of the unified ranker on CPU: ``idrec`` against ``ppm``, in one run.

Synthetic batches shaped like the data layer's (``trainer.model`` contract): batch 1024,
sequences left-padded to L = 50 with lengths drawn uniformly from 0..50, a modal table of
2,000 rows x 1664, a tenth of modal rows missing. A step is what ``trainer.train.fit`` does:
forward, backward, gradient clipping, AdamW. Both variants get the same batches, a few
warm-up steps, then timed steps interleaved round by round so machine noise hits both.

``--against REF`` also builds both variants from ``trainer/model.py`` as it was at git commit
REF (read with ``git show``; the batch contract must be the same) and interleaves them with
today's, so a speed-up is measured within one run: machines here differ by 2x or more
between runs, and their load changes within minutes.

Run ``python bench/train.py [--against REF]``; the last line is one JSON object:
``{"batch", "idrec_samples_per_s", "ppm_samples_per_s", "ratio_ppm_to_idrec", ...}``, with
``--against`` also ``"against"``, ``"against_<variant>_samples_per_s"`` and
``"speedup_<variant>"`` (today's samples/s over REF's).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ppm.config import TrainerConfig  # noqa: E402
from trainer.model import RankerConfig, UnifiedRanker  # noqa: E402
from trainer.train import adamw  # noqa: E402


def synthetic_batch(c: RankerConfig, batch: int, seq_len: int, modal_rows: int,
                    g: torch.Generator) -> dict[str, torch.Tensor]:
    """One batch in the model's contract with random ids, lengths and labels."""
    B, L = batch, seq_len
    lengths = torch.randint(0, L + 1, (B, 1), generator=g)  # (B, 1)
    mask = torch.arange(L).unsqueeze(0) >= L - lengths  # (B, L), left-padded
    ints = lambda lo, hi, shape: torch.randint(lo, hi, shape, generator=g)  # noqa: E731
    present = (torch.rand(B, L, generator=g) > 0.1) & mask  # 10% missing vectors
    return {
        "item_id": ints(1, c.item_buckets, (B,)),
        "category": ints(1, c.category_buckets, (B,)),
        "brand": ints(1, c.brand_buckets, (B,)),
        "shop": ints(1, c.shop_buckets, (B,)),
        "price_bucket": ints(0, c.price_buckets, (B,)),
        "user_id": ints(1, max(c.user_buckets, 2), (B,)),  # a model without user ids ignores it
        "item_rates": torch.randn(B, 2, generator=g),
        "taste_rates": torch.randn(B, 4, generator=g),
        "user_rates": torch.randn(B, 2, generator=g),
        "seq_item_id": ints(1, c.item_buckets, (B, L)) * mask,
        "seq_action": ints(1, 4, (B, L)) * mask,
        "seq_gap": ints(1, c.gap_buckets, (B, L)) * mask,
        "seq_mask": mask,
        "modal_table": torch.randn(modal_rows, c.modal_dim, generator=g) / c.modal_dim**0.5,
        "target_modal_row": ints(0, modal_rows, (B,)),
        "seq_modal_row": ints(1, modal_rows, (B, L)) * present,
        "labels": (torch.rand(B, len(c.tasks), generator=g) < 0.1).float(),
        "label_mask": torch.ones(B, len(c.tasks), dtype=torch.bool),
    }


def train_step(model: UnifiedRanker, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    """One step as ``trainer.train.fit`` takes it; ``.item()`` waits for the device."""
    _, loss = model.train()(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimizer.step()
    return loss.item()


def model_module_at(ref: str):
    """``trainer/model.py`` as it was at git commit ``ref``, imported as a module of its own."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:trainer/model.py"],
                            check=True, capture_output=True, text=True).stdout
    name = f"model_at_{ref.replace('-', '_').replace('/', '_')}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    exec(compile(source, f"{ref}:trainer/model.py", "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--modal-rows", type=int, default=2_000)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds")
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cpu", help="e.g. cuda (the goal is CPU)")
    parser.add_argument("--seq-dropout", type=float, default=RankerConfig.seq_dropout,
                        help="dropout inside the transformers (its cost on CPU is the point)")
    parser.add_argument("--against", metavar="REF",
                        help="also time trainer/model.py at this git commit, interleaved")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    builds = {"": (RankerConfig, UnifiedRanker)}
    if args.against:
        old = model_module_at(args.against)
        builds["against_"] = (old.RankerConfig, old.UnifiedRanker)
    models = {}
    for prefix, (config_cls, model_cls) in builds.items():
        for variant in ("idrec", "ppm"):
            torch.manual_seed(0)
            models[f"{prefix}{variant}"] = model_cls(config_cls(
                variant=variant, max_seq_len=args.seq_len,
                seq_dropout=args.seq_dropout)).to(device)
    variants = tuple(models)
    # Today's optimiser for every model: ``--against`` compares the model code only.
    optimizers = {v: adamw(m, lr=2e-3, weight_decay=1e-5,
                           id_lr_scale=TrainerConfig().id_lr_scale) for v, m in models.items()}
    g = torch.Generator().manual_seed(0)
    config = models["ppm"].config
    batches = [{k: v.to(device) for k, v in
                synthetic_batch(config, args.batch, args.seq_len, args.modal_rows, g).items()}
               for _ in range(4)]

    for v in variants:
        for i in range(args.warmup):
            train_step(models[v], optimizers[v], batches[i % len(batches)])
    seconds = dict.fromkeys(variants, 0.0)
    steps = dict.fromkeys(variants, 0)
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            started = time.perf_counter()
            for i in range(args.steps):
                train_step(models[v], optimizers[v], batches[(r + i) % len(batches)])
            seconds[v] += time.perf_counter() - started
            steps[v] += args.steps
    rate = {v: steps[v] * args.batch / seconds[v] for v in variants}
    for v in variants:
        print(f"{v}: {models[v].parameter_count():,} parameters, "
              f"{1000 * seconds[v] / steps[v]:.0f} ms/step, {rate[v]:,.0f} samples/s")
    result = {
        "batch": args.batch,
        "idrec_samples_per_s": round(rate["idrec"], 1),
        "ppm_samples_per_s": round(rate["ppm"], 1),
        "ratio_ppm_to_idrec": round(rate["ppm"] / rate["idrec"], 3),
        "seq_len": args.seq_len,
        "modal_rows": args.modal_rows,
        "timed_steps_per_variant": steps["idrec"],
        "seq_dropout": args.seq_dropout,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if args.against:
        result["against"] = args.against
        for v in ("idrec", "ppm"):
            result[f"against_{v}_samples_per_s"] = round(rate[f"against_{v}"], 1)
            result[f"speedup_{v}"] = round(rate[v] / rate[f"against_{v}"], 3)
    print(json.dumps(result))

if __name__ == "__main__":
    main()
