"""PNG figures of experiment results, drawn with matplotlib's Agg backend (no display).

:func:`staleness_plots` draws a ``ppm experiment staleness`` result
(:func:`trainer.staleness.run_staleness`): the click AUC each policy loses to the freshest
one, per bucket, with 95% bootstrap intervals over users. :func:`curves_plot` draws a
training run's curves (:mod:`trainer.curves`; ``ppm train --plot``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # after the backend is chosen
import numpy as np

PLOTTED_BUCKETS = ("all", "new_in_test", "age<1h", "age<1d")
"""The buckets drawn as lines: overall and the cold ones."""


def _lost_plot(path: Path, buckets: Mapping[str, Any], names: Sequence[str], reference: str,
               title: str, xlabel: str) -> Path:
    """Click AUC lost to ``reference`` by each of ``names`` (in order along x), one line
    per bucket, with the difference's interval as error bars."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    x = np.arange(len(names))
    for k, bucket in enumerate(b for b in PLOTTED_BUCKETS if b in buckets):
        lost, low, high = [], [], []
        for name in names:
            loss, ci = auc_lost(buckets[bucket], name, reference)
            if loss is None:
                lost.append(np.nan), low.append(0.0), high.append(0.0)
                continue
            ci = ci or [loss, loss]
            lost.append(loss)
            low.append(max(loss - ci[0], 0.0))
            high.append(max(ci[1] - loss, 0.0))
        shift = (k - 1.5) * 0.06  # side by side, so error bars do not hide each other
        ax.errorbar(x + shift, lost, yerr=[low, high], marker="o", capsize=3,
                    label=f"{bucket} (n={buckets[bucket]['samples']})")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"click AUC lost to {reference}")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def auc_lost(summary: Mapping[str, Any], name: str, reference: str
             ) -> tuple[float | None, list[float] | None]:
    """The click AUC ``name`` lost to ``reference`` in one bucket's
    :func:`trainer.experiment.compare_models` summary, with the 95% interval of that loss:
    ``(0, [0, 0])`` for the reference itself, ``(None, None)`` where it is undefined (the
    reference has no AUC there, or the pair was not compared)."""
    if summary["models"].get(reference, {}).get("auc") is None:  # one class, or no samples
        return None, None
    if name == reference:
        return 0.0, [0.0, 0.0]
    diff = summary["diffs"].get(f"{name}-{reference}", {})
    auc, ci = diff.get("auc"), diff.get("ci95")
    return (None if auc is None else -auc, None if ci is None else [-ci[1], -ci[0]])


def staleness_plots(result: Mapping[str, Any], out: Path) -> list[Path]:
    """Write under ``out`` and return: ``embedding_refresh.png`` (AUC lost vs embedding
    refresh policy), ``model_update.png`` (vs model update policy, when swept),
    ``grid.png`` (a heatmap of both, per bucket, when the sweep ran the grid) and
    ``ops.png`` (AUC lost on the cold bucket vs serving cache and freshness TTL, when
    swept)."""
    seeds = f"{result['period']} period, {result['seeds']} seed(s)"
    paths = [_lost_plot(out / "embedding_refresh.png", result["buckets"],
                        list(result["policies"]), result["reference"],
                        f"AUC lost by embedding refresh policy ({seeds})",
                        "embedding refresh policy (slower to the right)")]
    updates = result.get("updates")
    if updates:
        paths.append(_lost_plot(out / "model_update.png", updates["buckets"],
                                list(updates["policies"]), updates["reference"],
                                f"AUC lost by model update policy ({seeds})",
                                "model update policy (vectors on arrival)"))
    grid = result.get("grid")
    if grid:
        paths.append(_grid_plot(out / "grid.png", grid, seeds))
    ops = result.get("ops")
    if ops:
        paths.append(_ops_plot(out / "ops.png", ops, seeds))
    return paths


