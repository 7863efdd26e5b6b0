"""``ppm serve``: the ranker over HTTP with JSON, on the standard library's threaded server.

Endpoints:

* ``POST /rank`` with ``{"user_id": "u1", "item_ids": ["i1", "i2", ...]}`` answers
  ``{"model_version": ..., "items": [{"item_id", "click", "order", "collect"}, ...],
  "missing": {...}}``, items by descending click probability.
* ``GET /health`` answers ``{"status": "ok", "model_version": ..., "requests": n}``.

Bad requests get a 400 with ``{"error": reason}``; no model yet gives a 503. The limits on
a request are the ``[serving]`` section of the config.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ppm.config import ServingConfig
from trainer.serving.ranker import Ranker


def make_server(ranker: Ranker, host: str = "127.0.0.1", port: int = 0,
                limits: ServingConfig | None = None) -> ThreadingHTTPServer:
    """A server bound to ``host:port`` (0: a free port; read ``server.server_address``),
    refusing requests over ``limits`` (default: the config's defaults)."""
    limits = limits or ServingConfig()
    max_body_bytes, max_candidates = limits.max_body_bytes, limits.max_candidates

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path != "/health":
                return self._reply(404, {"error": f"no such path {self.path}"})
            self._reply(200, {"status": "ok", "model_version": ranker.model_version,
                              "requests": ranker.counters["requests"]})

        def do_POST(self) -> None:
            if self.path != "/rank":
                return self._reply(404, {"error": f"no such path {self.path}"})
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= max_body_bytes:
                return self._reply(400, {"error": f"body must be 1..{max_body_bytes} bytes"})
            try:
                request = json.loads(self.rfile.read(length))
                user_id, item_ids = request["user_id"], request["item_ids"]
                if not isinstance(user_id, str) or not isinstance(item_ids, list) or not all(
                        isinstance(i, str) for i in item_ids):
                    raise TypeError("user_id must be a string and item_ids a list of strings")
                if len(item_ids) > max_candidates:
                    raise ValueError(f"at most {max_candidates} candidates per request")
            except (ValueError, KeyError, TypeError) as exc:
                return self._reply(400, {"error": f"bad request: {exc}"})
            try:
                result = ranker.rank(user_id, item_ids)
            except RuntimeError as exc:
                return self._reply(503, {"error": str(exc)})
            items = [{"item_id": item_id, **{t: s[k] for t, s in result.scores.items()}}
                     for k, item_id in enumerate(result.item_ids)]
            self._reply(200, {"model_version": result.model_version, "items": items,
                              "missing": result.missing})

        def log_message(self, format: str, *args) -> None:
            pass  # one line per request is noise at serving rates

    return ThreadingHTTPServer((host, port), Handler)
