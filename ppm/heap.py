"""Keeping a loaded process's heap out of the garbage collector's sight.

A process that has loaded torch, Feast and Faust holds millions of objects that live as long
as it does; each full collection walks them all. ``gc.freeze`` moves them into a permanent
generation the collector skips. Frozen objects are never freed at exit either, and triton's
bindings (loaded with torchvision, through ``torch._dynamo``) report every object of theirs
still alive then as a leak: some thirty lines of ``nanobind: leaked ...`` on stderr after
each command. So a frozen process that has loaded triton hands its heap back to the collector
when it exits (one full collection, where triton is loaded at all: the commands that load the
encoders or serve a model, not ``ppm features get``).
"""

from __future__ import annotations

import atexit
import gc
import sys

_registered = False


def freeze_heap() -> None:
    """``gc.freeze()`` everything allocated so far, and unfreeze it at exit if triton is
    loaded by then (see the module docstring). Safe to call more than once."""
    global _registered
    gc.freeze()
    if not _registered:
        atexit.register(_unfreeze_for_triton)
        _registered = True


def _unfreeze_for_triton() -> None:
    if "triton" in sys.modules:
        gc.unfreeze()
