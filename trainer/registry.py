"""The model registry: immutable versions in a folder, and an atomic champion pointer.

Layout under ``root``::

    versions/v000001/model.pt    weights, model config and item vocabulary
                                 (trainer.model.save_checkpoint)
    versions/v000001/meta.json   metrics, data range, encoder_version, parent, decision

Every version's meta says which windows shaped it: ``trained_on`` (window names, required:
every window whose samples its weights and item vocabulary saw, its ancestors' included)
and, where labels chose it, ``validated_on`` (early stopping, tuning, promotion), so
``ppm eval`` can refuse a model that saw the test period.
    champion.json                {"version": "v000001", ...}: the model serving uses
    trainer_state.json           where the incremental trainer is (last window trained)
    curves.jsonl                 every run's training curves, appended (trainer.curves)

Several trainers may register into one registry at once: a version's name is claimed with
``mkdir`` (atomic, so no two processes ever get the same one) before anything is written.
The files are written under a temporary name and renamed onto the claimed, empty folder, so
a version is either complete (it has ``meta.json``) or an empty claim; it is never changed
afterwards. ``champion.json`` and ``trainer_state.json`` are replaced atomically. A
``kill -9`` at any moment therefore leaves the last promoted champion usable, and at worst
an empty claimed folder (skipped: the next version takes a higher number; its
``.vNNNNNN.tmp`` may stay behind and can be deleted) plus a finished but unrecorded step
that the trainer simply does again.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ppm.atomic_file import write_atomically


@dataclass(frozen=True)
class Version:
    name: str
    path: Path
    meta: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.path / "model.pt"


class Registry:
    """Versions and the champion pointer under ``root`` (created if needed)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.champion_path = self.root / "champion.json"
        self.state_path = self.root / "trainer_state.json"
        self.curves_path = self.root / "curves.jsonl"
        """Training curves of every run trained into this registry (``ppm train``),
        appended one JSON line at a time (:mod:`trainer.curves`)."""

    def versions(self) -> list[Version]:
        """All complete versions, oldest first."""
        out = []
        for path in sorted(self.versions_dir.glob("v[0-9]*")):
            meta_file = path / "meta.json"
            if meta_file.exists():
                out.append(Version(path.name, path, json.loads(meta_file.read_text())))
        return out

    def register(self, model, meta: dict[str, Any]) -> Version:
        """Store ``model`` with ``meta`` as a new immutable version; returns it.

        ``meta["trained_on"]`` (a list of window names; empty for an untrained model) is
        required: ValueError without it. Safe to call from several processes at once: each
        gets its own version name.
        """
        from trainer.model import save_checkpoint

        if not isinstance(meta.get("trained_on"), list):
            raise ValueError("a version's meta must say what it trained on: trained_on, a "
                             "list of window names ([] for an untrained model)")

        name = self._claim_name()
        final = self.versions_dir / name
        # ``name`` is ours alone, so nobody is writing this temporary name now: a leftover
        # is a dead write (from before names were claimed), safe to clear.
        tmp = self.versions_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        meta = {"version": name, "created_at": datetime.now(UTC).isoformat(), **meta}
        save_checkpoint(tmp / "model.pt", model, {"version": name})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        # rename(2) may replace an *empty* folder: the claim becomes the whole version in
        # one step, so no reader ever sees it half written.
        os.rename(tmp, final)
        _fsync_dir(self.versions_dir)
        return Version(name, final, meta)

    def _claim_name(self) -> str:
        """Create the empty folder of the next free version and return its name.

        ``mkdir`` either creates the folder or fails because it exists, atomically, also
        between processes: whoever creates ``vN`` owns it. Losing the race to another
        trainer just means trying the next number. Claims left empty by a crash count as
        taken, so they are skipped, never reused and never block.
        """
        while True:
            taken = [int(p.name[1:]) for p in self.versions_dir.glob("v[0-9]*")]
            name = f"v{max(taken, default=0) + 1:06d}"
            try:
                (self.versions_dir / name).mkdir()
            except FileExistsError:
                continue
            return name

    def promote(self, version: Version) -> None:
        """Make ``version`` the champion (atomic).

        Raises ValueError unless ``version`` is a complete version of this registry (one
        still being written by another process, or from another registry, cannot be
        promoted).
        """
        if not (self.versions_dir / version.name / "meta.json").exists():
            raise ValueError(f"{version.name} is not a complete version in {self.versions_dir}")
        pointer = {"version": version.name, "promoted_at": datetime.now(UTC).isoformat()}
        write_atomically(self.champion_path, json.dumps(pointer).encode())

    def champion(self) -> Version | None:
        """The current champion, or None before the first promotion."""
        if not self.champion_path.exists():
            return None
        name = json.loads(self.champion_path.read_text())["version"]
        path = self.versions_dir / name
        return Version(name, path, json.loads((path / "meta.json").read_text()))

    def load(self, version: Version):
        """The model of ``version`` (eval mode)."""
        from trainer.model import load_checkpoint

        model, _ = load_checkpoint(version.model_path)
        return model.eval()

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def save_state(self, state: dict[str, Any]) -> None:
        write_atomically(self.state_path, json.dumps(state, indent=2).encode())


def _fsync_dir(path: Path) -> None:
    # A rename or a new file lives in its folder's entry: sync it, or a power cut can undo it.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
