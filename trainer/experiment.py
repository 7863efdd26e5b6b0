"""``ppm eval --seeds N``: is ``ppm`` ahead of ``idrec``, and is its content the reason?

One experiment on the closed windows, cut by :func:`trainer.train.split_windows`:

* for each seed, ``idrec``, ``ppm`` and the shuffled-vector control (``ppm`` trained and
  scored with each item's vector swapped for another item's, :meth:`ModalTable.shuffled`)
  are fitted from scratch on the train period by :func:`trainer.train.train_batch` (the
  epoch chosen on validation) and score the test period; they are not registered;
* the baselines (:mod:`trainer.baselines`) are fitted once on the train period, on the
  windows the models read (``trainer.history_share`` of them; the ablation's data-share
  arms read fewer), the prior strength of the item rate chosen on validation, and score the
  test period;
* where the data come from the simulator, its oracle scores the test period too: the
  ceiling every AUC can be read against.

:func:`compare_models` then reports, per bucket, each model's click AUC (the mean over
seeds) with a 95% t-interval over seeds (training randomness) and a 95% bootstrap interval
over users (which users the test period happened to hold), and the paired differences of
:data:`PAIRS` (``ppm - idrec``, ``ppm - ppm_shuffled``, ``ppm_shuffled - idrec``), with a
bootstrap interval over users that resamples the same users for both models and averages
the per-seed differences.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ppm.clock import iso
from ppm.config import Config
from trainer.baselines import LogisticBaseline, Oracle, PositiveRate, clicks
from trainer.finetune import check_vector_periods
from trainer.metrics import (
    auc,
    bootstrap_auc,
    cold_buckets,
    gauc,
    logloss,
    percentile_interval,
    sigmoid,
)
from trainer.train import (
    TEST_BUCKETS,
    IncrementalTrainer,
    check_frozen_plug_in,
    check_restarts,
    new_in_period,
    predict,
    recent,
    split_windows,
    train_batch,
)


@dataclass(frozen=True)
class Arm:
    """One model an experiment fits from scratch per seed, on the training period."""

    variant: str
    shuffled: bool = False
    """Trained and scored on vectors shuffled across items (the control)."""
    encoder_version: str | None = None
    """The item vectors it reads (None: ``trainer.encoder_version``, else the newest)."""
    plug_in: Literal["frozen", "joint"] | None = None
    """Start the PPM module from a ``modal`` model pre-trained on the same windows and
    seed (:func:`trainer.train.plug_in`), kept frozen or trained jointly."""
    data_share: float = 1.0
    """Train on this share of what ``trainer.history_share`` keeps of the training windows,
    the most recent (:func:`trainer.train.recent`)."""


TRAINED: dict[str, Arm] = {
    "idrec": Arm("idrec"),
    "ppm": Arm("ppm"),
    "ppm_shuffled": Arm("ppm", shuffled=True),
}
"""The models ``ppm eval --seeds`` fits per seed."""


def ablation_arms(finetuned: str | None = None, generic: str | None = None
                  ) -> dict[str, Arm]:
    """The models of ``ppm experiment ablation`` (issue #15): ``ppm`` on the ``generic``
    encoders' vectors and, with ``finetuned`` (an encoder version a backfill wrote), on the
    fine-tuned ones; the PPM module pre-trained and plugged in, frozen or joint; ``ppm`` on
    50% and 25% of the training windows (the paper's data-efficiency claim); ``idrec``."""
    arms = {"idrec": Arm("idrec"), "ppm": Arm("ppm", encoder_version=generic)}
    if finetuned:
        arms["ppm_finetuned"] = Arm("ppm", encoder_version=finetuned)
    arms |= {"ppm_plugin_frozen": Arm("ppm", encoder_version=generic, plug_in="frozen"),
             "ppm_plugin_joint": Arm("ppm", encoder_version=generic, plug_in="joint"),
             "ppm_data50": Arm("ppm", encoder_version=generic, data_share=0.5),
             "ppm_data25": Arm("ppm", encoder_version=generic, data_share=0.25)}
    return arms


def ablation_pairs(arms: Mapping[str, Arm]) -> tuple[tuple[str, str], ...]:
    """Every arm against ``ppm``, and ``ppm`` against ``idrec``."""
    return (*((name, "ppm") for name in arms if name not in ("ppm", "idrec")),
            ("ppm", "idrec"))
BASELINES = ("baseline_logreg", "baseline_rate")
ORACLE = "oracle"
PAIRS: tuple[tuple[str, str], ...] = (("ppm", "idrec"), ("ppm", "ppm_shuffled"),
                                      ("ppm_shuffled", "idrec"))
"""Paired differences reported: (model, the one it is compared with). Where ppm's gain over
idrec is the content's doing, ppm is ahead of the control and the control is not ahead of
idrec."""
RESAMPLES = 200
"""Bootstrap resamples of the users: enough for the ends of a 95% interval to move by
less than their distance from the estimate."""
BOOTSTRAP_SEED = 0

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (numpy has no t
# distribution, and scipy is not a dependency).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_interval(values: Sequence[float], bounds: tuple[float, float] | None = None
               ) -> tuple[float, float] | None:
    """95% t-interval of the mean of ``values`` (e.g. one AUC per seed); None for fewer
    than two. Beyond 30 degrees of freedom the quantile is Cornish-Fisher's first order
    (1.96 + 2.37 / df), within 0.003 of the exact one. ``bounds``: clip the interval to
    what the values can be (with few values the t quantile is large: 12.7 for two)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    df = x.size - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96 + 2.372 / df
    half = t * x.std(ddof=1) / np.sqrt(x.size)
    lo, hi = float(x.mean() - half), float(x.mean() + half)
    return (lo, hi) if bounds is None else (max(lo, bounds[0]), min(hi, bounds[1]))


def _mean(values: Sequence[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else float(np.mean(values))


def compare_models(labels: np.ndarray, users: np.ndarray, scores: Mapping[str, np.ndarray],
                   pairs: Sequence[tuple[str, str]] = PAIRS, resamples: int = RESAMPLES,
                   seed: int = BOOTSTRAP_SEED, strata: np.ndarray | None = None
                   ) -> dict[str, Any]:
    """Click AUC of models that scored the same samples, with 95% intervals, and their
    GAUC (over users) and logloss.

    Args:
        labels: 0/1 clicks, (n,).
        users: user ids, (n,): the bootstrap resamples users, not samples.
        scores: model name -> its click logits (k, n): one row per seed (k = 1 for a
            deterministic model). A model named :data:`ORACLE` is the ceiling.
        pairs: ``(a, b)``: report ``a - b``; both have the same seeds, row i of one paired
            with row i of the other.
        resamples, seed: of :func:`trainer.metrics.bootstrap_auc`, one call for all models,
            so every model and difference is judged on the same resamples.
        strata: (n,) ints, e.g. which simulated world each sample comes from (each user in
            one): AUC is then the mean of the strata's AUCs (a stratum without both classes
            left out), the bootstrap resamples users within each stratum and averages the
            strata defined in each resample, and ``ci95_strata`` is the t-interval over
            strata (of a model's AUC, of a pair's difference; clipped to the possible
            range): how far another draw of the strata could move it.

    Returns:
        ``{"samples", "positives", "models": {name: {"auc", "aucs", "ci95_seeds",
        "ci95_users", "oracle_share", "gauc", "logloss"}}, "diffs": {"a-b": {"auc",
        "ci95"}}}``: ``auc``, ``gauc`` and ``logloss`` the means over seeds, ``aucs`` one
        per seed, ``ci95_seeds`` the t-interval over seeds (None for k = 1; clipped to [0, 1]:
        with two seeds t is 12.7 and the bare interval can pass 1), ``ci95_users``
        the bootstrap interval of the seed-mean AUC, ``oracle_share`` ``(auc - 0.5) /
        (oracle auc - 0.5)`` (None without an oracle); a difference's ``auc`` is the mean of
        the per-seed differences, its ``ci95`` the bootstrap interval of that mean. With
        ``strata``, models and differences also carry ``strata`` (how many were defined)
        and ``ci95_strata``.
        Intervals are ``[lo, hi]``; anything undefined (a bucket with one class) is None.
    """
    names = list(scores)
    blocks = [np.atleast_2d(np.asarray(scores[m], np.float64)) for m in names]
    stacked = np.concatenate(blocks) if blocks else np.zeros((0, len(labels)))
    starts = np.cumsum([0, *(len(b) for b in blocks)])
    rows = {m: slice(starts[i], starts[i + 1]) for i, m in enumerate(names)}
    labels = np.asarray(labels)
    by_stratum = None  # (strata, models x seeds): each stratum's AUC, with strata
    if strata is None:
        boot = bootstrap_auc(labels, stacked, users, resamples, seed)  # (models x seeds, B)
        point = [auc(labels, s) for s in stacked]
    else:
        strata, users = np.asarray(strata), np.asarray(users)
        # (the stratum's own index seeds its resamples: they do not shift when another
        # stratum is left out)
        parts = [(k, part) for k, part in enumerate(strata == v for v in np.unique(strata))
                 if 0 < labels[part].sum() < part.sum()]
        by_stratum = np.array([[auc(labels[part], row[part]) for row in stacked]
                               for _, part in parts]).reshape(len(parts), len(stacked))
        point = ([float(v) for v in by_stratum.mean(axis=0)] if parts
                 else [None] * len(stacked))
        # A stratum with few clicks has resamples of one class (NaN): each resample is the
        # mean of the strata defined in it, rather than lost whenever any one is undefined.
        # Definedness depends on the labels alone, so paired models share it.
        per = np.stack([bootstrap_auc(labels[part], stacked[:, part], users[part],
                                      resamples, seed + k) for k, part in parts]
                       ) if parts else np.full((1, len(stacked), resamples), np.nan)
        known = ~np.isnan(per)
        boot = np.where(known.any(axis=0), np.where(known, per, 0.0).sum(axis=0)
                        / np.maximum(known.sum(axis=0), 1), np.nan)  # (models x seeds, B)

    def listed(interval: tuple[float, float] | None) -> list[float] | None:
        return None if interval is None else list(interval)

    models: dict[str, dict[str, Any]] = {}
    for m in names:
        aucs = point[rows[m]]
        defined = all(a is not None for a in aucs)
        models[m] = {"auc": _mean(aucs), "aucs": aucs,
                     "ci95_seeds": listed(t_interval(aucs, bounds=(0.0, 1.0)))
                     if defined else None,
                     "ci95_users": listed(percentile_interval(boot[rows[m]].mean(axis=0))),
                     "gauc": _mean([gauc(labels, s, users) for s in stacked[rows[m]]]),
                     "logloss": _mean([logloss(labels, sigmoid(s)) for s in stacked[rows[m]]])
                     if len(labels) else None}
        if by_stratum is not None:
            models[m] |= {"strata": len(by_stratum), "ci95_strata": listed(
                t_interval(by_stratum[:, rows[m]].mean(axis=1), bounds=(0.0, 1.0)))}
    ceiling = models.get(ORACLE, {}).get("auc")
    for result in models.values():
        result["oracle_share"] = (
            (result["auc"] - 0.5) / (ceiling - 0.5)
            if result["auc"] is not None and ceiling is not None and ceiling != 0.5 else None)
    diffs = {}
    for a, b in pairs:
        if a in models and b in models:
            per_seed = [None if x is None or y is None else x - y
                        for x, y in zip(models[a]["aucs"], models[b]["aucs"], strict=True)]
            paired = (boot[rows[a]] - boot[rows[b]]).mean(axis=0)
            diffs[f"{a}-{b}"] = {"auc": _mean(per_seed),
                                 "ci95": listed(percentile_interval(paired))}
            if by_stratum is not None:
                per_stratum = (by_stratum[:, rows[a]] - by_stratum[:, rows[b]]).mean(axis=1)
                diffs[f"{a}-{b}"] |= {"strata": len(per_stratum), "ci95_strata": listed(
                    t_interval(per_stratum, bounds=(-1.0, 1.0)))}
    return {"samples": len(labels), "positives": int(np.sum(labels)),
            "models": models, "diffs": diffs}


@dataclass
class Scored:
    """Every model's click logits on one test period, and what :func:`compare_models`
    needs beside them; :func:`score_models` makes one."""

    labels: np.ndarray
    """(n,) clicks of the test period's samples."""
    users: np.ndarray
    """(n,) their user ids."""
    buckets: dict[str, np.ndarray]
    """:data:`trainer.train.TEST_BUCKETS` -> (n,) bool: which samples each holds."""
    scores: dict[str, np.ndarray]
    """Model -> (seeds, n) click logits (one row for a model without seeds)."""
    fits: dict[str, list[dict[str, Any]]]
    """Model -> one record per seed: epochs, validation AUC, parameters, seconds."""
    split: dict[str, Any]
    """The split and settings (shares, window counts, test start, the rate's strength)."""

    def summary(self, pairs: Sequence[tuple[str, str]] = PAIRS,
                resamples: int = RESAMPLES) -> dict[str, Any]:
        """JSON-ready: :attr:`split`, :attr:`fits` and per bucket :func:`compare_models`."""
        return {**self.split, "resamples": resamples, "fits": self.fits,
                "buckets": per_bucket(self.labels, self.users, self.buckets, self.scores,
                                      pairs, resamples)}

    def save(self, path: Path, spec: Mapping[str, Any]) -> None:
        """Write these scores to ``path`` (npz, atomically) with ``spec``, what they are
        scores of (JSON-ready): :meth:`load` gives them back only for an equal spec."""
        import io
        import json

        from ppm.atomic_file import write_atomically

        # Ids as text (loading refuses pickled objects): they come back as str.
        arrays = {"labels": self.labels, "users": self.users.astype(str),
                  **{f"bucket:{name}": mask for name, mask in self.buckets.items()},
                  **{f"scores:{name}": s for name, s in self.scores.items()}}
        meta = {"spec": spec, "fits": self.fits, "split": self.split}
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path, spec: Mapping[str, Any]) -> Scored | None:
        """The scores :meth:`save` wrote to ``path`` with this ``spec`` (user ids as str);
        None when there are none, they are of another spec, or the file cannot be read
        (cut short, of an older format)."""
        import json
        import zipfile

        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as saved:
                meta = json.loads(str(saved["meta"]))
                if meta["spec"] != json.loads(json.dumps(spec)):
                    return None

                def named(prefix: str) -> dict[str, np.ndarray]:
                    return {k.removeprefix(prefix): saved[k] for k in saved.files
                            if k.startswith(prefix)}

                return cls(saved["labels"], saved["users"].astype(object), named("bucket:"),
                           named("scores:"), meta["fits"], meta["split"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None


def per_bucket(labels: np.ndarray, users: np.ndarray, buckets: Mapping[str, np.ndarray],
               scores: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]],
               resamples: int, strata: np.ndarray | None = None) -> dict[str, Any]:
    """Bucket -> :func:`compare_models` on the samples of that bucket (``buckets``: name ->
    (n,) bool; ``scores``: model -> (seeds, n); ``strata`` (n,) or None)."""
    return {bucket: compare_models(labels[mask], users[mask],
                                   {m: s[:, mask] for m, s in scores.items()}, pairs,
                                   resamples=resamples,
                                   strata=None if strata is None else strata[mask])
            for bucket, mask in buckets.items()}


