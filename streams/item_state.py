"""What the pipeline knows about one item: ID features and the version of its embedding."""

from __future__ import annotations

import math
from dataclasses import dataclass


def price_bucket(price: float | None) -> int:
    """A log-scale price bucket: 0 for unknown, then one bucket per factor of ~1.5."""
    if price is None:
        return 0
    return 1 + max(0, min(30, int(math.log(price + 1.0, 1.5))))


@dataclass(frozen=True)
class ItemState:
    """An item as of its newest applied event. Times are microseconds since the epoch (UTC).

    ``encoder_version``, ``content_hash`` and ``content_time_us`` describe the embedding in the
    online store and are None until the item has been embedded.
    """

    item_id: str
    category: str | None
    brand: str | None
    shop: str | None
    price_bucket: int
    first_seen_us: int
    updated_us: int
    deleted: bool = False
    encoder_version: str | None = None
    content_hash: str | None = None
    content_time_us: int | None = None
