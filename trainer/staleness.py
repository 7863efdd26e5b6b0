"""``ppm experiment staleness``: what fresh item embeddings and fresh models are worth, in
click AUC.

The same closed windows are replayed under each embedding refresh policy
(:class:`trainer.refresh.EmbeddingRefresh`): for each seed and policy a ``ppm`` model is
fitted from scratch on the train period (:func:`trainer.train.train_batch`, the epoch
chosen on validation) with the vectors the policy makes readable, and scores the test
period with them; ``idrec``, which reads no vector, is the floor. Then under each model
update policy (:class:`ModelUpdate`): the reference policy's fit (on arrival, in the
presets), frozen or fine-tuned every U hours on the windows closed by then, each test
window scored by the model serving at its start; with ``grid``, every embedding policy's
fit under every update policy. The ops view: the reference fit scored as serving reads the
vectors through an item cache of each lifetime (``features.serving_cache_s``,
:func:`trainer.refresh.cached_reads`), and a fit per freshness TTL
(``features.freshness_window_s``). Every run scores the same samples, so differences are
paired: :func:`trainer.experiment.compare_models` reports each policy's AUC (and GAUC,
logloss) per bucket (overall, items new in the test period, by item age) with 95%
intervals over seeds and over users, and the difference to the freshest policy with a
bootstrap interval over users. Beside each setting: what it costs (encoder calls, which
are store writes, per hour of data; store reads per request; vectors the store holds), and
per knob the cheapest setting within a tolerance of AUC lost on cold items. A
:class:`Sweep` names what is run.

``period="validation"`` (``--validation``) replays the validation period instead, the split
moved one period back (:func:`trainer.train.split_windows`), so that a setting (a cache
lifetime, a TTL, a refresh period) is chosen on it and the test period read once, for the
one chosen; the command keeps its runs in another folder (``DataDir.staleness``).

Each run is saved under ``OUT/runs/`` as soon as it finishes, so a killed sweep resumes
where it stopped: a run already on disk is read, not recomputed. ``OUT/spec.json`` pins
what the runs are of (data dir, windows and their sizes, split, settings, the reference
policy); a sweep that differs in any of them is refused in the same folder.
"""

from __future__ import annotations

