"""A seeded fashion shop that unfolds over simulated days and emits catalog and behavior events.

The world
---------
* **Catalog.** Items of the ten Fashion-MNIST classes (:data:`CATEGORIES`), each with a made-up
  brand and shop, a colour, a material, a style, a price (lognormal around its category's
  median, higher for better items and premium brands) and a latent *quality*. The
  ``initial_items`` arrived one to two weeks before ``start``; ``items_per_day`` more arrive
  spread evenly over every simulated day. Each arrival is an ``upsert``
  :class:`~ppm.events.ItemEvent` at its arrival time, with a title and description built from
  the attribute words and a real product photo: a Fashion-MNIST picture of the item's class,
  tinted with its colour, inline as a PNG data URL (procedural silhouettes, with a warning,
  when the data set is missing). About ``delete_share`` of the items are withdrawn later
  (``op="delete"``) and are never shown after that; about ``sale_share`` (5%) get a second
  upsert with a sale price.
* **Users.** Each has an activity level and latent tastes: a weight for every value of every
  attribute (category, brand, colour, material, style), small noise plus one or two strong
  favourites and one dislike per attribute, so users differ.
* **Sessions.** Poisson-many per user per day at diurnal times (UTC). ``search_share`` start
  with a query drawn from the user's tastes ("black coat") and show only items of that colour
  and category (falling back to the category, then to everything, when none has arrived yet);
  the others browse. A session is one request: up to ``impressions_per_session`` distinct
  items at positions 0..k-1 sharing one ``request_id``. Each slot shows an item younger than
  a day with probability ``fresh_share``, otherwise an older one; an item is shown only after
  it arrived and only while it stays listed for the next 30 minutes.
* **Behavior.** ``click ~ Bernoulli(sigmoid(bias + match(user tastes, item attributes) +
  quality - position decay + search intent))``; order and collect only after a click, with
  their own sigmoids. Follow-ups come seconds to minutes later, always within 30 minutes of
  the impression, and never after the end of the simulation. The match term outweighs
  quality, so an item's *content* predicts its clicks before anyone has clicked it: the
  cold-start signal PPM learns from.

That is world ``v1`` (``SimulatorConfig.world``, the default), where content is nearly a
sufficient statistic of an item: the title names all five attributes, the photo repeats the
colour, and the catalog fields (what ``idrec`` reads) carry only category and brand.

The fair world, ``v2``
----------------------
The same shop, with every attribute in one place (:data:`STRUCTURED`, :data:`PHOTO_ONLY`,
:data:`TEXT_ONLY`):

* **catalog fields** (``category``, ``brand``, ``shop``, ``price``): on the wire as fields,
  so ``idrec`` reads them as well; users have tastes over category, brand, shop and the
  item's *price tier* (its price against its category's median, :data:`PRICE_TIERS`). Price
  does not depend on quality here.
* **photo only**: ``colour`` (the tint) and ``pattern`` (:data:`PATTERNS`, drawn on the
  garment); neither is named in the title, description or query.
* **text only**: ``material`` and ``style``, named in the title and description; the photo
  does not depend on them.
* **nowhere**: latent ``quality`` (no quality line in the description, no price premium):
  only clicks reveal it.

Searches name the category only ("coat") and show items of that category. The click logit is
``CLICK_BIAS_V2 + TASTE_STD_V2 * (sqrt(1 - s) * S + sqrt(s) * C) + quality - position decay +
search intent`` with ``S`` and ``C`` the user's summed tastes for the item's structured and
content-only attribute values, each standardised over all users x the whole catalog, and
``s = CONTENT_SHARE * content_signal``: the dial moves taste variance between content and
catalog fields while the total stays the same, so the base CTR hardly moves. At
``content_signal = 0`` a click depends on nothing a model without the photo and the text
could not learn.

Drift
-----
Both worlds are static by default: tastes never move and an item's content changes only by a
price cut (``sale_share``) that changes no click. The drift dials (``SimulatorConfig``; the
``drifting`` configuration preset turns them all on, ``static`` spells out the default) make
stale embeddings and stale models cost, for the staleness lab:

* ``sale_click_boost``: a price cut adds this to the item's click logit from the moment of
  the cut; the new upsert says "Now on sale." and carries the new price.
* ``restyle_share``: that share of items gets a new colour later: an upsert with a new photo
  (and in v1 a title naming the new colour); users' colour tastes apply to the new colour
  from then on.
* ``trends_per_day``, ``trend_hours``, ``trend_boost``: popularity bursts. Each trend picks
  a value of a content attribute (colour, material or style in v1, the content-only ones in
  v2) and, for ``trend_hours`` from a random moment, adds ``trend_boost`` to the click logit
  of every item with that value, for every user.
* ``taste_drift_per_day``: each user's weight for each attribute value moves linearly at a
  rate drawn from N(0, this) per day (searches still follow the tastes of the start).

The dials draw from a random stream of their own, so the static world's output is the same
byte for byte whatever they would draw. Two simplifications: v1's searches by colour still
find a restyled item under its first colour, and the oracle's ``logit_structured`` (the
content-blind ceiling) keeps the trend term, which follows content attributes.

Output
------
:meth:`ShopSimulator.events` yields typed events, :meth:`ShopSimulator.records` their JSON wire
bytes with malformed records mixed in, and :meth:`ShopSimulator.write_jsonl` writes both
topics as JSONL. Everything is in event-time order (at equal times: item events first, then
behaviors by request, position and action) and a pure function of the config: the same seed
gives byte-identical output. Generation runs vectorised in batches of at most
``MAX_BATCH_SESSIONS`` sessions, so memory stays bounded however long the simulation.

:meth:`ShopSimulator.oracle` (and ``oracle.parquet`` beside the JSONL) gives each impression's
true click probability, for scoring models as a share of the achievable AUC; it is never in
the events.
"""

from __future__ import annotations

import base64
import functools
import gzip
import io
import json
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from ppm.config import ContractConfig, SimulatorConfig
from ppm.data_dir import ORACLE_FILE  # what write_jsonl names the oracle (:meth:`oracle`)
from ppm.events import Action, BehaviorEvent, ItemEvent, ItemOp

if TYPE_CHECKING:
    import pandas as pd

# --------------------------------------------------------------------------- vocabulary


class Category(NamedTuple):
    """A product class; its index in :data:`CATEGORIES` is its Fashion-MNIST label."""

    id: str
    """The ``category`` on the wire."""
    label: str
    """Fashion-MNIST's class name."""
    noun: str
    """The word in titles and search queries."""
    details: tuple[str, ...]
    """Features a description may mention."""
    median_price: float
    outline: tuple[tuple[int, int], ...]
    """Silhouette polygon on a 28x28 canvas, for the procedural photos."""


CATEGORIES: tuple[Category, ...] = (
    Category("tshirt", "T-shirt/top", "t-shirt", ("a crew neck", "short sleeves", "a relaxed cut"),
             19.0, ((9, 3), (19, 3), (26, 8), (23, 12), (20, 10), (20, 25), (8, 25), (8, 10),
                    (5, 12), (2, 8))),
    Category("trouser", "Trouser", "trousers", ("a straight leg", "belt loops", "side pockets"),
             49.0, ((9, 2), (19, 2), (20, 26), (16, 26), (14, 9), (12, 26), (8, 26))),
    Category("pullover", "Pullover", "pullover", ("ribbed cuffs", "a round neck", "raglan sleeves"),
             45.0, ((9, 3), (19, 3), (24, 6), (26, 24), (22, 24), (20, 11), (20, 25), (8, 25),
                    (8, 11), (6, 24), (2, 24), (4, 6))),
    Category("dress", "Dress", "dress", ("a fitted waist", "a midi length", "thin straps"),
             59.0, ((11, 2), (17, 2), (18, 10), (23, 26), (5, 26), (10, 10))),
    Category("coat", "Coat", "coat", ("a button front", "a wide collar", "deep pockets"),
             129.0, ((8, 2), (20, 2), (25, 5), (27, 26), (23, 26), (21, 12), (21, 27), (7, 27),
                     (7, 12), (5, 26), (1, 26), (3, 5))),
    Category("sandal", "Sandal", "sandals", ("an open toe", "ankle straps", "a cushioned sole"),
             35.0, ((2, 19), (8, 14), (12, 18), (18, 13), (26, 17), (26, 21), (2, 22))),
    Category("shirt", "Shirt", "shirt", ("a button-down collar", "a chest pocket", "long cuffs"),
             39.0, ((10, 2), (14, 5), (18, 2), (24, 5), (26, 24), (22, 24), (20, 10), (20, 26),
                    (8, 26), (8, 10), (6, 24), (2, 24), (4, 5))),
    Category("sneaker", "Sneaker", "sneakers", ("a rubber sole", "laces", "a padded collar"),
             79.0, ((2, 15), (10, 13), (16, 15), (26, 18), (26, 22), (2, 22))),
    Category("bag", "Bag", "bag", ("a top handle", "an inner pocket", "a zip closure"),
             69.0, ((4, 10), (9, 10), (10, 4), (18, 4), (19, 10), (24, 10), (24, 25), (4, 25))),
    Category("ankle_boot", "Ankle boot", "ankle boots", ("a block heel", "a side zip", "a toe cap"),
             99.0, ((7, 3), (15, 3), (16, 15), (25, 18), (25, 24), (7, 24))),
)

