"""``ppm demo``: a seeded shop streamed through ppm-stream on the embedded default.

It simulates a shop (with a few malformed records mixed in), replays it through the local
runner (items embedded on arrival into Feast's SQLite online store, user sequences, labelled
training windows), then trains the ranker incrementally over the closed windows, as
``idrec`` (IDs only), as ``ppm`` (IDs + cached modal embeddings) and as the shuffled-vector
control (``ppm`` trained and scored with each item's vector swapped for another item's:
what it gains over ``idrec`` is not the content's doing), and reports what happened.
Evaluation is test-then-train: each window is scored by the model trained on the windows
before it, so every AUC is on data the model has not seen. Beside them: two baselines
(``trainer.baselines``), refitted the same way on every window before the one they score,
and the simulator's oracle, the best
AUC any model could reach on the same impressions; intervals are 95% bootstrap intervals
over users (``trainer.experiment.compare_models``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ppm.config import Config
from ppm.data_dir import DataDir
from trainer.baselines import LogisticBaseline, Oracle, PositiveRate, Samples, clicks
from trainer.experiment import BASELINES, ORACLE, PAIRS, TRAINED, compare_models
from trainer.metrics import auc, cold_buckets
from trainer.registry import Registry
from trainer.train import IncrementalTrainer
from trainer.windows import closed_windows

DISTRIBUTED = "the same processors on Kafka, Faust and Redis: README, The distributed path"
SCORERS = (*TRAINED, *BASELINES, ORACLE)
"""Everything that scores the evaluated windows, in report order: the incremental runs of
:data:`trainer.experiment.TRAINED` (each with a registry of its name), the baselines and
the oracle."""


def demo_outputs(paths: DataDir) -> tuple[Path, ...]:
    """Everything the demo writes in its folder; removed before a run so each demo starts
    fresh."""
    return (paths.feast_repo, paths.offline, paths.training, paths.registry_dir,
            paths.dead_letters, paths.item_warnings, paths.freshness, paths.freshness_items,
            paths.checkpoint, paths.summary, paths.demo_windows, paths.simulated_oracle)


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
            f"{f['warmup_windows']} warm-up windows; click AUC [95% over users] (cold: items "
            "younger than one day at the impression):",
            f"{'':21}{'':21}{'all':>27}{'cold':>27}",
            *(f"{'':21}{label:21}{_auc(f, key, ''):>27}{_auc(f, key, 'cold_'):>27}"
              for label, key in [*((name, name) for name in SCORERS),
                                 *((f"{a} - {b}", f"diff_{a}_{b}") for a, b in PAIRS)]),
            f"  data             {f['data_dir']}  (try: ppm --data-dir {f['data_dir']} "
            f"features get --item {f['example_item']})",
            f"  next             {DISTRIBUTED}",
        ])


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _auc(f: dict[str, Any], name: str, bucket: str) -> str:
    """A figure and its interval, e.g. ``0.6302 [0.6211, 0.6390]``."""
    value, interval = f.get(f"auc_{bucket}{name}"), f.get(f"auc_{bucket}{name}_ci95")
    return _num(value) + ("" if interval is None else f" [{_num(interval[0])}, "
                          f"{_num(interval[1])}]")


def train_and_score(run_cfg: Config, oracle: Oracle | None = None, progress: bool = True
                    ) -> tuple[dict, list[dict]]:
    """Incremental training of each of :data:`trainer.experiment.TRAINED` over the closed
    windows, test-then-train (the control's vectors shuffled with ``trainer.seed``);
    returns the click AUCs of everything in :data:`SCORERS` over all evaluated windows
    (``auc_<name>``; on items younger than a day ``auc_cold_<name>``), each with its 95%
    bootstrap interval over users (``..._ci95``), the paired differences of
    :data:`trainer.experiment.PAIRS` (``auc_diff_<a>_<b>``, ``auc_cold_diff_<a>_<b>``, with
    intervals), and one row per evaluated window.

    The baselines learn as the models do, test-then-train: before each evaluated window
    they are fitted again on every window before it (the warm-up and the evaluated windows
    so far), so they too never score a window they learned from, and read the same history.
    ``oracle``: the simulator's truth for these impressions (None: no ``auc_oracle``)."""
    # Only what a baseline reads is kept of each window: its sequence features are large.
    seen = [Samples.of(IncrementalTrainer(run_cfg, variant="idrec").dataset(
        closed_windows(run_cfg.paths.training)[: run_cfg.trainer.warmup_windows]))]
    # Per evaluated window, in order: labels, users, cold rows and every scorer's logits.
    columns: dict[str, list[np.ndarray]] = {k: [] for k in ("labels", "users", "cold",
                                                            *SCORERS)}
    evaluated: dict[str, list[str]] = {}
    per_window: dict[str, dict] = {}
    for name, arm in TRAINED.items():
        variant = arm.variant
        shuffle_seed = run_cfg.trainer.seed if arm.shuffled else None
        evaluated[name] = []

        def collect(step, name=name) -> None:
            data = step.eval_data
            y, young = clicks(data), cold_buckets(data.item_age_s,
                                                  data.item_clicks_before)["age<1d"]
            s = step.eval_logits[:, data.config.tasks.index("click")]
            if name == next(iter(TRAINED)):  # the samples are the same in every run
                columns["labels"].append(y)
                columns["users"].append(data.user_id)
                columns["cold"].append(young)
                history = Samples.concat(seen)
                columns["baseline_logreg"].append(LogisticBaseline.fit(history).scores(data))
                columns["baseline_rate"].append(PositiveRate.fit(history).scores(data))
                seen.append(Samples.of(data))
                if oracle is not None:
                    columns["oracle"].append(oracle.scores(data))
            columns[name].append(s)
            evaluated[name].append(step.eval_window)
            row = per_window.setdefault(step.eval_window, {"window": step.eval_window,
                                                            "samples": len(y)})
            row[f"auc_{name}"] = auc(y, s)
            row[f"auc_cold_{name}"] = auc(y[young], s[young])
            row[f"promoted_{name}"] = step.promoted
            if progress:
                print(f"  {name:12} {step.eval_window}: click AUC {_num(auc(y, s))}, "
                      f"cold {_num(auc(y[young], s[young]))}, "
                      f"{'promoted' if step.promoted else 'kept champion'}", flush=True)

        IncrementalTrainer(run_cfg, Registry(run_cfg.paths.registry(name)), variant,
                           shuffle_seed).follow(once=True, on_step=collect)
    if len({tuple(windows) for windows in evaluated.values()}) > 1:
        raise RuntimeError(f"the runs evaluated different windows: {evaluated}")

    def joined(key: str) -> np.ndarray:
        return np.concatenate(columns[key]) if columns[key] else np.zeros(0)

    y, users, cold = joined("labels"), joined("users"), joined("cold").astype(bool)
    scorers = [name for name in SCORERS if name != ORACLE or oracle is not None]
    totals: dict[str, Any] = {}
    for bucket, rows in (("", np.ones(len(y), bool)), ("cold_", cold)):
        summary = compare_models(y[rows], users[rows], {n: joined(n)[rows] for n in scorers})
        for name, result in summary["models"].items():
            totals[f"auc_{bucket}{name}"] = result["auc"]
            totals[f"auc_{bucket}{name}_ci95"] = result["ci95_users"]
        for a, b in PAIRS:
            diff = summary["diffs"][f"{a}-{b}"]
            totals[f"auc_{bucket}diff_{a}_{b}"] = diff["auc"]
            totals[f"auc_{bucket}diff_{a}_{b}_ci95"] = diff["ci95"]
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
    simulator = ShopSimulator(world)
    summary = runner.run(simulator.records(), source="demo")
    # Where ppm eval --seeds looks for it, so an experiment on the demo's data has its ceiling.
    truth = simulator.write_oracle(run_cfg.paths.simulated_oracle)

    windows = window_files(run_cfg.paths.training)
    samples = ds.dataset(windows, format="parquet").to_table(
        columns=["item_id", "item_age_s", "item_encoder_version"])
    cold = samples.filter(pc.less(samples["item_age_s"], 86_400.0))
    cold_embedded = cold.filter(pc.is_valid(cold["item_encoder_version"]))
    totals, windows_evaluated = train_and_score(
        run_cfg, Oracle.of(truth.request_id.tolist(), truth.item_id.tolist(),
                           truth.logit.to_numpy()))
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
