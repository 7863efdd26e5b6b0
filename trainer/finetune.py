"""``ppm finetune``: fine-tune the item encoders on a data directory's training period.

Query matching (QM, :mod:`encoders.query_matching`) reads the (query, clicked item) pairs of
the closed training windows: pairs of the training period train, those of the validation
period choose the epoch, those of the test period are the held-out report. The periods are
:func:`trainer.train.split_windows`'s, the same as ``ppm train --batch`` and ``ppm eval``
use, so the encoder never learns from the period the ranker is judged on. ``--pairs
next-click`` reads each user's clicks instead, for logs without queries
(:func:`encoders.query_matching.next_click_pairs`).

The fine-tuned encoder is written to its own folder or file (``DataDir.encoder``) with a
report beside it (:func:`~encoders.finetune_report.report_file`); its content hash is a new
``encoder_version``, so vectors of the old and the new encoder never mix. Entity prediction (EP,
:mod:`encoders.entity_prediction`) learns from labelled photos the caller gives, not from
the logs.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from encoders.finetune_report import fine_tuning_of, report_file
from ppm.clock import iso
from ppm.config import Config
from ppm.events import ItemEvent
from trainer.train import Split, split_windows
from trainer.windows import Window, files_of

_LOG_COLUMNS = ["request_id", "user_id", "item_id", "query", "click", "impression_time"]
PAIRS = {
    "query": ("qm", "text-qm", "clicked sample with a query and a known item"),
    "next-click": ("next-click", "text-next-click",
                   "click of a known item after an earlier click of the same user"),
}
"""What ``ppm finetune text`` learns from -> the report's ``kind``, the default model folder
and what a period without pairs lacks: search queries and their clicks (QM), or each user's
next click after an earlier one (:func:`encoders.query_matching.next_click_pairs`), for logs
without queries."""


def _say(metrics: dict[str, float]) -> None:
    """One line per epoch on stderr, beside the progress bars."""
    print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in metrics.items()), file=sys.stderr, flush=True)


def read_log(windows: list[Window]) -> pd.DataFrame:
    """The rows of ``windows`` that QM reads (:data:`_LOG_COLUMNS`)."""
    tables = [pq.read_table(f, columns=_LOG_COLUMNS) for f in files_of(windows)]
    if not tables:
        return pd.DataFrame(columns=_LOG_COLUMNS)
    return pa.concat_tables(tables).to_pandas()


def finetune_text(cfg: Config, items: Iterable[ItemEvent], out: Path | None = None,
                  test_share: float = 0.2, valid_share: float = 0.1,
                  epochs: int | None = None, progress: bool = True,
                  pairs: str = "query", k: int | None = None,
                  period: Literal["test", "validation"] = "test") -> dict[str, Any]:
    """QM-fine-tune the configured text encoder (``encoders.text_model``) on the data
    directory's logs and ``items``' texts; write it to ``out`` (default
    ``DataDir.encoder("text-qm")``, or ``"text-next-click"``) and return the report (also
    :func:`~encoders.finetune_report.report_file`): recall@k and MRR of the clicked item
    among the catalog, before and after, on the validation and the test period. ``pairs``
    (:data:`PAIRS`): ``"query"``, a search query and its click; ``"next-click"``, a user's
    earlier click and the next one, whose query side is the earlier item's text. ``k`` (default
    :attr:`~encoders.query_matching.QMConfig.k`) is the recall@k that chooses the epoch.
    ``period="validation"``: the split moved one period back, as ``ppm eval --validation``
    moves it (default ``out`` gains ``-validation``): the encoder learns only from what that
    evaluation's fits train on, its epoch is chosen on their validation windows, its "test"
    report is the validation period, and the test period is not read. An encoder fine-tuned
    on the test split has learned from the windows ``ppm eval --validation`` chooses epochs
    on and chosen its epoch on the period it scores, so its vectors carry clicks the ranker
    there has not seen (:func:`check_vector_periods` refuses its vectors). The report's
    ``periods`` say which clicks it learned from and chose on, counting those of a
    fine-tuned model it started from.

    Raises:
        ValueError: no closed windows, a period without a pair, or ``epochs`` or ``k``
            below 1.
    """
    import torch

    from encoders.query_matching import (
        CatalogTexts,
        QMConfig,
        finetune,
        next_click_pairs,
        query_pairs,
        save,
    )
    from encoders.query_matching import retrieval as retrieval_of
    from encoders.text_encoder import TextEncoder

    if pairs not in PAIRS:
        raise ValueError(f"pairs must be one of {tuple(PAIRS)}, got {pairs!r}")
    for name, value in (("epochs", epochs), ("k", k)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    kind, folder, lacking = PAIRS[pairs]
    started = time.monotonic()
    if cfg.encoders.threads:
        torch.set_num_threads(cfg.encoders.threads)
    split: Split = split_windows(cfg, test_share, valid_share, period)
    if not (split.train and split.valid and split.test):
        raise ValueError("QM needs closed windows in a training, a validation and a test "
                         f"period; {cfg.data_dir} has {len(split.train)}, "
                         f"{len(split.valid)} and {len(split.test)}")
    texts = CatalogTexts(items)
    if not len(texts):
        raise ValueError("no item events: QM needs the items' titles (--jsonl DIR with an "
                         "items.jsonl, or --simulate)")
    qm = QMConfig(**{name: value for name, value in (("epochs", epochs), ("k", k))
                     if value is not None})
    if pairs == "query":
        train, valid, test = (query_pairs(read_log(w), texts, qm.seed)
                              for w in (split.train, split.valid, split.test))
    else:  # each period's pairs may start from the last click before it
        train = next_click_pairs(read_log(split.train), texts, seed=qm.seed)
        valid = next_click_pairs(read_log(split.train + split.valid), texts,
                                 split.valid_start_us, qm.seed)
        test = next_click_pairs(read_log(split.train + split.valid + split.test), texts,
                                split.test_start_us, qm.seed)
    for name, found in (("training", train), ("validation", valid), ("test", test)):
        if not found:
            raise ValueError(f"the {name} period holds no {lacking}: nothing to fine-tune or "
                             "judge the encoder on")
    # Candidates: the catalog as it stood at the end of each period.
    valid_candidates = texts.as_of(split.test_start_us - 1)
    test_candidates = texts.as_of(split.test[-1].end_us - 1)
    encoder = TextEncoder(cfg.encoders.text_model, cfg.encoders.text_max_length)
    identity_before = encoder.identity
    test_before = retrieval_of(encoder.model, encoder.tokenizer, test, test_candidates, qm.k,
                               encoder.max_length)
    result = finetune(encoder, train, valid, valid_candidates, qm, progress=progress,
                      on_epoch=_say if progress else None)
    test_after = retrieval_of(encoder.model, encoder.tokenizer, test, test_candidates, qm.k,
                              encoder.max_length)
    out = Path(out) if out else cfg.paths.encoder(
        folder if period == "test" else f"{folder}-validation")
    out.parent.mkdir(parents=True, exist_ok=True)
    save(encoder, out)
    report = {
        "kind": kind, "out": str(out), "encoder_before": identity_before,
        "encoder_after": TextEncoder(out, cfg.encoders.text_max_length).identity,
        "pairs": {"train": len(train), "valid": len(valid), "test": len(test)},
        "hard_negatives": sum(p.shown is not None for p in train),
        "candidates": {"valid": len(valid_candidates), "test": len(test_candidates)},
        "valid_before": result.before, "valid_after": result.after,
        "test_before": test_before, "test_after": test_after,
        "best_epoch": result.best_epoch, "epochs": result.epochs,
        "period": period,
        "periods": _later(encoder_periods(split), fine_tuning_of(cfg.encoders.text_model)),
        "settings": asdict(qm), "seconds": round(time.monotonic() - started, 1),
    }
    # Beside the model folder, not in it: the folder's content is the encoder's identity.
    report_file(out).write_text(json.dumps(report, indent=1))
    return report


def encoder_periods(split: Split) -> dict[str, str]:
    """What a fine-tuned encoder learned from (pairs whose click is before ``trained_before``)
    and chose its epoch on (clicks before ``chosen_before``), as ISO times in the report."""
    return {"trained_before": iso(split.valid_start_us),
            "chosen_before": iso(split.test_start_us)}


def _later(periods: dict[str, str], start: dict[str, Any] | None) -> dict[str, str] | None:
    """``periods`` of an encoder fine-tuned from ``start`` (:func:`fine_tuning_of` of the
    model it began from): what either learned from or chose on, the later of the two; None
    where ``start``'s periods are unknown."""
    if start is None:
        return periods
    if start["periods"] is None:
        return None
    return {key: max(value, start["periods"][key], key=datetime.fromisoformat)
            for key, value in periods.items()}


