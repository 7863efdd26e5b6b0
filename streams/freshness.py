"""Freshness lag: how long a new or changed item waits until its embedding is readable online.

The lag of one item is *readable time - arrival time*, both on the wall clock: arrival is
when the event reached the pipeline (for a live stream, about its event time; for a replay,
when the replay handed it over), readable is when the online write that carries its vector
returned. It covers batching wait, image fetch, encoding and the store write.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class FreshnessStats:
    """Collects lags (milliseconds) and reports percentiles."""

    def __init__(self) -> None:
        self._lags_ms: list[float] = []

    def record(self, lags_ms: Iterable[float]) -> None:
        self._lags_ms.extend(float(x) for x in lags_ms)

    @property
    def count(self) -> int:
        return len(self._lags_ms)

    def percentiles(self) -> dict[str, float | None]:
        """``{"p50_ms", "p95_ms", "p99_ms", "max_ms"}``; None when nothing was recorded."""
        if not self._lags_ms:
            return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
        lags = np.asarray(self._lags_ms)
        p50, p95, p99 = np.percentile(lags, [50, 95, 99])
        return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99),
                "max_ms": float(lags.max())}

    def state_dict(self) -> dict:
        return {"lags_ms": list(self._lags_ms)}

    def load_state_dict(self, state: dict) -> None:
        self._lags_ms = list(state["lags_ms"])