def run_experiment(cfg: Config, seeds: int, test_share: float = 0.2,
                   valid_share: float = 0.1, epochs: int | None = None,
                   oracle: Oracle | None = None, resamples: int = RESAMPLES,
                   progress: bool = True, arms: Mapping[str, Arm] = TRAINED,
                   pairs: Sequence[tuple[str, str]] = PAIRS,
                   period: Literal["test", "validation"] = "test") -> dict[str, Any]:
    """The experiment of the module docstring over ``seeds`` seeds: :func:`score_models`,
    then :meth:`Scored.summary` with ``pairs`` (the differences reported) and
    ``resamples``. Returns a JSON-ready dict: the split, each fit's chosen epoch,
    validation AUC, trainable parameters and seconds per epoch, and per bucket
    (:data:`trainer.train.TEST_BUCKETS`) :func:`compare_models`."""
    return score_models(cfg, seeds, test_share, valid_share, epochs, oracle, progress,
                        arms, period).summary(pairs, resamples)


def score_models(cfg: Config, seeds: int, test_share: float = 0.2, valid_share: float = 0.1,
                 epochs: int | None = None, oracle: Oracle | None = None,
                 progress: bool = True, arms: Mapping[str, Arm] = TRAINED,
                 period: Literal["test", "validation"] = "test") -> Scored:
    """Fit ``arms`` (default :data:`TRAINED`; :func:`ablation_arms` for ``ppm experiment
    ablation``) per seed (``trainer.seed`` = 0 .. seeds-1, which also seeds the control's
    permutation) on the train period, each for at most ``epochs`` (default
    ``trainer.initial_epochs``) with the epoch chosen on validation, fit the baselines on
    the training windows a fit reads (``trainer.history_share`` of them; an arm with a
    ``data_share`` reads fewer), and score the test period with all of them and
    ``oracle``. ``period="validation"``: the
    split moved one period back (:func:`~trainer.train.split_windows`): the validation
    period is scored (its ``new_in_test`` bucket: items new in it) and the test period is
    not read. Raises ``ValueError`` for a bad split, an oracle of other data, a frozen
    plug-in arm the config cannot train (:func:`~trainer.train.check_frozen_plug_in`) or
    vectors whose encoder saw clicks of a later period
    (:func:`~trainer.finetune.check_vector_periods`),
    ``SystemExit`` when a period holds no window."""
    from tqdm import tqdm

    from trainer.registry import Registry

    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    if any(arm.plug_in == "frozen" for arm in arms.values()):
        check_frozen_plug_in(cfg)  # now, not at that arm's first fit after the others ran
    split = split_windows(cfg, test_share, valid_share, period)
    if not (split.train and split.test):
        raise SystemExit(f"no closed windows in the train or the {period} period")
    check_restarts(cfg, split.valid)
    for version in {arm.encoder_version or cfg.trainer.encoder_version
                    for arm in arms.values() if arm.variant != "idrec"}:  # it reads none
        check_vector_periods(cfg.paths.item_log, version, split)
    # Labels, users, buckets and the baselines' inputs; every model's dataset of the same
    # windows holds the same samples in the same order. The baselines fit on the windows a
    # fit reads (trainer.history_share), so neither side reads history the other does not.
    reference = IncrementalTrainer(cfg, variant="idrec")
    test = reference.dataset(split.test)
    train = reference.dataset(recent(split.train, cfg.trainer.history_share))
    rate = (PositiveRate.tuned(train, reference.dataset(split.valid)) if split.valid
            else PositiveRate.fit(train))
    scores: dict[str, np.ndarray] = {name: np.zeros((seeds, len(test))) for name in arms}
    scores["baseline_logreg"] = LogisticBaseline.fit(train).scores(test)[None]
    scores["baseline_rate"] = rate.scores(test)[None]
    if oracle is not None:
        scores[ORACLE] = oracle.scores(test)[None]
    del train  # its sequence features are large, and not needed any more

    fits: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    runs = [(seed, name) for seed in range(seeds) for name in arms]
    with tempfile.TemporaryDirectory(prefix="ppm-pretrained-") as scratch:
        pretrained: dict[tuple[int, str | None], Any] = {}  # (seed, encoder) -> Version
        for seed, name in tqdm(runs, desc="fits", disable=not progress):
            arm = arms[name]
            seeded = cfg.with_values({"trainer.seed": seed})
            if arm.encoder_version:
                seeded = seeded.with_values({"trainer.encoder_version": arm.encoder_version})
            if arm.data_share != 1:
                seeded = seeded.with_values({"trainer.history_share":
                                             cfg.trainer.history_share * arm.data_share})
            source = None
            if arm.plug_in:
                key = (seed, arm.encoder_version)
                if key not in pretrained:  # one modal model per seed, for both plug-ins
                    modal = train_batch(seeded, split.train, "modal", epochs, progress=False,
                                        valid=split.valid)
                    pretrained[key] = Registry(Path(scratch) / f"{seed}-{len(pretrained)}"
                                               ).register(modal.model, modal.meta())
                source = pretrained[key]
            started = time.perf_counter()
            fitted = train_batch(seeded, split.train, arm.variant, epochs, progress=False,
                                 valid=split.valid,
                                 shuffle_vectors_seed=seed if arm.shuffled else None,
                                 plug_in_from=source, freeze_plugin=arm.plug_in == "frozen")
            seconds = time.perf_counter() - started
            ran = sum(r["epochs"] for r in fitted.restarts["tried"]) if fitted.restarts \
                else fitted.epochs  # every restart's epochs, the chosen one's or not
            click = fitted.model.config.tasks.index("click")
            scores[name][seed] = predict(
                fitted.model, fitted.trainer.dataset_for(fitted.model, split.test))[:, click]
            fits[name].append({
                "seed": seed, "epochs": fitted.epochs, "best_epoch": fitted.best_epoch,
                "valid_click_auc": fitted.valid_auc, "windows": len(fitted.trained_on),
                "encoder_version": fitted.encoder_version,
                "trainable_parameters": fitted.meta()["trainable_parameters"],
                "epochs_run": ran, "seconds_per_epoch": round(seconds / max(1, ran), 2),
                "restarts": fitted.restarts})

    buckets = {"all": np.ones(len(test), bool),
               "new_in_test": new_in_period(test, split.test_start_us),
               **cold_buckets(test.item_age_s, test.item_clicks_before)}
    return Scored(
        clicks(test), np.asarray(test.user_id), {b: buckets[b] for b in TEST_BUCKETS},
        scores, fits,
        {"period": period, "seeds": seeds, "test_share": test_share,
         "valid_share": valid_share,
         "windows": {"train": len(split.train), "valid": len(split.valid),
                     "test": len(split.test)},
         "test_start": iso(split.test_start_us),
         "baseline_rate_strength": rate.items.strength})


