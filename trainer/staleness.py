"""``ppm experiment staleness``: what fresh item embeddings and fresh models are worth, in
click AUC.

The same closed windows are replayed under each embedding refresh policy
(:class:`trainer.refresh.EmbeddingRefresh`): for each seed and policy a ``ppm`` model is
fitted from scratch on the train period (:func:`trainer.train.train_batch`, the epoch
chosen on validation) with the vectors the policy makes readable, and scores the test
period with them; ``idrec``, which reads no vector, is the floor. Then under each model
update policy (:class:`ModelUpdate`): the on-arrival fit, frozen or fine-tuned every U
hours on the windows closed by then, each test window scored by the model serving at its
start. Every run scores the same samples, so differences are paired:
:func:`trainer.experiment.compare_models` reports each policy's AUC per bucket (overall,
items new in the test period, by item age) with 95% intervals over seeds and over users,
and the difference to the freshest policy with a bootstrap interval over users. Beside each
embedding policy: how many vectors it computes per hour of data, which is what a slower
refresh saves.

Each run is saved under ``OUT/runs/`` as soon as it finishes, so a killed sweep resumes
where it stopped: a run already on disk is read, not recomputed. ``OUT/spec.json`` pins
what the runs are of; another spec in the same folder is refused.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ppm.atomic_file import write_atomically
from ppm.config import Config
from trainer.baselines import clicks
from trainer.dataset import ModalTable
from trainer.experiment import RESAMPLES, compare_models, diff_table, num, span
from trainer.metrics import HOUR_S, cold_buckets
from trainer.refresh import EmbeddingRefresh, duration
from trainer.train import (
    TEST_BUCKETS,
    BatchFit,
    IncrementalTrainer,
    Split,
    admit_ids,
    fit,
    new_in_period,
    predict,
    split_windows,
    train_batch,
)

REFERENCE = EmbeddingRefresh("arrival")
"""The freshest policy, every other is compared with: each vector readable at its item
event's time."""
FLOOR = "idrec"
"""The model that reads no vector at all: what no embedding is worth."""


@dataclass(frozen=True)
class ModelUpdate:
    """How often the served model is fine-tuned after its first fit on the train period.

    At every multiple of ``every_s`` (since the epoch, UTC) from the validation period on,
    the model is fine-tuned (``trainer.incremental_epochs``, with ``trainer.replay_share``
    of older samples, as a ``ppm train --follow`` step) on the windows it has not trained
    on whose labels are final by then (ended at least ``pipeline.attribution_window_s``
    before), and serves from ``deploy_lag_s`` later; a window is scored by the newest model
    serving at its start. None: frozen.
    """

    every_s: float | None = None
    deploy_lag_s: float = 0.0

    @property
    def name(self) -> str:
        """``model frozen``, ``model every 6h``, ``model every 6h+1h``."""
        if self.every_s is None:
            return "model frozen"
        lag = f"+{duration(self.deploy_lag_s)}" if self.deploy_lag_s else ""
        return f"model every {duration(self.every_s)}{lag}"


