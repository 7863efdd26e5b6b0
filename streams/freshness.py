"""Freshness: how long a new or changed item waits until its embedding is readable online.

For every embedded item ppm records three times (microseconds since the epoch, UTC):

* ``event_time``: when the catalog changed (the item event's own time);
* ``arrived``: when the event reached the pipeline (wall clock; for a live stream about the
  event time, for a replay the moment the replay handed it over);
* ``readable``: when the online write carrying its vector returned (wall clock).

The *lag* is ``readable - arrived``: batching wait, image fetch, encoding and the store write.
Event time is kept too, so a live deployment can also read ``readable - event_time``, which
adds the time the event spent upstream (in Kafka, in the catalog service).
"""

from __future__ import annotations

from collections.abc import Sequence
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


class FreshnessStats:
    """Per-item freshness records, with percentiles of the arrival-to-readable lag."""

    def __init__(self) -> None:
        self._rows: dict[str, list] = {name: [] for name in SCHEMA.names}

    def record(self, item_ids: Sequence[str], event_us: Sequence[int],
               arrived_us: Sequence[int], readable_us: int) -> list[float]:
        """Record one written batch; returns its lags in milliseconds."""
        self._rows["item_id"].extend(item_ids)
        self._rows["event_time"].extend(event_us)
        self._rows["arrived"].extend(arrived_us)
        self._rows["readable"].extend([readable_us] * len(item_ids))
        return [(readable_us - a) / 1000 for a in arrived_us]

    @property
    def count(self) -> int:
        return len(self._rows["item_id"])

    def percentiles(self) -> dict[str, float | None]:
        """``{"p50_ms", "p95_ms", "p99_ms", "max_ms"}`` of the lag; None when empty."""
        if not self.count:
            return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
        lags = (np.asarray(self._rows["readable"]) - np.asarray(self._rows["arrived"])) / 1000
        p50, p95, p99 = np.percentile(lags, [50, 95, 99])
        return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99),
                "max_ms": float(lags.max())}

    def to_table(self) -> pa.Table:
        return pa.table({k: pa.array(v, pa.int64()) if k != "item_id" else v
                         for k, v in self._rows.items()}).cast(SCHEMA)

    def save(self, path: Path) -> None:
        """Write every record to ``path`` (parquet), atomically."""
        table = self.to_table()
        write_atomically(path, lambda fh: pq.write_table(table, fh))

    @classmethod
    def read(cls, path: Path) -> FreshnessStats:
        """The records saved at ``path`` by :meth:`save`; empty when there is no file."""
        stats = cls()
        if Path(path).exists():
            table = pq.read_table(path).cast(SCHEMA)
            stats._rows = {name: table.column(name).to_pylist() for name in SCHEMA.names}
            for name in ("event_time", "arrived", "readable"):
                stats._rows[name] = table.column(name).cast(pa.int64()).to_pylist()
        return stats

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self._rows.items()}

    def load_state_dict(self, state: dict) -> None:
        self._rows = {name: list(state[name]) for name in SCHEMA.names}


def read_freshness(data_dir: Path) -> FreshnessStats:
    """Every writer's records under ``data_dir`` as one :class:`FreshnessStats`: the local
    runner's ``freshness.parquet`` and each Faust worker's ``freshness/<worker>.parquet``
    (empty when there is none)."""
    paths = DataDir(Path(data_dir))
    union = FreshnessStats()
    for path in (paths.freshness, *sorted(paths.freshness_dir.glob("*.parquet"))):
        part = FreshnessStats.read(path)
        for name, values in part._rows.items():
            union._rows[name].extend(values)
    return union