class LeakyEncoderError(ValueError):
    """An evaluation's item vectors come from a text encoder fine-tuned on clicks its fits
    must not see (:func:`check_vector_periods`)."""


def check_vector_periods(item_log: Path, encoder_version: str | None, split: Split) -> None:
    """Raise :class:`LeakyEncoderError` where the vectors ``split``'s fits read
    (``encoder_version`` in the item log under ``item_log``; None: the newest, as
    :meth:`trainer.dataset.ModalTable.from_item_log` takes) come from a text encoder
    ``ppm finetune text`` fine-tuned on clicks those fits must not see: it learned from
    clicks at or after the start of the period that chooses their epochs, or chose its own
    epoch on clicks of the period scored. Then the vectors carry clicks the ranker never
    trained on, and content looks better than it is. Vectors of a model it did not
    fine-tune pass. Vectors written before the item log recorded how each version was made,
    or of an encoder whose report predates its periods, cannot be checked: warned about."""
    from feature_repo.item_log import newest_version, read_item_log, version_provenance

    version = encoder_version or newest_version(read_item_log(item_log))
    if version is None:  # no vectors at all: nothing to check
        return
    provenance = version_provenance(item_log, version)
    if provenance is None:
        _cannot_check(f"how the vectors {version} in {item_log} were made is not recorded "
                      "(written before ppm recorded it)", "embed the catalog again (ppm backfill)")
        return
    tuning = provenance["text_fine_tuning"]
    if tuning is None:  # not a model ppm finetune wrote
        return
    periods = tuning["periods"]
    if periods is None:
        _cannot_check(f"the report of the text encoder of the vectors {version} in {item_log} "
                      "does not say which periods it was fine-tuned on", "fine-tune it again")
        return
    limits = {"trained_before": ("learned from clicks", split.valid_start_us,
                                 "the period that chooses the fits' epochs"),
              "chosen_before": ("chose its epoch on clicks", split.test_start_us,
                                "the period scored")}
    over = [f"{did} until {periods[key]}, later than the start of {what} ({iso(limit)})"
            for key, (did, limit, what) in limits.items()
            if round(datetime.fromisoformat(periods[key]).timestamp() * 1e6) > limit]
    if over:
        raise LeakyEncoderError(
            f"the vectors {version} come from a text encoder ({tuning['report']}) that "
            f"{' and '.join(over)}, so they carry clicks the fits here do not train on. "
            "Fine-tune one on this split (ppm finetune text --validation for ppm eval "
            "--validation, without it for the test period; the same --test-share and "
            "--valid-share), embed the catalog with it (ppm backfill) and read its "
            "vectors (trainer.encoder_version).")


