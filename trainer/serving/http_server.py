"""``ppm serve``: the ranker over HTTP, a FastAPI app on uvicorn.

Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``):

* ``POST /rank`` with ``{"user_id": "u1", "item_ids": ["i1", "i2", ...]}`` answers
  ``{"model_version": ..., "items": [{"item_id", "click", "order", "collect"}, ...],
  "missing": {...}}``, items by descending click probability; a task the model never saw
  a label of (orders in a ratings data set) has no key (``/health`` lists the tasks served).
* ``GET /health``: the process answers (liveness), with the model version, the tasks its
  answers carry and the request count.
* ``GET /ready``: 200 when a model is loaded and the online store answers a read, else 503
  with the reason (readiness: route traffic here only when it is 200).
* ``GET /metrics``: Prometheus exposition (requests by status, latency, candidates, item
  cache hits and misses, missing features, model reloads, the served model's version).

Every request the app refuses gets a 4xx JSON body ``{"error": reason}``: malformed JSON
or a body that is not UTF-8 (400), a missing field, a wrong type, too many candidates or an
id that is not valid Unicode (422), a body over ``serving.max_body_bytes`` (413, before it
is read; the connection closes). No model yet or scoring past ``serving.request_timeout_s``
give a JSON 503, any other failure inside scoring a JSON 500 without its details, and a
``/rank`` past ``serving.max_concurrency`` requests being scored a JSON 503 with
``Retry-After`` at once (``/health``, ``/ready`` and ``/metrics`` are never refused for
load). A client that does not send its whole request (headers and body) within
``serving.request_timeout_s`` gets a 408 and the connection is closed, so slow or lying
clients (a ``Content-Length`` larger than the body) hold no worker; idle keep-alive
connections close after ``serving.keep_alive_s``. A request that is not HTTP (e.g.
``Content-Length: abc``) gets a JSON 400 from the protocol and the connection is closed.
That 400 and the 408 are answered before the app sees the request, so ``/metrics`` does not
count them; nor uvicorn's own plain-text 503 past ``serving.max_connections`` open
connections. Limits are the ``[serving]`` section of the config. With ``--workers N`` each
process serves its own ``/metrics``.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.supervisors import Multiprocess

from ppm.config import Config, ServingConfig
from ppm.heap import freeze_heap
from ppm.metrics import counter, histogram
from trainer.serving.ranker import NoChampionError, Ranker

CONFIG_ENV = "PPM_SERVE_CONFIG"
"""The effective config (JSON) handed to each ``--workers`` process."""
VARIANT_ENV = "PPM_SERVE_VARIANT"


Id = Annotated[str, Field(min_length=1, max_length=1024)]
"""An id: pydantic refuses one that is not valid Unicode (a lone surrogate such as
``"\\ud800"`` in the JSON)."""


class RankRequest(BaseModel):
    """Candidates to rank for one user."""

    model_config = ConfigDict(extra="forbid", strict=True)
    user_id: Id
    item_ids: list[Id]


class ScoredItem(BaseModel):
    """One candidate with the probability of each task its model learned (``click``,
    ``order``, ``collect``...: ``UnifiedRanker.trained_tasks``)."""

    model_config = ConfigDict(extra="allow")
    item_id: str


class RankResponse(BaseModel):
    model_version: str
    items: list[ScoredItem]
    missing: dict[str, int]
    """How many features were missing or stale (see ``RankResult.missing``)."""


class _RankerCollector:
    """The ranker's own counters (item cache, reloads, plug-in outputs, model) as Prometheus
    series, read at scrape time."""

    def __init__(self, ranker: Ranker):
        self.ranker = ranker

    def collect(self):
        cache = CounterMetricFamily("ppm_scoring_item_cache", "Item feature reads by the "
                                    "ranker's cache, by result", labels=["result"])
        counters = self.ranker.items.counters
        cache.add_metric(["hit"], counters["hits"])
        cache.add_metric(["miss"], counters["misses"])
        yield cache
        reloads = CounterMetricFamily("ppm_scoring_model_reloads", "Champion models loaded")
        reloads.add_metric([], self.ranker.counters["reloads"])
        yield reloads
        outputs = CounterMetricFamily("ppm_scoring_plugin_outputs", "A frozen plug-in's "
                                      "per-item outputs, by source", labels=["source"])
        outputs.add_metric(["store"], self.ranker.counters["plugin_outputs_read"])
        outputs.add_metric(["computed"], self.ranker.counters["plugin_outputs_computed"])
        yield outputs
        lost = CounterMetricFamily("ppm_scoring_plugin_output_writes_lost", "Batches of "
                                   "computed plug-in outputs not written back, by why",
                                   labels=["why"])
        lost.add_metric(["error"], self.ranker.counters["plugin_output_write_errors"])
        lost.add_metric(["dropped"], self.ranker.counters["plugin_output_writes_dropped"])
        yield lost
        model = GaugeMetricFamily("ppm_scoring_model_info", "The model being served (1)",
                                  labels=["version"])
        model.add_metric([str(self.ranker.model_version)], 1)
        yield model


class BodyCap:
    """ASGI middleware: a body over ``max_bytes`` gets a 413 without being read, by its
    ``Content-Length`` or, for a chunked body, as soon as the bytes received pass the cap."""

    def __init__(self, app, max_bytes: int, refused: Callable[[], None]):
        self.app, self.max_bytes, self.refused = app, max_bytes, refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            self.refused()
            # Closing the connection: the body that follows is not read.
            response = JSONResponse({"error": f"body over {self.max_bytes} bytes"}, 413,
                                    headers={"connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def capped() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, f"body over {self.max_bytes} bytes")
            return message

        await self.app(scope, capped, send)


def make_app(ranker: Ranker, limits: ServingConfig | None = None) -> FastAPI:
    """The scoring app around ``ranker``, refusing requests over ``limits`` (default: the
    config's defaults). Metrics go to a registry of the app's own."""
    limits = limits or ServingConfig()
    app = FastAPI(title="ppm-stream scoring", version="1")
    app.state.ranker = ranker
    registry = CollectorRegistry()
    requests = counter("ppm_scoring_requests", "Scoring requests answered, by status",
                       ["status"], registry=registry)
    latency = histogram("ppm_scoring_latency_seconds", "Time to rank one request (read, "
                        "build, forward), excluding HTTP", registry=registry,
                        buckets=(.002, .005, .01, .015, .02, .03, .05, .075, .1, .2, .5, 1, 5))
    candidates = histogram("ppm_scoring_candidates", "Candidates per ranked request",
                           registry=registry, buckets=(1, 10, 50, 100, 200, 500, 1000, 10_000))
    missing = counter("ppm_scoring_missing_features", "Features missing or stale at "
                      "scoring, by kind", ["feature"], registry=registry)
    registry.register(_RankerCollector(ranker))

    def error(status: int, message: str, headers: dict[str, str] | None = None
              ) -> JSONResponse:
        requests.labels(str(status)).inc()
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    scoring = [0]  # /rank requests being scored now (one event loop: no lock needed)

    app.add_middleware(BodyCap, max_bytes=limits.max_body_bytes,
                       refused=lambda: requests.labels("413").inc())

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return error(400, "malformed JSON: " + "; ".join(
                str(p.get("ctx", {}).get("error", p.get("msg"))) for p in problems))
        return error(422, "; ".join(
            f"{'.'.join(str(x) for x in p.get('loc', ())[1:]) or 'body'}: {p.get('msg')}"
            for p in problems))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(exc).__name__}")

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))  # 400 unreadable body, 404, 405, 413

    @app.post("/rank", response_model=RankResponse)
    async def rank(body: RankRequest) -> Any:
        if len(body.item_ids) > limits.max_candidates:
            return error(422, f"item_ids: at most {limits.max_candidates} candidates per "
                         f"request, got {len(body.item_ids)}")
        # The cap is on scoring, not on connections or uploads (the request deadline bounds
        # those) nor on /health, /ready and /metrics, which must answer most when busy.
        if scoring[0] >= limits.max_concurrency:
            return error(503, f"over capacity: {scoring[0]} requests being scored; retry "
                         "shortly", {"retry-after": "1"})
        scoring[0] += 1
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(
                run_in_threadpool(ranker.rank, body.user_id, body.item_ids),
                limits.request_timeout_s)
        except NoChampionError as exc:
            return error(503, str(exc))
        except TimeoutError:
            return error(503, f"scoring took over {limits.request_timeout_s} s")
        finally:
            scoring[0] -= 1
        latency.observe(time.perf_counter() - started)
        candidates.observe(len(body.item_ids))
        for feature, n in result.missing.items():
            if n:
                missing.labels(feature).inc(n)
        requests.labels("200").inc()
        items = [{"item_id": item_id, **{t: s[k] for t, s in result.scores.items()}}
                 for k, item_id in enumerate(result.item_ids)]
        return JSONResponse({"model_version": result.model_version, "items": items,
                             "missing": result.missing})

    @app.get("/health")
    async def health() -> dict:
        tasks = ranker.tasks
        return {"status": "ok", "model_version": ranker.model_version,
                "tasks": None if tasks is None else list(tasks),
                "requests": ranker.counters["requests"]}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        try:  # a champion promoted since the last request is loaded here, not on a /rank
            await asyncio.wait_for(run_in_threadpool(ranker.maybe_reload),
                                   limits.request_timeout_s)
        except Exception as exc:  # any failure means not ready, with its reason
            return JSONResponse({"ready": False, "reason": f"loading the champion: "
                                 f"{type(exc).__name__}: {exc}"}, 503)
        if ranker.model_version is None:
            return JSONResponse({"ready": False, "reason": "no champion model yet"}, 503)
        try:  # one small read: the store answers
            await asyncio.wait_for(run_in_threadpool(ranker.store.read_sequences,
                                                     ["\x00ready"]), limits.request_timeout_s)
        except Exception as exc:
            return JSONResponse({"ready": False, "reason": f"online store: "
                                 f"{type(exc).__name__}: {exc}"}, 503)
        return JSONResponse({"ready": True, "model_version": ranker.model_version})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


class DeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on reading each request: uvicorn times out
    idle keep-alive connections but not a client that is slow to send its headers or body
    (or whose ``Content-Length`` promises more than it sends). The clock starts at a new
    connection and at the first bytes of each request; past ``request_timeout_s`` a request
    still arriving gets a 408 and the connection is closed (a connection that sent nothing
    is just closed). Once the whole request is in, the app's own timeout bounds the answer;
    between requests, uvicorn's keep-alive timeout. :func:`server_config` makes a subclass
    per timeout."""

    request_timeout_s = 10.0
    _deadline: asyncio.TimerHandle | None = None
    _received = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None:  # the first bytes of a new request
            self._arm()
        self._received = True
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._disarm()
        self._received = bool(self.conn.trailing_data[0])
        if self._received:  # part of a pipelined request is already here
            self._arm()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP, as JSON like every other refusal
        (uvicorn's own is plain text); the connection closes. Mid-answer (a pipelined
        request broke while one was being answered) it only closes: a second status line
        would corrupt the answer under way."""
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.close()
            return
        body = json.dumps({"error": f"{msg} (not valid HTTP/1.1)"}).encode()
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.transport.close()

    def _expire(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if self.transport.is_closing():
            return
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            return  # the app has the whole request: its own timeout bounds the answer
        answering = cycle is not None and cycle.response_started and not cycle.response_complete
        if self._received and not answering:
            body = json.dumps({"error": f"request not received within "
                               f"{self.request_timeout_s} s"}).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: "
                                 b"application/json\r\nconnection: close\r\n"
                                 b"content-length: " + str(len(body)).encode()
                                 + b"\r\n\r\n" + body)
        self.transport.close()


def serve(cfg: Config, variant: str) -> None:
    """Run the scoring server of ``cfg.serving`` (host, port, workers) until interrupted:
    ``variant``'s champion, features from ``cfg``'s online store."""
    limits = cfg.serving
    app: FastAPI | str
    if limits.workers > 1:  # each worker process builds its own from the environment
        os.environ[CONFIG_ENV] = cfg.model_dump_json()
        os.environ[VARIANT_ENV] = variant
        app = f"{__name__}:app_from_env"
    else:
        app = loaded_app(cfg, variant)
    config = server_config(app, limits, limits.host, limits.port, limits.workers)
    sock = config.bind_socket()  # bound here, so port 0 is known before serving
    host, port = sock.getsockname()[:2]
    if isinstance(app, str):
        what = f"{limits.workers} workers"
    else:
        model = app.state.ranker.model_version
        what = (f"model {model}" if model else f"no model yet (no champion in "
                f"{cfg.paths.registry(variant)}; /ready answers 503 until one is promoted)")
    print(f"serving {what} on http://{host}:{port} (POST /rank, GET /health, /ready, "
          "/metrics, /docs); Ctrl-C stops", file=sys.stderr, flush=True)
    if limits.workers > 1:
        print("each worker process keeps its own /metrics: a scrape of the shared port "
              "reaches one of them (one worker per port keeps Prometheus' counters whole)",
              file=sys.stderr, flush=True)
        Multiprocess(config, sockets=[sock]).run()
    else:
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            app.state.ranker.close()


class BackgroundServer:
    """``app`` served on ``host`` (a free port) from a thread of this process, for tests and
    benchmarks: ``with BackgroundServer(app, limits) as server: server.url``."""

    def __init__(self, app: FastAPI, limits: ServingConfig | None = None,
                 host: str = "127.0.0.1"):
        self.config = server_config(app, limits or ServingConfig(), host, 0)
        self.server = uvicorn.Server(self.config)
        self._sock = self.config.bind_socket()
        self.url = "http://{}:{}".format(*self._sock.getsockname()[:2])
        self._thread = threading.Thread(target=self.server.run, kwargs={
            "sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()


def app_from_env() -> FastAPI:
    """The app of one ``--workers`` process: config and variant from the environment
    (:data:`CONFIG_ENV`, :data:`VARIANT_ENV`, set by :func:`serve`)."""
    cfg = Config.model_validate_json(os.environ[CONFIG_ENV])
    DeadlineProtocol.request_timeout_s = cfg.serving.request_timeout_s  # this process's copy
    app = loaded_app(cfg, os.environ[VARIANT_ENV])
    # As serve() does for one process: the write-back thread stops at exit (writes still
    # queued are dropped; their outputs are computed again when next needed).
    atexit.register(app.state.ranker.close)
    return app


def loaded_app(cfg: Config, variant: str) -> FastAPI:
    """The scoring app of ``variant``'s champion, features from ``cfg``'s store, with the
    process's loaded heap out of the collector's reach."""
    app = make_app(Ranker.from_config(cfg, variant), cfg.serving)
    # The loaded process (torch, Feast, the model) holds millions of objects that live as
    # long as it does: out of the collector's reach, a full collection no longer stalls a
    # request for a third of a second (bench/serve.py).
    gc.collect()
    freeze_heap()
    return app


def server_config(app: FastAPI | str, limits: ServingConfig, host: str, port: int,
                  workers: int = 1) -> uvicorn.Config:
    """uvicorn's settings for ``app`` (or an import string of a factory, for workers)."""
    # Worker processes import the class by name (a subclass made here would not pickle);
    # each sets its own copy's timeout (app_from_env).
    http = DeadlineProtocol if workers > 1 else type(
        "DeadlineProtocol", (DeadlineProtocol,), {"request_timeout_s": limits.request_timeout_s})
    return uvicorn.Config(
        app, host=host, port=port, workers=workers, factory=isinstance(app, str), http=http,
        timeout_keep_alive=int(max(1, limits.keep_alive_s)),
        limit_concurrency=limits.max_connections, log_level="warning", access_log=False,
        lifespan="off", ws="none", h11_max_incomplete_event_size=64 * 1024,
        # A worker loads torch, Feast and the model before it answers the supervisor's
        # pings: uvicorn's 5 s default kills and restarts it forever on a busy machine.
        timeout_worker_healthcheck=120)
