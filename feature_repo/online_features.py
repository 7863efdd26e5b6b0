"""ppm's view of the Feast feature store: batched writes, batched reads, freshness checks.

Every processor writes through :class:`OnlineFeatures`, whatever the online store behind
Feast (SQLite for the embedded default, Redis for the distributed path), so there is one
write path and one read path. Two things Feast does not do are done here:

* **Freshness.** Feast does not apply a FeatureView's ttl on online reads
  (feast-dev/feast#6821). :meth:`OnlineFeatures.read_items` marks an embedding *stale* when
  the item is deleted or not embedded yet, when it came from another encoder version, or
  when the item event it was computed from is older than ``features.freshness_window_s`` (if
  set) at the reader's clock; the ranker treats stale as missing.
* **Order.** SQLite lets the last write win even for an older event; Redis ignores an older
  or equal timestamp. The processors guard every write with the item's ``updated_us`` so
  both stores end up with the same, newest value (see ``streams.item_embedder``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from feast import FeatureStore
from feast.repo_config import RepoConfig

from feature_repo.feature_definitions import (
    DATA_DIR_ENV,
    ITEM_EMBEDDING_BY_VERSION_VIEW,
    ITEM_EMBEDDING_VIEW,
    ITEM_PROFILE_VIEW,
    ITEM_PROJECTION_VIEW,
    META_PACKED,
    PROFILE_PACKED,
    PROJECTION_PACKED,
    USER_SEQUENCE_VIEW,
    FeatureDefinitions,
    embedding_key,
    feature_definitions,
)
from feature_repo.online_reader import OnlineReader
from ppm.clock import now_us
from ppm.config import Config, OnlineReads
from ppm.records import ItemState, UserSequence

PROFILE_FIELDS = ("category", "brand", "shop", "price_bucket", "first_seen_us", "updated_us",
                  "deleted")
EMBEDDING_META = ("encoder_version", "content_hash", "content_time_us", "embedded_at_us")
SEQUENCE_FIELDS = ("seq_item_ids", "seq_actions", "seq_times_us", "updated_us")
PACKED = {
    ITEM_PROFILE_VIEW: (PROFILE_PACKED, PROFILE_FIELDS),
    ITEM_EMBEDDING_VIEW: (META_PACKED, EMBEDDING_META),
    ITEM_EMBEDDING_BY_VERSION_VIEW: (META_PACKED, EMBEDDING_META),
    ITEM_PROJECTION_VIEW: (PROJECTION_PACKED, (*EMBEDDING_META, "embedding")),
}
"""View -> its packed field and the typed fields that holds, in order (``embedding``
last, as float32 bytes after a newline; the rest a JSON list)."""


def _pack(values: Sequence[Any], vector: np.ndarray | None = None) -> bytes:
    """Fields as one stored value: a JSON list (numpy scalars as Python ones), and with
    ``vector`` a newline and its float32 bytes (compact JSON holds no raw newline)."""
    head = json.dumps([v.item() if isinstance(v, np.generic) else v for v in values],
                      separators=(",", ":")).encode()
    return head if vector is None else head + b"\n" + np.asarray(vector, "<f4").tobytes()


def _unpack(blobs: Sequence[bytes | None], with_vector: bool) -> list[list | None]:
    """:func:`_pack`'s values back, one list per blob (None for None); with
    ``with_vector`` the vector last, a float32 array."""
    if with_vector:
        split = [None if b is None else b.partition(b"\n") for b in blobs]
        heads = [None if p is None else p[0] for p in split]
    else:
        split, heads = None, blobs
    # One parse per field and read, not one per key.
    values = json.loads(b"[" + b",".join(b"null" if h is None else h for h in heads) + b"]")
    if split is not None:
        for v, p in zip(values, split, strict=True):
            if v is not None:
                v.append(np.frombuffer(p[2], "<f4").astype(np.float32))
    return values


REDIS_URL_ENV = "PPM__REDIS__URL"
"""The variable (``redis.url``) a store yaml names where Feast wants a Redis connection
string."""

_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def store_yaml(cfg: Config) -> Path:
    """The Feast settings file ``cfg`` uses: ``features.store_yaml``; unset, the packaged
    ``feature_store.redis.yaml`` when ``redis.url`` is set, else ``feature_store.yaml``."""
    if cfg.features.store_yaml is not None:
        return Path(cfg.features.store_yaml)
    name = "feature_store.yaml" if cfg.redis.url is None else "feature_store.redis.yaml"
    return Path(str(resources.files("feature_repo") / name))


def store_config(cfg: Config) -> RepoConfig:
    """Feast's settings for ``cfg``, built here from :func:`store_yaml` rather than read by
    Feast from a folder.

    The same yaml serves Feast's own CLI (``feast -c feature_repo plan``, with the
    definitions of ``feature_repo/repo.py``), which expands ``${VAR}`` from the environment.
    ppm fills the variables itself instead (:func:`resolved_store_settings`). Relative paths
    resolve under ``DATA_DIR/feast/`` (the registry and the SQLite store of the default live
    there, named by ``${PPM__DATA_DIR}``).

    Nothing is written into the data dir: ``DATA_DIR/feast/`` holds no
    ``feature_store.yaml``, so ``feast apply`` run there fails instead of applying an empty
    repo (which would delete every view).
    """
    config = RepoConfig(**resolved_store_settings(cfg))
    config.repo_path = Path(cfg.paths.feast_repo).resolve()
    return config


def resolved_store_settings(cfg: Config) -> dict[str, Any]:
    """:func:`store_yaml`, parsed, with its variables filled: ``${PPM__DATA_DIR}`` with
    ``cfg.data_dir`` (absolute), ``${PPM__REDIS__URL}`` with ``redis.url`` in Feast's form
    (``host:port,db=N``), any other from the environment; one that is not set is an error
    (naming ``PPM__REDIS__URL`` for the Redis address). ``ppm features yaml`` prints it, for
    ``feast -f``."""
    source = store_yaml(cfg)
    if not source.is_file():
        raise FileNotFoundError(f"feature store settings not found: {source}")
    known = {DATA_DIR_ENV: str(Path(cfg.data_dir).resolve())}
    missing: set[str] = set()

    def value(name: str) -> str:
        if name in known:
            return known[name]
        if name == REDIS_URL_ENV:
            if cfg.redis.url is None:
                raise ValueError(f"{source} needs a Redis server: set {REDIS_URL_ENV}, e.g. "
                                 f"{REDIS_URL_ENV}=redis://127.0.0.1:6379/0")
            return cfg.redis.feast_connection_string()
        if name not in os.environ:
            missing.add(name)
        return os.environ.get(name, "")

    def fill(node: Any) -> Any:
        if isinstance(node, str):
            return _VARIABLE.sub(lambda m: value(m.group(1) or m.group(2)), node)
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        return node

    raw = fill(yaml.safe_load(source.read_text()))
    if missing:
        raise ValueError(f"{source} uses environment variables that are not set: "
                         f"{', '.join(sorted(missing))}")
    return raw


def _timestamps(us: Iterable[int]) -> pd.Series:
    return pd.to_datetime(pd.Series(list(us), dtype="int64"), unit="us", utc=True)


def _embedding_frame(rows: Sequence[ItemEmbeddingRow], packed: str) -> pd.DataFrame:
    """The fields of ``rows`` in Feast's write format, with ``packed`` (:data:`PACKED`) and
    without the entity key; the entity timestamp is the content's event time."""
    df = pd.DataFrame({
        "embedding": [np.asarray(r.embedding, dtype=np.float32) for r in rows],
        "encoder_version": [r.encoder_version for r in rows],
        "content_hash": [r.content_hash for r in rows],
        "content_time_us": [r.content_time_us for r in rows],
        "embedded_at_us": [r.embedded_at_us for r in rows],
    })
    with_vector = packed == PROJECTION_PACKED
    df[packed] = [_pack([getattr(r, f) for f in EMBEDDING_META],
                        r.embedding if with_vector else None) for r in rows]
    df["event_timestamp"] = _timestamps(df["content_time_us"])
    return df