def _grid_plot(path: Path, grid: Mapping[str, Any], seeds: str) -> Path:
    shown = [b for b in PLOTTED_BUCKETS if b in grid["buckets"]]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 4.2), dpi=120,
                             squeeze=False)
    for ax, bucket in zip(axes[0], shown, strict=True):
        summary = grid["buckets"][bucket]
        lost = np.array([[np.nan if (v := auc_lost(summary, cell, grid["reference"])[0]) is None
                          else v for cell in cells.values()]
                         for cells in grid["cells"].values()])
        bound = np.nanmax(np.abs(lost)) if np.isfinite(lost).any() else 1.0
        image = ax.imshow(lost, cmap="RdBu_r", vmin=-bound, vmax=bound or 1.0)
        for (i, j), v in np.ndenumerate(lost):
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:+.3f}", ha="center", va="center",
                    fontsize=7)
        ax.set_xticks(range(len(grid["updates"])), grid["updates"], rotation=30, ha="right",
                      fontsize=7)
        ax.set_yticks(range(len(grid["embedding"])), grid["embedding"], fontsize=7)
        ax.set_title(f"{bucket} (n={grid['buckets'][bucket]['samples']})", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.7)
    fig.suptitle(f"AUC lost to {grid['reference']} by embedding refresh (rows) and model "
                 f"update (columns), {seeds}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _ops_plot(path: Path, ops: Mapping[str, Any], seeds: str) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=120)
    for ax, knob in zip(axes, ("serving_cache_s", "freshness_window_s"), strict=True):
        rows = [r for r in ops["rows"] if r["knob"] == knob]
        labels = [r["setting"] for r in rows]
        lost = [np.nan if r["loss_cold"] is None else r["loss_cold"] for r in rows]
        ci = [r["loss_cold_ci95"] or [v, v] for r, v in zip(rows, lost, strict=True)]
        ax.errorbar(range(len(rows)), lost, capsize=3, marker="o",
                    yerr=[[max(v - c[0], 0.0) for v, c in zip(lost, ci, strict=True)],
                          [max(c[1] - v, 0.0) for v, c in zip(lost, ci, strict=True)]])
        ax.axhline(ops["tolerance"], color="red", ls="--", lw=0.8, label="tolerance")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right")
        ax.set_title(knob, fontsize=9)
        ax.set_ylabel(f"AUC lost on {ops['bucket']}")
        ax.legend(fontsize=8)
    fig.suptitle(f"the ops view, {seeds}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def curves_plot(lines: Sequence[Mapping[str, Any]], out: Path) -> Path:
    """Draw training curves (:mod:`trainer.curves` lines of one run or several) to ``out``
    (PNG), against each run's step: the loss of every step with each epoch's mean, each
    task's training loss per epoch, and the click AUC on validation (``--batch``) or on
    each incremental step's next window. Raises ValueError without a step to draw."""
    runs = list(dict.fromkeys(line["run"] for line in lines if line["kind"] == "step"))
    if not runs:
        raise ValueError("no training steps to draw")
    fig, (loss_ax, task_ax, auc_ax) = plt.subplots(1, 3, figsize=(13, 3.8), dpi=120)
    for k, run in enumerate(runs):
        color, label = f"C{k}", run if len(runs) > 1 else None
        mine = [line for line in lines if line["run"] == run]
        steps = [line for line in mine if line["kind"] == "step"]
        loss_ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], color=color,
                     lw=0.6, alpha=0.4)
        epochs = [line for line in mine if line["kind"] == "epoch"]
        loss_ax.plot([e["step"] for e in epochs], [e["train_loss"] for e in epochs], "o-",
                     color=color, ms=3, label=label)
        for j, task in enumerate(epochs[0]["train_task_losses"] if epochs else ()):
            task_ax.plot([e["step"] for e in epochs],
                         [e["train_task_losses"][task] for e in epochs], marker="o", ms=3,
                         ls=("-", "--", ":")[j % 3], color=color,
                         label=task if label is None else f"{task} ({run})")
        for kind, key, marker, what in (("valid", "click_auc", "o-", "validation"),
                                        ("eval", "candidate_click_auc", "s--", "next window")):
            points = [line for line in mine if line["kind"] == kind and line.get(key) is not None]
            if points:
                auc_ax.plot([p["step"] for p in points], [p[key] for p in points], marker,
                            color=color, ms=3,
                            label=what if label is None else f"{what} ({run})")
    for ax, title in ((loss_ax, "loss per step (dots: epoch mean)"),
                      (task_ax, "training loss per task, per epoch"),
                      (auc_ax, "click AUC")):
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
