"""A worker's Prometheus metrics without a worker: served over HTTP on the loopback, dead
letters by reason class, retries and outages, Faust's sensor in the same registry, and the
endpoint files ``ppm status`` reads."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ppm.events import DeadLetter
from streams.freshness import FreshnessStats
from streams.worker_metrics import (
    MAX_REASONS,
    WorkerMetrics,
    read_endpoints,
    reason_class,
    scrape,
    write_endpoint,
)


def letter(reason: str, stage: str = "decode", error_type: str | None = None) -> DeadLetter:
    return DeadLetter(expected="item", reason=reason, source="items:0:1",
                      received_at=datetime.now(UTC), payload="{}", stage=stage,
                      error_type=error_type)


@pytest.mark.parametrize(("reason", "error_type", "want"), [
    ("event_time: timestamp has no UTC offset; add 'Z'", None, "event_time"),
    ("request_id: Field required", None, "request_id"),
    ("expected a JSON object, got str", None, "expected a JSON object"),
    ("the encoder failed on this item", "ImageLoadError", "ImageLoadError"),
    ("a very long reason without a field name " * 5, None,
     "a very long reason without a field name "[:40]),
    ("", None, "unknown"),
])
def test_a_reason_becomes_a_small_label(reason, error_type, want):
    assert reason_class(letter(reason or "x", error_type=error_type) if reason else
                        {"reason": reason, "error_type": error_type}) == want


def test_series_are_served_over_http_on_the_loopback():
    metrics = WorkerMetrics("host-1", "ppm-test")
    server, url = metrics.serve("127.0.0.1", 0)
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        metrics.items_embedded.inc(3)
        stats = FreshnessStats()
        stats.add([200.0])  # ms
        metrics.freshness_from(stats)
        metrics.dead_letter("items", letter("event_time: too far ahead"))
        metrics.dead_letter("items", letter("event_time: bad"))
        metrics.dead_letter("behaviors", letter("boom", "process", "ValueError"))
        metrics.retried("item batch", 1)
        metrics.retried("item batch", 2)
        metrics.retried("dead letter", 1)
        metrics.windows_closed.labels("2").inc()
        metrics.held("items", lambda: 7)
        got = scrape(url)
    finally:
        server.shutdown()
        server.server_close()
    assert got["ppm_items_embedded_total"] == 3
    assert got["ppm_freshness_seconds_count"] == 1 and got["ppm_freshness_seconds_sum"] == 0.2
    assert got['ppm_dead_letters_total{reason="event_time",stage="decode",topic="items"}'] == 2
    assert got['ppm_dead_letters_total{reason="ValueError",stage="process",'
               'topic="behaviors"}'] == 1
    assert got['ppm_retries_total{kind="item_batch"}'] == 2
    assert got['ppm_outages_total{kind="item_batch"}'] == 1
    assert got['ppm_outages_total{kind="dead_letter"}'] == 1
    assert got['ppm_windows_closed_total{partition="2"}'] == 1
    assert got['ppm_unacknowledged_records{lane="items"}'] == 7
    assert got['ppm_worker_info{app_id="ppm-test",worker="host-1"}'] == 1
    assert scrape(url, timeout_s=0.5) is None  # stopped: no answer, no exception


def test_reason_labels_are_capped():
    metrics = WorkerMetrics()
    for n in range(MAX_REASONS + 5):
        metrics.dead_letter("items", letter(f"field{n}: bad"))
    text = metrics.exposition().decode()
    assert text.count("ppm_dead_letters_total{") == MAX_REASONS + 1
    assert 'reason="other"' in text


def test_faust_sensor_records_into_the_same_registry():
    class App:
        monitor = None

    app = App()
    metrics = WorkerMetrics()
    metrics.attach_faust(app)
    assert type(app.monitor).__name__ == "PrometheusMonitor"
    text = metrics.exposition().decode()
    assert "ppm_faust_messages_received_total" in text and "ppm_freshness_seconds" in text
    WorkerMetrics().attach_faust(App())  # registries of their own: no clash in one process


def test_endpoint_files_are_written_and_read(tmp_path):
    write_endpoint(tmp_path / "metrics" / "w1.json", "w1", "http://127.0.0.1:1/metrics")
    (tmp_path / "metrics" / "half.json").write_text('{"worker": ')  # being replaced
    assert [e["worker"] for e in read_endpoints(tmp_path / "metrics")] == ["w1"]
    assert read_endpoints(tmp_path / "none") == []


def test_two_workers_metrics_in_one_process_never_add_up():
    # Feast sets PROMETHEUS_MULTIPROC_DIR; prometheus_client's own classes would then share
    # the values of equally named metrics in one process. Ours are held per object.
    first, second = WorkerMetrics("a"), WorkerMetrics("b")
    first.items_embedded.inc(2)
    lags = FreshnessStats()
    lags.add([30.0, 7000.0])  # ms
    first.freshness_from(lags)
    second.items_embedded.inc(5)
    text = first.exposition().decode()
    assert "ppm_items_embedded_total 2.0" in text
    assert 'ppm_freshness_seconds_bucket{le="0.032"} 1.0' in text  # 32 ms
    assert 'ppm_freshness_seconds_bucket{le="8.192"} 2.0' in text
    assert 'ppm_freshness_seconds_bucket{le="+Inf"} 2.0' in text
    assert "ppm_freshness_seconds_count 2.0" in text
    assert "ppm_items_embedded_total 5.0" in second.exposition().decode()
