"""What ``ppm finetune`` leaves beside a fine-tuned encoder: its report.

The report sits beside the model folder (or weights file), not in it: inside, it would change
the folder's content hash, which is the encoder's identity. The item encoder reads it to
record how its vectors were made (:attr:`encoders.item_encoder.ItemEncoder.provenance`), so
an evaluation can tell whether the vectors it reads learned from clicks its fits must not see.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def report_file(out: Path) -> Path:
    """Where ``ppm finetune`` writes its report for the encoder written to ``out``."""
    return out.parent / f"{out.name}.finetune.json"


def fine_tuning_of(model: str | Path | None) -> dict[str, Any] | None:
    """For a model ``ppm finetune`` wrote (a local folder or weights file with its report
    beside it): the report's path, ``kind`` and ``periods`` (None in a report written before
    they were recorded). None for any other model (a packaged or downloaded one)."""
    if model is None:
        return None
    report = report_file(Path(model))
    if not report.is_file():
        return None
    said = json.loads(report.read_text())
    return {"report": str(report.resolve()), "kind": said.get("kind"),
            "periods": said.get("periods")}
