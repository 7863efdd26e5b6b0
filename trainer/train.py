"""Training the unified ranker on the pipeline's windows, once or incrementally.

The loop reads top to bottom: load the data, fit, evaluate, decide, register.

* :func:`fit` / :func:`predict` are the plain training and scoring loops.
* :func:`split_windows` cuts the closed windows by time into train, validation and test
  periods. ``ppm train --batch`` (:func:`train_batch`, :func:`tune_batch`) fits on train and
  chooses what it tunes (the epoch, ``--tune`` values) on validation; ``ppm eval``
  (:func:`evaluate_champions`) scores champions on test and refuses one whose data reached
  into the test period (:func:`windows_used`).
* :class:`IncrementalTrainer` is ``ppm train --follow``: for each newly closed window it
  loads the champion, fine-tunes a copy on the window (plus a replayed share of older
  samples), evaluates candidate and champion on the *next* window, registers the candidate
  with its metrics, and promotes it unless it is worse than the champion by more than
  ``trainer.promote_tolerance`` (click AUC). Every step's outcome is in the registry. The
  score it reports for that next window is the champion's from *before* the decision
  (test-then-train): a model chosen on a window never scores that window.
* ``shuffle_vectors_seed`` (:class:`IncrementalTrainer`, :func:`train_batch`) trains and
  scores the shuffled-vector control (:meth:`ModalTable.shuffled`) that
  :mod:`trainer.experiment` and the demo hold ``ppm`` against.

Every model gets an item and a user vocabulary from its training windows
(:func:`admit_ids`: ``trainer.min_item_count``, ``min_user_count``), kept with its
weights; every registered version records the windows it ``trained_on``.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ppm.clock import iso
from ppm.config import Config, TrainerConfig
from trainer.baselines import newton_logistic
from trainer.curves import CurveLog
from trainer.dataset import (
    ModalTable,
    Window,
    WindowCounts,
    WindowDataset,
    chunks,
    closed_windows,
)
from trainer.features import IdVocabulary
from trainer.metrics import BUCKETS, auc, evaluate
from trainer.model import RankerConfig, UnifiedRanker, content_cosines, unit_vectors
from trainer.refresh import EmbeddingRefresh
from trainer.registry import Registry, Version


def adamw(model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
          id_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """The training steps' optimiser: AdamW over the parameters that train (a frozen plug-in
    keeps its weights, decay included), ``fused``: one pass over each tensor per step,
    not the CPU default's Python loop over each (nor ``foreach``'s several passes over
    every tensor, the item table's millions of weights included); the same arithmetic up
    to float rounding. The item and user id tables learn at ``id_lr_scale * lr``, and so
    decay at that share too (``trainer.id_lr_scale``: why, there; 1 here, a single group,
    where a caller gives none)."""
    params = [p for p in model.parameters() if p.requires_grad]
    tables = {id(p) for p in id_tables(model) if p.requires_grad} if id_lr_scale != 1 else set()
    groups = [{"params": [p for p in params if id(p) not in tables]}]
    if tables:
        groups.append({"params": [p for p in params if id(p) in tables],
                       "lr": lr * id_lr_scale})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)


def id_tables(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The per-id embedding tables of ``model``: item (targets and sequences) and user."""
    ids = getattr(model, "id_module", None)
    if ids is None:
        return []
    return [ids.item_emb.weight, *([ids.user_emb.weight] if ids.user_emb is not None else [])]


