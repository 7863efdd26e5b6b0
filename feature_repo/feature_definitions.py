"""Every Feast object of ppm-stream, in one place: entities, sources, views, the service.

The online store holds what the ranker needs at request time: each item's cached modal
embedding and ID features, and each user's recent behavior sequence. The offline history
is not Feast's: the pipeline writes its own batched parquet logs (item features, training
windows), because Feast's file offline store rewrites a whole parquet file on every push.

Paths differ per deployment, so the definitions are built for a data directory by
:func:`feature_definitions`, the one builder of them: ``ppm features apply`` (and every
``OnlineFeatures.open``) registers them for ppm's configured data dir, and
``feature_repo/repo.py`` holds them at module level, for the data dir ``PPM__DATA_DIR``
names, where Feast's own CLI looks for them (``feast -c feature_repo plan|apply``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Bool, Bytes, Float32, Int64, String

from ppm.data_dir import DataDir

DATA_DIR_ENV = "PPM__DATA_DIR"
"""The variable that names ppm's data dir (``Config.data_dir``); the store yamls put their
files under it."""

# Feast's FeatureView ttl is not applied on online reads (feast-dev/feast#6821), so views
# keep no ttl here and the freshness window is enforced by feature_repo.online_features instead.
NO_TTL = timedelta(0)

ITEM_EMBEDDING_VIEW = "item_embedding"
ITEM_EMBEDDING_BY_VERSION_VIEW = "item_embedding_by_version"
ITEM_PROJECTION_VIEW = "item_projection"
ITEM_PROFILE_VIEW = "item_profile"
USER_SEQUENCE_VIEW = "user_sequence"
ITEM_EMBEDDING_PUSH = "item_embedding_push"
ITEM_PROFILE_PUSH = "item_profile_push"
USER_SEQUENCE_PUSH = "user_sequence_push"
RANKER_SERVICE = "ranker"

# Feast's online stores keep one value per feature (a row each in SQLite) and parse each on
# read: an item's profile and vector metadata were eleven values, its plug-in output three
# more. The ranker reads each view's fields packed into one value instead, written beside
# the typed fields, which stay for Feast's own readers (feature_repo.online_features).
PROFILE_PACKED = "profile_packed"
META_PACKED = "meta_packed"
PROJECTION_PACKED = "projection_packed"


def embedding_key(item_id: str, encoder_version: str) -> str:
    """The ``item_key`` of an item's vector of one encoder version in
    ``item_embedding_by_version``: ids never hold control characters
    (``ppm.events.Id``), so the separator cannot collide."""
    return f"{item_id}\x1f{encoder_version}"


@dataclass(frozen=True)
class FeatureDefinitions:
    item: Entity
    item_version: Entity
    user: Entity
    item_embedding_push: PushSource
    item_profile_push: PushSource
    user_sequence_push: PushSource
    item_embedding: FeatureView
    item_embedding_by_version: FeatureView
    item_projection: FeatureView
    item_profile: FeatureView
    user_sequence: FeatureView
    ranker: FeatureService

    def all(self) -> list:
        """Everything, in the order ``FeatureStore.apply`` wants it."""
        sources = [self.item_embedding_push, self.item_profile_push, self.user_sequence_push]
        return [
            self.item,
            self.item_version,
            self.user,
            *[s.batch_source for s in sources],
            *sources,
            self.item_embedding,
            self.item_embedding_by_version,
            self.item_projection,
            self.item_profile,
            self.user_sequence,
            self.ranker,
        ]


def feature_definitions(data_dir: Path) -> FeatureDefinitions:
    """The feature repo for a deployment whose files live under ``data_dir``."""
    # DuckDB resolves relative FileSource paths against the working directory: use absolute.
    paths = DataDir(Path(data_dir).resolve())

    def push_source(name: str, log: Path) -> PushSource:
        batch = FileSource(name=f"{name}_log", path=str(log), timestamp_field="event_timestamp")
        return PushSource(name=name, batch_source=batch)

    # A catalog item, keyed by the catalog's own id.
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING)

    # An item's vector of one encoder version (embedding_key): several versions live side by
    # side while a backfill embeds the catalog with a new encoder (streams.backfill).
    item_version = Entity(name="item_version", join_keys=["item_key"],
                          value_type=ValueType.STRING)

    # A shopper, keyed by the front end's user id.
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING)

    # Written by ItemEmbedder when an item's content is new or changed.
    item_embedding_push = push_source(ITEM_EMBEDDING_PUSH, paths.item_log)

    # Written by ItemEmbedder on every newer item event (price changes, deletes).
    item_profile_push = push_source(ITEM_PROFILE_PUSH, paths.item_profile_log)

    # Written by SequenceBuilder for the users whose sequence changed in a batch.
    user_sequence_push = push_source(USER_SEQUENCE_PUSH, paths.user_sequence_log)

    def embedding_view(name: str, entity: Entity, packed: Field) -> FeatureView:
        """A vector and what it was computed from (the three embedding views share it), and
        ``packed``, what the ranker reads of them."""
        return FeatureView(
            name=name,
            entities=[entity],
            ttl=NO_TTL,
            schema=[
                Field(name="embedding", dtype=Array(Float32),
                      description="text ++ image vector"),
                Field(name="encoder_version", dtype=String),
                Field(name="content_hash", dtype=String),
                Field(name="content_time_us", dtype=Int64,
                      description="event time of the item event the vector was computed from"),
                Field(name="embedded_at_us", dtype=Int64,
                      description="wall-clock time the vector became readable online"),
                packed,
            ],
            source=item_embedding_push,
            online=True,
        )

    # The cached output of the frozen encoders: the PPM module's input. The newest vector
    # the stream wrote, whatever its encoder version: one read serves the common case.
    meta_packed = Field(name=META_PACKED, dtype=Bytes, description=(
        "the four fields above in one value (JSON): what the ranker reads, not four values"))
    item_embedding = embedding_view(ITEM_EMBEDDING_VIEW, item, meta_packed)

    # The same vectors keyed by (item, encoder version): what a reader of another version
    # than the newest one reads (a model trained on a backfilled version, or the old one
    # still serving while a backfill runs).
    item_embedding_by_version = embedding_view(ITEM_EMBEDDING_BY_VERSION_VIEW, item_version,
                                               meta_packed)

    # A frozen PPM plug-in's per-item output (d_model floats instead of the raw vector),
    # keyed by (item, projection version): what serving reads for a model whose plug-in is
    # frozen (trainer.serving.projection). Its meta fields are the raw vector's.
    item_projection = embedding_view(ITEM_PROJECTION_VIEW, item_version, Field(
        name=PROJECTION_PACKED, dtype=Bytes, description=(
            "the four fields above (JSON), a newline and the vector's float32 bytes: what "
            "the ranker reads, one value, not five")))

    # ID features of an item and the time of the newest event applied to it.
    item_profile = FeatureView(
        name=ITEM_PROFILE_VIEW,
        entities=[item],
        ttl=NO_TTL,
        schema=[
            Field(name="category", dtype=String),
            Field(name="brand", dtype=String),
            Field(name="shop", dtype=String),
            Field(name="price_bucket", dtype=Int64),
            Field(name="first_seen_us", dtype=Int64),
            Field(name="updated_us", dtype=Int64,
                  description="event time of the newest applied item event (order guard)"),
            Field(name="deleted", dtype=Bool),
            Field(name=PROFILE_PACKED, dtype=Bytes,
                  description="the seven fields above in one value (JSON): what the ranker "
                              "reads, one stored value per item, not seven"),
        ],
        source=item_profile_push,
        online=True,
    )

    # The last K interactions (clicks, orders, collects) of a user, oldest first, and with
    # features.sequence_impressions the user's last M impressions among them.
    user_sequence = FeatureView(
        name=USER_SEQUENCE_VIEW,
        entities=[user],
        ttl=NO_TTL,
        schema=[
            Field(name="seq_item_ids", dtype=Array(String)),
            Field(name="seq_actions", dtype=Array(String)),
            Field(name="seq_times_us", dtype=Array(Int64)),
            Field(name="updated_us", dtype=Int64),
        ],
        source=user_sequence_push,
        online=True,
    )

    # What the online ranker reads per request, as typed fields for Feast's clients (the
    # packed copies are ppm's own read path).
    def typed(view: FeatureView) -> FeatureView:
        return view[[f.name for f in view.features if f.name not in (PROFILE_PACKED,
                                                                     META_PACKED)]]

    ranker = FeatureService(name=RANKER_SERVICE, features=[typed(item_embedding),
                                                            typed(item_profile), user_sequence])

    return FeatureDefinitions(
        item=item,
        item_version=item_version,
        user=user,
        item_embedding_push=item_embedding_push,
        item_profile_push=item_profile_push,
        user_sequence_push=user_sequence_push,
        item_embedding=item_embedding,
        item_embedding_by_version=item_embedding_by_version,
        item_projection=item_projection,
        item_profile=item_profile,
        user_sequence=user_sequence,
        ranker=ranker,
    )
