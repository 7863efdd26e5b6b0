"""When a computed item vector becomes readable: the embedding refresh policy.

The stream embeds an item on arrival; a cheaper system embeds new and changed items in a
batch every few hours, or embeds the catalog once and never again. The staleness lab
(:mod:`trainer.staleness`) replays the same samples under each policy: a policy moves each
vector's ``available_us`` in the item table (:meth:`trainer.dataset.ModalTable.available_from`)
and the point-in-time lookup does the rest, in training and scoring alike. Times are event
times (UTC microseconds), as in the windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import numpy as np

from ppm.config import RefreshMode, StalenessConfig
from trainer.dataset import ModalTable

MODES: tuple[str, ...] = get_args(RefreshMode)
"""``recorded``: what the stream recorded at each impression (the live system: no policy);
``arrival``: each vector readable ``lag_s`` after its content's time; ``periodic``: ``lag_s``
after the first batch run (a multiple of ``period_s`` since the epoch, UTC) at or after its
content's time; ``catalog_once``: only vectors of content from before ``start_us``,
readable from then on: new items never get one, changed ones keep their old one."""

NEVER = np.iinfo(np.int64).max


def duration(seconds: float) -> str:
    """``90s``, ``10min``, ``6h``: the largest unit that divides ``seconds``, for labels."""
    for unit, size in (("h", 3600.0), ("min", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


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
