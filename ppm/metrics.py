"""Prometheus series whose values live in the process, for every ``/metrics`` ppm serves
(the Faust worker's, ``streams/worker_metrics.py``; the scoring server's,
``trainer/serving/http_server.py``).

Not prometheus_client's own ``Counter``/``Histogram``: importing Feast sets
``PROMETHEUS_MULTIPROC_DIR``, and a prometheus_client imported after that keeps every
metric's value in a file shared by all metrics of the same name in the process, so two
servers' or workers' metrics in one process (tests, benchmarks) would add up. A
:class:`Series` is a collector that holds its own values, registered with a registry of its
owner's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)


class Series:
    """One family of samples (counter, histogram or gauge of callables), each labelled
    child's value held here; registered with ``registry``."""

    def __init__(self, kind: str, name: str, documentation: str,
                 labelnames: Sequence[str] = (), registry: CollectorRegistry | None = None,
                 buckets: Sequence[float] = ()):
        self.kind, self.name, self.documentation = kind, name, documentation
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(buckets)
        self._values: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def labels(self, *values: object) -> _Child:
        return _Child(self, tuple(str(v) for v in values))

    def inc(self, amount: float = 1.0, key: tuple[str, ...] = ()) -> None:
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def observe(self, value: float, key: tuple[str, ...] = ()) -> None:
        with self._lock:
            counts = self._values.setdefault(key, [0] * (len(self.buckets) + 1) + [0.0])
            counts[next((i for i, le in enumerate(self.buckets) if value <= le),
                        len(self.buckets))] += 1
            counts[-1] += value

    def set_function(self, count: Callable[[], float], key: tuple[str, ...] = ()) -> None:
        with self._lock:
            self._values[key] = count

    def collect(self) -> Iterator[Any]:
        with self._lock:
            values = sorted(self._values.items())
        if self.kind == "counter":
            family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for key, value in values or ([((), 0.0)] if not self.labelnames else []):
                family.add_metric(list(key), value)
        elif self.kind == "histogram":
            family = HistogramMetricFamily(self.name, self.documentation,
                                           labels=self.labelnames)
            empty = [0] * (len(self.buckets) + 1) + [0.0]
            for key, counts in values or ([((), empty)] if not self.labelnames else []):
                cumulative, running = [], 0
                for le, n in zip([*map(str, self.buckets), "+Inf"], counts[:-1], strict=True):
                    running += n
                    cumulative.append((le, running))
                family.add_metric(list(key), cumulative, counts[-1])
        else:
            family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for key, count in values:
                try:
                    family.add_metric(list(key), float(count()))
                except Exception:  # a scrape shows the rest rather than failing
                    continue
        yield family


class _Child:
    """A labelled child of a :class:`Series`."""

    def __init__(self, series: Series, key: tuple[str, ...]):
        self.series, self.key = series, key

    def inc(self, amount: float = 1.0) -> None:
        self.series.inc(amount, self.key)

    def observe(self, value: float) -> None:
        self.series.observe(value, self.key)

    def set_function(self, count: Callable[[], float]) -> None:
        self.series.set_function(count, self.key)


def counter(name: str, documentation: str, labelnames: Sequence[str] = (),
            registry: CollectorRegistry | None = None) -> Series:
    return Series("counter", name, documentation, labelnames, registry)


def histogram(name: str, documentation: str, labelnames: Sequence[str] = (),
              registry: CollectorRegistry | None = None,
              buckets: Sequence[float] = ()) -> Series:
    return Series("histogram", name, documentation, labelnames, registry, buckets)


def gauge(name: str, documentation: str, labelnames: Sequence[str] = (),
          registry: CollectorRegistry | None = None) -> Series:
    return Series("gauge", name, documentation, labelnames, registry)


def serve(registry: CollectorRegistry, host: str, port: int) -> tuple[Any, str]:
    """Serve ``registry`` as ``/metrics`` on ``host:port`` (0: a free port) from a daemon
    thread; returns the server (``shutdown()`` stops it) and its URL."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return server, f"http://{shown}:{bound_port}/metrics"