import copy
import io
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ppm.atomic_file import write_atomically
from ppm.config import Config
from trainer.baselines import clicks
from trainer.dataset import ModalTable, WindowDataset
from trainer.experiment import RESAMPLES, compare_models, diff_table, num, span
from trainer.finetune import check_vector_periods
from trainer.metrics import HOUR_S, cold_buckets
from trainer.plots import auc_lost, staleness_plots
from trainer.refresh import EmbeddingRefresh, duration, parse_duration
from trainer.train import (
    TEST_BUCKETS,
    BatchFit,
    IncrementalTrainer,
    Split,
    admit_ids,
    check_restarts,
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

    def __post_init__(self):
        if (self.every_s is not None and self.every_s <= 0) or self.deploy_lag_s < 0:
            raise ValueError("a model update interval must be > 0 and its deploy lag >= 0")

    @property
    def name(self) -> str:
        """``model frozen``, ``model every 6h``, ``model every 6h+1h``."""
        if self.every_s is None:
            return "model frozen"
        lag = f"+{duration(self.deploy_lag_s)}" if self.deploy_lag_s else ""
        return f"model every {duration(self.every_s)}{lag}"


    @classmethod
    def parse(cls, label: str) -> ModelUpdate:
        """The policy a :attr:`name` describes, ``model`` optional: ``frozen``,
        ``every 6h``, ``model every 6h+1h``.

        Raises:
            ValueError: a label of no policy.
        """
        text = " ".join(label.split()).removeprefix("model ")
        if text == "frozen":
            return cls(None)
        if text.startswith("every "):
            every, plus, lag = text[len("every "):].partition("+")
            return cls(parse_duration(every), parse_duration(lag) if plus else 0.0)
        raise ValueError(f"not a model update policy: {label!r} (say frozen, every 6h or "
                         "every 6h+1h)")


@dataclass(frozen=True)
class Sweep:
    """What one sweep replays: ``--preset`` names one (:data:`SWEEPS`), ``--spec FILE``
    reads one (:meth:`from_toml`)."""

    embedding: tuple[EmbeddingRefresh, ...] = (REFERENCE,)
    """Embedding refresh policies, a fit each; the first is the reference."""
    updates: tuple[ModelUpdate, ...] = ()
    """Model update policies, each starting from the first embedding policy's fit; the
    first is their reference."""
    grid: bool = False
    """Also every other embedding policy under every update policy (the heatmap)."""
    serving_cache_s: tuple[float, ...] = ()
    """Ops view: the reference fit scored as serving with an item cache of each lifetime
    (``features.serving_cache_s``) reads the vectors; no cache is the reference."""
    freshness_window_s: tuple[float, ...] = ()
    """Ops view: a fit each with this freshness TTL (``features.freshness_window_s``: a
    vector older than it is missing), in training and scoring alike."""
    tolerance: float = 0.002
    """The ops view names the cheapest setting of each knob whose AUC loss on
    ``cold_bucket`` (mean over seeds) is at most this."""
    cold_bucket: str = "age<1d"

    def __post_init__(self):
        if not self.embedding:
            raise ValueError("give at least one embedding refresh policy")
        for kind in (self.embedding, self.updates):
            if len({p.name for p in kind}) != len(kind):
                raise ValueError("give each policy once")
        if self.cold_bucket not in TEST_BUCKETS:
            raise ValueError(f"cold_bucket must be one of {TEST_BUCKETS}")
        if any(c <= 0 for c in self.serving_cache_s) or any(
                t <= 0 for t in self.freshness_window_s):
            raise ValueError("serving cache lifetimes and freshness windows must be > 0")
        for values in (self.serving_cache_s, self.freshness_window_s):
            if len(set(values)) != len(values):
                raise ValueError("give each serving cache lifetime and freshness window once")
        if self.tolerance < 0:
            raise ValueError("tolerance must be >= 0")

    @classmethod
    def from_toml(cls, path: Path) -> Sweep:
        """A sweep from a TOML file; every key is optional::

            embedding_refresh = ["arrival", "arrival+1d", "every 7d", "catalog once"]
            model_update = ["every 7d", "every 28d", "frozen"]
            grid = false
            serving_cache = ["1min", "1h"]
            freshness_window = ["7d"]
            tolerance = 0.002
            cold_bucket = "age<1d"

        Raises:
            ValueError: an unknown key, a label of no policy or a bad value.
        """
        import tomllib

        try:
            spec = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not TOML: {exc}") from exc
        types = {"embedding_refresh": list, "model_update": list, "grid": bool,
                 "serving_cache": list, "freshness_window": list, "tolerance": (int, float),
                 "cold_bucket": str}
        if set(spec) - set(types):
            raise ValueError(f"{path}: unknown keys {sorted(set(spec) - set(types))}; "
                             f"known: {sorted(types)}")
        for key, value in spec.items():
            if not isinstance(value, types[key]) or isinstance(value, bool) != (key == "grid"):
                raise ValueError(f"{path}: {key} has the wrong type ({value!r})")
        return cls(
            embedding=tuple(EmbeddingRefresh.parse(str(x))
                            for x in spec.get("embedding_refresh", ["arrival"])),
            updates=tuple(ModelUpdate.parse(str(x)) for x in spec.get("model_update", [])),
            grid=spec.get("grid", False),
            serving_cache_s=tuple(parse_duration(str(x)) for x in spec.get("serving_cache", [])),
            freshness_window_s=tuple(parse_duration(str(x))
                                     for x in spec.get("freshness_window", [])),
            tolerance=float(spec.get("tolerance", 0.002)),
            cold_bucket=spec.get("cold_bucket", "age<1d"))


SWEEPS: dict[str, Sweep] = {
    "quick": Sweep(
        embedding=(REFERENCE, EmbeddingRefresh("arrival", lag_s=HOUR_S),
                   EmbeddingRefresh("periodic", period_s=6 * HOUR_S),
                   EmbeddingRefresh("periodic", period_s=24 * HOUR_S),
                   EmbeddingRefresh("catalog_once")),
        updates=(ModelUpdate(HOUR_S), ModelUpdate(6 * HOUR_S), ModelUpdate(24 * HOUR_S),
                 ModelUpdate(None)),
        grid=True, serving_cache_s=(60.0, 600.0, HOUR_S, 6 * HOUR_S),
        freshness_window_s=(6 * HOUR_S, 24 * HOUR_S)),
    "default": Sweep(
        embedding=(REFERENCE, EmbeddingRefresh("arrival", lag_s=600.0),
                   EmbeddingRefresh("arrival", lag_s=HOUR_S),
                   EmbeddingRefresh("periodic", period_s=HOUR_S),
                   EmbeddingRefresh("periodic", period_s=6 * HOUR_S),
                   EmbeddingRefresh("periodic", period_s=24 * HOUR_S),
                   EmbeddingRefresh("catalog_once")),
        updates=(ModelUpdate(HOUR_S), ModelUpdate(HOUR_S, deploy_lag_s=HOUR_S),
                 ModelUpdate(6 * HOUR_S), ModelUpdate(24 * HOUR_S), ModelUpdate(None)),
        grid=True, serving_cache_s=(1.0, 60.0, 600.0, HOUR_S, 6 * HOUR_S),
        freshness_window_s=(6 * HOUR_S, 24 * HOUR_S, 7 * 24 * HOUR_S)),
}
"""The sweeps of ``--preset``: hours-scale policies for simulated worlds; data whose
windows are days or weeks (``ppm import``) want a ``--spec`` of their own."""


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


def vectors_held(modal: ModalTable, at_us: int, freshness_window_s: float | None = None
                 ) -> int:
    """How many items have a vector readable at ``at_us`` in ``modal`` (a policy's
    table), not older than ``freshness_window_s``: what the online store holds when
    expired vectors are dropped."""
    ids = sorted(set(modal.item_ids[1:].tolist()))
    rows = modal.rows_as_of(ids, at_us)
    held = rows > 0
    if freshness_window_s is not None:
        held &= modal.content_time_us[rows] >= at_us - freshness_window_s * 1e6
    return int(held.sum())


def _run_file(name: str, seed: int) -> str:
    """``every_6h-seed0.npz``: a run's file name under ``OUT/runs``."""
    return re.sub(r"[^\w.-]", "_", name.replace("+", "_plus_")) + f"-seed{seed}.npz"


def grid_name(policy: EmbeddingRefresh, update: ModelUpdate, sweep: Sweep) -> str:
    """The run of ``policy``'s fit under ``update``: the update's name alone for the
    reference embedding policy (as in the update sweep), else ``every 6h, model
    every 1h``."""
    return update.name if policy == sweep.embedding[0] else f"{policy.name}, {update.name}"


def cache_name(cache_s: float) -> str:
    return f"cache {duration(cache_s)}"


def ttl_name(freshness_window_s: float) -> str:
    return f"ttl {duration(freshness_window_s)}"


def run_staleness(cfg: Config, sweep: Sweep, seeds: int, out: Path,
                  test_share: float = 0.2, valid_share: float = 0.1,
                  epochs: int | None = None, resamples: int = RESAMPLES,
                  progress: bool = True,
                  period: Literal["test", "validation"] = "test") -> dict[str, Any]:
    """The sweep of the module docstring; writes ``results.json``, ``results.md`` and the
    plots (:func:`trainer.plots.staleness_plots`) under ``out`` and returns the result.
    ``period``: the period replayed and scored (``"validation"``: the split moved one
    period back; the test period is not read). Raises ``ValueError`` for bad arguments or
    a folder holding another sweep's runs or vectors whose encoder learned from clicks of a
    later period (:func:`~trainer.finetune.check_vector_periods`), ``SystemExit`` when a
    period holds no window."""
    from tqdm import tqdm

    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    split = split_windows(cfg, test_share, valid_share, period)
    if not (split.train and split.test):
        raise SystemExit(f"no closed windows in the train or the {period} period")
    check_restarts(cfg, split.valid)
    check_vector_periods(cfg.paths.item_log, cfg.trainer.encoder_version, split)
    spec = {"data_dir": str(Path(cfg.data_dir).resolve()), "period": period,
            "test_share": test_share, "valid_share": valid_share, "epochs": epochs,
            # Windows with their sizes: data regenerated under the same names is not the same.
            "train": [[w.name, w.samples] for w in split.train],
            "test": [[w.name, w.samples] for w in split.test],
            # Update, cache and TTL runs start from the first embedding policy's fit.
            "reference": sweep.embedding[0].name,
            **{section: getattr(cfg, section).model_dump(mode="json")
               for section in ("trainer", "model", "features", "pipeline")}}
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out / "spec.json"
    # A spec written before sweeps had a period was a test period's.
    if spec_path.exists() and {"period": "test", **json.loads(spec_path.read_text())} != spec:
        raise ValueError(f"{out} holds runs of another sweep (other data, split, "
                         "settings or reference policy): give another --out")
    write_atomically(spec_path, json.dumps(spec, indent=1).encode())

    reference = IncrementalTrainer(cfg, variant="idrec")
    # For the ops view, also count the store reads serving would make with no cache.
    ops = bool(sweep.serving_cache_s or sweep.freshness_window_s)
    test = reference.dataset(split.test, serving_cache_s=0.0 if ops else None)
    ref = sweep.embedding[0]
    names = [p.name for p in sweep.embedding]
    grid = [(p, u) for p in (sweep.embedding if sweep.grid else (ref,)) for u in sweep.updates]
    # One plan entry per run: (seed, kind, what, name).
    plan: list[tuple[int, str, Any, str]] = []
    for seed in range(seeds):
        plan += [(seed, "fit", p, p.name) for p in sweep.embedding]
        plan.append((seed, "floor", None, FLOOR))
        plan += [(seed, "update", pu, grid_name(*pu, sweep)) for pu in grid]
        plan += [(seed, "cache", c, cache_name(c)) for c in sweep.serving_cache_s]
        plan += [(seed, "ttl", t, ttl_name(t)) for t in sweep.freshness_window_s]
    scores = {name: np.zeros((seeds, len(test)), np.float32) for *_, name in plan}
    fits: dict[str, list[dict[str, Any]]] = {name: [] for name in scores}
    base: dict[tuple[int, str], BatchFit] = {}  # (seed, policy) -> its fit, for updates
    resumed = 0

    def fitted(seed: int, policy: EmbeddingRefresh) -> BatchFit:
        if (seed, policy.name) not in base:
            base[seed, policy.name] = _fit(cfg, seed, policy, "ppm", split, epochs)
        return base[seed, policy.name]

    for seed, kind, what, name in tqdm(plan, desc="staleness", disable=not progress):
        for key in [k for k in base if k[0] < seed]:  # an earlier seed's fits: done with
            del base[key]
        path = runs_dir / _run_file(name, seed)
        if path.exists():
            saved = np.load(path, allow_pickle=False)
            run_scores, meta = saved["scores"], json.loads(str(saved["meta"]))
            resumed += 1
        else:
            meta = {"seed": seed}
            if kind == "update":
                run_scores = _scored_with_updates(cfg, split, fitted(seed, what[0]), what[1])
            elif kind == "cache":
                fit_ = fitted(seed, ref)
                data = fit_.trainer.dataset_for(fit_.model, split.test, serving_cache_s=what)
                run_scores = _click_scores(fit_, data)
                meta |= {"store_reads": data.store_reads, "requests": data.requests}
            else:
                if kind == "ttl":
                    fit_ = _fit(cfg.with_values({"features.freshness_window_s": str(what)}),
                                seed, ref, "ppm", split, epochs)
                elif kind == "floor":
                    fit_ = _fit(cfg, seed, ref, FLOOR, split, epochs)
                else:
                    fit_ = _fit(cfg, seed, what, "ppm", split, epochs)
                    if what == ref or sweep.grid:  # later runs start from it
                        base[seed, what.name] = fit_
                run_scores = _click_scores(fit_, fit_.trainer.dataset_for(fit_.model,
                                                                          split.test))
                meta |= {"epochs": fit_.epochs, "best_epoch": fit_.best_epoch,
                         "valid_click_auc": fit_.valid_auc}
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

    result: dict[str, Any] = {
        "period": period, "seeds": seeds, "reference": names[0], "floor": FLOOR,
        "cold_bucket": sweep.cold_bucket,
        "test_share": test_share, "valid_share": valid_share, "resamples": resamples,
        "runs_resumed": resumed,
        "policies": {p.name: {"mode": p.mode, "lag_s": p.lag_s, "period_s": p.period_s,
                              "vectors_per_hour": vectors_computed(modal, p, start, end) / hours,
                              "vectors_held": vectors_held(p.apply(modal, start), end)}
                     for p in sweep.embedding},
        "fits": fits,
        "buckets": compared([*names, FLOOR],
                            [*((n, names[0]) for n in names[1:]), (names[0], FLOOR)]),
    }
    if sweep.updates:
        update_names = [u.name for u in sweep.updates]
        result["updates"] = {
            "reference": update_names[0],
            "policies": {u.name: {"every_s": u.every_s, "deploy_lag_s": u.deploy_lag_s}
                         for u in sweep.updates},
            "buckets": compared(update_names, [(u, update_names[0])
                                               for u in update_names[1:]])}
    if sweep.grid and sweep.updates:
        cells = [grid_name(p, u, sweep) for p, u in grid]
        result["grid"] = {
            "embedding": names, "updates": [u.name for u in sweep.updates],
            "cells": {p.name: {u.name: grid_name(p, u, sweep) for u in sweep.updates}
                      for p in sweep.embedding},
            "reference": cells[0],
            "buckets": compared(cells, [(c, cells[0]) for c in cells[1:]])}
    if ops:
        result["ops"] = _ops_view(sweep, result, compared, fits, test, modal, start, end)
    result["plots"] = [p.name for p in staleness_plots(result, out)]
    write_atomically(out / "results.md", to_markdown(result).encode())
    write_atomically(out / "results.json", json.dumps(result, indent=1).encode())
    return result


def _click_scores(fit_: BatchFit, data: WindowDataset) -> np.ndarray:
    """(n,) click logits of ``fit_``'s model on ``data``."""
    return predict(fit_.model, data)[:, fit_.model.config.tasks.index("click")]


def _ops_view(sweep: Sweep, result: Mapping[str, Any],
              compared: Callable[[Sequence[str], Sequence[tuple[str, str]]], dict[str, Any]],
              fits: Mapping[str, Sequence[Mapping[str, Any]]], test: WindowDataset,
              modal: ModalTable, start: int, end: int) -> dict[str, Any]:
    """Per knob and setting: the AUC lost (to the reference) overall and on the cold
    bucket, beside encoder calls (= store writes) per hour, store reads per request and
    vectors held; and the cheapest setting of each knob within the tolerance."""
    ref = sweep.embedding[0].name
    cache = [cache_name(c) for c in sweep.serving_cache_s]
    ttl = [ttl_name(t) for t in sweep.freshness_window_s]
    ops_buckets = compared([ref, *cache, *ttl], [(n, ref) for n in [*cache, *ttl]])
    ref_policy = result["policies"][ref]
    uncached = test.store_reads / max(test.requests, 1)

    rows: list[dict[str, Any]] = []

    def add(knob: str, setting: str, value: Any, name: str, table: Mapping[str, Any],
            calls: float, reads: float, held: int) -> None:
        """A row: ``name``'s loss read off ``table`` (per bucket summaries), its costs."""
        row = {"knob": knob, "setting": setting, "value": value,
               "encoder_calls_per_hour": calls, "store_reads_per_request": reads,
               "vectors_held": held}
        row["loss_all"], row["loss_all_ci95"] = auc_lost(table["all"], name, ref)
        row["loss_cold"], row["loss_cold_ci95"] = auc_lost(table[sweep.cold_bucket], name, ref)
        rows.append(row)

    for name, p in result["policies"].items():
        add("embedding_refresh", name, name, name, result["buckets"], p["vectors_per_hour"],
            uncached, p["vectors_held"])
    for c, name in zip([0.0, *sweep.serving_cache_s], [ref, *cache], strict=True):
        reads = (uncached if name == ref else
                 float(np.mean([m["store_reads"] / max(m["requests"], 1)
                                for m in fits[name]])))
        add("serving_cache_s", "no cache" if name == ref else name, c, name, ops_buckets,
            ref_policy["vectors_per_hour"], reads, ref_policy["vectors_held"])
    for t, name in zip([None, *sweep.freshness_window_s], [ref, *ttl], strict=True):
        add("freshness_window_s", "no ttl" if name == ref else name, t, name, ops_buckets,
            ref_policy["vectors_per_hour"], uncached,
            vectors_held(sweep.embedding[0].apply(modal, start), end, t))

    def cheapest(knob: str, cost) -> dict[str, Any] | None:
        """The knob's cheapest row within the tolerance (``setting``, ``value``); None when
        none could be measured (the reference itself is always within)."""
        within = [r for r in rows if r["knob"] == knob and r["loss_cold"] is not None
                  and r["loss_cold"] <= sweep.tolerance]
        best = min(within, key=cost) if within else None
        return None if best is None else {"setting": best["setting"], "value": best["value"]}

    return {"tolerance": sweep.tolerance, "bucket": sweep.cold_bucket, "rows": rows,
            "buckets": ops_buckets,
            "choice": {
                # The fewest encoder calls; among equals the later (slower) policy.
                "embedding_refresh": cheapest("embedding_refresh", lambda r: (
                    r["encoder_calls_per_hour"], -rows.index(r))),
                "serving_cache_s": cheapest("serving_cache_s", lambda r: -r["value"]),
                "freshness_window_s": cheapest("freshness_window_s", lambda r: (
                    r["vectors_held"], float("inf") if r["value"] is None else r["value"]))}}


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
    t = trainer.cfg.trainer  # the base fit's config: its trainer.seed seeds the updates
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
                extra_share=t.replay_share, id_lr_scale=t.id_lr_scale)
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
    lines = [f"click AUC on the {result['period']} period by embedding refresh policy, mean "
             f"of {result['seeds']} seed(s); 95% intervals over seeds (t) and users "
             "(bootstrap); "
             f"`{result['floor']}` reads no vector", "",
             *_policy_rows(result["buckets"], policies)]
    lines += ["", f"paired differences to `{result['reference']}` (mean over seeds; 95% "
              "bootstrap over users, the same resamples for both)", "",
              *diff_table(result["buckets"])]
    updates = result.get("updates")
    if updates:
        lines += ["", f"click AUC on the {result['period']} period by model update policy "
                  "(vectors on arrival); 95% intervals over seeds (t) and users (bootstrap)",
                  "",
                  *_policy_rows(updates["buckets"])]
        lines += ["", f"paired differences to `{updates['reference']}`", "",
                  *diff_table(updates["buckets"])]
    grid = result.get("grid")
    if grid:
        for bucket in dict.fromkeys(("all", result["cold_bucket"])):
            lines += ["", f"click AUC lost on `{bucket}` ({result['period']} period) by "
                      "embedding refresh (rows) and model update (columns) policy, to "
                      f"`{grid['reference']}` (mean over seeds)",
                      "", "| embedding \\ model | " + " | ".join(grid["updates"]) + " |",
                      "|---|" + "---:|" * len(grid["updates"])]
            for emb, cells in grid["cells"].items():
                lost = [auc_lost(grid["buckets"][bucket], cell, grid["reference"])[0]
                        for cell in cells.values()]
                lines.append(f"| {emb} | " + " | ".join(num(x, "+") for x in lost) + " |")
    ops = result.get("ops")
    if ops:
        lines += ["", f"the ops view ({result['period']} period): click AUC lost to "
                  f"`{result['reference']}` overall and on `{ops['bucket']}` (95% bootstrap "
                  "over users) beside what each setting costs; encoder calls are store writes "
                  "too", "",
                  "| knob | setting | lost, all | lost, cold | 95% users, cold | encoder calls"
                  "/hour | store reads/request | vectors held |",
                  "|---|---|---:|---:|---|---:|---:|---:|"]
        for r in ops["rows"]:
            lines.append(f"| {r['knob']} | {r['setting']} | {num(r['loss_all'], '+')} | "
                         f"{num(r['loss_cold'], '+')} | {span(r['loss_cold_ci95'], '+')} | "
                         f"{r['encoder_calls_per_hour']:.1f} | "
                         f"{r['store_reads_per_request']:.1f} | {r['vectors_held']} |")
        lines += ["", f"within a loss of {ops['tolerance']} AUC on `{ops['bucket']}`, the "
                  "cheapest settings:", ""]
        for knob, value in ops["choice"].items():
            lines.append(f"- `{knob}`: {_setting(value)}")
    if result.get("plots"):
        lines += ["", "plots: " + ", ".join(f"`{p}`" for p in result["plots"])]
    return "\n".join(lines) + "\n"


def _setting(choice: Mapping[str, Any] | None) -> str:
    if choice is None:
        return "n/a (no AUC on that bucket)"
    value = choice["value"]
    return choice["setting"] + (f" ({value:g} s)" if isinstance(value, float) and value else "")
