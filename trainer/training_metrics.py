"""The incremental trainer's Prometheus metrics (``ppm train --follow``'s ``/metrics``).

Series (``_total`` is added to counters on exposition), labelled by model ``variant``:

* ``ppm_training_steps_total``: incremental steps run (one per window trained on);
* ``ppm_training_promotions_total``: steps whose new model was promoted;
* ``ppm_training_click_auc{model}``: click AUC on the last step's eval window, of the new
  model (``candidate``) and of the champion going into the step (``champion``);
* ``ppm_training_last_step_timestamp_seconds``: when the last step ended (wall clock).

The values live in this object (``ppm.metrics``); :meth:`TrainingMetrics.serve` serves them.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry

from ppm.metrics import counter, gauge, serve


class TrainingMetrics:
    """One training process's metrics; a registry of its own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.steps = counter("ppm_training_steps", "Incremental steps run", ["variant"],
                             registry=r)
        self.promotions = counter("ppm_training_promotions", "New models promoted",
                                  ["variant"], registry=r)
        self.auc = gauge("ppm_training_click_auc", "Click AUC on the last step's eval "
                         "window", ["variant", "model"], registry=r)
        self.last_step = gauge("ppm_training_last_step_timestamp_seconds",
                               "When the last step ended", ["variant"], registry=r)
        self._last: dict[tuple[str, str], float] = {}

    def step(self, variant: str, promoted: bool, candidate_auc: float | None,
             champion_auc: float | None) -> None:
        """Record one step of ``variant``."""
        self.steps.labels(variant).inc()
        if promoted:
            self.promotions.labels(variant).inc()
        for model, value in (("candidate", candidate_auc), ("champion", champion_auc)):
            if value is not None:
                key = (variant, model)
                if key not in self._last:
                    self.auc.labels(*key).set_function(lambda k=key: self._last[k])
                self._last[key] = float(value)
        ended = time.time()
        self.last_step.labels(variant).set_function(lambda: ended)

    def serve(self, host: str, port: int) -> tuple[Any, str]:
        """Serve ``/metrics`` on ``host:port`` (0: a free port); returns the server and its
        URL."""
        return serve(self.registry, host, port)