BRANDS: tuple[str, ...] = (
    "Nordvik", "Albero", "Kestrel", "Marlowe", "Solenne", "Tovari", "Brixby", "Quillon",
    "Fenwick Lane", "Ostara", "Vellum", "Caspian", "Larkspur", "Mirelle", "Runehold", "Thistle",
    "Halvard", "Zephyrine", "Corvid", "Juniper Row", "Aldine", "Pemberly", "Wrenfield", "Isola",
    "Drummond", "Calloway", "Everly", "Ravello", "Hollis", "Maribel",
)
SHOPS: tuple[str, ...] = (
    "Harbor Street Outfitters", "The Linen Loft", "Northgate Outlet", "Urban Thread",
    "Maple Lane Boutique", "Copper Kettle Clothing", "Bluewater Apparel", "Old Mill Wardrobe",
    "Sunday Closet", "Fox and Fern", "Quayside Goods", "Velvet Hanger", "Atlas Attire",
    "Morning Market Wear", "Silver Birch Style", "The Denim Depot", "Cobblestone Shoes",
    "Parkside Fashion", "Lantern House", "Riverbend Supply",
)
COLOURS: tuple[str, ...] = (
    "black", "white", "grey", "navy", "blue", "red", "green", "beige", "brown", "pink",
)
MATERIALS: tuple[str, ...] = (
    "cotton", "wool", "denim", "leather", "linen", "polyester", "suede", "canvas",
)
STYLES: tuple[str, ...] = (
    "casual", "classic", "sporty", "slim-fit", "oversized", "vintage", "minimalist", "elegant",
)


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


VOCAB: MappingProxyType[str, tuple[str, ...]] = MappingProxyType({
    "category": tuple(c.id for c in CATEGORIES),
    "brand": tuple(_slug(b) for b in BRANDS),
    "colour": COLOURS,
    "material": MATERIALS,
    "style": STYLES,
})
"""The attributes users have tastes over, and their values; category and brand values are
the ids on the wire, colour, material and style appear only as words in titles."""
ATTRIBUTES: tuple[str, ...] = tuple(VOCAB)
SHOP_IDS: tuple[str, ...] = tuple(_slug(s) for s in SHOPS)

PATTERNS: tuple[str, ...] = ("plain", "striped", "checked", "dotted")
"""v2: drawn on the garment in the photo, never named."""
PRICE_TIERS: tuple[str, ...] = ("budget", "mid-range", "premium")
"""v2: an item's price against its category's median (:data:`PRICE_TIER_EDGES`)."""
VOCAB_V2: MappingProxyType[str, tuple[str, ...]] = MappingProxyType({
    "category": VOCAB["category"],
    "brand": VOCAB["brand"],
    "shop": SHOP_IDS,
    "price_tier": PRICE_TIERS,
    "colour": COLOURS,
    "pattern": PATTERNS,
    "material": MATERIALS,
    "style": STYLES,
})
"""The attributes users of the v2 world have tastes over, and their values."""
STRUCTURED: tuple[str, ...] = ("category", "brand", "shop", "price_tier")
"""v2: attributes the catalog sends as fields (price as the price itself), which idrec reads."""
PHOTO_ONLY: tuple[str, ...] = ("colour", "pattern")
"""v2: attributes only the photo shows."""
TEXT_ONLY: tuple[str, ...] = ("material", "style")
"""v2: attributes only the title and description name."""
CONTENT_ONLY: tuple[str, ...] = PHOTO_ONLY + TEXT_ONLY
ACTIONS: tuple[str, ...] = tuple(a.value for a in Action)  # index = action code below
IMPRESSION, CLICK, ORDER, COLLECT = range(len(ACTIONS))

_COLOUR_RGB = np.array([
    (25, 25, 25), (245, 245, 240), (128, 128, 128), (25, 35, 90), (45, 95, 200),
    (200, 35, 45), (45, 130, 65), (220, 200, 160), (110, 70, 40), (240, 150, 180),
], dtype=np.float32)
_QUALITY_LINES = (
    "A budget-friendly basic.", "A dependable everyday piece.",
    "Premium finish with reinforced seams.",
)

# --------------------------------------------------------------------------- world constants

US = 1_000_000
HOUR_US = 3_600 * US
DAY_US = 24 * HOUR_US
FOLLOW_UP_US = 30 * 60 * US
"""Clicks, orders and collects happen within this long after their impression."""
MAX_BATCH_SESSIONS = 20_000
"""Sessions generated at once: bounds memory (~250k events) whatever the world's size."""

# Tastes: one weight per (user, attribute value). Favourites give users distinct profiles;
# their strength per attribute sets how much each attribute drives clicks.
TASTE_STRENGTH = MappingProxyType(
    {"category": 1.3, "brand": 0.9, "colour": 1.1, "material": 0.8, "style": 0.8}
)
TASTE_STRENGTH_V2 = MappingProxyType({
    "category": 1.3, "brand": 0.9, "shop": 0.7, "price_tier": 0.7,
    "colour": 1.1, "pattern": 0.9, "material": 0.8, "style": 0.9,
})  # v2: sets each attribute's weight inside its group (structured or content-only)
TASTE_NOISE = 0.3  # per-user idiosyncrasy on every value
TASTE_TREND = 0.3  # values everybody likes a bit more (or less)
QUERY_FOCUS = 1.5  # how sharply a search query follows the user's tastes

# Click model: overall CTR of a few percent; the match term (std ~1.4) outweighs quality
# (std 0.5), so content predicts clicks on items nobody has clicked yet.
QUALITY_STD = 0.5
CLICK_BIAS = -3.4
POSITION_DECAY = 0.35  # logit lost per log(1 + position)
SEARCH_INTENT = 0.7  # searchers asked for what they see
ORDER_BIAS = -2.5
COLLECT_BIAS = -1.8
PRICE_SENSITIVITY = 0.5  # order logit lost per log(price / category median)

# v2 click model: the taste term is standardised, then scaled to about the spread of v1's
# match term, so the base CTR is near v1's and hardly moves with content_signal.
CLICK_BIAS_V2 = -3.0
TASTE_STD_V2 = 1.4
CONTENT_SHARE = 0.6
"""v2: share of the taste term's variance carried by content-only attributes at
``content_signal = 1``; catalog fields carry the rest."""
PRICE_TIER_EDGES = (-0.2, 0.2)
"""v2: log(list price / category median) cuts between budget, mid-range and premium."""

# Relative traffic per hour of the (UTC) day: quiet nights, a lunch bump, an evening peak.
_HOURLY_TRAFFIC = np.array(
    [2, 1, 1, 1, 1, 2, 4, 6, 7, 7, 7, 8, 9, 8, 7, 7, 7, 8, 10, 12, 12, 10, 7, 4], dtype=float
)
_TRAFFIC_CDF = np.concatenate([[0.0], np.cumsum(_HOURLY_TRAFFIC)]) / _HOURLY_TRAFFIC.sum()
_HOUR_EDGES_US = np.arange(25, dtype=float) * HOUR_US

