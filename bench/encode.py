"""How fast do new items get embedded? Text-only, image-only and full ItemEncoder items/s.

Builds a fixed set of synthetic items (seeded titles such as "Acme black leather coat" and
Fashion-MNIST photos as inline PNG data URLs), loads and warms up the encoders, then times

* text:  ``TextEncoder.encode`` on the items' texts;
* image: ``ImageEncoder.encode`` on the decoded photos (preprocessing + CNN);
* item:  ``ItemEncoder.encode`` on the item events (text + PNG decode + CNN + concat),

each as the median of ``--repeats`` runs, at the configured batch size and image size.

    python bench/encode.py [--batch 64] [--image-size 112] [--items 256] [--config ppm.toml]
        [--against-text-model default]

``--against-text-model NAME`` also times another text model (``encoders.text_model``'s
values; ``default``: the packaged all-MiniLM-L6-v2) on the same texts in the same run, e.g.
``PPM__ENCODERS__TEXT_MODEL=all-mpnet-base-v2 python bench/encode.py --against-text-model
default``.

The LAST line of stdout is one JSON object:
``{"text_items_per_s": ..., "image_items_per_s": ..., "item_items_per_s": ..., "batch": ...,
"image_size": ..., "text_model": ...}``, with ``against_text_model``,
``against_text_items_per_s`` and ``text_speedup`` (ours / theirs) when asked. Progress goes
to stderr.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from encoders.image_source import load_image
from encoders.item_encoder import ItemEncoder, item_text
from encoders.text_encoder import TextEncoder
from ppm.config import EncoderConfig, load_config
from ppm.events import ItemEvent

DEFAULT_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirts", "trousers", "pullovers", "dresses", "coats",
           "sandals", "shirts", "sneakers", "bags", "boots"]  # fmt: skip
BRANDS = ["Acme", "Nordwind", "Bo", "Zed", "Lumen", "Oakridge"]
COLOURS = ["black", "white", "red", "navy", "olive", "grey", "beige"]
MATERIALS = ["leather", "cotton", "wool", "linen", "denim", "suede"]


def fashion_mnist_photos(folder: Path, n: int) -> tuple[list[bytes], np.ndarray]:
    """The first ``n`` training photos as PNG bytes (dark on white, like product shots)."""
    with gzip.open(folder / "train-images-idx3-ubyte.gz") as fh:
        pixels = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(folder / "train-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)[:n]
    pngs = []
    for photo in pixels:
        buf = io.BytesIO()
        Image.fromarray(255 - photo).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs, labels


def synthetic_items(folder: Path, n: int) -> list[ItemEvent]:
    rng = np.random.default_rng(0)
    pngs, labels = fashion_mnist_photos(folder, n)
    items = []
    for k, (png, label) in enumerate(zip(pngs, labels, strict=True)):
        brand = str(rng.choice(BRANDS))
        title = f"{brand} {rng.choice(COLOURS)} {rng.choice(MATERIALS)} {CLASSES[label][:-1]}"
        items.append(
            ItemEvent(
                item_id=f"bench-{k}",
                event_time="2026-01-01T00:00:00Z",
                title=title,
                category=CLASSES[label],
                brand=brand,
                image="data:image/png;base64," + base64.b64encode(png).decode(),
            )
        )
    return items


def items_per_s(work: Callable[[], object], n_items: int, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    return n_items / statistics.median(seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML config file (default: $PPM_CONFIG, if set)")
    parser.add_argument("--batch", type=int, help="items per forward pass (default: config)")
    parser.add_argument("--image-size", type=int, help="square image side (default: config)")
    parser.add_argument("--items", type=int, default=256, help="items in the fixed set")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median counts")
    parser.add_argument("--against-text-model", metavar="NAME",
                        help="also time this text model on the same texts ('default': the "
                             "packaged all-MiniLM-L6-v2)")
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
    overrides = {"batch_size": args.batch, "image_size": args.image_size}
    encoders = EncoderConfig.model_validate(
        cfg.encoders.model_dump() | {k: v for k, v in overrides.items() if v is not None}
    )
    folder = cfg.simulator.fashion_mnist_dir or DEFAULT_FASHION_MNIST
    items = synthetic_items(folder, args.items)

    start = time.perf_counter()
    encoder = ItemEncoder(encoders, cfg.images)
    print(
        f"loaded and warmed up in {time.perf_counter() - start:.1f}s: "
        f"{encoder.encoder_version}, dim {encoder.dim}",
        file=sys.stderr,
    )
    texts = [item_text(item) for item in items]
    photos = [load_image(item.image, cfg.images) for item in items if item.image]
    # One untimed full pass, so every batch shape has been seen once.
    encoder.encode(items)

    n, repeats = len(items), args.repeats
    result = {
        "text_items_per_s": items_per_s(lambda: encoder.text.encode(texts), n, repeats),
        "image_items_per_s": items_per_s(lambda: encoder.image.encode(photos), n, repeats),
        "item_items_per_s": items_per_s(lambda: encoder.encode(items), n, repeats),
        "batch": encoders.batch_size,
        "image_size": encoders.image_size,
        "text_model": encoder.text.identity,
    }
    if args.against_text_model:
        name = None if args.against_text_model == "default" else args.against_text_model
        other = TextEncoder(name, encoders.text_max_length, encoders.batch_size)
        other.encode(texts)  # warm, as the configured one was
        result["against_text_model"] = other.identity
        result["against_text_items_per_s"] = items_per_s(lambda: other.encode(texts), n,
                                                         repeats)
        result["text_speedup"] = result["text_items_per_s"] / result["against_text_items_per_s"]
    result = {k: round(v, 2 if k == "text_speedup" else 1) if isinstance(v, float) else v
              for k, v in result.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
