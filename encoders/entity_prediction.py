"""EP: fine-tune the image encoder to predict product entities from photos.

The PPM paper fine-tunes its ResNet on entity prediction before its vectors feed the
ranker: from a product photo, predict what the product is. Here the entities are whatever
the photos are labelled with (for the simulated shop: the garment class, its colour and its
pattern), one linear head each on the encoder's pooled feature, trained with the sum of
their cross-entropies.

Two numbers tell whether it worked, both on held-out photos:

* **before**: a linear probe, the heads alone trained on the frozen pretrained features:
  what the vectors the stream writes today say about each entity;
* **after**: the backbone fine-tuned with the heads (started from the probe's, so the first
  steps do not wreck the features with random heads' gradients), then the heads read off
  it: what the fine-tuned vectors say.

Batch-norm statistics stay frozen (eval mode) while fine-tuning: with the small batches a
CPU affords they would be noisier than the pretrained ones. :func:`save_weights` writes a
weights file that ``encoders.image_weights`` loads strictly, the classifier head the encoder
drops included, so its content hash is the new ``encoder_version``.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from encoders.image_encoder import ImageEncoder, preprocess


@dataclass(frozen=True)
class EPConfig:
    """Entity-prediction fine-tuning settings (``ppm finetune image`` options)."""

    epochs: int = 2
    """Most passes over the training photos; the best epoch on validation is kept."""
    batch_size: int = 32
    lr: float = 1e-4
    """Backbone learning rate (the heads get 10x)."""
    probe_epochs: int = 30
    """Passes of the linear probe over the (cached) frozen features."""
    seed: int = 0


@dataclass
class EPResult:
    """Held-out accuracy per entity before (linear probe) and after fine-tuning."""

    before: dict[str, float]
    after: dict[str, float]
    valid_before: dict[str, float]
    valid_after: dict[str, float]
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    """0: no epoch beat the probe on validation; the pretrained backbone is kept."""


class Heads(nn.Module):
    """One linear classifier per entity on a ``(B, dim)`` feature."""

    def __init__(self, dim: int, classes: Mapping[str, int]):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(dim, n) for name, n in classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(x) for name, head in self.heads.items()}  # each (B, classes)


def _loss(logits: dict[str, torch.Tensor], labels: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return sum(nn.functional.cross_entropy(logits[k], labels[k]) for k in logits)


def _accuracy(logits: dict[str, np.ndarray], labels: Mapping[str, np.ndarray]
              ) -> dict[str, float]:
    got = {k: float((logits[k].argmax(1) == labels[k]).mean()) for k in logits}
    got["mean"] = float(np.mean(list(got.values())))
    return got


def _features(model: nn.Module, photos: np.ndarray, encoder: ImageEncoder,
              batch_size: int = 128) -> torch.Tensor:
    # no_grad, not inference_mode: the probe's heads train on these features.
    with torch.no_grad():
        return torch.cat([model(_batch(photos[i:i + batch_size], encoder))
                          for i in range(0, len(photos), batch_size)])


def _batch(photos: np.ndarray, encoder: ImageEncoder) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> the encoder's input ``(B, 3, S, S)``."""
    return preprocess([Image.fromarray(p) for p in photos], encoder.image_size, encoder._norm)