def _cannot_check(what: str, fix: str) -> None:
    warnings.warn(f"{what}, so whether it learned from clicks of this split's later periods "
                  f"cannot be checked: {fix}", stacklevel=3)


def finetune_image(cfg: Config, photos, labels, out: Path | None = None,
                   epochs: int | None = None, held_out: float = 0.2, valid: float = 0.1,
                   progress: bool = True) -> dict[str, Any]:
    """EP-fine-tune the configured image encoder (``encoders.image_model`` and
    ``image_weights``) on ``photos`` (``(N, H, W, 3)`` uint8) and their entity ``labels``
    (name -> ``(N,)`` ints), split at random (seeded) into training, ``valid`` (chooses the
    epoch) and ``held_out`` (the report) shares; write the weights to ``out`` (default
    ``DataDir.encoder("image-ep") / "weights.pth"``) with
    :func:`~encoders.finetune_report.report_file` beside them and return the report:
    accuracy per entity before (a linear probe on the pretrained features) and after, on
    validation and held-out photos."""
    import numpy as np
    import torch

    from encoders.entity_prediction import EPConfig, finetune, save_weights
    from encoders.image_encoder import ImageEncoder, packaged_efficientnet_weights

    started = time.monotonic()
    if cfg.encoders.threads:
        torch.set_num_threads(cfg.encoders.threads)
    if not (0 < held_out < 1 and 0 < valid < 1 - held_out):
        raise ValueError("give 0 < held_out < 1 and 0 < valid < 1 - held_out")
    ep = EPConfig(**({"epochs": epochs} if epochs else {}))
    rows = np.random.default_rng(ep.seed).permutation(len(photos))
    n_test, n_valid = int(held_out * len(rows)), int(valid * len(rows))
    split = {"test": rows[:n_test], "valid": rows[n_test:n_test + n_valid],
             "train": rows[n_test + n_valid:]}
    encoder = ImageEncoder(cfg.encoders.image_model, cfg.encoders.image_weights,
                           cfg.encoders.image_size)
    identity_before = encoder.identity
    result = finetune(encoder, photos, labels, split, ep, progress=progress,
                      on_epoch=_say if progress else None)
    out = Path(out) if out else cfg.paths.encoder("image-ep") / "weights.pth"
    save_weights(encoder, cfg.encoders.image_weights or packaged_efficientnet_weights(), out)
    report = {
        "kind": "ep", "out": str(out), "encoder_before": identity_before,
        "encoder_after": ImageEncoder(cfg.encoders.image_model, out,
                                      cfg.encoders.image_size).identity,
        "photos": {k: len(v) for k, v in split.items()}, "entities": sorted(labels),
        "valid_before": result.valid_before, "valid_after": result.valid_after,
        "test_before": result.before, "test_after": result.after,
        "best_epoch": result.best_epoch, "epochs": result.epochs,
        "settings": asdict(ep), "image_size": cfg.encoders.image_size,
        "seconds": round(time.monotonic() - started, 1),
    }
    report_file(out).write_text(json.dumps(report, indent=1))
    return report
