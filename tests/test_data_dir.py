"""The data-dir layout: every path named once, under the root, and used by name."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from ppm.config import Config
from ppm.data_dir import DataDir, TrainingLogDir

REPO = Path(__file__).resolve().parents[1]
# The sample argument each path-naming method is called with, by parameter name.
SAMPLE_ARGS = {"partition": 3, "variant": "ppm", "worker": "host-1", "name": "20260101T000000Z",
               "preset": "quick", "seed": 4, "period": "validation"}


def named_paths(paths: DataDir) -> dict[str, Path]:
    """Every path the API names, by the property or method (with sample arguments) that
    names it; a :class:`TrainingLogDir`'s files under ``name.file``."""
    named: dict[str, Path] = {}
    for name, member in vars(DataDir).items():
        if name.startswith("_") or name in ("training_logs", "holds_run"):  # read the disk
            continue
        if isinstance(member, property):
            value = getattr(paths, name)
        elif inspect.isfunction(member):
            params = list(inspect.signature(member).parameters)[1:]
            value = member(paths, *(SAMPLE_ARGS[p] for p in params))
        else:
            continue
        if isinstance(value, TrainingLogDir):
            for file in ("windows", "manifest", "late_events"):
                named[f"{name}.{file}"] = getattr(value, file)
        else:
            named[name] = value
    return named


def test_every_path_is_under_the_root():
    root = Path("/srv/ppm")
    named = named_paths(DataDir(root))
    assert len(named) > 20  # the check sees the API
    for name, path in named.items():
        assert isinstance(path, Path), name
        assert path != root and path.is_relative_to(root), name


def test_every_name_is_a_different_path():
    named = named_paths(DataDir(Path("data")))
    by_path: dict[Path, list[str]] = {}
    for name, path in named.items():
        by_path.setdefault(path, []).append(name)
    assert [names for names in by_path.values() if len(names) > 1] == []


def test_worker_and_partition_paths_are_their_own():
    paths = DataDir(Path("data"))
    assert paths.worker_freshness("a") != paths.worker_freshness("b")
    assert paths.worker_freshness("a").parent == paths.freshness_dir
    assert paths.worker_item_warnings("a").parent == paths.item_warnings_dir
    assert paths.training_partition(1) != paths.training_partition(2)
    assert paths.training_partition(1).parent == paths.training
    assert paths.registry("ppm").parent == paths.registry_dir


def test_training_logs_lists_the_local_log_then_partitions_by_number(tmp_path):
    paths = DataDir(tmp_path)
    for p in (10, 2, 0):
        paths.training_partition(p).mkdir(parents=True)
    (paths.training / "partition-x").mkdir()  # not a partition: ignored
    assert [log.folder for log in paths.training_logs()] == [
        paths.training, *(paths.training_partition(p) for p in (0, 2, 10))]
    assert paths.training_log == TrainingLogDir(paths.training)


def test_the_config_names_its_data_dir_paths():
    cfg = Config(data_dir=Path("/srv/ppm"))
    assert cfg.paths == DataDir(Path("/srv/ppm"))
    moved = cfg.model_copy(update={"data_dir": Path("/elsewhere")})
    assert moved.paths.checkpoint == Path("/elsewhere/checkpoint.json")


# A data dir (``data_dir``, ``cfg.data_dir``, ``Path(cfg.data_dir)``) joined with a string.
JOINED_WITH_A_LITERAL = re.compile(r"""data_dir\)?\s*/\s*[rbuf]*["']""")


def literal_joins(sources: dict[str, str]) -> list[str]:
    """``path:line`` of every join of a data dir with a string literal in ``sources``."""
    return [f"{path}:{source.count(chr(10), 0, m.start()) + 1}"
            for path, source in sorted(sources.items())
            for m in JOINED_WITH_A_LITERAL.finditer(source)]


def test_no_module_joins_the_data_dir_with_a_literal():
    sources = {}
    for path in REPO.rglob("*.py"):
        relative = path.relative_to(REPO).as_posix()
        if (relative.startswith(".") or "/." in relative
                or relative in ("ppm/data_dir.py", "tests/test_data_dir.py")):
            continue
        sources[relative] = path.read_text()
    assert {"streams/app.py", "bench/fuzz.py", "trainer/train.py"} <= set(sources)  # all of it
    assert literal_joins(sources) == []


def test_the_scan_finds_literal_joins():
    assert literal_joins({"m.py": 'x = 1\np = cfg.data_dir / "training"\n',
                          "n.py": "q = Path(cfg.data_dir) / 'feast'\n",
                          "o.py": "r = cfg.paths.training / 'windows'\n"}) == ["m.py:2", "n.py:1"]