def pooled_summary(worlds: Mapping[str, Scored], pairs: Sequence[tuple[str, str]] = PAIRS,
                   resamples: int = RESAMPLES) -> dict[str, Any]:
    """Experiments on several worlds (draws of one simulator, ``ppm experiment worlds``)
    as one: per bucket, :func:`compare_models` over all their test samples with each world
    a stratum (users kept apart by world), so a model's AUC is the mean of its worlds' AUCs
    and ``ci95_strata`` says how far another draw of worlds could move it. Every world must
    have scored the same models, period and number of seeds. Returns a JSON-ready dict:
    ``worlds`` (their names), ``period`` (scored), ``seeds``, ``fits`` (per model, every
    world's), ``buckets`` and ``per_world`` (each world's own :meth:`Scored.summary`)."""
    if not worlds:
        raise ValueError("no worlds to pool")
    names = list(worlds)
    first = worlds[names[0]]
    period = first.split.get("period", "test")
    for name in names[1:]:
        other = worlds[name]
        if (({m: s.shape[0] for m, s in other.scores.items()}
                != {m: s.shape[0] for m, s in first.scores.items()})
                or other.split.get("period", "test") != period):
            raise ValueError(f"world {name} scored other models, seeds or period than "
                             f"{names[0]} (scores of an earlier run of other code? --refit)")
    labels = np.concatenate([worlds[n].labels for n in names])
    users = np.concatenate([[f"{n}/{u}" for u in worlds[n].users] for n in names])
    strata = np.concatenate([np.full(len(worlds[n].labels), k) for k, n in enumerate(names)])
    scores = {m: np.concatenate([worlds[n].scores[m] for n in names], axis=1)
              for m in first.scores}
    buckets = {bucket: np.concatenate([worlds[n].buckets[bucket] for n in names])
               for bucket in first.buckets}
    return {"worlds": names, "period": period, "seeds": first.split["seeds"],
            "resamples": resamples,
            "fits": {m: [fit | {"world": n} for n in names for fit in worlds[n].fits[m]]
                     for m in first.fits},
            "buckets": per_bucket(labels, users, buckets, scores, pairs, resamples, strata),
            "per_world": {n: worlds[n].summary(pairs, resamples) for n in names}}