def fit(model: UnifiedRanker, data: WindowDataset, epochs: int, batch_size: int, lr: float,
        weight_decay: float = 0.0, seed: int = 0, extra: WindowDataset | None = None,
        extra_share: float = 0.0, grad_clip: float | None = None,
        progress: bool = False, after_epoch: Callable[[int], bool] | None = None,
        curves: CurveLog | None = None, *, id_lr_scale: float) -> float:
    """Train ``model`` in place (its ``trained_tasks`` gain the tasks ``data`` and ``extra``
    hold); returns the mean loss of the last epoch run.

    ``extra`` (older samples) contributes ``extra_share * len(data)`` random samples per
    epoch: replay against forgetting. ``grad_clip``: the largest gradient norm of a step
    (``trainer.grad_clip``; None: not clipped). ``after_epoch(epoch)`` (1-based) is called
    after each epoch and may score the model (it is put back in training mode after);
    returning True stops training. ``curves``: where each step's loss, learning rate and
    speed and each epoch's losses per task are appended (:mod:`trainer.curves`).
    ``id_lr_scale``: the id tables' share of ``lr`` (:func:`adamw`), required so that no
    caller falls back to another value than its config's ``trainer.id_lr_scale``.
    """
    from tqdm import tqdm

    torch.manual_seed(seed)
    optimizer = adamw(model, lr, weight_decay, id_lr_scale)
    if epochs > 0:
        # The heads these samples teach (``label_mask`` hides the labels of other tasks).
        learned = {*(model.trained_tasks or ()), *(data.tasks if len(data) else ())}
        if extra is not None and len(extra) and int(extra_share * len(data)) > 0:
            learned |= set(extra.tasks)  # replayed: the loop below takes some of them
        model.trained_tasks = tuple(t for t in model.config.tasks if t in learned)
    last = float("nan")
    for epoch in range(epochs):
        model.train()
        # Which samples each step takes, decided up front; the batches themselves are built
        # as they are needed, so an epoch never holds all its tensors at once.
        steps = [(data, idx) for idx in data.batch_indices(batch_size, True, seed + epoch)]
        if extra is not None and len(extra) and extra_share > 0:
            rng = np.random.default_rng(seed + 10_000 + epoch)
            take = rng.choice(len(extra), min(len(extra), int(extra_share * len(data))),
                              replace=False)
            steps += [(extra, idx) for idx in chunks(take, batch_size)]
            steps = [steps[i] for i in rng.permutation(len(steps))]
        batches = (source.batch(idx) for source, idx in steps)
        losses = []
        task_sums = torch.zeros(len(model.config.tasks))  # BCE summed over present labels
        task_counts = torch.zeros(len(model.config.tasks))  # present labels
        started = step_started = time.perf_counter()
        for batch in tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", total=len(steps),
                          disable=not progress, leave=False):
            logits, loss = model(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            losses.append(loss.item())
            if curves is not None:
                with torch.no_grad():
                    # Summed per label, so a batch without a task's labels weighs nothing.
                    present = model.label_mask(batch).sum(0)
                    task_sums += (model.task_losses(logits, batch) * present).cpu()
                    task_counts += present.cpu()
                now = time.perf_counter()
                curves.log_step(epoch=epoch + 1, loss=losses[-1],
                                lr=optimizer.param_groups[0]["lr"], samples=len(logits),
                                samples_per_s=len(logits) / max(now - step_started, 1e-9))
                step_started = now
        last = float(np.mean(losses)) if losses else float("nan")
        if curves is not None:
            curves.write("epoch", epoch=epoch + 1, step=curves.step, train_loss=last,
                         train_task_losses={t: float(v) / max(float(n), 1.0) for t, v, n in
                                            zip(model.config.tasks, task_sums, task_counts,
                                                strict=True)},
                         seconds=time.perf_counter() - started)
        if after_epoch is not None and after_epoch(epoch + 1):
            break
    model.eval()
    return last


@torch.inference_mode()
def predict(model: UnifiedRanker, data: WindowDataset, batch_size: int = 4096) -> np.ndarray:
    """Logits (n, n_tasks), tasks in ``model.config.tasks`` order, rows in the dataset's.
    ``data`` must be built with the model's vocabularies (``IncrementalTrainer.dataset_for``):
    with none its ids are hashed and its click rates all zero, with another model's they
    are that model's; either would be scored without a word, so both raise ValueError."""
    own = (model.item_vocabulary, model.user_vocabulary, model.taste_vocabulary)
    # Identity first: the usual case, and equality compares every id's counts.
    which = [kind for kind, a, b in zip(("item", "user", "taste"), data.vocabularies, own,
                                        strict=True) if not (a is b or a == b)]
    if which:
        raise ValueError(f"the dataset was not built with this model's {', '.join(which)} "
                         "vocabulary: build it with IncrementalTrainer.dataset_for(model, "
                         "windows)")
    model.eval()
    out = [model(b)[0].numpy() for b in data.batches(batch_size)]
    return (np.concatenate(out) if out
            else np.zeros((0, len(model.config.tasks)), np.float32))


def report(data: WindowDataset, logits: np.ndarray, rows: np.ndarray | None = None,
           trained: Sequence[str] | None = None) -> dict:
    """Per task and cold-start bucket metrics (``trainer.metrics.evaluate``), over ``rows``
    (a boolean mask; default all); ``logits`` columns in the order of ``data.config.tasks``.
    ``trained``: the scoring model's ``trained_tasks``; a head that never learned is not
    reported even where these samples hold its labels (None: every task)."""
    rows = np.ones(len(data), bool) if rows is None else rows
    shown = [(i, t) for i, t in enumerate(data.config.tasks)
             if t in data.tasks and (trained is None or t in trained)]
    return evaluate(
        task_labels={t: data.labels[rows, i] for i, t in shown},
        task_label_masks=None,
        task_scores={t: logits[rows, i] for i, t in shown},
        users=data.user_id[rows],
        requests=data.request_id[rows],
        item_age_s=data.item_age_s[rows],
        item_clicks_before=data.item_clicks_before[rows],
    )


def click_auc(metrics: dict, bucket: str = "all") -> float | None:
    return metrics.get("click", {}).get(bucket, {}).get("auc")


def validation_auc(model: UnifiedRanker, data: WindowDataset) -> float | None:
    """The model's click AUC on ``data`` (its first task's where it has no click head):
    what validation chooses by. None where undefined (one class only, no samples)."""
    tasks = model.config.tasks
    column = tasks.index("click") if "click" in tasks else 0
    if not len(data):
        return None
    return auc(data.labels[:, column], predict(model, data)[:, column])


class EpochPicker:
    """``fit``'s ``after_epoch`` that chooses the number of epochs on held-out data: it
    scores each epoch's model (:func:`validation_auc`), keeps the best epoch's weights, and
    stops training after ``patience`` epochs without a better one. Without held-out data
    it only counts epochs."""

    def __init__(self, model: UnifiedRanker, held_out: WindowDataset | None, patience: int,
                 curves: CurveLog | None = None, keep_weights: bool = True):
        """``keep_weights``: copy the best epoch's weights for :meth:`restore_best`; False
        where only the count matters."""
        self.model, self.held_out, self.patience, self.curves = model, held_out, patience, curves
        self.keep_weights = keep_weights
        self.aucs: list[float | None] = []
        """Validation click AUC after each epoch run."""
        self.ran = 0
        """Epochs run."""
        self.best_epoch: int | None = None
        self.best_auc: float | None = None
        self._best_state: dict[str, Any] | None = None

    def __call__(self, epoch: int) -> bool:
        self.ran = epoch
        if self.held_out is None:
            return False
        self.aucs.append(validation_auc(self.model, self.held_out))
        if self.curves is not None:
            self.curves.write("valid", epoch=epoch, step=self.curves.step,
                              click_auc=self.aucs[-1])
        if self.aucs[-1] is not None and (self.best_auc is None
                                          or self.aucs[-1] > self.best_auc):
            self.best_epoch, self.best_auc = epoch, self.aucs[-1]
            if self.keep_weights:
                self._best_state = copy.deepcopy(self.model.state_dict())
        return self.best_epoch is not None and epoch - self.best_epoch >= self.patience

    def restore_best(self) -> None:
        """Put the best epoch's weights back into the model (if any epoch was scored)."""
        if self._best_state is not None:
            self.model.load_state_dict(self._best_state)
            self._best_state = None  # a restart kept for later must not hold a second copy


def ranker_config(cfg: Config, variant: str | None = None, modal_dim: int = 1664
                  ) -> RankerConfig:
    """The shape of a model trained from scratch: the ``[model]`` section, the variant
    (``trainer.variant`` unless given), ``features.sequence_length`` plus
    ``features.sequence_impressions`` as ``max_seq_len`` (the second also as
    ``sequence_impressions``), ``modal_dim`` (the cached vectors' width) and
    ``trainer.id_dropout``, which applies to
    ``ppm`` only (see its docstring); ``model.wide_rates`` to the variants that read click
    rates (:class:`RankerConfig` drops it elsewhere)."""
    variant = variant or cfg.trainer.variant
    shape = cfg.model.model_dump()
    impressions = cfg.features.sequence_impressions
    return RankerConfig(
        variant=variant, max_seq_len=cfg.features.sequence_length + impressions,
        sequence_impressions=impressions, modal_dim=modal_dim,
        id_dropout=cfg.trainer.id_dropout if variant == "ppm" else 0.0, **shape)


def new_model(cfg: Config, variant: str | None = None, modal_dim: int = 1664) -> UnifiedRanker:
    """A freshly initialised model of :func:`ranker_config` (seeded by ``trainer.seed``)."""
    torch.manual_seed(cfg.trainer.seed)
    return UnifiedRanker(ranker_config(cfg, variant, modal_dim))


RESTART_SEED_STEP = 1000
"""Restart ``r`` of a batch fit is seeded ``trainer.seed + RESTART_SEED_STEP * r``: far from
the seeds 0 .. N-1 that ``ppm eval --seeds N`` gives its fits, so no restart repeats
another seed's fit."""


_FROZEN_AFFINITY = ("model.content_affinity reads the raw cached vectors; a frozen plug-in's "
                    "training data holds its projections instead")
"""Why a model with ``content_affinity`` cannot train on a frozen plug-in (checked on the
config before a fit, :func:`check_frozen_plug_in`, and on the data, :func:`start_wide_part`)."""


def start_wide_part(model: UnifiedRanker, data: WindowDataset, how: str = "fitted") -> None:
    """Start the wide part (``model.wide_rates``) of ``model``, fitted from scratch on
    ``data`` (training samples, rates counted as training reads them), as
    ``trainer.wide_start`` says: ``fitted`` sets each task's weights and bias to a logistic
    regression (L2 1) of its present labels on the rates the model reads
    (``RankerConfig.rate_keys``; id dropout aside, the same values); ``unit`` keeps the
    model's initial start. A task whose labels are all one class keeps it too. Nothing to
    do for a model without a wide part.

    With ``model.content_affinity`` it first sets the PPM module's ``modal_centre``, the
    mean vector of the items ``data``'s impressions show (each as often as shown), and the
    regression reads the content cosines beside the rates.

    Raises:
        ValueError: ``content_affinity`` with a frozen plug-in's projected data."""
    if how not in ("fitted", "unit"):
        raise ValueError(f"wide_start must be 'fitted' or 'unit', got {how!r}")
    affinity = model.config.content_affinity
    if affinity and len(data):
        if data.projected:
            raise ValueError(_FROZEN_AFFINITY)
        shows = np.bincount(data.features["target_modal_row"], minlength=len(data.modal.vectors))
        shows[0] = 0  # "missing" is no vector
        if shows.any():  # else the centre stays as it is (zeros): no vector to centre
            with torch.no_grad():
                model.ppm.modal_centre.copy_(torch.from_numpy(
                    shows.astype(np.float64) @ data.modal.vectors / shows.sum()))
    if model.wide is None or how == "unit" or not len(data):
        return
    x = np.concatenate([data.features[k] for k in model.config.rate_keys], axis=1)
    x = x.astype(np.float64)  # (n, R)
    if affinity:
        x = np.concatenate([x, dataset_cosines(model, data)], axis=1)  # (n, R + 2)
    with torch.no_grad():
        for task, name in enumerate(model.config.tasks):
            if name not in data.tasks:
                continue
            present = data.label_mask[:, task] > 0
            y = data.labels[present, task].astype(np.float64)
            if not len(y) or y.min() == y.max():
                continue
            w = newton_logistic(x[present], y, l2=1.0)
            model.wide.weight[task] = torch.as_tensor(w[:-1], dtype=model.wide.weight.dtype)
            model.wide.bias[task] = float(w[-1])


def dataset_cosines(model: UnifiedRanker, data: WindowDataset, chunk: int = 4096
                    ) -> np.ndarray:
    """(n, 2) float64: :func:`~trainer.model.content_cosines` of every sample of ``data``
    under ``model``'s centre, as its forward computes them."""
    with torch.no_grad():
        unit = unit_vectors(torch.from_numpy(data.modal.vectors), model.ppm.modal_centre)
        keys = ("target_modal_row", "seq_modal_row", "seq_action", "seq_mask")
        return np.concatenate([
            content_cosines(unit, {k: torch.from_numpy(data.features[k][at:at + chunk])
                                   for k in keys}).double().numpy()
            for at in range(0, len(data), chunk)]) if len(data) else np.zeros((0, 2))


def names(windows: Sequence[Window | Path]) -> list[str]:
    """Window names, as version meta records them (``trained_on``, ``validated_on``)."""
    return [w.name for w in windows]


def admit_ids(model: UnifiedRanker, windows: Sequence[Window | Path], t: TrainerConfig,
              fine_tune: bool = False) -> None:
    """Set ``model``'s item and user vocabularies from the impressions of ``windows``
    (``trainer.min_item_count``, ``min_user_count``), and with ``taste_rates`` its taste
    vocabulary (every pair admitted). ``fine_tune``: add them to the
    model's own counts and keep its minimums; a vocabulary it has none of (a checkpoint
    from before that kind existed) stays None, so the model reads ids as it trained."""
    counts = WindowCounts.read(windows, tastes=model.config.taste_rates)
    for kind, min_count in (("item", t.min_item_count), ("user", t.min_user_count)):
        base = getattr(model, f"{kind}_vocabulary")
        if fine_tune and base is None:
            continue
        setattr(model, f"{kind}_vocabulary",
                counts.ids(f"{kind}_id", min_count, base if fine_tune else None))
    if model.config.taste_rates and not (fine_tune and model.taste_vocabulary is None):
        model.taste_vocabulary = counts.tastes(model.taste_vocabulary if fine_tune else None)


def vocabulary_meta(vocabulary: IdVocabulary | None) -> dict | None:
    """What a version's meta says of a vocabulary (the ids are in its checkpoint)."""
    if vocabulary is None:
        return None
    return {"min_count": vocabulary.min_count, "ids_seen": len(vocabulary.counts),
            "ids_admitted": len(vocabulary.admitted)}


@dataclass
class StepResult:
    """One incremental step, judged on ``eval_window`` (a window name)."""

    version: Version
    promoted: bool
    candidate: dict
    champion: dict | None
    eval_window: str
    eval_logits: np.ndarray
    """Logits on the eval window of the model chosen *before* that window was seen
    (test-then-train): the champion going into the step, whichever model the step then
    promotes; at the first step, with no champion yet, the new model (nothing was chosen
    on the window)."""
    eval_data: WindowDataset
    """The eval window's samples as the model of ``eval_logits`` reads them."""
    scored_by: str
    """The version whose logits ``eval_logits`` are."""


class IncrementalTrainer:
    """``ppm train --follow`` for one variant; state and versions live in ``registry``.

    Args:
        cfg: configuration (``trainer`` section; data under ``cfg.data_dir``).
        registry: where versions and the champion pointer live (default
            ``cfg.paths.registry(variant)``).
        variant: overrides ``cfg.trainer.variant``.
        shuffle_vectors_seed: the shuffled-vector control: train and score on
            :meth:`ModalTable.shuffled` (that seed) instead of the items' own vectors. A
            model trained so is an experiment's control, never one to serve: give it a
            ``registry`` of its own.
    """

    def __init__(self, cfg: Config, registry: Registry | None = None,
                 variant: str | None = None, shuffle_vectors_seed: int | None = None,
                 from_scratch: bool = False, curves: CurveLog | None = None):
        self.cfg = cfg
        self.curves = curves
        """Where each step's fit, decision and version are appended (``ppm train``: the
        registry's ``curves.jsonl``); None: nowhere."""
        self.from_scratch = from_scratch
        """Whether the models this trainer fits start from scratch (``ppm train --batch``):
        then the champion's encoder version does not choose the vectors (:attr:`modal`)."""
        self.variant = variant or cfg.trainer.variant
        self.registry = registry or Registry(cfg.paths.registry(self.variant))
        self.shuffle_vectors_seed = shuffle_vectors_seed
        self.refresh = EmbeddingRefresh.of(cfg.staleness)
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        self._modal: tuple[tuple[str | None, ...], ModalTable] | None = None
        self._champion_cache: tuple[Version, UnifiedRanker] | None = None

    def dataset(self, windows: Sequence[Window | Path], config: RankerConfig | None = None,
                vocabulary: IdVocabulary | None = None,
                user_vocabulary: IdVocabulary | None = None, training: bool = False,
                counted_later: Sequence[Window | Path] = (),
                serving_cache_s: float | None = None,
                taste_vocabulary: IdVocabulary | None = None) -> WindowDataset:
        """Samples of ``windows`` (or window files) as a model of ``config`` (default: a new
        model's) with item ``vocabulary``, ``user_vocabulary`` and ``taste_vocabulary`` (its
        ``item_vocabulary``, ``user_vocabulary``, ``taste_vocabulary``; None: every id
        keeps its bucket, no taste is counted) reads them; ``training``,
        ``counted_later``, ``serving_cache_s``: ``WindowDataset``'s arguments."""
        config = config or ranker_config(self.cfg, self.variant, self.modal.dim)
        return WindowDataset(windows, self.modal, config, self.cfg.features.freshness_window_s,
                             vocabulary=vocabulary, user_vocabulary=user_vocabulary,
                             taste_vocabulary=taste_vocabulary, training=training,
                             as_recorded=self.refresh.mode == "recorded",
                             counted_later=counted_later, serving_cache_s=serving_cache_s)

    def dataset_for(self, model: UnifiedRanker, windows: Sequence[Window | Path],
                    training: bool = False, counted_later: Sequence[Window | Path] = (),
                    serving_cache_s: float | None = None) -> WindowDataset:
        """Samples of ``windows`` as ``model`` reads them (its config and vocabularies);
        ``training``: ``model`` trains on them, and its vocabularies counted them (and
        ``counted_later``); ``serving_cache_s``: see :class:`WindowDataset`."""
        return self.dataset(windows, model.config, model.item_vocabulary,
                            model.user_vocabulary, training, counted_later, serving_cache_s,
                            model.taste_vocabulary)

    @property
    def modal(self) -> ModalTable:
        """Cached item vectors of the encoder version this trainer's models read: the
        champion's (fine-tuning never changes a model's version), else
        ``trainer.encoder_version``, else the version written last; re-read when the item
        log has new parts (items embedded since the last step must be visible), available
        as ``[staleness]``'s refresh policy says; shuffled for the control."""
        folder = self.cfg.paths.item_log
        champion = None if self.from_scratch else self.registry.champion()
        version = (champion.meta.get("encoder_version") if champion else None) or \
            self.cfg.trainer.encoder_version
        parts = (version, *sorted(p.name for p in folder.glob("part-*.parquet")))
        if self._modal is None or self._modal[0] != parts:
            modal = ModalTable.from_item_log(folder, version)
            if self.refresh.mode != "recorded":
                windows = closed_windows(self.cfg.paths.training)
                modal = self.refresh.apply(modal, windows[0].start_us if windows else 0)
            if self.shuffle_vectors_seed is not None:
                modal = modal.shuffled(self.shuffle_vectors_seed)
            self._modal = (parts, modal)
        return self._modal[1]

    def _champion(self) -> tuple[Version, UnifiedRanker] | None:
        """The champion and its model, kept in memory between steps."""
        champion = self.registry.champion()
        if champion is None:
            return None
        if self._champion_cache is None or self._champion_cache[0].name != champion.name:
            self._champion_cache = (champion, self.registry.load(champion))
        return self._champion_cache

    def next_step(self) -> tuple[list[Window], Window] | None:
        """(windows to train on, window to evaluate on), or None when waiting for data.

        Windows are those every source has closed (:func:`trainer.dataset.closed_windows`).
        """
        windows = closed_windows(self.cfg.paths.training)
        done = self.registry.state().get("trained_through")
        if done is None:
            warmup = self.cfg.trainer.warmup_windows
            return (windows[:warmup], windows[warmup]) if len(windows) > warmup else None
        closed = names(windows)
        if done not in closed:
            # A source that appeared since (a partition's first writer) can hold the closed
            # windows back behind what was trained on: wait for it. Names sort as times.
            if closed and done > closed[-1]:
                return None
            raise RuntimeError(f"registry says it trained through {done}, which is not a "
                               f"closed window in {self.cfg.data_dir}")
        i = closed.index(done)
        return ([windows[i + 1]], windows[i + 2]) if len(windows) > i + 2 else None

    def _first_fit_epochs(self, windows: Sequence[Window], progress: bool = False
                          ) -> tuple[int, dict[str, Any] | None]:
        """Epochs of the first fit over the warm-up ``windows``, and how they were chosen
        (None: not chosen, ``initial_epochs``). With ``trainer.warmup_valid_share``, the
        last share of the windows (rounded up; at least one window must be left to fit on)
        is held out: a model fitted on the others for at most ``trainer.initial_epochs`` is
        scored on it after each epoch (:class:`EpochPicker`), and its best epoch is the
        choice, or ``initial_epochs`` where no epoch could be scored (one class only)."""
        t = self.cfg.trainer
        # Rounded first: 0.1 * 30 is 3.0000000000000004 in floats, which ceil makes 4.
        held = math.ceil(round(t.warmup_valid_share * len(windows), 9))
        if t.initial_epochs == 1 or not 0 < held < len(windows):
            return t.initial_epochs, None
        probe = new_model(self.cfg, self.variant, self.modal.dim)
        admit_ids(probe, windows[:-held], t)
        picker = EpochPicker(probe, self.dataset_for(probe, windows[-held:]), t.patience,
                             keep_weights=False)
        data = self.dataset_for(probe, windows[:-held], training=True)
        start_wide_part(probe, data, t.wide_start)
        fit(probe, data, t.initial_epochs,
            t.batch_size, t.lr, t.weight_decay, seed=t.seed, grad_clip=t.grad_clip,
            progress=progress, after_epoch=picker, id_lr_scale=t.id_lr_scale)
        epochs = picker.best_epoch or t.initial_epochs
        return epochs, {"epochs": epochs, "valid_windows": names(windows[-held:]),
                        "valid_click_aucs": picker.aucs}

    def step(self, progress: bool = False) -> StepResult | None:
        """Do the next step if its windows are closed; None otherwise."""
        plan = self.next_step()
        if plan is None:
            return None
        train_windows, eval_window = plan
        t = self.cfg.trainer
        if self.curves is not None:
            self.curves.begin_fit(windows=names(train_windows), eval_window=eval_window.name)
        held = self._champion()
        if held is None:
            champion, champion_model = None, None
            epochs, chosen = self._first_fit_epochs(train_windows, progress)
            candidate = new_model(self.cfg, self.variant, self.modal.dim)
            admit_ids(candidate, train_windows, t)
            train = self.dataset_for(candidate, train_windows, training=True)
            start_wide_part(candidate, train, t.wide_start)
            fit(candidate, train, epochs, t.batch_size, t.lr, t.weight_decay,
                seed=t.seed, grad_clip=t.grad_clip, progress=progress, curves=self.curves,
                id_lr_scale=t.id_lr_scale)
            trained_on, validated_on = names(train_windows), []
        else:
            champion, champion_model = held
            chosen = None
            candidate = copy.deepcopy(champion_model)
            plugged = champion.meta.get("plug_in")
            if plugged and plugged.get("frozen"):  # a checkpoint keeps no requires_grad
                candidate.ppm.requires_grad_(False)
            closed = closed_windows(self.cfg.paths.training)
            older = closed[: names(closed).index(train_windows[0].name)]
            replayed = older[-t.replay_windows:] if t.replay_share > 0 else []
            # The new windows' impressions join the champion's counts (its min_count kept).
            seen = set(champion.meta.get("trained_on", []))
            admit_ids(candidate, [w for w in [*replayed, *train_windows] if w.name not in seen],
                      t, fine_tune=True)
            train = self.dataset_for(candidate, train_windows, training=True)
            replay = self.dataset_for(candidate, replayed, training=True,
                                      counted_later=train_windows) if replayed else None
            fit(candidate, train, t.incremental_epochs, t.batch_size, t.fine_tune_lr or t.lr,
                t.weight_decay, seed=t.seed + len(closed), extra=replay,
                extra_share=t.replay_share, grad_clip=t.grad_clip, progress=progress,
                curves=self.curves, id_lr_scale=t.id_lr_scale)
            trained_on = sorted(seen | {*names(replayed), *names(train_windows)})
            validated_on = sorted({*champion.meta.get("validated_on", []), eval_window.name})

        holdout = self.dataset_for(candidate, [eval_window])
        cand_logits = predict(candidate, holdout)
        cand_metrics = report(holdout, cand_logits, trained=candidate.trained_tasks)
        champ_metrics = None
        if champion_model is not None:
            champ_holdout = self.dataset_for(champion_model, [eval_window])
            champ_logits = predict(champion_model, champ_holdout)
            champ_metrics = report(champ_holdout, champ_logits,
                                   trained=champion_model.trained_tasks)
        promoted = self._better(cand_metrics, champ_metrics)
        version = self.registry.register(candidate, {
            "variant": self.variant,
            "mode": "incremental",
            "parent": champion.name if champion else None,
            "trained_on": trained_on,
            "step_windows": names(train_windows),
            "validated_on": validated_on,
            "evaluated_on": eval_window.name,
            "samples": len(train),
            "epochs_chosen": chosen,
            "encoder_version": self.modal.encoder_version,
            "shuffle_vectors_seed": self.shuffle_vectors_seed,
            "plug_in": champion.meta.get("plug_in") if champion else None,
            "trainer_config": trainer_meta(self.cfg, self.variant, self.modal.encoder_version),
            "trained_tasks": list(candidate.trained_tasks or ()),
            "item_vocabulary": vocabulary_meta(candidate.item_vocabulary),
            "user_vocabulary": vocabulary_meta(candidate.user_vocabulary),
            "taste_vocabulary": vocabulary_meta(candidate.taste_vocabulary),
            "metrics": cand_metrics,
            "champion_metrics": champ_metrics,
            "promoted": promoted,
        })
        if promoted:
            self.registry.promote(version)
            self._champion_cache = (version, candidate)
        if self.curves is not None:
            self.curves.write("eval", step=self.curves.step, window=eval_window.name,
                              candidate_click_auc=click_auc(cand_metrics),
                              champion_click_auc=click_auc(champ_metrics) if champ_metrics
                              else None, promoted=promoted)
            self.curves.write("version", version=version.name, promoted=promoted)
        self.registry.save_state({"trained_through": train_windows[-1].name,
                                  "last_version": version.name,
                                  "updated_at": datetime.now(UTC).isoformat()})
        # Test-then-train: the window is scored by the model chosen before it was seen.
        if champion is None:
            scored_by, eval_data, eval_logits = version.name, holdout, cand_logits
        else:
            scored_by, eval_data, eval_logits = champion.name, champ_holdout, champ_logits
        return StepResult(version, promoted, cand_metrics, champ_metrics, eval_window.name,
                          eval_logits, eval_data, scored_by)

    def _better(self, candidate: dict, champion: dict | None) -> bool:
        if champion is None:
            return True
        new, old = click_auc(candidate), click_auc(champion)
        if new is None or old is None:
            return new is not None or old is None
        return new >= old - self.cfg.trainer.promote_tolerance

    def follow(self, poll_s: float = 5.0, once: bool = False,
               on_step: Callable[[StepResult], None] | None = None,
               progress: bool = False) -> int:
        """Run steps as windows close; returns the number of steps. ``once``: stop when
        no step is ready instead of polling."""
        steps = 0
        while True:
            result = self.step(progress=progress)
            if result is None:
                if once:
                    return steps
                time.sleep(poll_s)
                continue
            steps += 1
            if on_step:
                on_step(result)


# -----------------------------------------------------------------------------
# The protocol: train, validation and test periods


@dataclass(frozen=True)
class Split:
    """The closed windows cut by time into three periods of whole windows, in order:
    ``train``, ``valid`` (chooses what training tunes) and ``test`` (``ppm eval``)."""

    train: list[Window]
    valid: list[Window]
    test: list[Window]
    valid_start_us: int
    """Start of the validation period, µs since the epoch (UTC); ``test_start_us`` when it
    holds no window."""
    test_start_us: int
    """Start of the test period (its first window's start), µs since the epoch (UTC)."""


def split_windows(cfg: Config, test_share: float = 0.2, valid_share: float = 0.1,
                  period: Literal["test", "validation"] = "test") -> Split:
    """The closed windows split by time, not samples: the test period is the last
    ``test_share`` of the time they span, the validation period the ``valid_share`` of that
    span just before it (0: none), and train the rest. A period starts with the first window
    that starts at or after its boundary, so no window is cut or left out.

    ``period="validation"``: the same split moved one period back, to choose settings
    without reading the test period. The validation period is returned as ``test`` (the
    period scored), the ``valid_share`` of the span just before it as ``valid``, what
    precedes as ``train``; the test period's windows are in none of them."""
    if period not in ("test", "validation"):
        raise ValueError(f"period must be 'test' or 'validation', got {period!r}")
    if not 0 < test_share < 1:
        raise ValueError(f"test_share must be in (0, 1), got {test_share}")
    if not 0 <= valid_share < 1 - test_share:
        raise ValueError(f"valid_share must be in [0, 1 - test_share), got {valid_share}")
    if period == "validation" and not 0 < valid_share < (1 - test_share) / 2:
        raise ValueError(f"scoring the validation period needs a valid_share in (0, "
                         f"{(1 - test_share) / 2:g}): one for it, one before it to choose "
                         f"the epoch, and training before both; got {valid_share}")
    windows = closed_windows(cfg.paths.training)
    if not windows:
        return Split([], [], [], 0, 0)
    first, last = windows[0].start_us, windows[-1].end_us
    test_from = last - int(test_share * (last - first))
    valid_from = test_from - int(valid_share * (last - first))
    if period == "validation":  # every boundary one validation period earlier
        windows = [w for w in windows if w.start_us < test_from]
        test_from, valid_from = valid_from, valid_from - int(valid_share * (last - first))
    train = [w for w in windows if w.start_us < valid_from]
    valid = [w for w in windows if valid_from <= w.start_us < test_from]
    test = [w for w in windows if w.start_us >= test_from]
    test_start = test[0].start_us if test else last
    return Split(train, valid, test, valid[0].start_us if valid else test_start, test_start)


def recent(windows: Sequence[Window | Path], share: float) -> list[Window | Path]:
    """The last ``share`` of ``windows`` (in time order), rounded, at least one."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    return list(windows[-max(1, round(share * len(windows))):])


@dataclass
class BatchFit:
    """A model fitted from scratch by :func:`train_batch`, and what chose it."""

    model: UnifiedRanker
    variant: str
    encoder_version: str | None
    trained_on: list[str]
    validated_on: list[str]
    epochs: int
    """Epochs run (early stopping may end before the most allowed)."""
    best_epoch: int | None
    """The epoch whose weights were kept (1-based); None without validation: the last."""
    valid_auc: float | None
    """Its click AUC on the validation period."""
    valid_aucs: list[float | None] = field(default_factory=list)
    """Validation click AUC after each epoch run."""
    tuned: dict[str, Any] | None = None
    """:func:`tune_batch`: the values chosen and every value tried with its AUC."""
    shuffle_vectors_seed: int | None = None
    """The shuffled-vector control's seed (:meth:`ModalTable.shuffled`); None: the items'
    own vectors."""
    trainer: IncrementalTrainer | None = field(default=None, repr=False, compare=False)
    """The trainer that read its data: its vectors (shuffled for the control) score the
    model's other windows without reading the item log again."""
    plug_in: dict[str, Any] | None = None
    """:func:`plug_in`'s record: the pre-trained PPM module it started from, and whether
    it stayed frozen."""
    restarts: dict[str, Any] | None = None
    """With ``trainer.restarts`` above 1: ``chosen`` (0-based) and ``tried``, each restart's
    seed, epochs, best epoch and validation click AUC; None for a single fit."""

    def meta(self) -> dict[str, Any]:
        """The registry meta of this model."""
        return {"variant": self.variant, "mode": "batch", "trained_on": self.trained_on,
                "validated_on": self.validated_on, "epochs": self.epochs,
                "best_epoch": self.best_epoch, "valid_click_auc": self.valid_auc,
                "valid_click_aucs": self.valid_aucs, "tuned": self.tuned,
                "encoder_version": self.encoder_version,
                "shuffle_vectors_seed": self.shuffle_vectors_seed, "plug_in": self.plug_in,
                "restarts": self.restarts,
                "trainable_parameters": sum(p.numel() for p in self.model.parameters()
                                            if p.requires_grad),
                "trained_tasks": list(self.model.trained_tasks or ()),
                "item_vocabulary": vocabulary_meta(self.model.item_vocabulary),
                "user_vocabulary": vocabulary_meta(self.model.user_vocabulary),
                "taste_vocabulary": vocabulary_meta(self.model.taste_vocabulary),
                "trainer_config": (trainer_meta(self.trainer.cfg, self.variant,
                                                self.encoder_version)
                                   if self.trainer is not None else None)}


def trainer_meta(cfg: Config, variant: str, encoder_version: str | None) -> dict[str, Any]:
    """The ``[trainer]`` section a model was fitted with, as its registry meta keeps it
    (``trainer_config``): with the checkpoint's RankerConfig, what a rerun needs. The
    variant and encoder version are the ones fitted, not the config's defaults (an
    ``idrec`` fit under the default ``variant = "ppm"``)."""
    return {**cfg.trainer.model_dump(mode="json"), "variant": variant,
            "encoder_version": encoder_version}


def plug_in(model: UnifiedRanker, source: Version, freeze: bool = False) -> dict[str, Any]:
    """Start ``model``'s PPM module from the one pre-trained in ``source`` (a registry
    version, usually of the ``modal`` variant: ``ppm train --batch --variant modal``), as
    the paper plugs its pre-trained module into IDRec; with ``freeze``, the module's
    weights never change again (the optimiser sees only the rest), so its per-item outputs
    are fixed. Returns the record kept in the model's meta.

    Raises:
        ValueError: ``model`` has no PPM module, ``source`` none or one of another shape.
    """
    from trainer.model import load_checkpoint

    if model.ppm is None:
        raise ValueError(f"a {model.config.variant} model has no PPM module to plug into")
    pretrained, _ = load_checkpoint(source.model_path)
    if pretrained.ppm is None:
        raise ValueError(f"{source.name} ({pretrained.config.variant}) has no PPM module")
    try:
        model.ppm.load_state_dict(pretrained.ppm.state_dict(), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{source.name}'s PPM module does not fit this model (model "
                         f"settings differ): {str(exc).splitlines()[0]}") from exc
    model.ppm.requires_grad_(not freeze)
    return {"version": source.name, "variant": pretrained.config.variant,
            "encoder_version": source.meta.get("encoder_version"), "frozen": freeze,
            "projection": projection_key(model) if freeze else None}


def projection_key(model: UnifiedRanker) -> str:
    """``proj-<hash>`` of the weights of ``model``'s per-item projection
    (``PPMModule.project``): the version of the projected vectors a frozen plug-in's
    outputs are stored under (``trainer.serving.projection``)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.ppm.proj.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"proj-{digest.hexdigest()[:12]}"


def check_frozen_plug_in(cfg: Config) -> None:
    """Raises ``ValueError`` where a model with a frozen plug-in cannot train under
    ``cfg``: ``model.content_affinity`` reads the raw cached vectors, and a frozen
    plug-in's training data holds its projections instead. Callers that fit several
    models check before the first fit."""
    if cfg.model.content_affinity:
        raise ValueError(_FROZEN_AFFINITY)


def check_restarts(cfg: Config, valid: Sequence[Window | Path]) -> None:
    """Raises ``ValueError`` where ``trainer.restarts`` is above 1 and there is no
    validation window to choose the restart by. Callers that fit several models, or fit
    baselines first, check before any of it."""
    if cfg.trainer.restarts > 1 and not valid:
        raise ValueError(f"trainer.restarts = {cfg.trainer.restarts} needs validation windows "
                         "to choose the restart by (give a validation period, or restarts = 1)")


def train_batch(cfg: Config, windows: Sequence[Window | Path], variant: str | None = None,
                epochs: int | None = None, progress: bool = True,
                valid: Sequence[Window] = (), shuffle_vectors_seed: int | None = None,
                plug_in_from: Version | None = None, freeze_plugin: bool = False,
                curves: CurveLog | None = None) -> BatchFit:
    """``ppm train --batch``: one fit from scratch over the most recent
    ``trainer.history_share`` of ``windows`` (:func:`recent`; every one at the default 1;
    ``trained_on`` names those read), for at most ``epochs`` (default
    ``trainer.initial_epochs``). With ``valid`` windows, the epoch with the best validation
    click AUC is kept, and training stops after ``trainer.patience`` epochs without a better
    one. The id vocabularies are counted from the windows read. With ``trainer.restarts``
    above 1 (and ``valid``), the fit runs that many times from different seeds and the one
    with the best validation click AUC is returned (``BatchFit.restarts`` says which).
    ``shuffle_vectors_seed``: the shuffled-vector control (see :class:`IncrementalTrainer`;
    score the model through a trainer with the same seed). ``plug_in_from``: start the PPM
    module from that version's (:func:`plug_in`; its encoder version is read), frozen with
    ``freeze_plugin``. ``curves``: where the steps, epochs and validation AUCs go."""
    if plug_in_from is not None and freeze_plugin:
        check_frozen_plug_in(cfg)
    windows = recent(windows, cfg.trainer.history_share)
    if plug_in_from is not None and plug_in_from.meta.get("encoder_version"):
        cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(
            update={"encoder_version": plug_in_from.meta["encoder_version"]})})
    trainer = IncrementalTrainer(cfg, variant=variant, shuffle_vectors_seed=shuffle_vectors_seed,
                                 from_scratch=True)
    t = cfg.trainer
    check_restarts(cfg, valid)
    data = held_out = best = None
    tried: list[dict[str, Any]] = []
    for restart in range(t.restarts):
        seed = t.seed + RESTART_SEED_STEP * restart
        model = new_model(cfg.with_values({"trainer.seed": seed}), trainer.variant,
                          trainer.modal.dim)
        plugged = plug_in(model, plug_in_from, freeze_plugin) if plug_in_from else None
        if data is None:
            admit_ids(model, windows, t)
            data = trainer.dataset_for(model, windows, training=True)
            held_out = trainer.dataset_for(model, valid) if valid else None
            if plugged and freeze_plugin:  # the plug-in's outputs are fixed: project once
                for dataset in (data, held_out):
                    if dataset is not None:
                        dataset.project_with(model.ppm)
        else:  # the same windows, so the same vocabularies: the samples are read once
            model.item_vocabulary, model.user_vocabulary, model.taste_vocabulary = (
                best[0].item_vocabulary, best[0].user_vocabulary, best[0].taste_vocabulary)
        if curves is not None and t.restarts > 1:
            curves.write("restart", restart=restart, seed=seed)
        start_wide_part(model, data, t.wide_start)
        picker = EpochPicker(model, held_out, t.patience, curves)
        fit(model, data, epochs or t.initial_epochs, t.batch_size, t.lr, t.weight_decay,
            seed=seed, grad_clip=t.grad_clip, progress=progress, after_epoch=picker,
            curves=curves, id_lr_scale=t.id_lr_scale)
        picker.restore_best()
        tried.append({"seed": seed, "epochs": picker.ran, "best_epoch": picker.best_epoch,
                      "valid_click_auc": picker.best_auc})
        # The first restart stands unless a later one is strictly better on validation.
        if best is None or (picker.best_auc is not None and (
                best[1].best_auc is None or picker.best_auc > best[1].best_auc)):
            best = (model, picker, plugged, restart)
    model, picker, plugged, chosen = best
    return BatchFit(model, trainer.variant, trainer.modal.encoder_version, names(windows),
                    names(valid) if held_out is not None else [], picker.ran,
                    picker.best_epoch, picker.best_auc, picker.aucs,
                    shuffle_vectors_seed=shuffle_vectors_seed,
                    trainer=trainer, plug_in=plugged,
                    restarts={"chosen": chosen, "tried": tried} if t.restarts > 1 else None)


def tune_batch(cfg: Config, split: Split, grid: Mapping[str, Sequence[str]],
               variant: str | None = None, epochs: int | None = None,
               progress: bool = True, curves: CurveLog | None = None) -> BatchFit:
    """``ppm train --batch --tune``: one :func:`train_batch` per combination of ``grid``'s
    values (config field -> values, see :meth:`ppm.config.Config.with_values`), each fitted
    on ``split.train``; returns the one with the best validation click AUC, with every
    value tried in its ``tuned``. The test period is never read."""
    if not split.valid:
        raise ValueError("tuning chooses on the validation period, which holds no window: "
                         "give a larger --valid-share")
    choices = [dict(zip(grid, values, strict=True))
               for values in itertools.product(*grid.values())]
    configs = [cfg.with_values(choice) for choice in choices]  # a bad value fails first
    tried: list[dict[str, Any]] = []
    best: tuple[dict[str, str], BatchFit] | None = None
    for choice, tuned_cfg in zip(choices, configs, strict=True):
        if curves is not None:
            curves.begin_fit(tuned=choice)
        fitted = train_batch(tuned_cfg, split.train, variant, epochs, progress,
                             valid=split.valid, curves=curves)
        tried.append({**choice, "valid_click_auc": fitted.valid_auc})
        if fitted.valid_auc is not None and (best is None or fitted.valid_auc > best[1].valid_auc):
            best = (choice, fitted)
    if best is None:
        raise ValueError("no value tried has a validation click AUC (are there clicks in "
                         "the validation period?)")
    best[1].tuned = {"chosen": best[0], "tried": tried}
    return best[1]


class LeakyChampionError(ValueError):
    """``ppm eval``: a champion trained on, or was chosen on, windows of the test period."""


def windows_used(registry: Registry, version: Version) -> dict[str, list[str]]:
    """The windows whose labels shaped or chose ``version``: ``trained_on`` (its meta: its
    weights and item vocabulary saw them) and ``validated_on`` (its meta's early stopping,
    tuning and promotions, and the windows on which later candidates lost to it)."""
    challengers = [v.meta["evaluated_on"] for v in registry.versions()
                   if v.meta.get("parent") == version.name and v.meta.get("evaluated_on")]
    return {"trained_on": sorted(version.meta["trained_on"]),
            "validated_on": sorted({*version.meta.get("validated_on", []), *challengers})}


def check_before_test(registry: Registry, version: Version, split: Split) -> None:
    """Raise :class:`LeakyChampionError` unless every window that shaped or chose
    ``version`` ends before the test period; the message names the overlap and the fix."""
    test_start = iso(split.test_start_us)
    if "trained_on" not in version.meta:
        raise LeakyChampionError(
            f"{version.name} does not record the windows it trained on, so it cannot be "
            f"tested: train it again with ppm train --batch")
    first_test = split.test[0].name  # window names sort as their start times
    used = windows_used(registry, version)
    overlap = {kind: [n for n in window_names if n >= first_test]
               for kind, window_names in used.items()}
    if not any(overlap.values()):
        return
    verbs = {"trained_on": "trained on", "validated_on": "was chosen on"}
    said = " and ".join(
        f"{verbs[kind]} {len(o)} of its windows ({', '.join(o[:3])}{', ...' if len(o) > 3 else ''})"
        for kind, o in overlap.items() if o)
    variant = version.meta.get("variant", "")
    raise LeakyChampionError(
        f"the {variant} champion {version.name} ({version.meta.get('mode', 'incremental')}) "
        f"saw the test period, which starts {test_start}: it {said}, so its scores there "
        f"would not be a test. Evaluate a model that never saw it: ppm train --batch "
        f"--variant {variant} (fits on the train period, chooses on validation), or train "
        f"incrementally only on windows before {test_start}.")


TEST_BUCKETS = ("all", "new_in_test", *BUCKETS[1:])
"""The buckets of a test-period report, in order: ``trainer.metrics.BUCKETS`` and
``new_in_test`` (:func:`new_in_period` of the test period)."""


def new_in_period(data: WindowDataset, start_us: int) -> np.ndarray:
    """bool (n,): samples whose item was first seen at or after ``start_us`` (µs since the
    epoch, UTC), from the impression time and the item's age; an unknown age is never new.
    With the test period's start: ``new_in_test``, the cold items of a temporal split."""
    first_seen = data.impression_us - np.nan_to_num(data.item_age_s, nan=np.inf) * 1e6
    return first_seen >= start_us


def evaluate_champions(cfg: Config, variants: Sequence[str],
                       test_share: float) -> tuple[dict, tuple[str, ...]]:
    """``ppm eval``: each variant's champion on the test period.

    Returns ``({variant: report}, buckets)``; besides the buckets of
    ``trainer.metrics.cold_buckets`` a report has ``new_in_test``: items first seen in the
    test period (the cold items of a temporal split). Raises :class:`LeakyChampionError`
    for a champion that trained or was chosen on windows of the test period (see
    :func:`windows_used`), :class:`~trainer.finetune.LeakyEncoderError` for one that reads
    vectors whose encoder learned from clicks of it."""
    split = split_windows(cfg, test_share, valid_share=0.0)
    if not split.test:
        raise SystemExit("no closed windows in the test period")
    from trainer.finetune import check_vector_periods  # it imports this module
    reports = {}
    for variant in variants:
        trainer = IncrementalTrainer(cfg, variant=variant)
        champion = trainer.registry.champion()
        if champion is None:
            raise SystemExit(f"no {variant} model yet: run ppm train --batch --variant {variant}")
        check_before_test(trainer.registry, champion, split)
        model = trainer.registry.load(champion)
        if model.config.uses_modal:
            check_vector_periods(cfg.paths.item_log, trainer.modal.encoder_version, split)
        data = trainer.dataset_for(model, split.test)
        logits = predict(model, data)
        result = report(data, logits, trained=model.trained_tasks)
        new = report(data, logits, rows=new_in_period(data, split.test_start_us),
                     trained=model.trained_tasks)
        for task in result:
            result[task]["new_in_test"] = new[task]["all"]
        result["model"] = {"version": champion.name, "test_windows": len(split.test),
                           "trained_tasks": (None if model.trained_tasks is None
                                             else list(model.trained_tasks)),
                           "test_start": iso(split.test_start_us)}
        reports[variant] = result
    return reports, TEST_BUCKETS


def describe(result: StepResult) -> str:
    c = click_auc(result.candidate)
    o = click_auc(result.champion) if result.champion else None
    verdict = "promoted" if result.promoted else "rejected"
    return json.dumps({"version": result.version.name, "eval_window": result.eval_window,
                       "candidate_click_auc": c, "champion_click_auc": o,
                       "decision": verdict, "scored_by": result.scored_by})
