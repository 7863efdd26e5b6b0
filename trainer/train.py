"""Training the unified ranker on the pipeline's windows, once or incrementally.

The loop reads top to bottom: load the data, fit, evaluate, decide, register.

* :func:`fit` / :func:`predict` are the plain training and scoring loops.
* :class:`IncrementalTrainer` is ``ppm train --follow``: for each newly closed window it
  loads the champion, fine-tunes a copy on the window (plus a replayed share of older
  samples), evaluates candidate and champion on the *next* window, registers the candidate
  with its metrics, and promotes it unless it is worse than the champion by more than
  ``trainer.promote_tolerance`` (click AUC). Every step's outcome is in the registry.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from ppm.config import Config
from trainer.dataset import ModalTable, Window, WindowDataset, closed_windows
from trainer.metrics import evaluate
from trainer.model import RankerConfig, UnifiedRanker
from trainer.registry import Registry, Version


def fit(model: UnifiedRanker, data: WindowDataset, epochs: int, batch_size: int, lr: float,
        weight_decay: float = 0.0, seed: int = 0, extra: WindowDataset | None = None,
        extra_share: float = 0.0, grad_clip: float | None = None,
        progress: bool = False) -> float:
    """Train ``model`` in place; returns the mean loss of the last epoch.

    ``extra`` (older samples) contributes ``extra_share * len(data)`` random samples per
    epoch: replay against forgetting. ``grad_clip``: the largest gradient norm of a step
    (``trainer.grad_clip``; None: not clipped).
    """
    from tqdm import tqdm

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    last = float("nan")
    for epoch in range(epochs):
        batches = list(data.batches(batch_size, shuffle=True, seed=seed + epoch))
        if extra is not None and len(extra) and extra_share > 0:
            rng = np.random.default_rng(seed + 10_000 + epoch)
            take = rng.choice(len(extra), min(len(extra), int(extra_share * len(data))),
                              replace=False)
            batches += [extra.batch(take[i : i + batch_size])
                        for i in range(0, len(take), batch_size)]
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        losses = []
        for batch in tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress,
                          leave=False):
            _, loss = model(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            losses.append(loss.item())
        last = float(np.mean(losses)) if losses else float("nan")
    model.eval()
    return last


@torch.inference_mode()
def predict(model: UnifiedRanker, data: WindowDataset, batch_size: int = 4096) -> np.ndarray:
    """Logits (n, n_tasks), tasks in ``model.config.tasks`` order, rows in the dataset's."""
    model.eval()
    out = [model(b)[0].numpy() for b in data.batches(batch_size)]
    return (np.concatenate(out) if out
            else np.zeros((0, len(model.config.tasks)), np.float32))


def report(data: WindowDataset, logits: np.ndarray, rows: np.ndarray | None = None) -> dict:
    """Per task and cold-start bucket metrics (``trainer.metrics.evaluate``), over ``rows``
    (a boolean mask; default all); ``logits`` columns in the order of ``data.config.tasks``."""
    rows = np.ones(len(data), bool) if rows is None else rows
    tasks = data.config.tasks
    return evaluate(
        task_labels={t: data.labels[rows, i] for i, t in enumerate(tasks) if t in data.tasks},
        task_label_masks=None,
        task_scores={t: logits[rows, i] for i, t in enumerate(tasks) if t in data.tasks},
        users=data.user_id[rows],
        requests=data.request_id[rows],
        item_age_s=data.item_age_s[rows],
        item_clicks_before=data.item_clicks_before[rows],
    )


def click_auc(metrics: dict, bucket: str = "all") -> float | None:
    return metrics.get("click", {}).get(bucket, {}).get("auc")


def ranker_config(cfg: Config, variant: str | None = None, modal_dim: int = 1664
                  ) -> RankerConfig:
    """The shape of a model trained from scratch: the ``[model]`` section, the variant
    (``trainer.variant`` unless given), ``features.sequence_length`` as ``max_seq_len``,
    ``modal_dim`` (the cached vectors' width) and ``trainer.id_dropout``, which applies to
    ``ppm`` only (see its docstring)."""
    variant = variant or cfg.trainer.variant
    return RankerConfig(
        variant=variant, max_seq_len=cfg.features.sequence_length, modal_dim=modal_dim,
        id_dropout=cfg.trainer.id_dropout if variant == "ppm" else 0.0,
        **cfg.model.model_dump())