NEVER = np.iinfo(np.int64).max
"""Time of an item event that does not happen."""
REDRAWS = 8  # tries to replace a drawn item that is withdrawn too soon, before giving up the slot

_UPSERT, _SALE, _DELETE, _RESTYLE = range(4)  # item-event kinds in the schedule


class _Stream(IntEnum):
    """Independent random streams, so changing one part of the world leaves the others alone."""

    CATALOG = 0
    TEXT = 1
    PHOTO = 2
    USERS = 3
    BEHAVIOR = 4
    MALFORMED = 5
    DRIFT = 6


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SimulationSummary:
    """Counts from one :meth:`ShopSimulator.write_jsonl` run (valid events unless named)."""

    items: int
    """Distinct items in the world: the initial catalog plus all arrivals."""
    item_events: int
    behavior_events: int
    malformed: int
    """Malformed records written (both files together)."""
    days: float
    by_action: dict[str, int]
    fresh_impression_share: float
    """Share of impressions on items younger than one day."""


# --------------------------------------------------------------------------- parts


@dataclass
class _Behaviors:
    """Behavior events as columns, one row per event, so a batch is built without Python loops."""

    time: np.ndarray  # (n,) int64 microseconds since start
    user: np.ndarray  # (n,) int64 user index
    item: np.ndarray  # (n,) int64 item index
    action: np.ndarray  # (n,) int64 index into ACTIONS
    request: np.ndarray  # (n,) int64 request number
    position: np.ndarray  # (n,) int64
    query: np.ndarray  # (n,) int64 index into the query table, -1 when browsing

    @classmethod
    def concat(cls, parts: Sequence[_Behaviors]) -> _Behaviors:
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    @classmethod
    def empty(cls) -> _Behaviors:
        return cls(*(np.empty(0, np.int64) for _ in fields(cls)))

    def take(self, index: np.ndarray) -> _Behaviors:
        return _Behaviors(*(getattr(self, f.name)[index] for f in fields(self)))

    def __len__(self) -> int:
        return len(self.time)


@dataclass
class _Step:
    """A stretch of output in event-time order: item events merged into behaviors."""

    items: np.ndarray  # rows of the item-event schedule, in order
    behaviors: _Behaviors  # sorted
    cuts: np.ndarray  # item event j comes right before behavior cuts[j]
    until: int  # every event before this time (µs since start) has been emitted


