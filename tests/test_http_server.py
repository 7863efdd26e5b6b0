"""The scoring server (``trainer/serving/http_server.py``) under hostile clients, over real
sockets to a real uvicorn: every bad request gets its 4xx (or, for a client that stalls, a
408 and a closed connection at the timeout), and the server keeps answering others."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from ppm.config import ServingConfig
from trainer.serving.http_server import BackgroundServer, make_app
from trainer.serving.ranker import NoChampionError, RankResult

LIMITS = ServingConfig(max_candidates=5, max_body_bytes=300_000, request_timeout_s=1.5,
                       keep_alive_s=1)


class FakeStore:
    def __init__(self) -> None:
        self.down = False

    def read_sequences(self, user_ids):
        if self.down:
            raise ConnectionError("store unreachable")
        return {}


class Echo:
    """A ranker without a model: scores are the candidates' positions; the user ids
    "boom" and "torch" raise, as a bug in scoring would, "slow" takes longer than the
    request timeout, and "hold" waits until ``release`` is set."""

    def __init__(self, model_version: str | None = "v-test"):
        self.model_version = model_version
        self.tasks = ("click",) if model_version else None
        self.counters = {"requests": 0, "reloads": 1, "plugin_outputs_read": 0,
                         "plugin_outputs_computed": 0, "plugin_output_write_errors": 0,
                         "plugin_output_writes_dropped": 0}
        self.items = SimpleNamespace(counters={"hits": 0, "misses": 0})  # the item cache's
        self.store = FakeStore()
        self.release = threading.Event()  # what a "hold" request waits for
        self.holding = 0  # "hold" requests that reached scoring

    def maybe_reload(self) -> None:
        pass

    def rank(self, user_id, item_ids):
        if self.model_version is None:
            raise NoChampionError("no champion model yet")
        if user_id == "boom":
            raise KeyError("a bug")
        if user_id == "torch":  # a RuntimeError that is not "no model": a 500, not a 503
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        if user_id == "slow":
            time.sleep(LIMITS.request_timeout_s + 0.5)
        if user_id == "hold":
            self.holding += 1
            self.release.wait(timeout=30)
        self.counters["requests"] += 1
        return RankResult(list(item_ids), {"click": [1.0 / (k + 1) for k in
                                                     range(len(item_ids))]}, "v-test",
                          {"item_embedding": 1})


@pytest.fixture(scope="module")
def server():
    ranker = Echo()
    with BackgroundServer(make_app(ranker, LIMITS), LIMITS) as running:
        running.ranker = ranker
        yield running


def request(server, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict]:
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json",
                                          **(headers or {})})
        reply = conn.getresponse()
        data = reply.read()
        return reply.status, json.loads(data) if data.startswith(b"{") else {"raw": data}
    finally:
        conn.close()


def rank(server, body) -> tuple[int, dict]:
    return request(server, "POST", "/rank",
                   body if isinstance(body, bytes) else json.dumps(body).encode())


def raw(server, data: bytes, wait_s: float = 10) -> bytes:
    """Send ``data`` on a fresh connection and return everything the server sends back
    until it closes the connection (or ``wait_s`` passes)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except TimeoutError:
            out += b"<still open>"
        return out


def answers(server) -> bool:
    status, reply = rank(server, {"user_id": "u", "item_ids": ["a", "b"]})
    return status == 200 and [i["item_id"] for i in reply["items"]] == ["a", "b"]


def test_a_good_request_is_ranked(server):
    status, reply = rank(server, {"user_id": "u", "item_ids": ["a", "b", "c"]})
    assert status == 200
    assert [i["item_id"] for i in reply["items"]] == ["a", "b", "c"]
    assert reply["items"][0]["click"] == 1.0 and reply["model_version"] == "v-test"


@pytest.mark.parametrize(("body", "status", "says"), [
    (b'{"user_id": "u", "item_ids": [', 400, "malformed JSON"),
    (b'\xff\xfe{"user_id": 1}', 400, ""),
    (b"[" * 100_000 + b"]" * 100_000, 400, ""),  # nested deep: refused, not a crash
    ({"user_id": 7, "item_ids": ["a"]}, 422, "user_id"),
    ({"user_id": "u", "item_ids": "a"}, 422, "item_ids"),
    ({"user_id": "u", "item_ids": ["a", 3]}, 422, "item_ids"),
    ({"item_ids": ["a"]}, 422, "user_id"),
    ({"user_id": "u", "item_ids": ["a"], "extra": 1}, 422, "extra"),
    ({"user_id": "u", "item_ids": list("abcdef")}, 422, "at most 5 candidates"),
    ({"user_id": "", "item_ids": ["a"]}, 422, "user_id"),
    (b'{"user_id": "\\ud800", "item_ids": ["a"]}', 422, "valid string"),
    (b'{"user_id": "u", "item_ids": ["\\udfff"]}', 422, "valid string"),
])
def test_each_bad_request_gets_its_4xx_and_the_server_goes_on(server, body, status, says):
    got, reply = rank(server, body)
    assert got == status, reply
    assert says in reply["error"]
    assert answers(server)


