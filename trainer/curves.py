"""Training curves: what each optimisation step and epoch of a training run measured, as
JSON lines appended to the registry's ``curves.jsonl`` (``Registry.curves_path``).

One file per registry (variant) holds every run trained into it; each line names its
``run`` (``<variant>-<UTC start>-<pid>``) and ``kind``:

* ``step``: one optimiser step: ``fit`` (1-based, the fits of a run: windows or tuned
  values), ``epoch`` (1-based, within the fit), ``step`` (counts up over the whole run),
  ``loss`` (the step's weighted multitask loss), ``lr``, ``samples``, ``samples_per_s``;
* ``epoch``: the end of an epoch: ``train_loss`` (the mean of its steps) and
  ``train_task_losses`` (``{task: mean BCE over present labels}``), ``seconds``;
* ``valid``: the fit's validation after an epoch (``click_auc``), where there is one;
* ``restart``: a batch fit's restart begins (``restart``, 0-based, and its ``seed``;
  ``trainer.restarts`` above 1 only): the ``epoch`` of the lines after it counts again
  from 1;
* ``eval``: an incremental step's decision on its next window (``window``,
  ``candidate_click_auc``, ``champion_click_auc``, ``promoted``);
* ``version``: the registered version a fit became (``version``, ``promoted``).

Every line also has ``time`` (UTC, ISO). A line is written with one ``write`` to a file
opened for appending, so trainers sharing a registry do not tear each other's lines.
:func:`trainer.plots.curves_plot` draws them.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class CurveLog:
    """Appends one training run's lines to ``path`` (created with its folder if needed).

    Args:
        path: the registry's ``curves.jsonl``.
        run: the run's name in every line (default ``<variant>-<UTC start>-<pid>``).
        variant: the model variant, in the default run name and every line.
    """

    def __init__(self, path: Path, variant: str, run: str | None = None):
        self.path = Path(path)
        self.variant = variant
        self.run = run or f"{variant}-{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}-{os.getpid()}"
        self.fit = 0
        """The fit being logged (1-based; 0 before the first)."""
        self.step = 0
        """Steps logged so far in this run, over all its fits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def begin_fit(self, **fields: Any) -> None:
        """A new fit starts (a window step, a tuned value); ``fields`` describe it."""
        self.fit += 1
        self.write("fit", **fields)

    def log_step(self, **fields: Any) -> None:
        """One optimiser step (``step`` and ``fit`` are added)."""
        self.step += 1
        self.write("step", step=self.step, **fields)

    def write(self, kind: str, **fields: Any) -> None:
        """Append one line of ``kind`` with ``fields`` (NaN written as null)."""
        line = {"run": self.run, "variant": self.variant, "kind": kind, "fit": self.fit,
                **{k: _plain(v) for k, v in fields.items()},
                "time": datetime.now(UTC).isoformat()}
        data = (json.dumps(line, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and value != value:  # NaN: JSON has none
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def read_curves(path: Path, runs: set[str] | None = None) -> list[dict[str, Any]]:
    """The lines of ``path`` (of ``runs`` only, when given), in file order; a last line
    still being written is skipped."""
    out = []
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            line = json.loads(raw)
            if runs is None or line["run"] in runs:
                out.append(line)
    return out
