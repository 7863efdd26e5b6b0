"""When a computed item vector becomes readable: the embedding refresh policy.

The stream embeds an item on arrival; a cheaper system embeds new and changed items in a
batch every few hours, or embeds the catalog once and never again. The staleness lab
(:mod:`trainer.staleness`) replays the same samples under each policy: a policy moves each
vector's ``available_us`` in the item table (:meth:`trainer.dataset.ModalTable.available_from`)
and the point-in-time lookup does the rest, in training and scoring alike. Times are event
times (UTC microseconds), as in the windows.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

import numpy as np

from ppm.config import RefreshMode, StalenessConfig

if TYPE_CHECKING:  # the dataset reads the serving cache's replay from here
    from trainer.dataset import ModalTable

MODES: tuple[str, ...] = get_args(RefreshMode)
"""``recorded``: what the stream recorded at each impression (the live system: no policy);
``arrival``: each vector readable ``lag_s`` after its content's time; ``periodic``: ``lag_s``
after the first batch run (a multiple of ``period_s`` since the epoch, UTC) at or after its
content's time; ``catalog_once``: only vectors of content from before ``start_us``,
readable from then on: new items never get one, changed ones keep their old one."""

NEVER = np.iinfo(np.int64).max


UNITS = {"s": 1.0, "min": 60.0, "h": 3_600.0, "d": 86_400.0, "w": 604_800.0}
"""The duration units of policy labels."""


def duration(seconds: float) -> str:
    """``90s``, ``10min``, ``6h``, ``24h``, ``7d``: the largest unit that divides ``seconds``
    (days from two days on, so a daily period reads ``24h``), for labels."""
    if seconds >= 2 * UNITS["d"] and seconds % UNITS["d"] == 0:
        return f"{seconds / UNITS['d']:g}d"
    for unit in ("h", "min"):
        if seconds >= UNITS[unit] and seconds % UNITS[unit] == 0:
            return f"{seconds / UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def parse_duration(text: str) -> float:
    """Seconds of ``90s``, ``10min``, ``6h``, ``7d``, ``2w`` (a bare number: seconds).

    Raises:
        ValueError: anything else.
    """
    text = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min|h|d|w)?", text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (say 90s, 10min, 6h, 7d or 2w)")
    return float(match[1]) * UNITS[match[2] or "s"]


@dataclass(frozen=True)
class EmbeddingRefresh:
    """One embedding refresh policy (see :data:`MODES`)."""

    mode: str = "recorded"
    lag_s: float = 0.0
    """Seconds from an item event to its vector being readable (``arrival``, ``periodic``)."""
    period_s: float = 86_400.0
    """Seconds between batch embedding runs (``periodic``)."""

    @classmethod
    def of(cls, config: StalenessConfig) -> EmbeddingRefresh:
        """The policy the config's ``[staleness]`` section describes."""
        return cls(config.embedding_refresh, config.embedding_lag_s, config.embedding_period_s)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"embedding refresh mode must be one of {MODES}, got {self.mode!r}")
        if self.lag_s < 0 or self.period_s <= 0:
            raise ValueError("lag_s must be >= 0 and period_s > 0")

    @classmethod
    def parse(cls, label: str) -> EmbeddingRefresh:
        """The policy a :attr:`name` describes: ``arrival``, ``arrival+10min``, ``every 6h``,
        ``every 6h+10min``, ``catalog once`` (``recorded``: no policy).

        Raises:
            ValueError: a label of no policy.
        """
        text = " ".join(label.split())
        if text in ("catalog once", "recorded"):
            return cls(text.replace(" ", "_"))
        head, plus, lag = text.partition("+")
        lag_s = parse_duration(lag) if plus else 0.0
        if head == "arrival":
            return cls("arrival", lag_s=lag_s)
        if head.startswith("every "):
            return cls("periodic", lag_s=lag_s, period_s=parse_duration(head[len("every "):]))
        raise ValueError(f"not an embedding refresh policy: {label!r} (say arrival, "
                         "arrival+10min, every 6h, every 6h+10min or catalog once)")

    @property
    def name(self) -> str:
        """A short label: ``arrival``, ``arrival+10min``, ``every 6h``, ``catalog once``."""
        if self.mode == "arrival":
            return "arrival" if not self.lag_s else f"arrival+{duration(self.lag_s)}"
        if self.mode == "periodic":
            return f"every {duration(self.period_s)}" + (f"+{duration(self.lag_s)}"
                                                         if self.lag_s else "")
        return self.mode.replace("_", " ")

    def apply(self, modal: ModalTable, start_us: int) -> ModalTable:
        """``modal`` as a reader under this policy has it; ``start_us``: when the data begin
        (``catalog_once`` embeds the catalog as it was then). ``recorded``: unchanged."""
        if self.mode == "recorded":
            return modal
        content = modal.content_time_us.astype(np.int64)
        lag = int(self.lag_s * 1e6)
        if self.mode == "arrival":
            available = content + lag
        elif self.mode == "periodic":
            period = int(self.period_s * 1e6)
            available = -(-content // period) * period + lag  # the next run, then its lag
        else:  # catalog_once
            available = np.where(content <= start_us, start_us, NEVER)
        return modal.available_from(available)


def cached_reads(keys: Sequence[object] | np.ndarray, at_us: np.ndarray, cache_s: float,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Replay reads through the serving cache (``trainer.serving.ranker.ItemCache``): an
    item read from the store is reused until a moment drawn between half and all of
    ``cache_s`` later, so a reader sees the store as it was at the read that filled the
    entry.

    What it leaves out of the real cache: its size cap (``features.serving_cache_items``,
    least recently fetched first out: a catalog larger than the cap hits less), reads of
    candidates that were never shown (only logged impressions and their users' sequences
    are replayed), and the item's catalog fields (price, category), which samples carry as
    logged; only vectors are read as of the fill.

    Args:
        keys: the item each of N reads is of, (N,).
        at_us: when each read happens, (N,) event time.
        cache_s: the cache's lifetime (``features.serving_cache_s``); 0: no cache.
        seed: of the expiry draws.

    Returns:
        ``(as_of_us, missed)``: per read, the time of the store read whose value it gets
        (N,) int64, and whether it went to the store (N,) bool.
    """
    at_us = np.asarray(at_us, np.int64)
    as_of = at_us.copy()
    missed = np.ones(len(at_us), bool)
    if cache_s <= 0:
        return as_of, missed
    draw = random.Random(seed).uniform
    cache_us = cache_s * 1e6
    entries: dict[object, tuple[int, int]] = {}  # item -> (filled at, expires at)
    keys = keys.tolist() if isinstance(keys, np.ndarray) else keys
    for k in np.argsort(at_us, kind="stable").tolist():
        t = int(at_us[k])
        entry = entries.get(keys[k])
        if entry is not None and entry[1] > t:
            as_of[k], missed[k] = entry[0], False
        else:
            entries[keys[k]] = (t, t + int(cache_us * draw(0.5, 1.0)))
    return as_of, missed
