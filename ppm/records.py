"""The records the layers share: what the pipeline knows about an item (:class:`ItemState`)
and a user's recent interactions (:class:`UserSequence`)."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace

from ppm.clock import to_us
from ppm.events import Action, BehaviorEvent


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

    @property
    def vector_source(self) -> tuple[str | None, str | None]:
        """What the item's vector was computed from: ``(encoder_version, content_hash)``.
        A vector derived from it (a frozen plug-in's output) is the item's only while
        this is unchanged."""
        return self.encoder_version, self.content_hash


@dataclass(frozen=True)
class UserSequence:
    """A user's last interactions (and, with ``features.sequence_impressions``, last
    impressions), oldest first; the three tuples are parallel."""

    user_id: str
    item_ids: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()
    times_us: tuple[int, ...] = ()
    """Event times, microseconds since the Unix epoch (UTC)."""

    @property
    def updated_us(self) -> int:
        return self.times_us[-1] if self.times_us else 0

    def before(self, time_us: int) -> UserSequence:
        """The part strictly before ``time_us``: what was known at that moment (this
        sequence itself, not a copy, when all of it is)."""
        if self.updated_us < time_us:  # the common case: nothing to cut
            return self
        cut = bisect.bisect_left(self.times_us, time_us)
        return replace(self, item_ids=self.item_ids[:cut], actions=self.actions[:cut],
                       times_us=self.times_us[:cut])

    def with_event(self, event: BehaviorEvent) -> UserSequence:
        """This sequence plus ``event`` at its event-time place, uncut.

        A late event is inserted where it belongs; an exact duplicate (same item, action and
        time) changes nothing (returns this sequence).
        """
        t = to_us(event.event_time)
        lo = bisect.bisect_left(self.times_us, t)
        hi = bisect.bisect_right(self.times_us, t)
        for i in range(lo, hi):
            if self.item_ids[i] == event.item_id and self.actions[i] == event.action.value:
                return self
        items = (*self.item_ids[:hi], event.item_id, *self.item_ids[hi:])
        actions = (*self.actions[:hi], event.action.value, *self.actions[hi:])
        times = (*self.times_us[:hi], t, *self.times_us[hi:])
        return replace(self, item_ids=items, actions=actions, times_us=times)

    def kept(self, interactions: int, impressions: int = 0) -> UserSequence:
        """The last ``interactions`` interactions and the last ``impressions`` impressions
        (items shown, clicked or not), in their order: what the online store keeps
        (``features.sequence_length`` and ``features.sequence_impressions``) and what a
        model reads of it (``trainer.features.sequence_features`` applies the same rule to
        many sequences at once)."""
        n = len(self.actions)
        if Action.IMPRESSION.value not in self.actions:
            if n <= interactions:
                return self
            cut = slice(n - interactions, n) if interactions else slice(0, 0)
            return replace(self, item_ids=self.item_ids[cut], actions=self.actions[cut],
                           times_us=self.times_us[cut])
        left = {True: impressions, False: interactions}  # what each kind may still keep
        keep = []
        for i in range(n - 1, -1, -1):
            shown = self.actions[i] == Action.IMPRESSION.value
            if left[shown] > 0:
                left[shown] -= 1
                keep.append(i)
        if len(keep) == n:
            return self
        keep.reverse()
        return replace(self, item_ids=tuple(self.item_ids[i] for i in keep),
                       actions=tuple(self.actions[i] for i in keep),
                       times_us=tuple(self.times_us[i] for i in keep))
