"""The champion's forward compiled with ``torch.compile`` for serving (``serving.compile``).

A serving forward is a few hundred small operators on a few hundred rows, so on a CPU most
of its time goes to calling them one by one; Inductor fuses them into a few kernels. The
model is compiled when the ranker loads it, before it serves, on an example batch of
serving's shape (one user row shared by B candidates, M vector rows) with B and M marked
dynamic: a request of any B >= 2 and M >= 2 runs the compiled code without compiling again.
The weights are inputs of the compiled code, so a newly promoted model of the same
configuration reuses it (the first compile in a process takes tens of seconds, less with
Inductor's on-disk cache; a model of the same configuration after it none, one of another
configuration as long again).

Anything else runs eagerly: a request of one candidate or with fewer than two vector rows
(:meth:`CompiledForward.fits`), a request whose compiled call fails, and every request of a
model whose compile failed or whose compiled scores disagree with its eager ones on the
example (:meth:`CompiledForward.build` returns None and logs why). The ranker compiles
when it loads a model; meanwhile its other requests go on with the model they had.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ppm.records import UserSequence
from trainer.features import (
    Sequences,
    Targets,
    model_batch,
    sequence_features,
    target_features,
    taste_features,
)
from trainer.model import UnifiedRanker

log = logging.getLogger(__name__)

EXAMPLE_CANDIDATES = 11
"""B of the example batch; with the example's M (13), two sizes no other dimension of a
batch is marked with, so the compiler gives them a symbol each."""

TOLERANCE = 1e-4
"""Largest difference of a logit, compiled against eager, on the example batch."""


class CompiledForward:
    """``model``'s logits (B, n_tasks) through its compiled forward, for the batches that
    :meth:`fits`. Build with :meth:`build`."""

    def __init__(self, compiled, modal_key: str | None):
        self._compiled = compiled
        self._modal_key = modal_key

    @classmethod
    def build(cls, model: UnifiedRanker, projected: bool) -> CompiledForward | None:
        """Compile ``model`` (in eval mode) for the batches ``Ranker.build_batch`` makes
        (``projected``: a frozen plug-in's outputs, not raw vectors) and check it on an
        example batch; None, with a warning in the log, if either fails."""
        modal_key = (("modal_projected" if projected else "modal_table")
                     if model.config.uses_modal else None)
        try:
            batch = example_batch(model, projected)
            for key, value in batch.items():  # the candidates' and vector rows' dimensions
                modal = key in ("modal_table", "modal_projected")
                if not key.startswith(("seq_", "user_")) and (not modal or key == modal_key):
                    torch._dynamo.mark_dynamic(value, 0)
            compiled = torch.compile(model, dynamic=False)
            with torch.inference_mode():
                got, want = compiled(batch)[0], model(batch)[0]
            gap = float((got - want).abs().max())
            if not gap <= TOLERANCE:  # NaN too
                raise ValueError(f"its logits differ from the eager model's by {gap:.3g}")
        except Exception as exc:  # a missing compiler, an unsupported operator, ...
            log.warning("serving the model uncompiled: torch.compile failed (%s: %s)",
                        type(exc).__name__, exc)
            return None
        return cls(compiled, modal_key)

    def fits(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether ``batch`` runs compiled: two candidates or more, and (for a model with a
        PPM module) two vector rows or more; the compiled code has no case for one."""
        return batch["item_id"].shape[0] >= 2 and (
            self._modal_key is None or batch[self._modal_key].shape[0] >= 2)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The logits, or None (and a warning) if the compiled code fails: the caller
        scores the batch eagerly instead."""
        try:
            return self._compiled(batch)[0]
        except Exception as exc:  # e.g. a recompile that fails; never a failed request
            log.warning("a compiled forward failed (%s: %s); scoring eagerly",
                        type(exc).__name__, exc)
            return None


def example_batch(model: UnifiedRanker, projected: bool) -> dict[str, torch.Tensor]:
    """A batch of serving's shape for ``model``: one user with a sequence of three,
    :data:`EXAMPLE_CANDIDATES` candidates and 13 vector rows (all used), random vectors
    (seeded), so the check against the eager model sees every row gathered."""
    c = model.config
    B = EXAMPLE_CANDIDATES
    ids = [f"example-{i}" for i in range(B + 1)]
    seq = UserSequence("example-user", tuple(ids[-3:]), ("click",) * 3, (1, 2, 3))
    width = c.d_model if projected else c.modal_dim
    vectors = np.random.default_rng(0).normal(size=(B + 2, width)).astype(np.float32)
    targets = Targets.from_states(ids[:B], [None] * B)
    batch = model_batch({
        **target_features(targets, c, model.item_vocabulary),
        **taste_features([seq.user_id] * B, targets, c, model.taste_vocabulary,
                         user_vocabulary=model.user_vocabulary),
        "target_modal_row": np.arange(1, B + 1, dtype=np.int64),
        **sequence_features(Sequences.of([seq]), np.array([4], np.int64),
                            np.array([B, B + 1, B + 1], np.int64), c, model.item_vocabulary,
                            model.user_vocabulary),
    }, vectors)
    if projected:
        batch["modal_projected"] = batch.pop("modal_table")
    return batch
