"""``ppm experiment staleness``: what fresh item embeddings are worth, in click AUC.

The same closed windows are replayed under each embedding refresh policy
(:class:`trainer.refresh.EmbeddingRefresh`): for each seed and policy a ``ppm`` model is
fitted from scratch on the train period (:func:`trainer.train.train_batch`, the epoch
chosen on validation) with the vectors the policy makes readable, and scores the test
period with them; ``idrec``, which reads no vector, is the floor. Every run scores the same
samples, so differences are paired: :func:`trainer.experiment.compare_models` reports each
policy's AUC per bucket (overall, items new in the test period, by item age) with 95%
intervals over seeds and over users, and the difference to the freshest policy
(:data:`REFERENCE`) with a bootstrap interval over users. Beside each policy: how many
vectors it computes per hour of data, which is what a slower refresh saves.

Each run is saved under ``OUT/runs/`` as soon as it finishes, so a killed sweep resumes
where it stopped: a run already on disk is read, not recomputed. ``OUT/spec.json`` pins
what the runs are of; another spec in the same folder is refused.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ppm.atomic_file import write_atomically
from ppm.config import Config
from trainer.baselines import clicks
from trainer.dataset import ModalTable
from trainer.experiment import RESAMPLES, compare_models
from trainer.metrics import cold_buckets
from trainer.refresh import EmbeddingRefresh
from trainer.train import (
    TEST_BUCKETS,
    IncrementalTrainer,
    new_in_period,
    predict,
    split_windows,
    train_batch,
)

HOUR_S = 3_600.0
REFERENCE = EmbeddingRefresh("arrival")
"""The freshest policy, every other is compared with: each vector readable at its item
event's time."""
FLOOR = "idrec"
"""The model that reads no vector at all: what no embedding is worth."""
PRESETS: dict[str, tuple[EmbeddingRefresh, ...]] = {
    "quick": (REFERENCE, EmbeddingRefresh("arrival", lag_s=HOUR_S),
              EmbeddingRefresh("periodic", period_s=6 * HOUR_S),
              EmbeddingRefresh("periodic", period_s=24 * HOUR_S),
              EmbeddingRefresh("catalog_once")),
    "default": (REFERENCE, EmbeddingRefresh("arrival", lag_s=600.0),
                EmbeddingRefresh("arrival", lag_s=HOUR_S),
                EmbeddingRefresh("periodic", period_s=HOUR_S),
                EmbeddingRefresh("periodic", period_s=6 * HOUR_S),
                EmbeddingRefresh("periodic", period_s=24 * HOUR_S),
                EmbeddingRefresh("catalog_once")),
}
"""The policies of ``--preset``; the first is :data:`REFERENCE`."""


def policy_values(policy: EmbeddingRefresh) -> dict[str, str]:
    """``[staleness]`` config values of ``policy`` (for :meth:`Config.with_values`)."""
    return {"staleness.embedding_refresh": policy.mode,
            "staleness.embedding_lag_s": str(policy.lag_s),
            "staleness.embedding_period_s": str(policy.period_s)}


def vectors_computed(modal: ModalTable, policy: EmbeddingRefresh, start_us: int,
                     end_us: int) -> int:
    """How many vectors ``policy`` computes for the item versions of ``modal`` whose
    content falls before ``end_us``: one per version on arrival; one per item and batch in
    which it changed (the batch embeds its newest content); the catalog once."""
    content = modal.content_time_us[1:]
    within = content < end_us
    if policy.mode in ("arrival", "recorded"):
        return int(within.sum())
    available = policy.apply(modal, start_us).available_us[1:]
    ids = modal.item_ids[1:]
    if policy.mode == "catalog_once":
        return len({i for i, a in zip(ids, available, strict=True) if a <= start_us})
    return len({(i, a) for i, a, w in zip(ids, available, within, strict=True) if w})


