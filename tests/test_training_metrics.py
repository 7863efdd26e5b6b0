"""The trainer's /metrics: steps, promotions and click AUCs per variant, served over HTTP."""

from __future__ import annotations

import urllib.request

from trainer.training_metrics import TrainingMetrics


def test_steps_promotions_and_aucs_are_served():
    metrics = TrainingMetrics()
    metrics.step("ppm", promoted=True, candidate_auc=0.61, champion_auc=None)
    metrics.step("ppm", promoted=False, candidate_auc=0.60, champion_auc=0.63)
    metrics.step("idrec", promoted=True, candidate_auc=0.58, champion_auc=0.57)
    server, url = metrics.serve("127.0.0.1", 0)
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    finally:
        server.shutdown()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines()
                 if line and not line.startswith("#"))
    assert float(lines['ppm_training_steps_total{variant="ppm"}']) == 2
    assert float(lines['ppm_training_promotions_total{variant="ppm"}']) == 1
    assert float(lines['ppm_training_promotions_total{variant="idrec"}']) == 1
    assert float(lines['ppm_training_click_auc{model="candidate",variant="ppm"}']) == 0.60
    assert float(lines['ppm_training_click_auc{model="champion",variant="ppm"}']) == 0.63
    assert float(lines['ppm_training_last_step_timestamp_seconds{variant="idrec"}']) > 1e9
