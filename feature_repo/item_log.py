"""The offline item-feature log: every embedding ever written online, as parquet parts, and
beside them how each encoder version is made (:meth:`ItemLog.record_version`).

One part per micro-batch (never a file per event), written atomically before the online
write it stands for. A replay after a crash may write a batch again: a part's name is a
digest of its rows, so the same batch lands in the same file; batches cut differently can
repeat rows, so readers deduplicate on ``(item_id, encoder_version, content_hash)`` (see
:func:`read_item_log`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feature_repo.online_features import ItemEmbeddingRow
from ppm.atomic_file import write_atomically

SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("encoder_version", pa.string()),
    ("content_hash", pa.string()),
    ("content_time", pa.timestamp("us", tz="UTC")),
    ("arrived_at", pa.timestamp("us", tz="UTC")),
    ("embedded_at", pa.timestamp("us", tz="UTC")),
    ("embedding", pa.list_(pa.float32())),
])
KEY = ["item_id", "encoder_version", "content_hash"]


class ItemLog:
    """Appends :class:`ItemEmbeddingRow` batches under ``folder`` (created if needed)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def record_version(self, provenance: Mapping[str, Any]) -> Path:
        """Write how the vectors of ``provenance["encoder_version"]`` are made
        (:attr:`encoders.item_encoder.ItemEncoder.provenance`) to ``<version>.json`` in
        :func:`versions_folder`; a writer calls it before its first append. Several workers
        may write it at once: each write is atomic, and all describe the same encoder."""
        path = versions_folder(self.folder) / f"{provenance['encoder_version']}.json"
        path.parent.mkdir(exist_ok=True)
        text = json.dumps(provenance, indent=1, sort_keys=True)
        if not (path.is_file() and path.read_text() == text):
            write_atomically(path, text.encode())
        return path

    def append(self, rows: Sequence[ItemEmbeddingRow], arrived_us: Sequence[int]) -> Path | None:
        """Write one part for a batch; returns its path (None for an empty batch)."""
        if not rows:
            return None
        digest = hashlib.sha256()
        for r in rows:
            digest.update(f"{r.item_id}\x00{r.encoder_version}\x00{r.content_hash}\x00"
                          f"{r.content_time_us}\n".encode())
        first = min(r.content_time_us for r in rows)
        path = self.folder / f"part-{first:017d}-{digest.hexdigest()[:16]}.parquet"
        vectors = np.stack([np.asarray(r.embedding, dtype=np.float32) for r in rows])
        table = pa.table(
            {
                "item_id": [r.item_id for r in rows],
                "encoder_version": [r.encoder_version for r in rows],
                "content_hash": [r.content_hash for r in rows],
                "content_time": pa.array([r.content_time_us for r in rows], pa.int64()),
                "arrived_at": pa.array(list(arrived_us), pa.int64()),
                "embedded_at": pa.array([r.embedded_at_us for r in rows], pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(vectors.reshape(-1)), vectors.shape[1]
                ).cast(pa.list_(pa.float32())),
            }
        ).cast(SCHEMA)
        write_atomically(path, lambda fh: pq.write_table(table, fh))
        return path


def versions_folder(folder: Path) -> Path:
    """Where the item log under ``folder`` records its encoder versions: beside the parts'
    folder, not in it, which holds parquet only (Feast's offline source reads it)."""
    folder = Path(folder)
    return folder.parent / f"{folder.name}-versions"


def version_provenance(folder: Path, encoder_version: str) -> dict[str, Any] | None:
    """What :meth:`ItemLog.record_version` recorded for ``encoder_version`` of the item log
    under ``folder``; None for vectors written before versions were recorded."""
    path = versions_folder(folder) / f"{encoder_version}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def newest_version(log: pa.Table) -> str | None:
    """The encoder version of ``log``'s most recent write (a :func:`read_item_log` table);
    None for an empty log. What a reader takes when no version is named."""
    if log.num_rows == 0:
        return None
    return log["encoder_version"][pc.index(log["embedded_at"],
                                           pc.max(log["embedded_at"])).as_py()].as_py()


def read_item_log(folder: Path) -> pa.Table:
    """All parts, one row per (item_id, encoder_version, content_hash): the latest write."""
    parts = sorted(Path(folder).glob("part-*.parquet"))
    if not parts:
        return SCHEMA.empty_table()
    table = pa.concat_tables(pq.read_table(p, schema=SCHEMA) for p in parts)
    table = table.sort_by([("embedded_at", "descending")])
    keys = [f"{a}\x00{b}\x00{c}" for a, b, c in zip(
        *(table[k].to_pylist() for k in KEY), strict=True)]
    seen: set[str] = set()
    keep = [i for i, k in enumerate(keys) if not (k in seen or seen.add(k))]
    return table.take(keep)