@dataclass(frozen=True)
class ItemEmbeddingRow:
    """One item vector as written to the online store (and the offline item log)."""

    item_id: str
    embedding: np.ndarray
    """(dim,) float32 or float16; stored as float32 (Feast has no float16)."""
    encoder_version: str
    content_hash: str
    content_time_us: int
    embedded_at_us: int


@dataclass(frozen=True)
class StoredItem:
    """An item's features as stored, before any freshness judgement."""

    state: ItemState
    embedding: np.ndarray | None
    """float32 vector; None when not embedded yet or not read."""
    embedded_at_us: int | None
    with_embedding: bool
    """Whether the vector was read at all (False: ``embedding`` is None regardless)."""


@dataclass(frozen=True)
class OnlineItem:
    """An item as read back from the online store, judged at the reader's clock."""

    state: ItemState
    embedding: np.ndarray | None
    """The cached vector, or None when not embedded yet or not asked for."""
    embedded_at_us: int | None
    age_s: float | None
    """How old the embedding's source event is at the reader's clock (event time)."""
    stale: bool
    """True when the embedding is missing, too old, or from another encoder version."""
    stale_reason: str | None


class OnlineFeatures:
    """Batched reads and writes of item and user features in one Feast store.

    Build it with :meth:`open`. ``freshness_window_s`` (None: no age limit) decides when an
    embedding is too old.
    """

    def __init__(self, store: FeatureStore, definitions: FeatureDefinitions,
                 freshness_window_s: float | None, reads: OnlineReads = "direct"):
        self.store = store
        self.definitions = definitions
        self.freshness_window_s = freshness_window_s
        self.reads = reads
        self.reader = OnlineReader(store)

    @classmethod
    def open(cls, cfg: Config, apply: bool = True) -> OnlineFeatures:
        """Open (and by default register) the feature store of ``cfg``
        (:func:`store_config`). ``apply=True`` runs the equivalent of ``feast apply`` (cheap
        when nothing changed)."""
        config = store_config(cfg)
        repo = cfg.paths.feast_repo
        repo.mkdir(parents=True, exist_ok=True)
        legacy = repo / "feature_store.yaml"  # the copy ppm used to keep there
        if legacy.is_file() and legacy.resolve() != store_yaml(cfg).resolve():
            legacy.unlink()
        definitions = feature_definitions(Path(cfg.data_dir))
        store = FeatureStore(repo_path=str(config.repo_path), config=config)
        if apply:
            store.apply(definitions.all())
        return cls(store, definitions, cfg.features.freshness_window_s,
                   cfg.features.online_reads)

    # ------------------------------------------------------------------ writes

    def write_item_embeddings(self, rows: Sequence[ItemEmbeddingRow], newest: bool = True
                              ) -> None:
        """Write vectors in one batch, keyed by item and encoder version, and with
        ``newest`` (the stream's writes) also as the item's newest vector, whatever its
        version (a backfill of another version leaves that one alone). The entity
        timestamp is the content's event time."""
        if not rows:
            return
        df = _embedding_frame(rows, META_PACKED)
        by_version = df.assign(item_key=[embedding_key(r.item_id, r.encoder_version)
                                         for r in rows])
        self.store.write_to_online_store(ITEM_EMBEDDING_BY_VERSION_VIEW, by_version)
        if newest:
            self.store.write_to_online_store(ITEM_EMBEDDING_VIEW,
                                             df.assign(item_id=[r.item_id for r in rows]))

    def write_projections(self, rows: Sequence[ItemEmbeddingRow], projection: str) -> None:
        """Write a frozen plug-in's per-item outputs (``rows[i].embedding``: d floats; the
        rest the raw vector's meta) under ``projection`` (``trainer.train.projection_key``)."""
        if not rows:
            return
        self.store.write_to_online_store(ITEM_PROJECTION_VIEW, _embedding_frame(
            rows, PROJECTION_PACKED).assign(item_key=[embedding_key(r.item_id, projection)
                                                     for r in rows]))

    def fetch_projections(self, items: dict[str, StoredItem], projection: str
                          ) -> dict[str, StoredItem]:
        """``items`` (as :meth:`fetch_items` returned them, without vectors) with the
        vector stored under ``projection`` where there is one *of the same content* as the
        item's vector (encoder version and content hash): a projection computed before the
        item changed is left out, and the caller projects the raw vector instead."""
        if not items:
            return {}
        data = self._fields("item_key", [embedding_key(i, projection) for i in items], {
            ITEM_PROJECTION_VIEW: ("embedding", "encoder_version", "content_hash")})
        out = {}
        for row, (item_id, item) in enumerate(items.items()):
            if data["embedding"][row] is not None and (
                    data["encoder_version"][row], data["content_hash"][row]
            ) == item.state.vector_source:
                out[item_id] = StoredItem(item.state, np.asarray(data["embedding"][row],
                                                                 dtype=np.float32),
                                          item.embedded_at_us, True)
        return out

    def write_item_profiles(self, states: Sequence[ItemState]) -> None:
        """Write ID features and tombstones in one batch (timestamp: the newest event)."""
        if not states:
            return
        df = pd.DataFrame({f: [getattr(s, f) for s in states] for f in ("item_id",
                                                                         *PROFILE_FIELDS)})
        df[PROFILE_PACKED] = [_pack([getattr(s, f) for f in PROFILE_FIELDS]) for s in states]
        df["event_timestamp"] = _timestamps(df["updated_us"])
        self.store.write_to_online_store(ITEM_PROFILE_VIEW, df)

    def write_sequences(self, sequences: Sequence[UserSequence]) -> None:
        """Write users' sequences in one batch.

        The entity timestamp is the wall clock, not the newest interaction: a late event
        inserted mid-sequence leaves the newest interaction unchanged, and Redis would ignore
        a write whose timestamp did not grow. One writer per user (a partition) keeps this
        ordered.
        """
        if not sequences:
            return
        df = pd.DataFrame({
            "user_id": [s.user_id for s in sequences],
            "seq_item_ids": [list(s.item_ids) for s in sequences],
            "seq_actions": [list(s.actions) for s in sequences],
            "seq_times_us": [list(s.times_us) for s in sequences],
            "updated_us": [s.updated_us for s in sequences],
        })
        df["event_timestamp"] = _timestamps([now_us()] * len(df))
        self.store.write_to_online_store(USER_SEQUENCE_VIEW, df)

    # ------------------------------------------------------------------ reads

    def read_items(
        self,
        item_ids: Sequence[str],
        with_embeddings: bool = False,
        now: int | None = None,
        encoder_version: str | None = None,
    ) -> dict[str, OnlineItem]:
        """The online state of ``item_ids`` (unknown ids are left out), judged at ``now``.

        ``now`` is microseconds since the epoch on the clock the freshness window is measured
        in: event time for a replay, the wall clock (the default) for a live stream.
        ``encoder_version``, when given, reads that version's embeddings
        (:meth:`fetch_items`) and makes any other stale.
        """
        now = now_us() if now is None else now
        stored = self.fetch_items(item_ids, with_embeddings, encoder_version)
        return {i: self.judge(item, now, encoder_version) for i, item in stored.items()}

    def fetch_items(self, item_ids: Sequence[str], with_embeddings: bool = False,
                    encoder_version: str | None = None) -> dict[str, StoredItem]:
        """The stored features of ``item_ids`` as they are, not judged (see :meth:`judge`);
        unknown ids are left out. One batched read of profiles and newest embeddings; with
        ``encoder_version``, a second one, of that version's vectors, for the items whose
        newest vector is of another version (none found: the newest is kept, and
        :meth:`judge` calls it stale)."""
        if not item_ids:
            return {}
        out = self._fetch_newest(item_ids, with_embeddings)
        other = [i for i, item in out.items() if encoder_version is not None
                 and item.state.encoder_version != encoder_version]
        if other:
            out.update(self._fetch_version(other, encoder_version, with_embeddings, out))
        return out

    def _fetch_version(self, item_ids: Sequence[str], encoder_version: str,
                       with_embeddings: bool, newest: dict[str, StoredItem]
                       ) -> dict[str, StoredItem]:
        fields = [*EMBEDDING_META, *(["embedding"] if with_embeddings else [])]
        data = self._fields("item_key", [embedding_key(i, encoder_version) for i in item_ids],
                             {ITEM_EMBEDDING_BY_VERSION_VIEW: fields})
        out = {}
        for row, item_id in enumerate(item_ids):
            if data["encoder_version"][row] is None:
                continue  # not embedded under this version (yet)
            state = replace(newest[item_id].state, encoder_version=data["encoder_version"][row],
                            content_hash=data["content_hash"][row],
                            content_time_us=data["content_time_us"][row])
            vector = data["embedding"][row] if with_embeddings else None
            out[item_id] = StoredItem(
                state, None if vector is None else np.asarray(vector, dtype=np.float32),
                data["embedded_at_us"][row], with_embeddings)
        return out

    def _fetch_newest(self, item_ids: Sequence[str], with_embeddings: bool
                      ) -> dict[str, StoredItem]:
        data = self._fields("item_id", item_ids, {
            ITEM_PROFILE_VIEW: PROFILE_FIELDS,
            ITEM_EMBEDDING_VIEW: [*EMBEDDING_META, *(["embedding"] if with_embeddings else [])]})
        out: dict[str, StoredItem] = {}
        for row, item_id in enumerate(item_ids):
            if data["updated_us"][row] is None:
                continue  # never written
            state = ItemState(
                item_id=item_id,
                category=data["category"][row],
                brand=data["brand"][row],
                shop=data["shop"][row],
                price_bucket=data["price_bucket"][row],
                first_seen_us=data["first_seen_us"][row],
                updated_us=data["updated_us"][row],
                deleted=bool(data["deleted"][row]),
                encoder_version=data["encoder_version"][row],
                content_hash=data["content_hash"][row],
                content_time_us=data["content_time_us"][row],
            )
            vector = data["embedding"][row] if with_embeddings else None
            out[item_id] = StoredItem(
                state, None if vector is None else np.asarray(vector, dtype=np.float32),
                data["embedded_at_us"][row], with_embeddings)
        return out

    def judge(self, item: StoredItem, now: int, encoder_version: str | None = None
              ) -> OnlineItem:
        """``item`` judged at ``now`` (µs): stale when deleted, not embedded yet, of another
        encoder version than ``encoder_version`` (if given), or older than the freshness
        window."""
        state = item.state
        age = None if state.content_time_us is None else (now - state.content_time_us) / 1e6
        if state.deleted:
            reason = "deleted"
        elif state.encoder_version is None:
            reason = "not embedded yet"
        elif encoder_version is not None and state.encoder_version != encoder_version:
            reason = f"encoder version {state.encoder_version} is not {encoder_version}"
        elif (age is not None and self.freshness_window_s is not None
              and age > self.freshness_window_s):
            reason = f"older than the freshness window ({age:.0f}s > "\
                     f"{self.freshness_window_s:.0f}s)"
        else:
            reason = None
        return OnlineItem(state, item.embedding, item.embedded_at_us, age, reason is not None,
                          reason)

    def read_sequences(self, user_ids: Sequence[str]) -> dict[str, UserSequence]:
        """The online sequences of ``user_ids``; users with none are left out."""
        if not user_ids:
            return {}
        data = self._columns("user_id", user_ids, {USER_SEQUENCE_VIEW: SEQUENCE_FIELDS})
        return {
            user_id: UserSequence(
                user_id,
                tuple(data["seq_item_ids"][row]),
                tuple(data["seq_actions"][row]),
                tuple(data["seq_times_us"][row]),
            )
            for row, user_id in enumerate(user_ids)
            if data["updated_us"][row] is not None
        }

    def _fields(self, join_key: str, keys: Sequence[str], fields: dict[str, Sequence[str]]
                ) -> dict[str, list]:
        """:meth:`_columns`, with the fields a packed field holds (:data:`PACKED`) read as
        that one value per key and unpacked; a key whose packed value is missing (a store
        written before packing, or a key never written) has its typed fields read instead.
        Feast's SDK path (``reads="feast"``) reads the typed fields, as any Feast client."""
        if self.reads == "feast":
            return self._columns(join_key, keys, fields)
        asked, unpacked = {}, []
        for view, names in fields.items():
            packed, held = PACKED.get(view, (None, ()))
            inside = [f for f in names if f in held]
            asked[view] = [*([packed] if inside else []), *(f for f in names if f not in held)]
            if inside:
                unpacked.append((packed, held))
        data = self._columns(join_key, keys, asked)
        out = {f: data[f] for names in asked.values() for f in names}
        for packed, held in unpacked:
            values = _unpack(data[packed], with_vector="embedding" in held)
            for k, name in enumerate(held):
                out[name] = [None if v is None else v[k] for v in values]
        missing = [row for row in range(len(keys))
                   if any(data[packed][row] is None for packed, _ in unpacked)]
        if missing:
            again = self._columns(join_key, [keys[row] for row in missing], fields)
            for f, column in again.items():
                for row, value in zip(missing, column, strict=True):
                    out[f][row] = value
        return {f: out[f] for names in fields.values() for f in names}

    def _columns(self, join_key: str, keys: Sequence[str],
                 fields: dict[str, Sequence[str]]) -> dict[str, list]:
        """``{field: [value per key]}`` of ``fields`` (view -> its fields; no name in two
        views) for the entity rows ``{join_key: key}``; None where a key has no value."""
        if self.reads == "feast":
            data = self.store.get_online_features(
                features=[f"{view}:{f}" for view, names in fields.items() for f in names],
                entity_rows=[{join_key: k} for k in keys]).to_dict()
            return {f: data[f] for names in fields.values() for f in names}
        return self.reader.read(join_key, keys, fields)