def test_a_body_over_the_cap_is_refused_before_it_is_read(server):
    status, reply = rank(server, {"user_id": "u", "item_ids": ["x" * 300_001]})
    assert status == 413 and "300000 bytes" in reply["error"]
    # By its Content-Length: answered at once, the connection closed, the body never read.
    started = time.monotonic()
    reply = raw(server, b"POST /rank HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                b"\r\nContent-Length: 300001\r\n\r\n{")
    assert reply.startswith(b"HTTP/1.1 413") and reply.count(b"HTTP/1.1") == 1
    assert time.monotonic() - started < 1
    # Chunked, with no Content-Length: refused once the bytes pass the cap.
    chunk = b'{"user_id": "u", "item_ids": ["' + b"x" * 300_001 + b'"]}'
    reply = raw(server, b"POST /rank HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(chunk):x}".encode() + b"\r\n"
                + chunk + b"\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413")
    assert answers(server)


def test_a_content_length_that_lies_gets_an_answer(server):
    # Not a number: the parser refuses it, in JSON like every other refusal, and closes.
    reply = raw(server, b"POST /rank HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n{}")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert "not valid HTTP" in json.loads(body)["error"]
    # Longer than the body: the server waits for the rest until the request timeout, then
    # answers 408 and closes.
    started = time.monotonic()
    reply = raw(server, b"POST /rank HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                b"\r\nContent-Length: 500\r\n\r\n" + b'{"user_id": "u"}')
    assert reply.startswith(b"HTTP/1.1 408") and b"<still open>" not in reply
    assert LIMITS.request_timeout_s - 0.2 <= time.monotonic() - started < 8
    # Shorter than the body: the request is the truncated JSON (400); the rest is garbage.
    body = b'{"user_id": "u", "item_ids": ["a"]}'
    reply = raw(server, b"POST /rank HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                b"\r\nContent-Length: 10\r\n\r\n" + body)
    assert reply.startswith(b"HTTP/1.1 400")
    assert answers(server)


def test_a_slow_client_is_cut_off_at_the_timeout_while_others_are_answered(server):
    host, port = server.url.removeprefix("http://").split(":")
    slow = [socket.create_connection((host, int(port)), timeout=10) for _ in range(20)]
    try:
        for sock in slow:  # headers begun, never finished
            sock.sendall(b"POST /rank HTTP/1.1\r\nHost: t\r\n")
        assert answers(server)  # the stalled ones hold nothing others need
        for sock in slow:
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 408"), reply
    finally:
        for sock in slow:
            sock.close()
    assert answers(server)


def test_a_failure_inside_scoring_is_a_500_with_a_json_body(server):
    status, reply = rank(server, {"user_id": "boom", "item_ids": ["a"]})
    assert status == 500 and reply["error"] == "internal error: KeyError"
    status, reply = rank(server, {"user_id": "torch", "item_ids": ["a"]})
    assert status == 500 and reply["error"] == "internal error: RuntimeError"  # no detail
    assert answers(server)


def test_scoring_past_the_timeout_is_a_503(server):
    started = time.monotonic()
    status, reply = rank(server, {"user_id": "slow", "item_ids": ["a"]})
    assert status == 503 and "1.5 s" in reply["error"]
    assert time.monotonic() - started < LIMITS.request_timeout_s + 0.4
    assert answers(server)


def test_an_idle_keep_alive_connection_is_closed_without_an_answer():
    # Keep-alive longer than the request timeout: idle is not a slow request.
    limits = ServingConfig(request_timeout_s=1, keep_alive_s=3)
    with BackgroundServer(make_app(Echo(), limits), limits) as server:
        host, port = server.url.removeprefix("http://").split(":")
        started = time.monotonic()
        out = _one_request_then_idle(host, int(port))
        assert out.startswith(b"HTTP/1.1 200") and out.count(b"HTTP/1.1") == 1  # no 408
        assert time.monotonic() - started >= 2.5  # closed by the keep-alive timeout


def _one_request_then_idle(host: str, port: int) -> bytes:
    body = json.dumps({"user_id": "u", "item_ids": ["a"]}).encode()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /rank HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        out = b""
        while chunk := sock.recv(65536):  # until the server closes the idle connection
            out += chunk
    return out


def test_each_server_keeps_its_own_request_timeout(server):
    slower = ServingConfig(request_timeout_s=30)
    with BackgroundServer(make_app(Echo(), slower), slower):
        started = time.monotonic()
        reply = raw(server, b"POST /rank HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\n{")
        assert reply.startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < LIMITS.request_timeout_s + 3


def test_unknown_paths_and_methods_are_4xx_json(server):
    assert request(server, "GET", "/nope")[0] == 404
    status, reply = request(server, "GET", "/rank")
    assert status == 405 and "error" in reply


def test_health_ready_and_metrics(server):
    status, health = request(server, "GET", "/health")
    assert status == 200 and health["model_version"] == "v-test" and health["tasks"] == ["click"]
    assert request(server, "GET", "/ready") == (200, {"ready": True, "model_version": "v-test"})
    server.ranker.store.down = True
    try:
        status, reply = request(server, "GET", "/ready")
        assert status == 503 and "store unreachable" in reply["reason"]
    finally:
        server.ranker.store.down = False
    assert answers(server)
    status, reply = request(server, "GET", "/metrics")
    text = reply["raw"].decode()
    assert status == 200
    for series in ("ppm_scoring_requests_total", "ppm_scoring_latency_seconds_bucket",
                   "ppm_scoring_candidates_bucket", "ppm_scoring_missing_features_total",
                   "ppm_scoring_model_reloads_total", "ppm_scoring_item_cache_total",
                   'ppm_scoring_plugin_outputs_total{source="computed"}',
                   'ppm_scoring_model_info{version="v-test"}'):
        assert series in text, series
    ok = next(line for line in text.splitlines()
              if line.startswith('ppm_scoring_requests_total{status="200"}'))
    assert float(ok.split()[-1]) >= 1


def test_without_a_model_rank_and_ready_are_503():
    with BackgroundServer(make_app(Echo(model_version=None), LIMITS), LIMITS) as server:
        status, reply = rank(server, {"user_id": "u", "item_ids": ["a"]})
        assert status == 503 and "no champion" in reply["error"]
        status, reply = request(server, "GET", "/ready")
        assert status == 503 and reply["ready"] is False


def test_requests_past_the_concurrency_cap_get_a_json_503_and_idle_connections_do_not_count():
    """At ``max_concurrency`` requests being scored a new /rank gets a JSON 503 with
    Retry-After; idle connections and /health, /ready, /metrics are not capped."""
    limits = ServingConfig(max_concurrency=2, request_timeout_s=30)
    ranker = Echo()
    with BackgroundServer(make_app(ranker, limits), limits) as server:
        host, port = server.url.removeprefix("http://").split(":")
        # More idle keep-alive connections than the cap: they hold no request slot.
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(6)]
        try:
            assert answers(server)
            held = [threading.Thread(target=rank, args=(server, {"user_id": "hold",
                                                                 "item_ids": ["a"]}))
                    for _ in range(2)]
            for thread in held:
                thread.start()
            deadline = time.monotonic() + 30
            while ranker.holding < 2 and time.monotonic() < deadline:  # both in flight
                time.sleep(0.02)
            status, reply = rank(server, {"user_id": "u", "item_ids": ["a"]})
            assert status == 503 and "over capacity: 2 requests being scored" in reply["error"]
            # Health, readiness and metrics still answer at the cap.
            assert request(server, "GET", "/health")[0] == 200
            assert request(server, "GET", "/ready")[0] == 200
            ranker.release.set()
            for thread in held:
                thread.join(timeout=10)
            assert answers(server)
            _, metrics = request(server, "GET", "/metrics")
            assert 'ppm_scoring_requests_total{status="503"} 1.0' in metrics["raw"].decode()
            # A request that fails inside scoring gives its slot back.
            for _ in range(3):
                assert rank(server, {"user_id": "boom", "item_ids": ["a"]})[0] == 500
            assert answers(server)
        finally:
            ranker.release.set()
            for sock in idle:
                sock.close()


@pytest.mark.slow
def test_the_serve_command_runs_worker_processes_that_answer_and_stop_on_sigint(tmp_path):
    """``ppm serve --port 0 --workers 2`` on a data dir without a model yet: the port it
    prints answers /health and /ready (503: no champion), and Ctrl-C stops it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ppm.cli", "--data-dir", str(tmp_path / "d"), "serve",
         "--port", "0", "--workers", "2"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stderr.readline()
        found = re.search(r"serving 2 workers on (http://127\.0\.0\.1:\d+)", line)
        assert found, line
        server = SimpleNamespace(url=found.group(1))
        deadline = time.monotonic() + 240  # each worker loads torch and Feast first
        status = None
        while time.monotonic() < deadline:
            try:
                status, health = request(server, "GET", "/health")
                break
            except OSError:
                time.sleep(0.5)
        assert status == 200 and health["model_version"] is None
        status, ready = request(server, "GET", "/ready")
        assert status == 503 and "no champion" in ready["reason"]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
