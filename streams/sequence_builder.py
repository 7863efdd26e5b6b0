"""Per-user behavior sequences: the last K interactions, kept in event-time order.

An *interaction* is a click, order or collect. Impressions are many, so by default none is
kept; with ``features.sequence_impressions`` M the sequence also keeps the user's last M
(items shown, clicked or not), so that a model can see what a user passed over beside what
the user took. :class:`SequenceBuilder` applies behavior events to a mapping ``user_id ->
UserSequence`` that the caller owns (a dict in the local runner, a changelog-backed Faust
table in the distributed path), and writes the changed sequences to a sink in one batch.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping, Sequence
from typing import Protocol

from ppm.config import Config
from ppm.events import INTERACTIONS, Action, BehaviorEvent
from ppm.records import UserSequence


class SequenceSink(Protocol):
    """Where changed sequences go (the online store)."""

    def write_sequences(self, sequences: Sequence[UserSequence]) -> None: ...


class SequenceBuilder:
    """Keeps each user's last ``k`` interactions and writes the changed ones in batches.

    Args:
        sink: receives the changed sequences, one call per :meth:`process` batch.
        state: ``user_id -> UserSequence``; owned by the caller so that it can be a durable
            table. Defaults to a fresh dict.
        k: interactions kept (``features.sequence_length``).
        impressions: impressions kept beside them (``features.sequence_impressions``).
    """

    def __init__(
        self,
        sink: SequenceSink,
        state: MutableMapping[str, UserSequence] | None = None,
        k: int = 50,
        impressions: int = 0,
    ):
        self.sink = sink
        self.state: MutableMapping[str, UserSequence] = {} if state is None else state
        self.k = k
        self.impressions = impressions
        self.actions = {*INTERACTIONS, *((Action.IMPRESSION,) if impressions else ())}
        # The last planned batch's users, every event applied and nothing cut yet: what
        # :meth:`history` reads, so that an impression early in a batch is not robbed of
        # the history that later events of the same batch push out of the kept sequence.
        self._uncut: dict[str, UserSequence] = {}

    @classmethod
    def of(cls, cfg: Config, sink: SequenceSink,
           state: MutableMapping[str, UserSequence] | None = None) -> SequenceBuilder:
        """A builder keeping what ``cfg.features`` says."""
        return cls(sink, state, k=cfg.features.sequence_length,
                   impressions=cfg.features.sequence_impressions)

    def process(self, events: Iterable[BehaviorEvent]) -> list[UserSequence]:
        """Apply a batch: write the changed sequences to the sink, then update the state.

        The state changes only after the sink accepted the write, so when the write raises,
        the same batch can be retried and nothing is lost; a caller may commit the batch's
        input offsets once this returns. Returns the changed sequences.
        """
        changed = self.plan(events)
        if changed:
            self.sink.write_sequences(changed)
            self.commit(changed)
        return changed

    def plan(self, events: Iterable[BehaviorEvent]) -> list[UserSequence]:
        """The sequences a batch changes, with the batch applied; nothing is written and the
        state is left as it is. For callers that write elsewhere (another thread) and then
        :meth:`commit`."""
        uncut: dict[str, UserSequence] = {}
        changed: set[str] = set()
        for event in events:
            if event.action not in self.actions:
                continue
            current = uncut.get(event.user_id) or self.state.get(event.user_id)
            current = current or UserSequence(event.user_id)
            uncut[event.user_id] = updated = current.with_event(event)
            if updated is not current:
                changed.add(event.user_id)
        self._uncut = uncut
        return [uncut[u].kept(self.k, self.impressions) for u in uncut if u in changed]

    def history(self, user_id: str, time_us: int) -> UserSequence | None:
        """The user's sequence just before ``time_us`` as the store keeps it (the last
        ``k`` interactions and ``impressions`` impressions before then), for an impression
        of the last planned batch or earlier: what the training log records, and what a
        model serving that impression reads. None: the user has none."""
        sequence = self._uncut.get(user_id) or self.state.get(user_id)
        return None if sequence is None else sequence.before(time_us).kept(
            self.k, self.impressions)

    def commit(self, changed: Iterable[UserSequence]) -> None:
        """Record sequences of :meth:`plan` as the state, once their write succeeded."""
        for sequence in changed:
            self.state[sequence.user_id] = sequence