def run_staleness(cfg: Config, policies: Sequence[EmbeddingRefresh], seeds: int, out: Path,
                  test_share: float = 0.2, valid_share: float = 0.1,
                  epochs: int | None = None, resamples: int = RESAMPLES,
                  progress: bool = True) -> dict[str, Any]:
    """The sweep of the module docstring; writes ``results.json`` and ``results.md`` under
    ``out`` and returns the result. ``policies[0]`` is the reference the others are
    compared with. Raises ``ValueError`` for bad arguments or a folder holding another
    sweep's runs, ``SystemExit`` when a period holds no window."""
    from tqdm import tqdm

    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    if not policies or len({p.name for p in policies}) != len(policies):
        raise ValueError("give at least one policy, each once")
    split = split_windows(cfg, test_share, valid_share)
    if not (split.train and split.test):
        raise SystemExit("no closed windows in the train or the test period")
    spec = {"data_dir": str(Path(cfg.data_dir).resolve()), "test_share": test_share,
            "valid_share": valid_share, "epochs": epochs,
            "train": [w.name for w in split.train], "test": [w.name for w in split.test],
            "trainer": cfg.trainer.model_dump(mode="json"),
            "model": cfg.model.model_dump(mode="json")}
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out / "spec.json"
    if spec_path.exists() and json.loads(spec_path.read_text()) != spec:
        raise ValueError(f"{out} holds runs of another sweep (other data, split or "
                         "settings): give another --out")
    write_atomically(spec_path, json.dumps(spec, indent=1).encode())

    reference = IncrementalTrainer(cfg, variant="idrec")
    test = reference.dataset(split.test)
    names = [p.name for p in policies]
    scores = {name: np.zeros((seeds, len(test))) for name in [*names, FLOOR]}
    fits: dict[str, list[dict[str, Any]]] = {name: [] for name in scores}
    plan = [(seed, p) for seed in range(seeds) for p in [*policies, None]]
    resumed = 0
    for seed, policy in tqdm(plan, desc="staleness", disable=not progress):
        name = FLOOR if policy is None else policy.name
        path = runs_dir / f"{name.replace(' ', '_').replace('+', '_plus_')}-seed{seed}.npz"
        if path.exists():
            saved = np.load(path, allow_pickle=False)
            run_scores, meta = saved["scores"], json.loads(str(saved["meta"]))
            resumed += 1
        else:
            values = {"trainer.seed": str(seed),
                      **policy_values(REFERENCE if policy is None else policy)}
            fitted = train_batch(cfg.with_values(values), split.train,
                                 FLOOR if policy is None else "ppm", epochs, progress=False,
                                 valid=split.valid)
            click = fitted.model.config.tasks.index("click")
            run_scores = predict(fitted.model, fitted.trainer.dataset_for(
                fitted.model, split.test))[:, click]
            meta = {"seed": seed, "epochs": fitted.epochs, "best_epoch": fitted.best_epoch,
                    "valid_click_auc": fitted.valid_auc}
            buffer = io.BytesIO()
            np.savez(buffer, scores=run_scores, meta=np.array(json.dumps(meta)))
            write_atomically(path, buffer.getvalue())
        scores[name][seed] = run_scores
        fits[name].append(meta)

    modal = reference.modal
    start, end = split.train[0].start_us, split.test[-1].end_us
    hours = (end - start) / 1e6 / HOUR_S
    y = clicks(test)
    buckets = {"all": np.ones(len(test), bool),
               "new_in_test": new_in_period(test, split.test_start_us),
               **cold_buckets(test.item_age_s, test.item_clicks_before)}
    pairs = [*((n, names[0]) for n in names[1:]), (names[0], FLOOR)]
    result = {
        "seeds": seeds, "reference": names[0], "floor": FLOOR,
        "test_share": test_share, "valid_share": valid_share, "resamples": resamples,
        "runs_resumed": resumed,
        "policies": {p.name: {"mode": p.mode, "lag_s": p.lag_s, "period_s": p.period_s,
                              "vectors_per_hour": vectors_computed(modal, p, start, end) / hours}
                     for p in policies},
        "fits": fits,
        "buckets": {b: compare_models(y[buckets[b]], test.user_id[buckets[b]],
                                      {m: s[:, buckets[b]] for m, s in scores.items()},
                                      pairs=pairs, resamples=resamples)
                    for b in TEST_BUCKETS},
    }
    write_atomically(out / "results.json", json.dumps(result, indent=1).encode())
    write_atomically(out / "results.md", to_markdown(result).encode())
    return result


def to_markdown(result: Mapping[str, Any]) -> str:
    """The sweep's tables: per bucket, each policy's click AUC with intervals and the
    vectors it computes per hour, then the paired differences to the reference."""

    def num(x: float | None, sign: str = "") -> str:
        return "n/a" if x is None else f"{x:{sign}.4f}"

    def span(interval: Sequence[float] | None, sign: str = "") -> str:
        return "n/a" if interval is None else (f"[{num(interval[0], sign)}, "
                                               f"{num(interval[1], sign)}]")

    policies = result["policies"]
    lines = [f"click AUC on the test period by embedding refresh policy, mean of "
             f"{result['seeds']} seed(s); 95% intervals over seeds (t) and users (bootstrap); "
             f"`{result['floor']}` reads no vector", "",
             "| bucket | policy | samples | auc | 95% seeds | 95% users | vectors/hour |",
             "|---|---|---:|---:|---|---|---:|"]
    for bucket, summary in result["buckets"].items():
        for name, m in summary["models"].items():
            per_hour = policies.get(name, {}).get("vectors_per_hour")
            lines.append(f"| {bucket} | {name} | {summary['samples']} | {num(m['auc'])} | "
                         f"{span(m['ci95_seeds'])} | {span(m['ci95_users'])} | "
                         f"{'n/a' if per_hour is None else f'{per_hour:.1f}'} |")
    lines += ["", f"paired differences to `{result['reference']}` (mean over seeds; 95% "
              "bootstrap over users, the same resamples for both)", "",
              "| bucket | difference | auc | 95% users |", "|---|---|---:|---|"]
    for bucket, summary in result["buckets"].items():
        for name, d in summary["diffs"].items():
            a, _, b = name.rpartition("-")
            lines.append(f"| {bucket} | {a} - {b} | {num(d['auc'], '+')} | "
                         f"{span(d['ci95'], '+')} |")
    return "\n".join(lines) + "\n"
