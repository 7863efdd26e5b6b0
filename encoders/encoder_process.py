"""An :class:`~encoders.item_encoder.ItemEncoder` in a child process of its own.

Inside a Faust worker's own process the encoder ran well below its bare speed: the models'
Python code and the worker's event loop share one interpreter lock, and each waits for the
other. In a child process the encoder has an interpreter to itself, and the worker only
sends item events and receives vectors (bench/freshness.py measures the bare encoder and the
worker's latency; docs/results.md has the figures).

The child is started with ``spawn`` (a fork of a process with running threads is unsafe), so
it imports torch and loads the models itself: a few seconds, waited for at construction. On
Linux it is killed when its parent dies, so a SIGKILLed worker leaves no encoder behind.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ppm.config import Config
from ppm.events import ItemEvent

if TYPE_CHECKING:
    from encoders.item_encoder import ItemEmbeddings, ItemEncoder

_PR_SET_PDEATHSIG = 1
_child_encoder: ItemEncoder | None = None  # the child's own encoder (one per child process)


def _start_child(cfg: Config, local_files: bool) -> None:
    global _child_encoder
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    from encoders.item_encoder import ItemEncoder

    _child_encoder = ItemEncoder.from_config(cfg, local_files=local_files)


def _child_provenance() -> dict:
    assert _child_encoder is not None
    return _child_encoder.provenance


def _child_pid() -> int:
    return os.getpid()


def _child_encode(items: list[ItemEvent]) -> ItemEmbeddings:
    assert _child_encoder is not None
    return _child_encoder.encode(items)


class EncoderProcess:
    """``ItemEncoder.from_config(cfg, local_files=local_files)`` running in a child process;
    what :class:`~streams.item_embedder.ItemEmbedder` needs of an encoder: ``encoder_version``,
    ``provenance``, :meth:`content_hash` and :meth:`encode` (without ``seen``).

    ``local_files`` (default True, for trusted input) says whether an item's image may be a
    local path or ``file://`` URL; the Faust worker passes ``images.local_files_from_kafka``.

    Raises RuntimeError at construction if the child cannot load the encoder, and from
    :meth:`encode` if the child has died since; the encoder's own errors (a delete event)
    come back as they are. Call :meth:`close` when done (or use it as a context manager).
    """

    def __init__(self, cfg: Config, *, local_files: bool = True):
        for attempt in range(2):
            try:
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_child, initargs=(cfg, local_files))
                break
            except BrokenPipeError:
                # multiprocessing's resource tracker died between its liveness check and
                # the pool's first semaphore (seen once in the suite's Faust worker); the
                # next registration finds it dead and launches a new one (CPython
                # gh-131788 makes that automatic from 3.14).
                if attempt:
                    raise
        self.provenance: dict = self._call(_child_provenance)
        """As :attr:`ItemEncoder.provenance`."""
        self.encoder_version: str = self.provenance["encoder_version"]

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._call(_child_pid)

    def content_hash(self, item: ItemEvent) -> str:
        """As :meth:`ItemEncoder.content_hash`; computed here, no round trip."""
        from encoders.item_encoder import content_hash

        return content_hash(self.encoder_version, item)

    def encode(self, items: Sequence[ItemEvent]) -> ItemEmbeddings:
        """As :meth:`ItemEncoder.encode` without ``seen``; blocks until the child is done."""
        return self._call(_child_encode, list(items))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> EncoderProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, fn, *args):
        try:
            return self._pool.submit(fn, *args).result()
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise RuntimeError("the encoder process died or could not load the encoder "
                               "(its error, if any, is in the log above)") from exc
