"""A Faust worker's Prometheus metrics: ours (``ppm_*``) and Faust's own (``ppm_faust_*``).

:class:`WorkerMetrics` holds one registry per worker. Faust's Prometheus sensor
(``faust.sensors.prometheus.PrometheusMonitor``: records in and out, commit and send
latency, rebalances, end and committed offsets per partition) records into it too, named
``ppm_faust_*``. Faust's ``setup_prometheus_sensors`` would serve them through Faust's web
server, which the worker runs without (``--without-web``: one more aiohttp server, on port
6066 by default, for nothing else); here the registry is served by prometheus_client's own
small HTTP server instead (:meth:`WorkerMetrics.serve`), on ``kafka.metrics_host`` (the
loopback by default) and ``kafka.metrics_port`` (0: a free port, so several workers on one
host never collide; -1: none). The worker writes the address it got to
``DATA_DIR/metrics/<worker>.json``, where ``ppm status`` finds every worker's endpoint.

Series (``_total`` is added to counters on exposition):

* ``ppm_freshness_seconds`` (histogram): an item event's arrival to its vector being
  readable online, read at each scrape from the worker's own ``FreshnessStats`` (the
  histogram ``ppm status`` reads too; ``le`` at every doubling from 1 ms);
* ``ppm_items_embedded_total``, ``ppm_item_image_errors_total``;
* ``ppm_records_total{topic}`` (Kafka records read), ``ppm_events_total{kind}`` (events
  admitted: a record may hold several);
* ``ppm_dead_letters_total{topic,stage,reason}``: ``reason`` is the class of the reason
  (:func:`reason_class`: the field it names, else the exception type), not its free text;
* ``ppm_retries_total{kind}`` (each retried failure) and ``ppm_outages_total{kind}`` (each
  write that failed at least once because the store or the broker was unreachable);
  ``kind`` is ``item_batch``, ``sequence_batch`` or ``dead_letter``;
* ``ppm_sequences_written_total``, ``ppm_windows_closed_total{partition}``,
  ``ppm_samples_logged_total`` (samples in closed windows);
* ``ppm_batch_seconds{lane}`` (histogram): one batch's processing, items or behaviors;
* ``ppm_unacknowledged_records{lane}`` (gauge): records held until their writes are durable;
* ``ppm_worker_info{worker,app_id}``.

Our series keep their values in the worker (``ppm.metrics``, which says why not in
prometheus_client's metric classes).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import HistogramMetricFamily, InfoMetricFamily

from ppm.atomic_file import write_atomically
from ppm.events import DeadLetter
from ppm.metrics import counter, gauge, histogram, serve
from streams.freshness import FreshnessStats

BATCH_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)
MAX_REASONS = 100
"""Distinct ``reason`` label values a worker keeps; later ones are counted as ``other``."""

_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]{0,39}):")
_LABEL = re.compile(r"[^A-Za-z0-9_. -]")


def reason_class(letter: DeadLetter | dict) -> str:
    """A dead letter's reason as a small label: the field its reason starts with
    (``event_time: ...`` -> ``event_time``), else the exception type behind it, else the
    reason's first clause (``expected a JSON object, got str`` -> ``expected a JSON
    object``), at most 40 characters."""
    reason = letter.get("reason") if isinstance(letter, dict) else letter.reason
    error_type = letter.get("error_type") if isinstance(letter, dict) else letter.error_type
    reason = str(reason or "")
    field = _FIELD.match(reason)
    if field:
        return field.group(1)
    if error_type:
        return _LABEL.sub("", str(error_type))[:40] or "unknown"
    return _LABEL.sub("", reason.split(",")[0]).strip()[:40] or "unknown"


class _Info:
    def __init__(self, name: str, documentation: str, labels: dict[str, str],
                 registry: CollectorRegistry):
        self.name, self.documentation, self.values = name, documentation, labels
        registry.register(self)

    def collect(self) -> Iterator[Any]:
        yield InfoMetricFamily(self.name, self.documentation, value=self.values)


class _Freshness:
    """``ppm_freshness_seconds`` from a :class:`FreshnessStats` (empty until one is set)."""

    def __init__(self, registry: CollectorRegistry):
        self.stats = FreshnessStats()
        registry.register(self)

    def collect(self) -> Iterator[Any]:
        buckets, _, sum_s = self.stats.cumulative_seconds()
        family = HistogramMetricFamily("ppm_freshness_seconds", "Item event arrival to its "
                                       "vector readable online")
        family.add_metric([], [("+Inf" if le == float("inf") else repr(le), n)
                               for le, n in buckets], sum_s)
        yield family


class WorkerMetrics:
    """One worker's metrics (see the module docstring); a registry of its own, so several
    apps in one process (tests) never clash."""

    def __init__(self, worker: str = "", app_id: str = ""):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._freshness = _Freshness(r)
        self.items_embedded = counter(
            "ppm_items_embedded", "Items whose vector was written online", registry=r)
        self.image_errors = counter(
            "ppm_item_image_errors", "Items embedded without a usable photo", registry=r)
        self.records = counter("ppm_records", "Kafka records read", ["topic"], registry=r)
        self.events = counter("ppm_events", "Events admitted", ["kind"], registry=r)
        self.dead_letters = counter(
            "ppm_dead_letters", "Dead letters sent, by reason class",
            ["topic", "stage", "reason"], registry=r)
        self.retries = counter(
            "ppm_retries", "Writes retried because the store or broker was unreachable",
            ["kind"], registry=r)
        self.outages = counter(
            "ppm_outages", "Writes that failed at least once because the store or broker "
            "was unreachable", ["kind"], registry=r)
        self.sequences_written = counter(
            "ppm_sequences_written", "User sequences written online", registry=r)
        self.windows_closed = counter(
            "ppm_windows_closed", "Training windows closed", ["partition"], registry=r)
        self.samples_logged = counter(
            "ppm_samples_logged", "Labelled samples in closed training windows", registry=r)
        self.batch_seconds = histogram(
            "ppm_batch_seconds", "Processing time of one batch", ["lane"],
            buckets=BATCH_BUCKETS_S, registry=r)
        self.unacknowledged = gauge(
            "ppm_unacknowledged_records", "Records held until their writes are durable",
            ["lane"], registry=r)
        _Info("ppm_worker", "The worker", {"worker": worker, "app_id": app_id}, registry=r)
        self._reasons: set[str] = set()

    def dead_letter(self, topic: str, letter: DeadLetter) -> None:
        reason = reason_class(letter)
        if reason not in self._reasons:
            if len(self._reasons) >= MAX_REASONS:
                reason = "other"
            self._reasons.add(reason)
        self.dead_letters.labels(topic, letter.stage, reason).inc()

    def retried(self, kind: str, attempt: int) -> None:
        """A write of ``kind`` failed for the ``attempt``-th time (from 1) and is retried."""
        label = kind.replace(" ", "_")
        self.retries.labels(label).inc()
        if attempt == 1:
            self.outages.labels(label).inc()

    def freshness_from(self, stats: FreshnessStats) -> None:
        """Serve ``stats`` (the item lane's, which ``ppm status`` reads from its file) as
        ``ppm_freshness_seconds``."""
        self._freshness.stats = stats

    def held(self, lane: str, count: Callable[[], float]) -> None:
        """Report ``count()`` as the lane's unacknowledged records at each scrape."""
        self.unacknowledged.labels(lane).set_function(count)

    def attach_faust(self, app: Any) -> None:
        """Make Faust's Prometheus sensor the app's monitor, recording into this registry
        (before the worker starts)."""
        from faust.sensors.prometheus import FaustMetrics, PrometheusMonitor

        app.monitor = PrometheusMonitor(metrics=FaustMetrics.create(self.registry, "ppm_faust"))

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (what ``/metrics`` answers)."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> tuple[Any, str]:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) in a daemon thread; returns
        the server and its URL."""
        return serve(self.registry, host, port)


def write_endpoint(path: Path, worker: str, url: str) -> None:
    """Record where a worker serves its metrics (``DataDir.worker_metrics``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps({"worker": worker, "url": url,
                                       "pid": os.getpid()}).encode())


def read_endpoints(metrics_dir: Path) -> list[dict]:
    """Every endpoint file under ``metrics_dir`` (workers that stopped cleanly removed
    theirs; one that was killed leaves its file, which a probe finds unanswered)."""
    out = []
    for path in sorted(Path(metrics_dir).glob("*.json")):
        try:
            out.append(json.loads(path.read_bytes()))
        except (OSError, ValueError):  # removed or being replaced right now
            continue
    return out


def scrape(url: str, timeout_s: float = 1.0) -> dict[str, float] | None:
    """``{"name{labels}": value}`` of the samples an endpoint serves; None when it does
    not answer."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out