class _Pool:
    """Catalog items grouped by a key (e.g. category), sorted by arrival inside each group.

    Answers "draw an item of group g that had arrived by time t, fresh (younger than a day)
    or older" for many (g, t) at once with three binary searches over one composite key.
    """

    def __init__(self, group: np.ndarray, arrival: np.ndarray, horizon: int) -> None:
        self._base = min(int(arrival.min()), -DAY_US) - 1  # below every time we look up
        self._span = horizon - self._base + 1
        if (int(group.max()) + 1) * self._span >= NEVER:
            raise ValueError("simulation too long for the composite pool key")
        self._order = np.lexsort((arrival, group))
        self._key = group[self._order] * self._span + (arrival[self._order] - self._base)

    def _keys(self, group: np.ndarray, t: np.ndarray) -> np.ndarray:
        return group * self._span + (t - self._base)

    def ranges(self, group: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per query: ``first`` <= ``split`` <= ``stop`` bound the group's items that arrived
        before ``t``; those in [split, stop) are younger than a day."""
        first = np.searchsorted(self._key, group * self._span, "left")
        split = np.searchsorted(self._key, self._keys(group, t - DAY_US), "right")
        stop = np.searchsorted(self._key, self._keys(group, t), "left")
        return first, split, stop

    def draw(self, group: np.ndarray, t: np.ndarray, fresh: np.ndarray,
             u: np.ndarray) -> np.ndarray:
        """One item per query, uniformly from the fresh or the older items (whichever exists
        when the asked-for kind does not); -1 where the group has no item yet."""
        first, split, stop = self.ranges(group, t)
        use_fresh = (fresh & (stop > split)) | (split == first)
        low = np.where(use_fresh, split, first)
        count = np.where(use_fresh, stop - split, split - first)
        pick = np.minimum(low + (u * count).astype(np.int64), len(self._order) - 1)
        return np.where(count > 0, self._order[pick], -1)


DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` puts the gzipped IDX files."""


@functools.cache
def _fashion_mnist(folder: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray] | None:
    """(images (N, 28, 28) uint8, labels (N,)) of Fashion-MNIST's ``train`` (60,000) or
    ``t10k`` (10,000) split, read-only, or None when absent."""
    images = folder / f"{split}-images-idx3-ubyte.gz"
    labels = folder / f"{split}-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        return None
    pixels = np.frombuffer(gzip.decompress(images.read_bytes()), np.uint8, offset=16)
    return pixels.reshape(-1, 28, 28), np.frombuffer(gzip.decompress(labels.read_bytes()),
                                                     np.uint8, offset=8)


def _procedural_photo(category: int, dx: int, dy: int, shade: int) -> np.ndarray:
    """A grey silhouette of the category, shifted and shaded per item; (28, 28) uint8."""
    canvas = Image.new("L", (28, 28), 0)
    outline = [(x + dx, y + dy) for x, y in CATEGORIES[category].outline]
    ImageDraw.Draw(canvas).polygon(outline, fill=shade)
    return np.asarray(canvas)


def _pattern_masks() -> np.ndarray:
    """(len(PATTERNS), 28, 28) bool: the pixels each pattern repaints."""
    y, x = np.mgrid[0:28, 0:28]
    return np.stack([
        np.zeros((28, 28), bool),  # plain
        y % 5 < 2,  # striped
        (x % 7 < 2) | (y % 7 < 2),  # checked
        (x % 5 < 2) & (y % 5 < 2),  # dotted
    ])


_PATTERN_MASKS = _pattern_masks()
# Pattern ink: light on dark colours, dark on light ones, so every pattern shows on every colour.
_PATTERN_INK = np.where((_COLOUR_RGB @ np.array([0.3, 0.59, 0.11], np.float32) < 140)[:, None],
                        np.float32(235.0), np.float32(40.0))  # (n_colours, 1)


def render_photo(grey: np.ndarray, colour: int, pattern: int | None = None) -> np.ndarray:
    """A product shot: a grey picture (28, 28) uint8 tinted with ``COLOURS[colour]``, with
    ``PATTERNS[pattern]`` drawn on the garment when given (v2), on a white backdrop;
    (28, 28, 3) uint8."""
    ink = grey.astype(np.float32)[..., None] / 255.0  # (28, 28, 1)
    tinted = _COLOUR_RGB[colour] * (0.35 + 0.65 * ink)  # keeps texture
    if pattern is not None:
        mask = _PATTERN_MASKS[pattern][..., None]
        tinted = np.where(mask, 0.4 * tinted + 0.6 * _PATTERN_INK[colour], tinted)
    alpha = np.minimum(4.0 * ink, 1.0)  # soft edges instead of dark speckles
    return (alpha * tinted + (1.0 - alpha) * 255.0).astype(np.uint8)  # (28, 28, 3)


def entity_photos(folder: Path | None = None, patterns: bool = True, seed: int = 0
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labelled product shots for entity prediction (``ppm finetune image``): each picture
    of Fashion-MNIST's *test* split, disjoint from the item photos (its training split),
    rendered as the shop renders an item (:func:`render_photo`) with a colour and, when
    ``patterns``, a pattern drawn at random (``seed``).

    Returns:
        ``(10000, 28, 28, 3)`` uint8 photos and their labels: ``class`` (index into
        :data:`CATEGORIES`), ``colour`` (into :data:`COLOURS`) and ``pattern`` (into
        :data:`PATTERNS`, only with ``patterns``), each ``(10000,)`` int64.

    Raises:
        FileNotFoundError: no Fashion-MNIST test split in ``folder``.
    """
    folder = Path(folder or DEFAULT_FASHION_MNIST)
    data = _fashion_mnist(folder, "t10k")
    if data is None:
        raise FileNotFoundError(f"no Fashion-MNIST test split (t10k-*-ubyte.gz) in {folder}: "
                                "install dataset-fashion-mnist or give its folder")
    grey, classes = data
    rng = np.random.default_rng(seed)
    colour = rng.integers(len(COLOURS), size=len(grey))
    pattern = rng.integers(len(PATTERNS), size=len(grey)) if patterns else None
    photos = np.stack([render_photo(g, int(colour[k]),
                                    None if pattern is None else int(pattern[k]))
                       for k, g in enumerate(grey)])  # (N, 28, 28, 3)
    labels = {"class": classes.astype(np.int64), "colour": colour.astype(np.int64)}
    if pattern is not None:
        labels["pattern"] = pattern.astype(np.int64)
    return photos, labels


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _gumbel_argmax(rng: np.random.Generator, logits: np.ndarray) -> np.ndarray:
    """Per row, an index drawn with probability softmax(logits) (the Gumbel-max trick)."""
    return np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)


def _times_of_day(rng: np.random.Generator, n: int, length_us: int) -> np.ndarray:
    """n diurnal times in [0, length_us) of a day, in µs."""
    u = rng.random(n) * np.interp(length_us, _HOUR_EDGES_US, _TRAFFIC_CDF)
    return np.minimum(np.interp(u, _TRAFFIC_CDF, _HOUR_EDGES_US).astype(np.int64), length_us - 1)


def _interleave(items: Sequence[Any], behaviors: Sequence[Any], cuts: np.ndarray) -> list[Any]:
    """Merge: ``items[j]`` goes right before ``behaviors[cuts[j]]``."""
    out: list[Any] = []
    done = 0
    for record, cut in zip(items, cuts.tolist(), strict=True):
        out.extend(behaviors[done:cut])
        out.append(record)
        done = cut
    out.extend(behaviors[done:])
    return out


# --------------------------------------------------------------------------- malformed records
# Each defect turns one valid record (parsed and raw) into bytes that ppm.events.decode must
# turn into a DeadLetter. None of them writes a raw newline, so JSONL stays one record a line.

_LIMITS = ContractConfig()  # the defaults equal the hard caps of the event models


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _truncated(obj: dict[str, Any], line: bytes, rng: np.random.Generator) -> bytes:
    return line[: int(rng.integers(1, len(line)))]  # a proper prefix of an object never parses


def _not_utf8(obj: dict[str, Any], line: bytes, rng: np.random.Generator) -> bytes:
    return line.replace(b'"item_id":"', b'"item_id":"\xe9', 1)  # Latin-1 bytes in UTF-8


def _missing_field(obj: dict[str, Any], line: bytes, rng: np.random.Generator) -> bytes:
    required = (("user_id", "item_id", "action", "event_time", "request_id")
                if obj["kind"] == "behavior" else
                ("item_id", "event_time") + (("title", "category") if "title" in obj else ()))
    del obj[required[rng.integers(len(required))]]
    return _dumps(obj)


def _wrong_type(obj: dict[str, Any], line: bytes, rng: np.random.Generator) -> bytes:
    options: list[tuple[str, Any]] = [("item_id", 12345), ("event_time", [2026, 1, 1])]
    if obj["kind"] == "behavior":
        options += [("position", "first"), ("action", "like"), ("user_id", None)]
    else:
        options += [("price", "cheap"), ("price", -5.0), ("op", "archive")]
    key, value = options[rng.integers(len(options))]
    obj[key] = value
    return _dumps(obj)


def _bad_timestamp(obj: dict[str, Any], line: bytes, rng: np.random.Generator) -> bytes:
    options = ("2026-01-01 10:00:00", 1767225600000, "1970-01-01T00:00:00Z", "next tuesday",
               "2026-13-45T25:61:00Z")
    obj["event_time"] = options[rng.integers(len(options))]
    return _dumps(obj)


def _oversized(obj: dict[str, Any], line: bytes, rng: np.random.Generator) -> bytes:
    keys = ["item_id", "user_id", "request_id"] if obj["kind"] == "behavior" else ["item_id"]
    if "title" in obj:
        keys += ["title", "description"]
    key = keys[rng.integers(len(keys))]
    size = (_LIMITS.max_text_chars if key in ("title", "description") else _LIMITS.max_id_chars)
    obj[key] = "x" * (size + 1)
    return _dumps(obj)


def _wrong_kind(obj: dict[str, Any], line: bytes, rng: np.random.Generator) -> bytes:
    obj["kind"] = "item" if obj["kind"] == "behavior" else "behavior"
    return _dumps(obj)


def _not_an_object(obj: dict[str, Any], line: bytes, rng: np.random.Generator) -> bytes:
    # The record as a JSON string. (Not as a one-element array: a Kafka record may carry an
    # array of one key's events, see ppm.events.decode_record.)
    return _dumps(line.decode())


def _bad_image(obj: dict[str, Any], line: bytes, rng: np.random.Generator) -> bytes:
    png = base64.b64decode(obj["image"].partition(",")[2])
    options = (
        "data:image/png;base64,***not base64***",
        "data:image/png;base64," + base64.b64encode(rng.bytes(48)).decode(),  # not a picture
        "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode(),  # truncated
    )
    obj["image"] = options[rng.integers(len(options))]
    return _dumps(obj)


_Defect = Callable[[dict[str, Any], bytes, np.random.Generator], bytes]
_DEFECTS: tuple[_Defect, ...] = (
    _truncated, _not_utf8, _missing_field, _wrong_type, _bad_timestamp, _oversized, _wrong_kind,
    _not_an_object,
)


def _malformed(line: bytes, rng: np.random.Generator) -> bytes:
    obj = json.loads(line)
    defects = _DEFECTS + ((_bad_image,) if "image" in obj else ())
    return defects[rng.integers(len(defects))](obj, line, rng)


# --------------------------------------------------------------------------- the simulator


class ShopSimulator:
    """The seeded shop world of one :class:`~ppm.config.SimulatorConfig`.

    Building it creates the catalog and the users (fast); events are generated lazily, day by
    day, each time :meth:`events`, :meth:`records` or :meth:`write_jsonl` is called, and are the
    same every time. A naive ``config.start`` is taken as UTC. Item ids are ``i0000000``...,
    user ids ``u0000000``..., request ids ``r000000000``...

    Example::

        sim = ShopSimulator(SimulatorConfig(seed=7, days=1, n_users=100))
        summary = sim.write_jsonl(Path("out"))   # out/items.jsonl, out/behaviors.jsonl
        truth = sim.oracle()                     # as out/oracle.parquet: for evaluation only
    """

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        start = config.start if config.start.tzinfo else config.start.replace(tzinfo=UTC)
        self._start = start.astimezone(UTC)
        self._start64 = np.datetime64(self._start.replace(tzinfo=None), "us")
        self._end = max(round(config.days * DAY_US), 1)  # µs since start
        self._v2 = config.world == "v2"
        self._vocab = VOCAB_V2 if self._v2 else VOCAB  # attributes users have tastes over
        # v1 searches name a colour and a category; v2 searches only a category, since its
        # colour is in the photo alone.
        self._queries = ([c.noun for c in CATEGORIES] if self._v2 else
                         [f"{colour} {c.noun}" for c in CATEGORIES for colour in COLOURS])
        self._build_catalog()
        self._build_texts()
        self._build_photos()
        self._build_indexes()
        self._build_users()
        self._build_click_model()

    def _rng(self, stream: _Stream, index: int = 0) -> np.random.Generator:
        seq = np.random.SeedSequence(self.config.seed % 2**64, spawn_key=(stream, index))
        return np.random.default_rng(seq)

    # ----------------------------------------------------------------- world building

    def _build_catalog(self) -> None:
        cfg, rng = self.config, self._rng(_Stream.CATALOG)
        initial = np.sort(rng.integers(-14 * DAY_US, -7 * DAY_US, cfg.initial_items))
        arrivals = [initial]
        for day in range(math.ceil(cfg.days)):
            length = min(DAY_US, self._end - day * DAY_US)
            count = round(cfg.items_per_day * length / DAY_US)
            arrivals.append(day * DAY_US + np.sort(rng.integers(0, length, count)))
        arrival = np.concatenate(arrivals)  # item index = arrival order
        n = self.n_items = len(arrival)

        self._attr = {  # the price tier (v2) follows from the price below
            name: rng.choice(len(values), n, p=rng.dirichlet(np.full(len(values), 4.0)))
            for name, values in self._vocab.items() if name != "price_tier"
        }
        # v2: the shop is an attribute with tastes, and price says nothing about quality.
        shop = self._attr["shop"] if self._v2 else rng.integers(0, len(SHOPS), n)
        quality_premium = 0.0 if self._v2 else 0.4
        quality = rng.normal(0.0, QUALITY_STD, n)
        brand_premium = rng.normal(0.0, 0.25, len(BRANDS))
        median = np.array([c.median_price for c in CATEGORIES])[self._attr["category"]]
        raw_price = median * np.exp(0.35 * rng.standard_normal(n) + quality_premium * quality
                                    + brand_premium[self._attr["brand"]])
        price = np.maximum(np.round(raw_price), 1.0) - 0.01  # shop prices end in .99
        if self._v2:
            self._attr["price_tier"] = np.digitize(np.log(price / median), PRICE_TIER_EDGES)

        # Withdrawals and sales happen after the simulation starts and an hour after arrival.
        earliest = np.maximum(arrival, 0) + HOUR_US
        deleted = np.where((rng.random(n) < cfg.delete_share) & (earliest < self._end),
                           earliest + (rng.random(n) * (self._end - earliest)).astype(np.int64),
                           NEVER)
        sale_end = np.minimum(deleted, self._end)
        sale = np.where((rng.random(n) < cfg.sale_share) & (earliest < sale_end),
                        earliest + (rng.random(n) * (sale_end - earliest)).astype(np.int64),
                        NEVER)
        sale_price = np.maximum(np.round(price * rng.uniform(0.6, 0.9, n)), 1.0) - 0.01

        self._arrival, self._deleted, self._sale = arrival, deleted, sale
        self._quality, self._price, self._sale_price, self._shop = quality, price, sale_price, shop
        self._median_price = median
        self._item_ids = [f"i{i:07d}" for i in range(n)]
        self._build_drift(earliest, sale_end)

    def _build_drift(self, earliest: np.ndarray, listed_until: np.ndarray) -> None:
        """The drift dials' draws (module docstring, "Drift"), from a stream of their own so
        a static world is the same with or without them."""
        cfg, rng, n = self.config, self._rng(_Stream.DRIFT), self.n_items
        self._restyle = np.where((rng.random(n) < cfg.restyle_share) & (earliest < listed_until),
                                 earliest + (rng.random(n) * (listed_until - earliest)
                                             ).astype(np.int64), NEVER)
        n_colours = len(COLOURS)  # a new colour, never the old one
        self._new_colour = (self._attr["colour"] + rng.integers(1, n_colours, n)) % n_colours
        count = rng.poisson(cfg.trends_per_day * self._end / DAY_US)
        content = CONTENT_ONLY if self._v2 else ("colour", "material", "style")
        attribute = rng.integers(0, len(content), count)
        self._trends = [(content[a], int(rng.integers(0, len(self._vocab[content[a]]))),
                         int(t), int(t + cfg.trend_hours * HOUR_US))
                        for a, t in zip(attribute, rng.integers(0, self._end, count), strict=True)]
        self._taste_rates = {name: rng.normal(0.0, cfg.taste_drift_per_day, (cfg.n_users, len(v)))
                             if cfg.taste_drift_per_day > 0 else None
                             for name, v in self._vocab.items()}

    def _build_texts(self) -> None:
        rng = self._rng(_Stream.TEXT)
        # The quality line tells the truth only roughly, like real copy-writing.
        seen_quality = self._quality + rng.normal(0.0, QUALITY_STD, self.n_items)
        tier = np.digitize(seen_quality, np.quantile(seen_quality, [1 / 3, 2 / 3]))
        detail = rng.random(self.n_items)
        self._titles, self._descriptions = [], []
        for i in range(self.n_items):
            cat = CATEGORIES[self._attr["category"][i]]
            brand = BRANDS[self._attr["brand"][i]]
            colour = COLOURS[self._attr["colour"][i]]
            material = MATERIALS[self._attr["material"][i]]
            style = STYLES[self._attr["style"][i]]
            feature = cat.details[int(detail[i] * len(cat.details))]
            if self._v2:  # no colour, no pattern (photo only), no quality line (nowhere)
                self._titles.append(f"{brand} {style} {material} {cat.noun}")
                self._descriptions.append(
                    f"{style.capitalize()} {cat.noun} in {material} by {brand}, with "
                    f"{feature}. Sold by {SHOPS[self._shop[i]]}."
                )
                continue
            self._titles.append(f"{brand} {style} {colour} {material} {cat.noun}")
            self._descriptions.append(
                f"{style.capitalize()} {cat.noun} in {colour} {material} by {brand}, with "
                f"{feature}. {_QUALITY_LINES[tier[i]]} Sold by {SHOPS[self._shop[i]]}."
            )

    def _build_photos(self) -> None:
        rng, n = self._rng(_Stream.PHOTO), self.n_items
        which = rng.random(n)  # which picture of its class an item gets
        # Shift and shade of the procedural silhouettes: (n, 3) = dx, dy, grey level.
        self._jitter = np.stack([rng.integers(-1, 2, n), rng.integers(-1, 2, n),
                                 rng.integers(150, 256, n)], axis=1)
        self._photo_index = np.full(n, -1)  # into Fashion-MNIST's training images
        folder = Path(self.config.fashion_mnist_dir or DEFAULT_FASHION_MNIST)
        self._fashion = _fashion_mnist(folder)
        if self._fashion is None:
            warnings.warn(
                f"Fashion-MNIST not found in {folder}: item photos are procedural silhouettes "
                "(install dataset-fashion-mnist or set simulator.fashion_mnist_dir)",
                stacklevel=3,
            )
            return
        labels = self._fashion[1]
        for c in range(len(CATEGORIES)):
            members = np.flatnonzero(self._attr["category"] == c)
            candidates = np.flatnonzero(labels == c)
            self._photo_index[members] = candidates[(which[members] * len(candidates)).astype(int)]

    def _build_indexes(self) -> None:
        """What generation looks up: the item events in time order, and the pools that
        impressions are drawn from."""
        n, sale, deleted, arrival = self.n_items, self._sale, self._deleted, self._arrival
        restyle = self._restyle
        times = np.concatenate([arrival, sale[sale < NEVER], deleted[deleted < NEVER],
                                restyle[restyle < NEVER]])
        items = np.concatenate([np.arange(n), np.flatnonzero(sale < NEVER),
                                np.flatnonzero(deleted < NEVER), np.flatnonzero(restyle < NEVER)])
        ops = np.repeat([_UPSERT, _SALE, _DELETE, _RESTYLE],
                        [n, int((sale < NEVER).sum()), int((deleted < NEVER).sum()),
                         int((restyle < NEVER).sum())])
        order = np.lexsort((ops, items, times))
        self._schedule_time, self._schedule_item, self._schedule_op = (
            times[order], items[order], ops[order])

        horizon = self._end + DAY_US
        n_colours = len(COLOURS)
        self._pools = (  # browsing, search by category, (v1) search by category and colour
            _Pool(np.zeros(n, np.int64), arrival, horizon),
            _Pool(self._attr["category"], arrival, horizon),
        )
        if not self._v2:
            self._pools += (_Pool(self._attr["category"] * n_colours + self._attr["colour"],
                                  arrival, horizon),)

    def _build_users(self) -> None:
        cfg, rng = self.config, self._rng(_Stream.USERS)
        n = cfg.n_users
        self._activity = rng.lognormal(-0.32, 0.8, n)  # mean 1: heavy and light users
        rows = np.arange(n)
        self._tastes: dict[str, np.ndarray] = {}
        strengths = TASTE_STRENGTH_V2 if self._v2 else TASTE_STRENGTH
        for name, values in self._vocab.items():
            strength = strengths[name]
            taste = (rng.normal(0.0, TASTE_NOISE, (n, len(values)))
                     + rng.normal(0.0, TASTE_TREND, len(values)))
            taste[rows, rng.integers(0, len(values), n)] += strength
            second = rows[rng.random(n) < 0.5]
            taste[second, rng.integers(0, len(values), len(second))] += strength
            taste[rows, rng.integers(0, len(values), n)] -= strength
            taste.flags.writeable = False
            self._tastes[name] = taste  # (n_users, n_values)
        self._user_ids = [f"u{u:07d}" for u in range(n)]

    def _build_click_model(self) -> None:
        """What the click logit needs besides tastes and attributes: each user's expected
        taste for every attribute over the catalog, and in v2 the weights that standardise
        the structured and the content-only taste sums (over all users x the catalog)."""
        n_users = self.config.n_users
        frequency = {name: np.bincount(self._attr[name], minlength=len(values)) / self.n_items
                     for name, values in self._vocab.items()}
        self._expected = {name: self._tastes[name] @ frequency[name]  # (n_users,)
                          for name in self._vocab}
        if not self._v2:  # idrec reads category and brand; the rest is content
            self._structured, self._content = ("category", "brand"), ("colour", "material",
                                                                       "style")
            return
        self._structured, self._content = STRUCTURED, CONTENT_ONLY

        def mean_and_std(names: tuple[str, ...]) -> tuple[float, float]:
            # Attributes are drawn independently per item, so given the user the variance
            # of the sum is the sum of the per-attribute variances.
            user_mean = sum((self._expected[a] for a in names), np.zeros(n_users))
            within = sum(((self._tastes[a] ** 2) @ frequency[a] - self._expected[a] ** 2
                          for a in names), np.zeros(n_users))
            mean = float(user_mean.mean())
            variance = float((user_mean**2).mean() + within.mean()) - mean**2
            return mean, math.sqrt(max(variance, 0.0))

        share = CONTENT_SHARE * self.config.content_signal
        self._taste_terms = []  # (attributes, mean, weight) of the v2 taste term
        for names, part in ((self._structured, 1.0 - share), (self._content, share)):
            mean, std = mean_and_std(names)
            weight = TASTE_STD_V2 * math.sqrt(part) / std if std > 0 else 0.0
            self._taste_terms.append((names, mean, weight))

    # ----------------------------------------------------------------- ground truth

    @property
    def catalog(self) -> pd.DataFrame:
        """Ground truth, one row per item (a fresh copy): ids, attribute values (as in
        :data:`VOCAB`, or :data:`VOCAB_V2` in v2), ``shop``, ``title``, ``price`` (the list
        price), latent ``quality``, and UTC times
        ``arrival``, ``sale_at`` (with ``sale_price``) and ``deleted_at`` (NaT: never), and
        ``photo``: the index of its picture among Fashion-MNIST's training images (-1 when the
        photos are procedural)."""
        import pandas as pd

        def stamp(us: np.ndarray) -> pd.DatetimeIndex:
            when = self._start64 + np.where(us < NEVER, us, 0).astype("timedelta64[us]")
            return pd.DatetimeIndex(np.where(us < NEVER, when, np.datetime64("NaT")), tz=UTC)

        frame = {"item_id": self._item_ids}
        frame |= {name: np.array(values)[self._attr[name]]
                  for name, values in self._vocab.items()}
        return pd.DataFrame(frame | {
            "shop": np.array(SHOP_IDS)[self._shop], "title": self._titles, "price": self._price,
            "quality": self._quality, "arrival": stamp(self._arrival),
            "sale_at": stamp(self._sale),
            "sale_price": np.where(self._sale < NEVER, self._sale_price, np.nan),
            "deleted_at": stamp(self._deleted),
            "photo": self._photo_index,
        })

    @property
    def user_tastes(self) -> pd.DataFrame:
        """Ground-truth taste weights (a fresh copy): index ``user_id``, columns
        ``(attribute, value)``, e.g. ``tastes.loc["u0000003", ("colour", "black")]``."""
        import pandas as pd

        columns = pd.MultiIndex.from_tuples(
            [(name, value) for name, values in self._vocab.items() for value in values])
        weights = np.concatenate([self._tastes[name] for name in self._vocab], axis=1)
        return pd.DataFrame(weights, index=pd.Index(self._user_ids, name="user_id"),
                            columns=columns)

    # ----------------------------------------------------------------- generation

    def _value(self, name: str, items: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The items' value of attribute ``name`` at times ``t`` (a restyle changes the
        colour)."""
        if name != "colour":
            return self._attr[name][items]
        return np.where(self._restyle[items] <= t, self._new_colour[items],
                        self._attr[name][items])

    def _taste(self, users: np.ndarray, items: np.ndarray, t: np.ndarray,
               names: Sequence[str], blind: bool = False) -> np.ndarray:
        """Sum over attributes ``names`` of the user's taste at ``t`` for the item's value
        then; ``blind``: the content-only ones replaced by the user's expectation over the
        catalog."""
        total = np.zeros(len(users))
        for a in names:
            if blind and a in self._content:
                total = total + self._expected[a][users]
                continue
            value = self._value(a, items, t)
            total = total + self._tastes[a][users, value]
            if self._taste_rates[a] is not None:  # drift: linear in time since the start
                total = total + self._taste_rates[a][users, value] * (t / DAY_US)
        return total

    def _affinity(self, users: np.ndarray, items: np.ndarray, t: np.ndarray,
                  blind: bool = False) -> np.ndarray:
        """The user x item taste term of the click logit at times ``t``, (n,); ``blind`` as
        in :meth:`_taste`."""
        if not self._v2:
            return self._taste(users, items, t, ATTRIBUTES, blind)
        return sum(weight * (self._taste(users, items, t, names, blind) - mean)
                   for names, mean, weight in self._taste_terms)

    def _click_logit(self, affinity: np.ndarray, items: np.ndarray, position: np.ndarray,
                     search: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The logit a click is drawn with at times ``t``: sigmoid of it is the click
        probability."""
        bias = CLICK_BIAS_V2 if self._v2 else CLICK_BIAS
        logit = (bias + affinity + self._quality[items] - POSITION_DECAY * np.log1p(position)
                 + SEARCH_INTENT * search)
        cfg = self.config
        if cfg.sale_click_boost:
            logit = logit + cfg.sale_click_boost * (self._sale[items] <= t)
        first, last = (int(t.min()), int(t.max())) if len(t) else (0, -1)
        for name, value, start, end in self._trends:
            if cfg.trend_boost and start <= last and end > first:  # overlaps these times
                logit = logit + cfg.trend_boost * ((self._value(name, items, t) == value)
                                                   & (t >= start) & (t < end))
        return logit

    def _sessions(self, day: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(users, times) of the day's sessions, sorted by time."""
        length = min(DAY_US, self._end - day * DAY_US)
        traffic = float(np.interp(length, _HOUR_EDGES_US, _TRAFFIC_CDF))  # partial last day
        counts = rng.poisson(self.config.sessions_per_user_per_day * self._activity * traffic)
        users = np.repeat(np.arange(self.config.n_users), counts)
        times = day * DAY_US + _times_of_day(rng, len(users), length)
        order = np.lexsort((users, times))
        return users[order], times[order]

    def _draw(self, rng: np.random.Generator, pool: _Pool, group: np.ndarray, t: np.ndarray,
              fresh: np.ndarray) -> np.ndarray:
        """Items for slots (1-D), never one withdrawn within FOLLOW_UP_US of ``t``; -1: none."""
        items = pool.draw(group, t, fresh, rng.random(len(t)))
        for _ in range(REDRAWS):
            doomed = np.flatnonzero((items >= 0) & (self._deleted[items] <= t + FOLLOW_UP_US))
            if not len(doomed):
                return items
            items[doomed] = pool.draw(group[doomed], t[doomed], fresh[doomed],
                                      rng.random(len(doomed)))
        items[(items >= 0) & (self._deleted[items] <= t + FOLLOW_UP_US)] = -1
        return items

    def _behaviors(self, rng: np.random.Generator, users: np.ndarray, times: np.ndarray,
                   first_request: int) -> _Behaviors:
        """All behavior events of these sessions (one request each), unsorted."""
        cfg, n, k = self.config, len(users), self.config.impressions_per_session
        if not n:
            return _Behaviors.empty()
        search = rng.random(n) < cfg.search_share
        query_cat = _gumbel_argmax(rng, QUERY_FOCUS * self._tastes["category"][users])
        query_colour = _gumbel_argmax(rng, QUERY_FOCUS * self._tastes["colour"][users])
        asked = query_cat if self._v2 else query_cat * len(COLOURS) + query_colour
        query = np.where(search, asked, -1)  # into self._queries

        # Which pool each session draws from: the narrowest one with items for its query.
        groups = (np.zeros(n, np.int64), query_cat, query)[: len(self._pools)]
        level = np.zeros(n, np.int64)
        for lv in range(1, len(self._pools)):
            first, _, stop = self._pools[lv].ranges(groups[lv], times)
            level[search & (stop > first)] = lv
        fresh = rng.random((n, k)) < cfg.fresh_share
        items = np.empty((n, k), np.int64)  # (sessions, slots)
        for lv, pool in enumerate(self._pools):
            rows = np.flatnonzero(level == lv)
            items[rows] = self._draw(rng, pool, np.repeat(groups[lv][rows], k),
                                     np.repeat(times[rows], k), fresh[rows].ravel()
                                     ).reshape(-1, k)

        # A request shows an item once: keep the first slot of repeats, close the gaps.
        by_item = np.argsort(items, axis=1, kind="stable")
        ranked = np.take_along_axis(items, by_item, axis=1)
        repeat = np.zeros((n, k), bool)
        np.put_along_axis(repeat, by_item[:, 1:], ranked[:, 1:] == ranked[:, :-1], axis=1)
        shown = (items >= 0) & ~repeat
        position = np.cumsum(shown, axis=1) - 1
        session, slot = np.nonzero(shown)
        item, pos = items[session, slot], position[session, slot]
        user, t = users[session], times[session]

        match = self._affinity(user, item, t)
        click_logit = self._click_logit(match, item, pos, search[session], t)
        c = np.flatnonzero(rng.random(len(item)) < _sigmoid(click_logit))
        deadline = t[c] + FOLLOW_UP_US - 1
        click_t = np.minimum(t[c] + US + rng.exponential(30 * US, len(c)).astype(np.int64),
                             deadline)
        order_logit = (ORDER_BIAS + 0.5 * match[c] + self._quality[item[c]]
                       - PRICE_SENSITIVITY * np.log(self._price[item[c]]
                                                    / self._median_price[item[c]]))
        ordered = rng.random(len(c)) < _sigmoid(order_logit)
        order_t = np.minimum(click_t + 30 * US + rng.exponential(240 * US, len(c)).astype(np.int64),
                             deadline)
        collected = rng.random(len(c)) < _sigmoid(COLLECT_BIAS + 0.4 * match[c])
        collect_t = np.minimum(click_t + 3 * US + rng.exponential(60 * US, len(c)).astype(np.int64),
                               deadline)

        rows = np.concatenate([np.arange(len(item)), c, c[ordered], c[collected]])
        return _Behaviors(
            time=np.concatenate([t, click_t, order_t[ordered], collect_t[collected]]),
            user=user[rows],
            item=item[rows],
            action=np.repeat([IMPRESSION, CLICK, ORDER, COLLECT],
                             [len(item), len(c), int(ordered.sum()), int(collected.sum())]),
            request=first_request + session[rows],
            position=pos[rows],
            query=query[session[rows]],
        )

    def _steps(self) -> Iterator[_Step]:
        """The whole simulation as consecutive stretches of output in event-time order."""
        pending = _Behaviors.empty()  # generated but later than what may be emitted yet
        next_request, next_item_event = 0, 0
        for day in range(math.ceil(self.config.days)):
            rng = self._rng(_Stream.BEHAVIOR, day)
            users, times = self._sessions(day, rng)
            day_end = min((day + 1) * DAY_US, self._end)
            for lo in range(0, max(len(users), 1), MAX_BATCH_SESSIONS):
                hi = lo + MAX_BATCH_SESSIONS
                new = self._behaviors(rng, users[lo:hi], times[lo:hi], next_request)
                next_request += len(users[lo:hi])
                # Later batches start at their first session, so all before it is final.
                # Follow-ups past the end of the simulation are never emitted.
                until = int(times[hi]) if hi < len(users) else day_end
                pending = _Behaviors.concat([pending, new])
                due = pending.time < until
                out, pending = pending.take(due), pending.take(~due)
                out = out.take(np.lexsort((out.action, out.position, out.request, out.time)))
                stop = int(np.searchsorted(self._schedule_time, until, "left"))
                rows = np.arange(next_item_event, stop)
                next_item_event = stop
                cuts = np.searchsorted(out.time, self._schedule_time[rows], "left")
                yield _Step(items=rows, behaviors=out, cuts=cuts, until=until)

    def _oracle_rows(self, b: _Behaviors) -> dict[str, np.ndarray]:
        """The oracle's columns for the impressions among behaviors ``b``, in their order."""
        shown = b.take(np.flatnonzero(b.action == IMPRESSION))
        user, item, position, search = shown.user, shown.item, shown.position, shown.query >= 0
        t = shown.time
        top = np.zeros_like(position)  # position 0: no position effect
        affinity = self._affinity(user, item, t)  # exactly as the clicks were drawn
        blind = self._affinity(user, item, t, blind=True)
        return {
            "request": shown.request, "item": item, "user": user, "time": shown.time,
            "position": position, "searched": search,
            "p_click": _sigmoid(self._click_logit(affinity, item, position, search, t)),
            "logit": self._click_logit(affinity, item, top, search, t),
            "p_click_structured": _sigmoid(self._click_logit(blind, item, position, search, t)),
            "logit_structured": self._click_logit(blind, item, top, search, t),
        }

    def _oracle_frame(self, parts: Sequence[dict[str, np.ndarray]]) -> pd.DataFrame:
        import pandas as pd

        if not parts:
            parts = [self._oracle_rows(_Behaviors.empty())]
        col = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        return pd.DataFrame({
            "request_id": [f"r{r:09d}" for r in col["request"].tolist()],
            "item_id": np.array(self._item_ids, dtype=object)[col["item"]],
            "user_id": np.array(self._user_ids, dtype=object)[col["user"]],
            "impression_time": pd.DatetimeIndex(
                self._start64 + col["time"].astype("timedelta64[us]")).tz_localize(UTC),
        } | {name: col[name] for name in ("position", "searched", "p_click", "logit",
                                          "p_click_structured", "logit_structured")})

    # ----------------------------------------------------------------- rendering

    def _datetime(self, us: int) -> datetime:
        return self._start + timedelta(microseconds=int(us))

    def _photo_url(self, item: int, colour: int) -> str:
        """The item's photo (:func:`render_photo`) in ``colour`` as an inline PNG data URL."""
        if self._fashion is not None:
            grey = self._fashion[0][self._photo_index[item]]
        else:
            grey = _procedural_photo(self._attr["category"][item], *map(int, self._jitter[item]))
        pattern = int(self._attr["pattern"][item]) if "pattern" in self._attr else None
        pixels = render_photo(grey, colour, pattern)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    def _item_event(self, row: int) -> ItemEvent:
        item, op = int(self._schedule_item[row]), self._schedule_op[row]
        when = self._datetime(self._schedule_time[row])
        if op == _DELETE:
            return ItemEvent(item_id=self._item_ids[item], op=ItemOp.DELETE, event_time=when)
        # The item as it is then: on sale from its sale, in its new colour from its restyle.
        t = self._schedule_time[row]
        # Sales come at least an hour after arrival, so the arrival upsert is never on sale.
        on_sale = self._sale[item] <= t
        title, description = self._titles[item], self._descriptions[item]
        colour = int(self._value("colour", np.array([item]), np.array([t]))[0])
        if colour != self._attr["colour"][item] and not self._v2:  # v1 names the colour
            material = MATERIALS[self._attr["material"][item]]
            before = f" {COLOURS[self._attr['colour'][item]]} {material}"
            after = f" {COLOURS[colour]} {material}"
            title, description = title.replace(before, after), description.replace(before, after)
        return ItemEvent(
            item_id=self._item_ids[item],
            event_time=when,
            title=title,
            description=description + (" Now on sale." if on_sale else ""),
            category=VOCAB["category"][self._attr["category"][item]],
            brand=VOCAB["brand"][self._attr["brand"][item]],
            shop=SHOP_IDS[self._shop[item]],
            price=float(self._sale_price[item] if on_sale else self._price[item]),
            image=self._photo_url(item, colour),
        )

    @staticmethod
    def _request_ids(b: _Behaviors) -> list[str]:
        return [f"r{r:09d}" for r in b.request.tolist()]

    def _behavior_events(self, b: _Behaviors) -> list[BehaviorEvent]:
        return [
            BehaviorEvent(
                user_id=self._user_ids[u], item_id=self._item_ids[i], action=ACTIONS[a],
                event_time=self._datetime(t), request_id=r, position=p,
                query=self._queries[q] if q >= 0 else None,
            )
            for u, i, a, t, r, p, q in zip(
                b.user.tolist(), b.item.tolist(), b.action.tolist(), b.time.tolist(),
                self._request_ids(b), b.position.tolist(), b.query.tolist(), strict=True)
        ]

    def _behavior_lines(self, b: _Behaviors) -> list[tuple[Literal["behavior"], bytes]]:
        """Wire records, byte-identical to ``BehaviorEvent.to_json()`` (the tests check) but
        much faster (docs/results.md): no model object per event."""
        stamps = np.datetime_as_string(self._start64 + b.time.astype("timedelta64[us]"),
                                       unit="us").tolist()
        users, items = self._user_ids, self._item_ids
        # tails[q + 1]: the record's end; q = -1 (browsing) has no query field.
        tails = ["}"] + [f',"query":{json.dumps(q)}}}' for q in self._queries]
        return [
            ("behavior", (f'{{"kind":"behavior","user_id":"{users[u]}","item_id":"{items[i]}",'
                          f'"action":"{ACTIONS[a]}","event_time":"{ts}Z","request_id":"{r}",'
                          f'"position":{p}{tails[q]}').encode())
            for u, i, a, ts, r, p, q in zip(
                b.user.tolist(), b.item.tolist(), b.action.tolist(), stamps,
                self._request_ids(b), b.position.tolist(), (b.query + 1).tolist(), strict=True)
        ]

    def _record_steps(self) -> Iterator[tuple[_Step, list[tuple[Literal["item", "behavior"],
                                                                 bytes]]]]:
        """Each step with its wire records, malformed ones mixed in right after their source."""
        share = self.config.malformed_share
        rng = self._rng(_Stream.MALFORMED)
        for step in self._steps():
            item_records = [("item", self._item_event(r).to_json()) for r in step.items.tolist()]
            records = _interleave(item_records, self._behavior_lines(step.behaviors), step.cuts)
            if share > 0:
                mixed = []
                for record, spoil in zip(records, rng.random(len(records)) < share, strict=True):
                    mixed.append(record)
                    if spoil:
                        mixed.append((record[0], _malformed(record[1], rng)))
                records = mixed
            yield step, records

    # ----------------------------------------------------------------- public API

    def events(self) -> Iterator[ItemEvent | BehaviorEvent]:
        """All valid events, typed, in event-time order (no malformed records).

        Builds a model object per event: fine for tests and demos; use :meth:`records` or
        :meth:`write_jsonl` for millions of events.
        """
        for step in self._steps():
            items = [self._item_event(r) for r in step.items.tolist()]
            yield from _interleave(items, self._behavior_events(step.behaviors), step.cuts)

    def records(self) -> Iterator[tuple[Literal["item", "behavior"], bytes]]:
        """``(topic kind, JSON bytes)`` in event-time order: every event of :meth:`events` as
        ``event.to_json()``, plus after each, with probability ``malformed_share``, a
        malformed record derived from it (of the same kind) that ``ppm.events.decode`` turns
        into a DeadLetter. No record contains a newline byte."""
        for _, records in self._record_steps():
            yield from records

    def write_oracle(self, path: Path) -> pd.DataFrame:
        """:meth:`oracle`, written to ``path`` as parquet (atomically, its folder made if
        needed: a reader finds the whole truth or none) and returned."""
        from ppm.atomic_file import write_atomically

        truth = self.oracle()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: truth.to_parquet(f, index=False))
        return truth

    def oracle(self) -> pd.DataFrame:
        """The truth behind every impression of :meth:`events`, one row each, in event-time
        order: for scoring models against the best achievable ranking. Never feed it to a
        model.

        Columns: ``request_id``, ``item_id`` (together the key: a request shows an item
        once), ``user_id``, ``impression_time`` (UTC), ``position``, ``searched`` (the
        request had a query, which adds ``SEARCH_INTENT`` to the logit); ``p_click``, the true
        click probability the click was drawn with (position effect included), and
        ``logit``, its logit at position 0 (bias, tastes, quality and search intent, no
        position); ``p_click_structured`` and ``logit_structured``, the same with the
        content-only attributes' tastes (v2: :data:`CONTENT_ONLY`; v1: colour, material,
        style) replaced by the user's expectation over the catalog: what an oracle that knows
        everything but the photo and the text would predict (to first order).

        To score a model as a share of the achievable AUC, join the oracle to its samples
        and compare AUCs on the same rows. Training-log window files carry ``request_id``
        and ``item_id``, so::

            samples.merge(sim.oracle(), on=["request_id", "item_id"], how="left")

        (Their ``sample_id`` is ``sample_id_of(request_id, item_id, impression_us)``, with
        ``impression_us`` the impression time in µs since the Unix epoch: the same row.)
        Generates the whole simulation again, without rendering any event.
        """
        return self._oracle_frame([self._oracle_rows(step.behaviors) for step in self._steps()])

    def write_jsonl(self, out_dir: Path, progress: bool = False,
                    oracle: bool = True) -> SimulationSummary:
        """Write :meth:`records` to ``out_dir/items.jsonl`` and ``out_dir/behaviors.jsonl``
        (one record a line, files replaced) and return the counts. ``oracle``: also write
        :meth:`oracle` to ``out_dir/oracle.parquet`` (else remove an old one), in the same
        pass. ``progress`` shows a tqdm bar over simulated hours."""
        from tqdm import tqdm

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        by_action = np.zeros(len(ACTIONS), np.int64)
        item_events = malformed = fresh = 0
        oracle_parts = []
        with (open(out_dir / "items.jsonl", "wb") as items_file,
              open(out_dir / "behaviors.jsonl", "wb") as behaviors_file,
              tqdm(total=math.ceil(self.config.days * 24), unit="h", desc="simulating",
                   disable=not progress) as bar):
            files = {"item": items_file, "behavior": behaviors_file}
            for step, records in self._record_steps():
                lines: dict[str, list[bytes]] = {"item": [], "behavior": []}
                for kind, line in records:
                    lines[kind].append(line)
                for kind, chunk in lines.items():
                    if chunk:
                        files[kind].write(b"\n".join(chunk) + b"\n")
                b = step.behaviors
                if oracle:
                    oracle_parts.append(self._oracle_rows(b))
                by_action += np.bincount(b.action, minlength=len(ACTIONS))
                shown = b.action == IMPRESSION
                fresh += int((b.time[shown] - self._arrival[b.item[shown]] < DAY_US).sum())
                item_events += len(step.items)
                malformed += len(records) - len(step.items) - len(b)
                bar.update(math.ceil(step.until / HOUR_US) - bar.n)
                bar.set_postfix(behaviors=int(by_action.sum()), refresh=False)
        if oracle:
            self._oracle_frame(oracle_parts).to_parquet(out_dir / ORACLE_FILE, index=False)
        else:
            (out_dir / ORACLE_FILE).unlink(missing_ok=True)
        return SimulationSummary(
            items=self.n_items,
            item_events=item_events,
            behavior_events=int(by_action.sum()),
            malformed=malformed,
            days=self.config.days,
            by_action=dict(zip(ACTIONS, by_action.tolist(), strict=True)),
            fresh_impression_share=fresh / max(int(by_action[IMPRESSION]), 1),
        )