def num(x: float | None, sign: str = "") -> str:
    """An AUC (or difference, ``sign="+"``) for a markdown table; None is "n/a"."""
    return "n/a" if x is None else f"{x:{sign}.4f}"


def span(interval: Sequence[float] | None, sign: str = "") -> str:
    """A 95% interval ``[lo, hi]`` for a markdown table; None is "n/a"."""
    if interval is None:
        return "n/a"
    return f"[{num(interval[0], sign)}, {num(interval[1], sign)}]"


def diff_table(buckets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown table lines of the paired differences of :func:`compare_models` results
    per bucket (their ``diffs``, keyed ``"a-b"``); with a column of ``ci95_strata`` where
    they were compared over strata (worlds)."""
    worlds = any("ci95_strata" in d for b in buckets.values() for d in b["diffs"].values())
    lines = ["| bucket | difference | auc | 95% users |" + (" 95% worlds |" if worlds else ""),
             "|---|---|---:|---|" + ("---|" if worlds else "")]
    for bucket, summary in buckets.items():
        for name, d in summary["diffs"].items():
            a, _, b = name.rpartition("-")
            lines.append(f"| {bucket} | {a} - {b} | {num(d['auc'], '+')} | "
                         f"{span(d['ci95'], '+')} |"
                         + (f" {span(d.get('ci95_strata'), '+')} |" if worlds else ""))
    return lines


def to_markdown(result: Mapping[str, Any]) -> str:
    """Two markdown tables of :func:`run_experiment`'s (or :func:`pooled_summary`'s)
    result: each model's click AUC per bucket with its intervals and share of the oracle,
    then the paired differences."""
    worlds = result.get("worlds")
    over = (f"mean of {len(worlds)} worlds x {result['seeds']} seed(s); 95% intervals over "
            "worlds (t), over seeds (t) and over users (bootstrap within each world)"
            if worlds else f"mean of {result['seeds']} seed(s); 95% intervals over seeds (t) "
            "and over users (bootstrap)")
    lines = [f"click AUC on the {result.get('period', 'test')} period, {over}", "",
             "| bucket | model | samples | positives | auc | "
             + ("95% worlds | " if worlds else "") + "95% seeds | 95% users | "
             "share of oracle | gauc | logloss |",
             "|---|---|---:|---:|---:|" + ("---|" if worlds else "") + "---|---|---:|---:|---:|"]
    for bucket, summary in result["buckets"].items():
        for model, m in summary["models"].items():
            lines.append(f"| {bucket} | {model} | {summary['samples']} | "
                         f"{summary['positives']} | {num(m['auc'])} | "
                         + (f"{span(m.get('ci95_strata'))} | " if worlds else "")
                         + f"{span(m['ci95_seeds'])} | "
                         f"{span(m['ci95_users'])} | {num(m['oracle_share'])} | "
                         f"{num(m.get('gauc'))} | {num(m.get('logloss'))} |")
    lines += ["", "paired differences (mean over seeds; 95% bootstrap over users, the same "
              "resamples for both models" + ("; t over the worlds' own differences)" if worlds
                                             else ")"), "", *diff_table(result["buckets"])]
    if result.get("reused_scores"):
        lines += ["", "scores of " + ", ".join(result["reused_scores"]) + " reused from an "
                  "earlier run with the same settings (their fits' seconds are that run's)"]
    lines += ["", "what each fit cost (mean over " + ("worlds and seeds; the first world's "
              "training windows)" if worlds else "seeds)"), "",
              "| model | training windows | trainable parameters | seconds per epoch "
              "| epochs run | validation click AUC |", "|---|---:|---:|---:|---:|---:|"]
    for model, runs in result["fits"].items():
        if runs and "seconds_per_epoch" in runs[0]:
            # The AUC that chose each fit's epoch: a model behind on it was behind before
            # the period scored was read.
            chose = [r["valid_click_auc"] for r in runs if r.get("valid_click_auc") is not None]
            lines.append(
                f"| {model} | {runs[0]['windows']} | {runs[0]['trainable_parameters']:,} | "
                f"{np.mean([r['seconds_per_epoch'] for r in runs]):.1f} | "
                f"{np.mean([r.get('epochs_run', r['epochs']) for r in runs]):.1f} | "
                f"{num(float(np.mean(chose)) if chose else None)} |")
    return "\n".join(lines) + "\n"