def new_model(cfg: Config, variant: str | None = None, modal_dim: int = 1664) -> UnifiedRanker:
    """A freshly initialised model of :func:`ranker_config` (seeded by ``trainer.seed``)."""
    torch.manual_seed(cfg.trainer.seed)
    return UnifiedRanker(ranker_config(cfg, variant, modal_dim))


@dataclass
class StepResult:
    """One incremental step, judged on ``eval_window`` (a window name)."""

    version: Version
    promoted: bool
    candidate: dict
    champion: dict | None
    eval_window: str
    eval_logits: np.ndarray
    """The promoted model's (after the step) logits on the eval window: test-then-train."""
    eval_data: WindowDataset


class IncrementalTrainer:
    """``ppm train --follow`` for one variant; state and versions live in ``registry``.

    Args:
        cfg: configuration (``trainer`` section; data under ``cfg.data_dir``).
        registry: where versions and the champion pointer live (default
            ``cfg.paths.registry(variant)``).
        variant: overrides ``cfg.trainer.variant``.
    """

    def __init__(self, cfg: Config, registry: Registry | None = None,
                 variant: str | None = None):
        self.cfg = cfg
        self.variant = variant or cfg.trainer.variant
        self.registry = registry or Registry(cfg.paths.registry(self.variant))
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        self._modal: tuple[tuple[str, ...], ModalTable] | None = None
        self._champion_cache: tuple[Version, UnifiedRanker] | None = None

    def dataset(self, windows: Sequence[Window | Path], config: RankerConfig | None = None
                ) -> WindowDataset:
        """Samples of ``windows`` (or window files) hashed and padded for ``config`` (the
        model's own config; default: a new model's)."""
        config = config or ranker_config(self.cfg, self.variant, self.modal.dim)
        return WindowDataset(windows, self.modal, config, self.cfg.features.freshness_window_s)

    @property
    def modal(self) -> ModalTable:
        """Cached item vectors, re-read when the item log has new parts (items embedded
        since the last step must be visible)."""
        folder = self.cfg.paths.item_log
        parts = tuple(sorted(p.name for p in folder.glob("part-*.parquet")))
        if self._modal is None or self._modal[0] != parts:
            self._modal = (parts, ModalTable.from_item_log(folder))
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
        names = [w.name for w in windows]
        if done not in names:
            # A source that appeared since (a partition's first writer) can hold the closed
            # windows back behind what was trained on: wait for it. Names sort as times.
            if names and done > names[-1]:
                return None
            raise RuntimeError(f"registry says it trained through {done}, which is not a "
                               f"closed window in {self.cfg.data_dir}")
        i = names.index(done)
        return ([windows[i + 1]], windows[i + 2]) if len(windows) > i + 2 else None

    def step(self, progress: bool = False) -> StepResult | None:
        """Do the next step if its windows are closed; None otherwise."""
        plan = self.next_step()
        if plan is None:
            return None
        train_windows, eval_window = plan
        t = self.cfg.trainer
        held = self._champion()
        if held is None:
            champion, champion_model = None, None
            candidate = new_model(self.cfg, self.variant, self.modal.dim)
            train = self.dataset(train_windows, candidate.config)
            fit(candidate, train, t.initial_epochs, t.batch_size, t.lr, t.weight_decay,
                seed=t.seed, grad_clip=t.grad_clip, progress=progress)
        else:
            champion, champion_model = held
            candidate = copy.deepcopy(champion_model)
            train = self.dataset(train_windows, candidate.config)
            closed = closed_windows(self.cfg.paths.training)
            older = closed[: [w.name for w in closed].index(train_windows[0].name)]
            replay = (self.dataset(older[-t.replay_windows:], candidate.config)
                      if t.replay_share > 0 and older else None)
            fit(candidate, train, t.incremental_epochs, t.batch_size, t.lr, t.weight_decay,
                seed=t.seed + len(closed), extra=replay, extra_share=t.replay_share,
                grad_clip=t.grad_clip, progress=progress)

        holdout = self.dataset([eval_window], candidate.config)
        cand_logits = predict(candidate, holdout)
        cand_metrics = report(holdout, cand_logits)
        champ_metrics, champ_logits = None, None
        if champion_model is not None:
            champ_logits = predict(champion_model, holdout)
            champ_metrics = report(holdout, champ_logits)
        promoted = self._better(cand_metrics, champ_metrics)
        version = self.registry.register(candidate, {
            "variant": self.variant,
            "parent": champion.name if champion else None,
            "trained_on": [w.name for w in train_windows],
            "evaluated_on": eval_window.name,
            "samples": len(train),
            "encoder_version": self.modal.encoder_version,
            "metrics": cand_metrics,
            "champion_metrics": champ_metrics,
            "promoted": promoted,
        })
        if promoted:
            self.registry.promote(version)
            self._champion_cache = (version, candidate)
        self.registry.save_state({"trained_through": train_windows[-1].name,
                                  "last_version": version.name,
                                  "updated_at": datetime.now(UTC).isoformat()})
        return StepResult(version, promoted, cand_metrics, champ_metrics, eval_window.name,
                          cand_logits if promoted or champ_logits is None else champ_logits,
                          holdout)

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