def finetune(encoder: ImageEncoder, photos: np.ndarray, labels: Mapping[str, np.ndarray],
             split: Mapping[str, np.ndarray], cfg: EPConfig = EPConfig(),
             progress: bool = False,
             on_epoch: Callable[[dict[str, float]], None] | None = None) -> EPResult:
    """Fine-tune ``encoder.model`` in place on entity prediction and report accuracies.

    Args:
        photos: ``(N, H, W, 3)`` uint8 RGB.
        labels: entity name -> ``(N,)`` int class ids (0..classes-1).
        split: ``train``, ``valid`` and ``test`` -> row indices into ``photos``, disjoint.

    The encoder is left frozen and in eval mode, holding the backbone of the epoch with the
    best mean validation accuracy (the pretrained one when no epoch beats the probe).
    """
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    order = random.Random(cfg.seed)
    model = encoder.model
    classes = {k: int(v.max()) + 1 for k, v in labels.items()}
    y = {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in labels.items()}
    train, valid, test = (np.asarray(split[k]) for k in ("train", "valid", "test"))

    def at(rows: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: v[rows] for k, v in y.items()}

    def score(heads: Heads, rows: np.ndarray) -> dict[str, float]:
        model.eval()
        with torch.inference_mode():
            logits = heads(_features(model, photos[rows], encoder))
        return _accuracy({k: v.numpy() for k, v in logits.items()},
                         {k: v.numpy() for k, v in at(rows).items()})

    # The linear probe: heads on frozen, cached features.
    model.eval()
    cached = _features(model, photos[np.concatenate([train, valid, test])], encoder)
    feats = dict(zip(("train", "valid", "test"),
                     torch.split(cached, [len(train), len(valid), len(test)]), strict=True))
    heads = Heads(cached.shape[1], classes)
    probe = torch.optim.AdamW(heads.parameters(), lr=1e-2)
    for _ in range(cfg.probe_epochs):
        for start in range(0, len(train), 256):
            rows = train[start:start + 256]
            loss = _loss(heads(feats["train"][start:start + 256]), at(rows))
            probe.zero_grad()
            loss.backward()
            probe.step()

    def probe_score(name: str, rows: np.ndarray) -> dict[str, float]:
        with torch.inference_mode():
            logits = heads(feats[name])
        return _accuracy({k: v.numpy() for k, v in logits.items()},
                         {k: v.numpy() for k, v in at(rows).items()})

    result = EPResult(before=probe_score("test", test), after={},
                      valid_before=probe_score("valid", valid), valid_after={})
    best = result.valid_before["mean"]
    best_state, best_heads = copy.deepcopy(model.state_dict()), copy.deepcopy(heads.state_dict())
    model.requires_grad_(True)
    optimiser = torch.optim.AdamW([{"params": model.parameters(), "lr": cfg.lr},
                                   {"params": heads.parameters(), "lr": 10 * cfg.lr}])
    rows_all = list(train)
    for epoch in range(1, cfg.epochs + 1):
        order.shuffle(rows_all)
        model.eval()  # batch-norm statistics stay frozen (module docstring)
        losses = []
        for start in tqdm(range(0, len(rows_all), cfg.batch_size), desc=f"ep epoch {epoch}",
                          disable=not progress, leave=False):
            rows = np.asarray(rows_all[start:start + cfg.batch_size])
            with torch.enable_grad():
                loss = _loss(heads(model(_batch(photos[rows], encoder))), at(rows))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        metrics = {"epoch": epoch, "loss": float(np.mean(losses)),
                   **{f"valid_{k}": v for k, v in score(heads, valid).items()}}
        result.epochs.append(metrics)
        if on_epoch:
            on_epoch(metrics)
        if metrics["valid_mean"] > best:
            best = metrics["valid_mean"]
            best_state = copy.deepcopy(model.state_dict())
            best_heads = copy.deepcopy(heads.state_dict())
            result.best_epoch = epoch
    model.load_state_dict(best_state)
    heads.load_state_dict(best_heads)
    model.requires_grad_(False)
    model.eval()
    if result.best_epoch:
        result.valid_after, result.after = score(heads, valid), score(heads, test)
    else:
        result.valid_after, result.after = result.valid_before, result.before
    return result


def save_weights(encoder: ImageEncoder, base_weights: Path, out: Path) -> Path:
    """Write ``encoder``'s backbone over the state_dict in ``base_weights`` (the file it was
    loaded from, whose classifier head the encoder dropped) to ``out``, atomically: a file
    ``encoders.image_weights`` loads strictly."""
    state = torch.load(base_weights, map_location="cpu", weights_only=True)
    backbone = encoder.model.state_dict()
    unknown = set(backbone) - set(state)
    if unknown:
        raise ValueError(f"{base_weights} is not this encoder's weights file: it lacks "
                         f"{sorted(unknown)[:3]}")
    state.update({k: v.detach().clone() for k, v in backbone.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    return out
