"""A frozen plug-in's per-item outputs, computed once per item and stored for serving.

A ``ppm`` model whose PPM module was plugged in and frozen (``ppm train --batch --plug-in V
--freeze-plugin``) maps each item's raw vector (1,664 floats) through a projection that
never changes again (``PPMModule.project``). So the projection is computed once per item and
projection version (``trainer.train.projection_key``) and written to the online store's
``item_projection`` view: a server of that model reads d_model floats per item instead of
the raw vector (``Ranker.build_batch``), and projects in-process only the items embedded
since (whose stored projection is missing or of older content), writing those back so the
next request reads them. ``ppm train --freeze-plugin`` writes them before it promotes such a
model; ``ppm project`` writes every item's again (after a backfill, say).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from feature_repo.online_features import ItemEmbeddingRow, OnlineFeatures
from trainer.model import UnifiedRanker


def projection_of(meta: dict) -> str | None:
    """The projection version a model's registry ``meta`` names: its plug-in's, when the
    plug-in is frozen (``trainer.train.plug_in``); else None (the model reads raw vectors)."""
    return (meta.get("plug_in") or {}).get("projection")


def project_items(store: OnlineFeatures, model: UnifiedRanker, encoder_version: str,
                  projection: str, item_ids: Sequence[str], batch_size: int = 512) -> int:
    """Read the raw vectors (of ``encoder_version``) of ``item_ids``, project them with
    ``model``'s plug-in and write the outputs under ``projection``, with the raw vector's
    meta (version, content hash and time), so a reader can tell a projection of content
    the item no longer has. Returns how many were written (items without a vector of that
    version are skipped)."""
    written = 0
    for start in range(0, len(item_ids), batch_size):
        stored = store.fetch_items(list(item_ids[start:start + batch_size]), True,
                                   encoder_version)
        usable = [(i, s) for i, s in stored.items()
                  if s.embedding is not None and s.state.encoder_version == encoder_version]
        if not usable:
            continue
        with torch.inference_mode():
            out = model.ppm.project(torch.from_numpy(np.stack([s.embedding for _, s in usable])))
        store.write_projections([
            ItemEmbeddingRow(i, out[k].numpy(), s.state.encoder_version, s.state.content_hash,
                             s.state.content_time_us, s.embedded_at_us)
            for k, (i, s) in enumerate(usable)], projection)
        written += len(usable)
    return written


def project_catalog(store: OnlineFeatures, model: UnifiedRanker, meta: dict,
                    item_log: Path) -> int:
    """:func:`project_items` for every item the offline item log holds a vector of the
    model's encoder version for; ``meta`` is the model's registry meta (its
    ``plug_in.projection`` names the version written). 0 for a model without one."""
    from feature_repo.item_log import read_item_log

    projection = projection_of(meta)
    version = meta.get("encoder_version")
    if not projection or not version:
        return 0
    log = read_item_log(item_log)
    ids = sorted({i for i, v in zip(log["item_id"].to_pylist(),
                                    log["encoder_version"].to_pylist(), strict=True)
                  if v == version})
    return project_items(store, model, version, projection, ids)
