"""The feature repo as Feast's own CLI reads it: ``feast -c feature_repo plan|apply|serve|ui``.

Feast collects the objects a repo's modules define at module level. These are the objects
ppm registers, built by the same function (``feature_definitions``, so the two cannot
drift), for the data dir ``PPM__DATA_DIR`` names, the variable ppm's configuration reads
and ``feature_store.yaml`` puts the registry and the online store under::

    export PPM__DATA_DIR=$PWD/ppm-data
    feast -c feature_repo plan      # then apply, serve, ui: the same stores ppm uses

``PPM__DATA_DIR`` must be set and absolute here, although ppm defaults it to ``ppm-data``:
Feast expands ``${VAR}`` in ``feature_store.yaml`` with ``os.path.expandvars`` (no
defaults; an unset variable stays as written) and works inside ``feature_repo/``, where a
relative path names another folder than the one ppm uses. ppm never imports this module;
``.feastignore`` keeps Feast from importing the package's other modules, which define no
Feast objects at module level.
"""

from __future__ import annotations

import os
from pathlib import Path

from feature_repo.feature_definitions import DATA_DIR_ENV, feature_definitions
from ppm.data_dir import DataDir


def data_dir_from_env() -> Path:
    """ppm's data dir as ``PPM__DATA_DIR`` names it; a clear error when unset or relative."""
    value = os.environ.get(DATA_DIR_ENV, "")
    if not value or not Path(value).is_absolute():
        raise RuntimeError(
            f"Feast's CLI on feature_repo/ needs {DATA_DIR_ENV}, ppm's data dir as an absolute "
            f"path (it is {value or 'unset'}), e.g. export {DATA_DIR_ENV}=$PWD/ppm-data")
    data_dir = Path(value)
    if not data_dir.is_dir():
        raise RuntimeError(f"{DATA_DIR_ENV}={value} is not a folder: ppm creates its data dir "
                           f"on its first run (or mkdir it to start with Feast)")
    DataDir(data_dir).feast_repo.mkdir(exist_ok=True)  # the yaml's stores live in it
    return data_dir


_repo = feature_definitions(data_dir_from_env())

# A catalog item, keyed by the catalog's own id.
item = _repo.item

# An item's vector of one encoder version: several versions live side by side during a
# backfill.
item_version = _repo.item_version

# A shopper, keyed by the front end's user id.
user = _repo.user

# Item vectors, pushed by the item embedder; offline: the item log under the data dir.
item_embedding_push = _repo.item_embedding_push

# Item ID features and tombstones, pushed by the item embedder.
item_profile_push = _repo.item_profile_push

# User sequences, pushed by the sequence builder.
user_sequence_push = _repo.user_sequence_push

# The newest vector of each item, whatever its encoder version.
item_embedding = _repo.item_embedding

# The vectors keyed by (item, encoder version).
item_embedding_by_version = _repo.item_embedding_by_version

# A frozen PPM plug-in's per-item output, keyed by (item, projection version).
item_projection = _repo.item_projection

# ID features of an item and the time of its newest event.
item_profile = _repo.item_profile

# The last K interactions of a user, oldest first.
user_sequence = _repo.user_sequence

# What the online ranker reads per request.
ranker = _repo.ranker
