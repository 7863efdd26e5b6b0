"""Time as the pipeline keeps it: integer microseconds since the Unix epoch (UTC)."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def to_us(event_time) -> int:
    """A timezone-aware datetime as integer microseconds since the Unix epoch (UTC)."""
    return int(event_time.timestamp() * 1_000_000)


def now_us() -> int:
    """Wall-clock time, microseconds since the Unix epoch."""
    return time.time_ns() // 1_000


def iso(us: int) -> str:
    """Microseconds since the Unix epoch as an ISO 8601 time in UTC, as reports write it."""
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat()
