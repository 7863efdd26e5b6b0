"""``ppm demo``: a seeded shop streamed through ppm-stream on the embedded default.

It simulates a shop (with a few malformed records mixed in), replays it through the local
runner (items embedded on arrival into Feast's SQLite online store, user sequences, labelled
training windows), then trains the ranker incrementally over the closed windows, once as
``idrec`` (IDs only) and once as ``ppm`` (IDs + cached modal embeddings), and reports what
happened. Evaluation is test-then-train: each window is scored by the model trained on the
windows before it, so every AUC is on data the model has not seen.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppm.config import Config
from ppm.data_dir import DataDir

DISTRIBUTED = "the same processors on Kafka, Faust and Redis: README, The distributed path"
VARIANTS = ("idrec", "ppm")


def demo_outputs(paths: DataDir) -> tuple[Path, ...]:
    """Everything the demo writes in its folder; removed before a run so each demo starts
    fresh."""
    return (paths.feast_repo, paths.offline, paths.training, paths.registry_dir,
            paths.dead_letters, paths.item_warnings, paths.freshness, paths.checkpoint,
            paths.summary, paths.demo_windows)


@dataclass
class DemoReport:
    figures: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        f = self.figures

        def ms(x: float | None) -> str:
            return "n/a" if x is None else f"{x:,.0f} ms"

        return "\n".join([
            "ppm demo (embedded: Feast on SQLite, no servers)",
            f"  world            {f['days']:g} days, {f['users']:,} users, seed {f['seed']}",
            f"  item events      {f['item_events']:,}: {f['items_embedded']:,} embedded on "
            f"arrival ({f['embedding_dim']}-d, {f['encoder_version']})",
            f"  freshness        arrival -> readable online: p50 {ms(f['freshness_p50_ms'])}, "
            f"p99 {ms(f['freshness_p99_ms'])}",
            f"  behavior events  {f['behavior_events']:,} -> {f['sequences_written']:,} "
            f"sequence writes",
            f"  training log     {f['samples_logged']:,} labelled impressions in "
            f"{f['windows_closed']:,} closed windows; {f['cold_sample_share']:.1%} on items "
            f"< 1 day old, {f['cold_samples_with_embedding']:.1%} of those with an embedding",
            f"  dead letters     {f['dead_letters']:,} (reasons in {f['dead_letter_file']})",
            f"  ranker           test-then-train over {f['windows_evaluated']} windows after "
            f"{f['warmup_windows']} warm-up windows; click AUC:",
            "                     " + "  ".join(f"{v:>6}" for v in ("", *VARIANTS)),
            "                     " + "  ".join(
                [f"{'all':>6}"] + [f"{_num(f[f'auc_{v}']):>6}" for v in VARIANTS]),
            "                     " + "  ".join(
                [f"{'cold':>6}"] + [f"{_num(f[f'auc_cold_{v}']):>6}" for v in VARIANTS])
            + "   (cold: items younger than one day at the impression)",
            f"  data             {f['data_dir']}  (try: ppm --data-dir {f['data_dir']} "
            f"features get --item {f['example_item']})",
            f"  next             {DISTRIBUTED}",
        ])


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def train_and_score(run_cfg: Config, progress: bool = True) -> tuple[dict, list[dict]]:
    """Incremental training of each variant over the closed windows; returns total click AUCs
    (``auc_<variant>``, ``auc_cold_<variant>``) and one row per evaluated window."""
    import numpy as np

    from trainer.metrics import auc, cold_buckets
    from trainer.train import IncrementalTrainer

    totals: dict = {}
    per_window: dict[str, dict] = {}
    for variant in VARIANTS:
        labels, scores, cold = [], [], []

        def collect(step, variant=variant, labels=labels, scores=scores, cold=cold) -> None:
            y, s = step.eval_data.labels[:, 0], step.eval_logits[:, 0]
            young = cold_buckets(step.eval_data.item_age_s,
                                 step.eval_data.item_clicks_before)["age<1d"]
            labels.append(y)
            scores.append(s)
            cold.append(young)
            row = per_window.setdefault(step.eval_window, {"window": step.eval_window,
                                                            "samples": len(y)})
            row[f"auc_{variant}"] = auc(y, s)
            row[f"auc_cold_{variant}"] = auc(y[young], s[young])
            row[f"promoted_{variant}"] = step.promoted
            if progress:
                print(f"  {variant:5} {step.eval_window}: click AUC {_num(auc(y, s))}, "
                      f"cold {_num(auc(y[young], s[young]))}, "
                      f"{'promoted' if step.promoted else 'kept champion'}", flush=True)

        IncrementalTrainer(run_cfg, variant=variant).follow(once=True, on_step=collect)
        if labels:
            y, s, young = (np.concatenate(x) for x in (labels, scores, cold))
            totals[f"auc_{variant}"] = auc(y, s)
            totals[f"auc_cold_{variant}"] = auc(y[young], s[young])
        else:
            totals[f"auc_{variant}"] = totals[f"auc_cold_{variant}"] = None
    return totals, list(per_window.values())


def run_demo(cfg: Config, quick: bool = False, out_dir: Path | None = None) -> DemoReport:
    """Simulate and stream a shop into ``out_dir`` (default ``DATA_DIR/demo``); the figures.
    ``quick``: with the ``quick`` preset (:data:`ppm.config.PRESETS`)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from streams.local_runner import LocalRunner
    from streams.sources.shop_simulator import ShopSimulator
    from trainer.windows import window_files

    if quick:
        cfg = cfg.with_preset("quick")
    world = cfg.simulator.model_copy(
        update={"malformed_share": max(cfg.simulator.malformed_share, 0.005)})
    out = Path(out_dir or cfg.paths.demo)
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = cfg.model_copy(update={"data_dir": out})
    for path in demo_outputs(run_cfg.paths):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    runner = LocalRunner(run_cfg, resume=False)
    summary = runner.run(ShopSimulator(world).records(), source="demo")

    windows = window_files(run_cfg.paths.training)
    samples = ds.dataset(windows, format="parquet").to_table(
        columns=["item_id", "item_age_s", "item_encoder_version"])
    cold = samples.filter(pc.less(samples["item_age_s"], 86_400.0))
    cold_embedded = cold.filter(pc.is_valid(cold["item_encoder_version"]))
    totals, windows_evaluated = train_and_score(run_cfg)
    run_cfg.paths.demo_windows.write_text(json.dumps(windows_evaluated, indent=1))
    freshness = summary.freshness
    return DemoReport({
        "days": world.days,
        "users": world.n_users,
        "seed": world.seed,
        "item_events": summary.item_events,
        "items_embedded": summary.items_embedded,
        "embedding_dim": runner.encoder.dim,
        "encoder_version": runner.encoder.encoder_version,
        "behavior_events": summary.behavior_events,
        "sequences_written": summary.sequences_written,
        "freshness_p50_ms": freshness["p50_ms"],
        "freshness_p95_ms": freshness["p95_ms"],
        "freshness_p99_ms": freshness["p99_ms"],
        "dead_letters": summary.dead_letters,
        "dead_letter_file": str(run_cfg.paths.dead_letters),
        "windows_closed": summary.windows_closed,
        "samples_logged": samples.num_rows,
        "cold_sample_share": cold.num_rows / max(samples.num_rows, 1),
        "cold_samples_with_embedding": cold_embedded.num_rows / max(cold.num_rows, 1),
        "image_errors": summary.image_errors,
        "data_dir": str(out),
        "example_item": samples["item_id"][0].as_py() if samples.num_rows else "i0000000",
        "warmup_windows": run_cfg.trainer.warmup_windows,
        "windows_evaluated": len(windows_evaluated),
        **totals,
    })