UPDATE_PRESETS: dict[str, tuple[ModelUpdate, ...]] = {
    "quick": (ModelUpdate(HOUR_S), ModelUpdate(6 * HOUR_S), ModelUpdate(24 * HOUR_S),
              ModelUpdate(None)),
    "default": (ModelUpdate(HOUR_S), ModelUpdate(HOUR_S, deploy_lag_s=HOUR_S),
                ModelUpdate(6 * HOUR_S), ModelUpdate(24 * HOUR_S), ModelUpdate(None)),
}
"""The model update policies of ``--preset``; the first (the freshest) is the reference."""
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
    content falls in ``[start_us, end_us)``: one per version on arrival; one per item and
    batch in which it changed (the batch embeds its newest content); for ``catalog_once``,
    the catalog as it was at ``start_us``, once."""
    content = modal.content_time_us[1:]
    within = (content >= start_us) & (content < end_us)
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
                  progress: bool = True, updates: Sequence[ModelUpdate] = ()
                  ) -> dict[str, Any]:
    """The sweep of the module docstring; writes ``results.json`` and ``results.md`` under
    ``out`` and returns the result. ``policies[0]`` is the reference the others are
    compared with; so is ``updates[0]`` among the model update policies (each starts from
    the fit of ``REFERENCE``'s vectors). Raises ``ValueError`` for bad arguments or a
    folder holding another sweep's runs, ``SystemExit`` when a period holds no window."""
    from tqdm import tqdm

    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    for kind in (policies, updates):
        if len({p.name for p in kind}) != len(kind):
            raise ValueError("give each policy once")
    if not policies:
        raise ValueError("give at least one embedding refresh policy")
    split = split_windows(cfg, test_share, valid_share)
    if not (split.train and split.test):
        raise SystemExit("no closed windows in the train or the test period")
    spec = {"data_dir": str(Path(cfg.data_dir).resolve()), "test_share": test_share,
            "valid_share": valid_share, "epochs": epochs,
            "train": [w.name for w in split.train], "test": [w.name for w in split.test],
            **{section: getattr(cfg, section).model_dump(mode="json")
               for section in ("trainer", "model", "features", "pipeline")}}
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
    update_names = [u.name for u in updates]
    scores = {name: np.zeros((seeds, len(test))) for name in [*names, FLOOR, *update_names]}
    fits: dict[str, list[dict[str, Any]]] = {name: [] for name in scores}
    plan: list[tuple[int, EmbeddingRefresh | ModelUpdate | None]] = [
        (seed, p) for seed in range(seeds) for p in [*policies, None, *updates]]
    base: dict[int, BatchFit] = {}  # seed -> the fit the update policies start from
    resumed = 0
    for seed, policy in tqdm(plan, desc="staleness", disable=not progress):
        base.pop(seed - 1, None)  # a seed's fit and its vector table, no longer needed
        name = FLOOR if policy is None else policy.name
        path = runs_dir / f"{name.replace(' ', '_').replace('+', '_plus_')}-seed{seed}.npz"
        if path.exists():
            saved = np.load(path, allow_pickle=False)
            run_scores, meta = saved["scores"], json.loads(str(saved["meta"]))
            resumed += 1
        else:
            if isinstance(policy, ModelUpdate):
                if seed not in base:
                    base[seed] = _fit(cfg, seed, REFERENCE, "ppm", split, epochs)
                run_scores = _scored_with_updates(cfg, split, base[seed], policy)
                meta = {"seed": seed, "updates": policy.name}
            else:
                fitted = _fit(cfg, seed, policy or REFERENCE, "ppm" if policy else FLOOR,
                              split, epochs)
                if policy == REFERENCE:
                    base[seed] = fitted
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

    def compared(models: Sequence[str], pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
        return {b: compare_models(y[buckets[b]], test.user_id[buckets[b]],
                                  {m: scores[m][:, buckets[b]] for m in models},
                                  pairs=pairs, resamples=resamples)
                for b in TEST_BUCKETS}

    result = {
        "seeds": seeds, "reference": names[0], "floor": FLOOR,
        "test_share": test_share, "valid_share": valid_share, "resamples": resamples,
        "runs_resumed": resumed,
        "policies": {p.name: {"mode": p.mode, "lag_s": p.lag_s, "period_s": p.period_s,
                              "vectors_per_hour": vectors_computed(modal, p, start, end) / hours}
                     for p in policies},
        "fits": fits,
        "buckets": compared([*names, FLOOR],
                            [*((n, names[0]) for n in names[1:]), (names[0], FLOOR)]),
    }
    if updates:
        result["updates"] = {
            "reference": update_names[0],
            "policies": {u.name: {"every_s": u.every_s, "deploy_lag_s": u.deploy_lag_s}
                         for u in updates},
            "buckets": compared(update_names, [(u, update_names[0])
                                               for u in update_names[1:]])}
    write_atomically(out / "results.json", json.dumps(result, indent=1).encode())
    write_atomically(out / "results.md", to_markdown(result).encode())
    return result


def _fit(cfg: Config, seed: int, policy: EmbeddingRefresh, variant: str, split: Split,
         epochs: int | None) -> BatchFit:
    """One fit from scratch on the train period with ``policy``'s vectors."""
    return train_batch(cfg.with_values({"trainer.seed": str(seed), **policy_values(policy)}),
                       split.train, variant, epochs, progress=False, valid=split.valid)


def _scored_with_updates(cfg: Config, split: Split, base: BatchFit, update: ModelUpdate
                         ) -> np.ndarray:
    """The test period's click logits, (n,) in the order of ``split.test``'s samples, each
    window scored by the newest model ``update`` has serving at its start (see
    :class:`ModelUpdate`), starting from ``base`` (left unchanged)."""
    model, trainer = copy.deepcopy(base.model), base.trainer
    t = trainer.cfg.trainer  # the base fit's, its seed included
    # A window's labels are final only once its attribution window has passed.
    settle = int(cfg.pipeline.attribution_window_s * 1e6)
    click = model.config.tasks.index("click")
    pending = [*split.valid, *split.test]  # not trained on yet, in order
    everything = [*split.train, *pending]
    runs: list[int] = []
    if update.every_s is not None:
        every = int(update.every_s * 1e6)
        first = -(-split.valid_start_us // every) * every
        runs = list(range(first, split.test[-1].start_us + 1, every))
    out = []
    for window in split.test:
        lag = int(update.deploy_lag_s * 1e6)
        # Every update run whose model serves by this window's start, in order.
        while runs and runs[0] + lag <= window.start_us:
            at = runs.pop(0)
            ready = [w for w in pending if w.end_us + settle <= at]
            if not ready:
                continue
            pending = [w for w in pending if w not in ready]
            trained = [w for w in everything if w.end_us <= ready[0].start_us]
            replayed = trained[-t.replay_windows:] if t.replay_share > 0 else []
            admit_ids(model, ready, t, fine_tune=True)
            fit(model, trainer.dataset_for(model, ready, training=True),
                t.incremental_epochs, t.batch_size, t.fine_tune_lr or t.lr, t.weight_decay,
                seed=t.seed + at // every, grad_clip=t.grad_clip,
                extra=trainer.dataset_for(model, replayed, training=True,
                                          counted_later=ready) if replayed else None,
                extra_share=t.replay_share)
        out.append(predict(model, trainer.dataset_for(model, [window]))[:, click])
    return np.concatenate(out) if out else np.zeros(0)


def _policy_rows(buckets: Mapping[str, Mapping[str, Any]],
                 policies: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """Markdown table lines: per bucket and policy, click AUC with its intervals, GAUC,
    logloss and (embedding policies) the vectors computed per hour."""
    extra = policies is not None
    lines = ["| bucket | policy | samples | auc | 95% seeds | 95% users | gauc | logloss |"
             + (" vectors/hour |" if extra else ""),
             "|---|---|---:|---:|---|---|---:|---:|" + ("---:|" if extra else "")]
    for bucket, summary in buckets.items():
        for name, m in summary["models"].items():
            row = (f"| {bucket} | {name} | {summary['samples']} | {num(m['auc'])} | "
                   f"{span(m['ci95_seeds'])} | {span(m['ci95_users'])} | {num(m['gauc'])} | "
                   f"{num(m['logloss'])} |")
            if extra:
                per_hour = policies.get(name, {}).get("vectors_per_hour")
                row += f" {'n/a' if per_hour is None else f'{per_hour:.1f}'} |"
            lines.append(row)
    return lines


def to_markdown(result: Mapping[str, Any]) -> str:
    """The sweep's tables: per bucket, each embedding policy's click AUC with intervals and
    the vectors it computes per hour, then the paired differences to the reference; the
    same for the model update policies."""
    policies = result["policies"]
    lines = [f"click AUC on the test period by embedding refresh policy, mean of "
             f"{result['seeds']} seed(s); 95% intervals over seeds (t) and users (bootstrap); "
             f"`{result['floor']}` reads no vector", "",
             *_policy_rows(result["buckets"], policies)]
    lines += ["", f"paired differences to `{result['reference']}` (mean over seeds; 95% "
              "bootstrap over users, the same resamples for both)", "",
              *diff_table(result["buckets"])]
    updates = result.get("updates")
    if updates:
        lines += ["", "click AUC by model update policy (vectors on arrival); 95% intervals "
                  "over seeds (t) and users (bootstrap)", "",
                  *_policy_rows(updates["buckets"])]
        lines += ["", f"paired differences to `{updates['reference']}`", "",
                  *diff_table(updates["buckets"])]
    return "\n".join(lines) + "\n"
