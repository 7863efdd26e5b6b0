"""Online reads of feature views without ``FeatureStore.get_online_features``.

``FeatureStore.get_online_features`` is the general path: it resolves feature references
against the registry, joins several views, and builds a response that ``to_dict`` converts
value by value. ppm reads views with string keys and knows their fields, so its reads go
through the provider's ``online_read`` (the call ``get_online_features`` itself ends in;
Redis and any other store) or, for Feast's SQLite store, one SQL query on Feast's own
tables (its private ``_table_id`` and connection: the same tables and key encoding), and
convert the values once, here. Two things the SDK path costs are avoided:

* Feast's SQLite store reads *every* feature of a view and parses each value, whatever was
  requested: a read of an item's embedding metadata also pulls its 1,664-float vector. For
  SQLite the reader selects only the requested features from Feast's own table (same table,
  same key encoding); Redis honours ``requested_features`` already.
* The response's per-value conversion to Python objects (a float vector becomes a list of
  Python floats): float lists come back as float32 arrays.

``tests/test_features.py`` (SQLite) and ``tests/integration/test_servers.py`` (Redis)
check that both paths return the same values. Views are looked up in the registry once per
reader: a view re-applied with ``enable_online_feature_view_versioning`` needs a new reader
(``OnlineFeatures.open``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from feast import FeatureStore, FeatureView
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.sqlite import SqliteOnlineStore, _quote_id, _table_id
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

_ARRAYS = {"float_list_val": np.float32, "double_list_val": np.float64}


def _python(value: ValueProto):
    """A stored value as Python: None when unset, arrays for float (float32) and double
    (float64) lists, lists for other lists."""
    kind = value.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    got = getattr(value, kind)
    if kind in _ARRAYS:
        return np.array(got.val, dtype=_ARRAYS[kind])
    if kind.endswith("_list_val"):
        return list(got.val)
    return got


class OnlineReader:
    """Reads fields of feature views for a list of string entity keys.

    Args:
        store: the Feast store; its registry gives the views (looked up once each).
        key_cache: how many serialized entity keys to keep (a request's item ids recur).
    """

    def __init__(self, store: FeatureStore, key_cache: int = 200_000):
        self.store = store
        self.key_cache = key_cache
        self._views: dict[str, FeatureView] = {}
        self._keys: dict[tuple[str, str], bytes] = {}

    def _view(self, name: str) -> FeatureView:
        if name not in self._views:
            self._views[name] = self.store.get_feature_view(name, allow_registry_cache=True)
        return self._views[name]

    def read(self, join_key: str, keys: Sequence[str], fields: dict[str, Sequence[str]]
             ) -> dict[str, list]:
        """``{field: [value per key]}`` of ``fields`` (view name -> its fields; a field name
        in one view only) for the entity rows ``{join_key: key}``; a key the store holds no
        value of reads None."""
        online_store = getattr(self.store.provider, "online_store", None)
        if isinstance(online_store, SqliteOnlineStore):
            rows = self._sqlite_read(online_store, join_key, keys, fields)
        else:
            entity_keys = [_entity_key(join_key, k) for k in keys]
            rows = [{} for _ in keys]
            for view, names in fields.items():
                for row, (_, values) in zip(rows, self.store.provider.online_read(
                        self.store.config, self._view(view), entity_keys, list(names)),
                        strict=True):
                    row.update(values or {})
        return {f: [_python(r[f]) if f in r else None for r in rows]
                for names in fields.values() for f in names}

    def _binary(self, join_key: str, keys: Sequence[str]) -> list[bytes]:
        """The keys as the online store's tables hold them (Feast's own encoding)."""
        version = self.store.config.entity_key_serialization_version
        out = []
        for k in keys:
            got = self._keys.get((join_key, k))
            if got is None:
                if len(self._keys) >= self.key_cache:
                    self._keys.clear()
                got = self._keys[(join_key, k)] = serialize_entity_key(
                    _entity_key(join_key, k), entity_key_serialization_version=version)
            out.append(got)
        return out

    def _sqlite_read(self, online_store: SqliteOnlineStore, join_key: str,
                     keys: Sequence[str], fields: dict[str, Sequence[str]]
                     ) -> list[dict[str, ValueProto]]:
        config = self.store.config
        binary = self._binary(join_key, keys)
        versioned = config.registry.enable_online_feature_view_versioning
        selects, params = [], []
        for view, names in fields.items():
            table = _quote_id(_table_id(config.project, self._view(view), versioned))
            selects.append(f"SELECT entity_key, feature_name, value FROM {table} "
                           f"WHERE entity_key IN ({','.join('?' * len(binary))}) "
                           f"AND feature_name IN ({','.join('?' * len(names))})")
            params += [*binary, *names]
        cursor = online_store._get_conn(config).execute(" UNION ALL ".join(selects), params)
        found: dict[bytes, dict[str, ValueProto]] = {}
        for key, feature, blob in cursor.fetchall():
            found.setdefault(key, {})[feature] = ValueProto.FromString(blob)
        return [found.get(k, {}) for k in binary]


def _entity_key(join_key: str, key: str) -> EntityKeyProto:
    return EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(string_val=key)])
