"""Importing Feast in 1.5 s instead of 8.

``import feast`` (0.67) spends most of its time on two things ppm never uses: typeguard's
``@typechecked`` on Feast's classes re-parses and recompiles each module's source at
import (about 6 s on one core), and ``feast.torch_wrapper`` imports PyTorch at once (3-4 s)
for the few methods that return tensors. :func:`import_feast` imports Feast without either:
Feast's classes are used unchecked (ppm's calls into them are fixed and tested) and PyTorch
is imported only when one of those methods runs, so ``ppm features get`` takes about 2 s,
not 12. ``feature_repo/__init__.py`` calls it, so every module of this package gets the
lean Feast; where Feast was imported before (Feast's own CLI), it is left as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _unchecked(target=None, **_options):
    """typeguard's ``typechecked`` as a no-op decorator (with or without options)."""
    return (lambda f: f) if target is None else target


def _lazy_torch_wrapper() -> types.ModuleType:
    """A ``feast.torch_wrapper`` whose ``get_torch`` imports PyTorch when first called."""
    module = types.ModuleType("feast.torch_wrapper", "PyTorch, imported on first use (ppm).")

    def get_torch():
        try:
            return importlib.import_module("torch")
        except Exception as exc:  # as Feast's own wrapper: a clear ImportError
            raise ImportError(f"Torch is not available or failed to import: {exc}") from exc

    module.get_torch = get_torch
    module.TORCH_AVAILABLE = importlib.util.find_spec("torch") is not None
    return module


def import_feast() -> None:
    """Import ``feast`` without typeguard's instrumentation and without PyTorch."""
    if "feast" in sys.modules:
        return
    import typeguard

    checked = typeguard.typechecked
    typeguard.typechecked = _unchecked  # only while Feast's modules are defined
    sys.modules.setdefault("feast.torch_wrapper", _lazy_torch_wrapper())
    try:
        import feast  # noqa: F401
    finally:
        typeguard.typechecked = checked
