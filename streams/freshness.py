"""Freshness: how long a new or changed item waits until its embedding is readable online.

For every embedded item ppm knows three times (microseconds since the epoch, UTC):

* ``event_time``: when the catalog changed (the item event's own time);
* ``arrived``: when the event reached the pipeline (wall clock; for a live stream about the
  event time, for a replay the moment the replay handed it over);
* ``readable``: when the online write carrying its vector returned (wall clock).

The *lag* is ``readable - arrived``: batching wait, image fetch, encoding and the store write.

:class:`FreshnessStats` keeps the lags as a fixed-bucket histogram, so its memory and its
file stay the same size however many items go by (a few kilobytes of JSON). Bucket ``0``
holds lags under 1 ms (and negative ones, from clock steps); bucket ``k`` holds
``[2**((k-1)/4), 2**(k/4))`` ms, up to about 6 days; the last bucket holds the rest. A
percentile is estimated as the geometric middle of the bucket the order statistic falls in
(clipped to the exact minimum and maximum), so it is within one bucket, i.e. about 19%, of
the true value. Count, sum, minimum and maximum are exact.

The per-item records (``item_id`` and the three times) are kept for research only when
asked (``keep_items``), and then only until :meth:`FreshnessStats.write_items_part`
appends them to their folder as a new parquet part: nothing is ever rewritten.
:func:`read_freshness_items` reads every part; ``readable - event_time`` there adds the
time an event spent upstream (in Kafka, in the catalog service).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ppm.atomic_file import write_atomically
from ppm.data_dir import DataDir

SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("event_time", pa.timestamp("us", tz="UTC")),
    ("arrived", pa.timestamp("us", tz="UTC")),
    ("readable", pa.timestamp("us", tz="UTC")),
])

BUCKETS_PER_DOUBLING = 4
"""Resolution of the histogram: bucket edges grow by ``2 ** (1/4)`` (about 19%)."""
BUCKET_COUNT = 1 + 29 * BUCKETS_PER_DOUBLING + 1
"""Under 1 ms, then 1 ms to 2**29 ms (about 6 days) in quarter doublings, then the rest."""


def buckets_of(lags_ms: np.ndarray) -> np.ndarray:
    """The histogram bucket of each lag in milliseconds (see the module docstring)."""
    lags_ms = np.asarray(lags_ms, dtype=np.float64)
    under = ~(lags_ms >= 1.0)  # also NaN
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.log2(np.where(under, 1.0, lags_ms)) * BUCKETS_PER_DOUBLING
    buckets = np.minimum(BUCKET_COUNT - 1, 1 + np.floor(scaled)).astype(np.int64)
    return np.where(under, 0, buckets)


def bucket_of(lag_ms: float) -> int:
    """The histogram bucket of one lag in milliseconds (:func:`buckets_of`)."""
    return int(buckets_of(np.array([lag_ms]))[0])


def bucket_bounds(bucket: int) -> tuple[float, float]:
    """``[low, high)`` in milliseconds of a bucket (the first starts at 0, the last ends
    at infinity)."""
    low = 0.0 if bucket == 0 else 2 ** ((bucket - 1) / BUCKETS_PER_DOUBLING)
    high = math.inf if bucket == BUCKET_COUNT - 1 else 2 ** (bucket / BUCKETS_PER_DOUBLING)
    return low, high


class FreshnessStats:
    """The arrival-to-readable lags of the items one writer made readable, as a histogram
    in constant memory, with estimated percentiles.

    Args:
        keep_items: also keep each item's record until :meth:`write_items_part` appends
            it to a parquet part (for research: ``bench/freshness.py`` reads them).
    """

    def __init__(self, keep_items: bool = False) -> None:
        self.counts = [0] * BUCKET_COUNT
        self.count = 0
        self.sum_ms = 0.0
        self.min_ms: float | None = None
        self.max_ms: float | None = None
        self.keep_items = keep_items
        self.parts_written = 0
        """Parts :meth:`write_items_part` wrote so far: the next part's number."""
        self._items: dict[str, list] = {name: [] for name in SCHEMA.names}
        # The worker saves from one thread while the embedder records from another.
        self._lock = threading.Lock()

    def record(self, item_ids: Sequence[str], event_us: Sequence[int],
               arrived_us: Sequence[int], readable_us: int) -> None:
        """Record one written batch."""
        lags = [(readable_us - a) / 1000 for a in arrived_us]
        with self._lock:
            self._add(lags)
            if self.keep_items:
                self._items["item_id"].extend(item_ids)
                self._items["event_time"].extend(event_us)
                self._items["arrived"].extend(arrived_us)
                self._items["readable"].extend([readable_us] * len(item_ids))

    def add(self, lags_ms: Iterable[float]) -> None:
        """Count lags (milliseconds) without item records."""
        with self._lock:
            self._add(lags_ms)

    def _add(self, lags_ms: Iterable[float]) -> None:
        lags = np.fromiter(lags_ms, dtype=np.float64)
        if not lags.size:
            return
        added = np.bincount(buckets_of(lags), minlength=BUCKET_COUNT)
        for bucket in np.flatnonzero(added):
            self.counts[bucket] += int(added[bucket])
        self.count += int(lags.size)
        self.sum_ms += float(lags.sum())
        low, high = float(lags.min()), float(lags.max())
        self.min_ms = low if self.min_ms is None else min(self.min_ms, low)
        self.max_ms = high if self.max_ms is None else max(self.max_ms, high)

    def quantile(self, q: float) -> float | None:
        """Estimated ``q``-quantile (0..1) of the lag in ms, within one bucket of the order
        statistic at rank ``q * (count - 1)``; None when empty."""
        if not self.count:
            return None
        rank = math.floor(q * (self.count - 1))
        bucket, seen = 0, self.counts[0]
        while seen <= rank:
            bucket += 1
            seen += self.counts[bucket]
        low, high = bucket_bounds(bucket)
        middle = (math.sqrt(low * high) if low > 0 and math.isfinite(high)
                  else (high / 2 if low == 0 else low))
        return min(max(middle, self.min_ms), self.max_ms)  # type: ignore[type-var]

    def percentiles(self) -> dict[str, float | None]:
        """``{"p50_ms", "p95_ms", "p99_ms", "max_ms"}`` of the lag (estimated within one
        bucket, the maximum exact); None when empty."""
        return {"p50_ms": self.quantile(0.50), "p95_ms": self.quantile(0.95),
                "p99_ms": self.quantile(0.99), "max_ms": self.max_ms}

    def summary(self) -> dict:
        """What ``ppm status`` shows: ``items``, mean and :meth:`percentiles`."""
        return {"items": self.count,
                "mean_ms": self.sum_ms / self.count if self.count else None,
                **self.percentiles()}

    def cumulative_seconds(self) -> tuple[list[tuple[float, int]], int, float]:
        """``([(le_s, lags below le_s)], count, sum_s)`` at every doubling from 1 ms to the
        last bucket's start (exact: those are bucket edges), then ``inf``: the histogram as
        Prometheus exposes it (``streams.worker_metrics``)."""
        with self._lock:
            counts, count, sum_ms = list(self.counts), self.count, self.sum_ms
        out, running = [], 0
        for bucket, n in enumerate(counts[:-1]):
            running += n
            if bucket % BUCKETS_PER_DOUBLING == 0:  # bucket k ends at 2**(k/4) ms
                out.append((2 ** (bucket // BUCKETS_PER_DOUBLING) / 1000, running))
        return [*out, (math.inf, count)], count, sum_ms / 1000

    def merge(self, other: FreshnessStats) -> None:
        """Add another writer's histogram to this one (item records are not merged)."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.count += other.count
        self.sum_ms += other.sum_ms
        for name, pick in (("min_ms", min), ("max_ms", max)):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, theirs if mine is None else
                    mine if theirs is None else pick(mine, theirs))

    # ------------------------------------------------------------------ files

    def state_dict(self) -> dict:
        """The histogram as JSON-ready data (what :meth:`save` writes; the local runner's
        checkpoint holds it). Buckets are listed sparsely: ``{"<bucket>": count}``."""
        with self._lock:
            return self._state()

    def _state(self) -> dict:
        return {"version": 2, "buckets_per_doubling": BUCKETS_PER_DOUBLING,
                "counts": {str(b): n for b, n in enumerate(self.counts) if n},
                "count": self.count, "sum_ms": self.sum_ms, "min_ms": self.min_ms,
                "max_ms": self.max_ms, "parts_written": self.parts_written}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 2 or state.get("buckets_per_doubling") != (
                BUCKETS_PER_DOUBLING):
            raise ValueError("freshness figures of another ppm version")
        self.counts = [0] * BUCKET_COUNT
        for bucket, n in state["counts"].items():
            self.counts[int(bucket)] = n
        self.count, self.sum_ms = state["count"], state["sum_ms"]
        self.min_ms, self.max_ms = state["min_ms"], state["max_ms"]
        self.parts_written = state.get("parts_written", 0)
        self._items = {name: [] for name in SCHEMA.names}

    def save(self, path: Path) -> None:
        """Write the histogram to ``path`` (JSON, a few KB), atomically."""
        write_atomically(Path(path), json.dumps(self.state_dict()).encode())

    @classmethod
    def read(cls, path: Path) -> FreshnessStats:
        """The histogram saved at ``path`` by :meth:`save`; empty when there is no file."""
        stats = cls()
        if Path(path).exists():
            stats.load_state_dict(json.loads(Path(path).read_bytes()))
        return stats

    @property
    def pending_items(self) -> int:
        """Item records not yet written to a part."""
        return len(self._items["item_id"])

    def write_items_part(self, folder: Path) -> Path | None:
        """Append the item records kept since the last call to ``folder`` as a new part
        (``part-<n>.parquet``, atomically) and forget them; None when there were none.

        The part's number is :attr:`parts_written`, which a checkpoint restores: a part
        written after the last checkpoint is overwritten by the replay, never doubled."""
        with self._lock:
            if not self.pending_items:
                return None
            items, self._items = self._items, {name: [] for name in SCHEMA.names}
            part = self.parts_written
            self.parts_written += 1
        table = pa.table({k: pa.array(v, pa.int64()) if k != "item_id" else v
                          for k, v in items.items()}).cast(SCHEMA)
        path = Path(folder) / f"part-{part:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda fh: pq.write_table(table, fh))
        return path


def read_freshness_by_writer(data_dir: Path) -> dict[str, FreshnessStats]:
    """Each writer's histogram under ``data_dir``: ``"local"`` for the local runner's
    ``freshness.json``, the worker's name for each Faust worker's
    ``freshness/<worker>.json``; only files that exist."""
    paths = DataDir(Path(data_dir))
    found = {"local": paths.freshness} if paths.freshness.exists() else {}
    found.update({p.stem: p for p in sorted(paths.freshness_dir.glob("*.json"))})
    return {name: FreshnessStats.read(path) for name, path in found.items()}


def read_freshness(data_dir: Path) -> FreshnessStats:
    """Every writer's histogram under ``data_dir`` merged into one (empty when there is
    none): the local runner's and each Faust worker's."""
    union = FreshnessStats()
    for stats in read_freshness_by_writer(data_dir).values():
        union.merge(stats)
    return union


def read_freshness_items(data_dir: Path) -> pa.Table:
    """Every writer's per-item records under ``data_dir`` (:data:`SCHEMA`), from the parts
    in ``freshness-items/<writer>/``; an empty table when there is none."""
    parts = sorted(DataDir(Path(data_dir)).freshness_items.glob("*/part-*.parquet"))
    if not parts:
        return SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(p).cast(SCHEMA) for p in parts)