def train_batch(cfg: Config, windows: Sequence[Window | Path], variant: str | None = None,
                epochs: int | None = None, progress: bool = True) -> UnifiedRanker:
    """``ppm train --batch``: one fit over ``windows`` from scratch."""
    trainer = IncrementalTrainer(cfg, variant=variant)
    model = new_model(cfg, trainer.variant, trainer.modal.dim)
    t = cfg.trainer
    fit(model, trainer.dataset(windows, model.config), epochs or t.initial_epochs,
        t.batch_size, t.lr, t.weight_decay, seed=t.seed, grad_clip=t.grad_clip,
        progress=progress)
    return model


def split_windows(cfg: Config, test_share: float) -> tuple[list[Window], list[Window], int]:
    """(train windows, test windows, test start µs): the test period is the last
    ``test_share`` of the time the closed windows span (time, not samples)."""
    if not 0 < test_share < 1:
        raise ValueError(f"test_share must be in (0, 1), got {test_share}")
    windows = closed_windows(cfg.paths.training)
    if not windows:
        return [], [], 0
    first, last = windows[0].start_us, windows[-1].end_us
    test_start = last - int(test_share * (last - first))
    train = [w for w in windows if w.end_us <= test_start]
    test = [w for w in windows if w.start_us >= test_start]
    return train, test, test_start


def evaluate_champions(cfg: Config, variants: Sequence[str],
                       test_share: float) -> tuple[dict, tuple[str, ...]]:
    """``ppm eval``: each variant's champion on the test period.

    Returns ``({variant: report}, buckets)``; besides the buckets of
    ``trainer.metrics.cold_buckets`` a report has ``new_in_test``: items first seen in the
    test period (the cold items of a temporal split)."""
    _, test_windows, test_start = split_windows(cfg, test_share)
    if not test_windows:
        raise SystemExit("no closed windows in the test period")
    reports = {}
    for variant in variants:
        trainer = IncrementalTrainer(cfg, variant=variant)
        champion = trainer.registry.champion()
        if champion is None:
            raise SystemExit(f"no {variant} model yet: run ppm train --batch --variant {variant}")
        model = trainer.registry.load(champion)
        data = trainer.dataset(test_windows, model.config)
        logits = predict(model, data)
        result = report(data, logits)
        first_seen = data.impression_us - np.nan_to_num(data.item_age_s, nan=np.inf) * 1e6
        new = report(data, logits, rows=first_seen >= test_start)
        for task in result:
            result[task]["new_in_test"] = new[task]["all"]
        result["model"] = {"version": champion.name, "test_windows": len(test_windows),
                           "test_start": datetime.fromtimestamp(test_start / 1e6, UTC)
                           .isoformat()}
        reports[variant] = result
    return reports, ("all", "new_in_test", "age<1d", "age1-7d", "age>7d", "no_click_before")


def describe(result: StepResult) -> str:
    c = click_auc(result.candidate)
    o = click_auc(result.champion) if result.champion else None
    verdict = "promoted" if result.promoted else "rejected"
    return json.dumps({"version": result.version.name, "eval_window": result.eval_window,
                       "candidate_click_auc": c, "champion_click_auc": o,
                       "decision": verdict})
