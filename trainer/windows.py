"""Which training windows are closed, over every writer of the training log.

One local runner and any number of Faust workers (a writer per Kafka partition) each record
windows in their own folder (``streams/training_log.py`` owns the manifest format); a
:class:`Window` is the union of their files for one start, and :func:`closed_windows` lists
those complete for readers. No torch here: ``ppm status`` reads it too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ppm.data_dir import training_logs

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Window:
    """One closed event-time window of the training log, over every source that recorded it.

    A *source* is one writer's ``windows/manifest.json`` under the training folder: the
    local runner's ``windows/``, or a Faust worker's ``partition-<p>/windows/`` (one writer
    per Kafka partition). Every source names a window's file after its start, so the
    sources' files of one window share :attr:`name`.
    """

    name: str
    """The window's file name, e.g. ``20260101T000000Z.parquet``: the trainer's key for it
    (registry state ``trained_through``, version meta ``trained_on``)."""
    start_us: int
    """Start (inclusive), microseconds since the epoch, UTC."""
    end_us: int
    """End (exclusive), microseconds since the epoch, UTC."""
    files: tuple[Path, ...]
    """One parquet file per source that recorded the window (a source that started later
    has none): the local runner's first, then partitions by number."""
    samples: int
    """Rows over all of :attr:`files`."""


def window_sources(training_dir: Path) -> dict[str, list[Window]]:
    """Every source's recorded windows, oldest first, each with its one file.

    Keyed by the source's folder relative to ``training_dir`` (``"windows"``,
    ``"partition-3/windows"``): the local runner's first, then partitions by number
    (:func:`ppm.data_dir.training_logs`). A source is a manifest that exists; a folder
    ``partition-<p>`` whose ``<p>`` is not an integer is not one.
    """
    root = Path(training_dir)
    sources: dict[str, list[Window]] = {}
    for log in training_logs(root):
        if not log.manifest.exists():
            continue
        windows = [Window(Path(e["path"]).name, _micros(e["start"]), _micros(e["end"]),
                          (log.windows / e["path"],), e["samples"])
                   for e in json.loads(log.manifest.read_text())]
        sources[log.windows.relative_to(root).as_posix()] = sorted(
            windows, key=lambda w: w.start_us)
    return sources


def closed_windows(training_dir: Path) -> list[Window]:
    """The windows closed for readers under ``training_dir``, oldest first; each is the
    union of its sources' files, and its ``samples`` their sum.

    A window is closed once *every* source has recorded it or a later window: a source
    closes windows in order and never writes a recorded one again, so nothing more for it
    can come. A source without the window (it started later) adds no file. So the union ends
    at the earliest of the sources' last windows: a partition that falls behind holds
    training back, and a source with an empty manifest holds back everything.

    Raises:
        ValueError: two sources give one start different ends or file names (they were
            written with different window sizes).
    """
    sources = window_sources(training_dir)
    if not sources or not all(sources.values()):
        return []
    through = min(windows[-1].start_us for windows in sources.values())
    by_start: dict[int, list[Window]] = {}
    for windows in sources.values():
        for window in windows:
            if window.start_us <= through:
                by_start.setdefault(window.start_us, []).append(window)
    union = []
    for start in sorted(by_start):
        parts = by_start[start]
        first = parts[0]
        if any((p.name, p.end_us) != (first.name, first.end_us) for p in parts):
            raise ValueError(f"training sources disagree on the window starting {first.name}: "
                             + ", ".join(f"{p.files[0]} ends {p.end_us}" for p in parts))
        union.append(Window(first.name, start, first.end_us,
                            tuple(f for p in parts for f in p.files),
                            sum(p.samples for p in parts)))
    return union


def window_files(training_dir: Path) -> list[Path]:
    """The files of :func:`closed_windows`, oldest window first."""
    return files_of(closed_windows(training_dir))


def files_of(windows: Sequence[Window | Path]) -> list[Path]:
    """The parquet files of ``windows`` in order; a Path stands for itself."""
    return [f for w in windows for f in (w.files if isinstance(w, Window) else (w,))]


def _micros(text: str) -> int:
    """Microseconds since the epoch of an ISO-8601 time (naive means UTC), exactly."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1)


