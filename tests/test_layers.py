"""Imports flow one way: base -> encoders, feature repo -> stream processors, trainer ->
drivers, online scoring -> CLI. A module may import its own group and any group of a lower
layer; groups of one layer are independent (the stream processors never import the trainer,
nor the other way round). Imports inside functions count as well: a lazy import is still a
dependency."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ppm", "encoders", "feature_repo", "streams", "trainer")

#: Lowest first; each layer's groups, each group by its module prefixes (the longest prefix
#: that matches a module names its group).
LAYERS: list[dict[str, tuple[str, ...]]] = [
    {"base": ("ppm",)},
    {"encoders": ("encoders",), "feature store": ("feature_repo",)},
    {"stream processors and sources": ("streams",), "training": ("trainer",)},
    {"stream drivers": ("streams.app", "streams.local_runner"),
     "online scoring": ("trainer.serving",)},
    {"cli": ("ppm.cli",)},
]


def group_of(module: str) -> tuple[int, str] | None:
    """``(layer, group)`` of a first-party module, None for anything else."""
    best: tuple[int, int, str] | None = None
    for layer, groups in enumerate(LAYERS):
        for group, prefixes in groups.items():
            for prefix in prefixes:
                if (module == prefix or module.startswith(prefix + ".")) and (
                        best is None or len(prefix) > best[0]):
                    best = (len(prefix), layer, group)
    return None if best is None else (best[1], best[2])


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``source`` (the module ``module``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                package = module.split(".")[:-node.level]
                base = ".".join([*package, *([base] if base else [])])
            # `from pkg import sub` imports pkg.sub when sub is a module
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def layer_violations(sources: dict[str, str]) -> list[str]:
    """Every import in ``sources`` (module name -> its source) that goes up a layer or
    across to another group of the same layer."""
    problems = []
    for module, source in sorted(sources.items()):
        here = group_of(module)
        if here is None:
            continue
        for line, target in imported_modules(source, module):
            there = group_of(target)
            if there is None or there[1] == here[1]:
                continue
            if there[0] >= here[0]:
                problems.append(f"{module}:{line} ({here[1]}, layer {here[0]}) imports "
                                f"{target} ({there[1]}, layer {there[0]})")
    return problems


def repo_sources() -> dict[str, str]:
    sources = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            sources[".".join(parts)] = path.read_text()
    return sources


def test_imports_flow_one_way():
    sources = repo_sources()
    assert {"ppm.config", "streams.app", "trainer.serving.ranker", "ppm.cli.commands"} <= set(
        sources), "the check sees the packages"
    assert layer_violations(sources) == []


def test_the_check_fails_when_a_base_module_imports_the_cli():
    sources = repo_sources()
    sources["ppm.config"] += "\n\ndef late():\n    from ppm.cli.commands import main\n"
    line = len(sources["ppm.config"].splitlines())  # the import is the last line
    assert layer_violations(sources) == [
        f"ppm.config:{line} (base, layer 0) imports ppm.cli.commands.main (cli, layer 4)"]


def test_the_check_fails_across_groups_of_one_layer():
    problems = layer_violations({"streams.intake": "import trainer.model\n",
                                 "trainer.model": "from streams import intake\n"})
    assert problems == [
        "streams.intake:1 (stream processors and sources, layer 2) imports trainer.model "
        "(training, layer 2)",
        "trainer.model:1 (training, layer 2) imports streams.intake "
        "(stream processors and sources, layer 2)"]
