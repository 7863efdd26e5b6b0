"""Training throughput of the unified ranker on CPU: ``idrec`` against ``ppm``, in one run.

Synthetic batches shaped like the data layer's (``trainer.model`` contract): batch 1024,
sequences left-padded to L = 50 with lengths drawn uniformly from 0..50, a modal table of
2,000 rows x 1664, a tenth of modal rows missing. A step is what ``trainer.train.fit`` does:
forward, backward, gradient clipping, AdamW. Both variants get the same batches, a few
warm-up steps, then timed steps interleaved round by round so machine noise hits both.

Run ``python bench/train.py``; the last line is one JSON object:
``{"batch", "idrec_samples_per_s", "ppm_samples_per_s", "ratio_ppm_to_idrec", ...}``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from trainer.model import RankerConfig, UnifiedRanker


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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    variants = ("idrec", "ppm")
    models = {v: UnifiedRanker(RankerConfig(variant=v, max_seq_len=args.seq_len,
                                           seq_dropout=args.seq_dropout)).to(device)
              for v in variants}
    optimizers = {v: torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=1e-5)
                  for v, m in models.items()}
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
    print(json.dumps({
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
    }))


if __name__ == "__main__":
    main()
