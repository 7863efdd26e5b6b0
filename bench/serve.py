"""Latency of ``Ranker.rank`` for one user and 200 candidates, features from the embedded store.

Set-up (not timed): a small simulated shop is streamed into a temporary Feast SQLite store
and a ``ppm`` champion is trained on its windows. Then ``--requests`` requests, each for a
random active user and 200 random catalog items, go through ``Ranker.rank``: the online
reads (sequence, items with their 1664-d vectors), the batch build and the model's forward.

Reads go through ``features.online_reads="direct"`` (the default); ``sdk_*`` repeat the
raw-vector requests through Feast's ``get_online_features`` (``"feast"``: the read path
before the direct one existed), the baseline of every ``*_ratio``.
``p50_ms``/``p99_ms`` are with the default item cache (``features.serving_cache_s``, one
second: items read in the last second are not read again; the sequence is read every
time); ``uncached_*`` repeat the same requests with the cache off, so every request reads
all its ~250 items from the store. As baselines in the same run, the model's forward alone
is timed on the same batch, and on the same batch with the sequence tiled per candidate
(what a model must do when the sequence attends to the target: ``attention="full"``), and
the batch build alone (``build_p50_ms``: every item already in a cache that never expires,
so only the sequence is read from the store).

``plugin_*``: the same requests to a ``ppm`` model whose PPM module was pre-trained
(``modal``), plugged in and frozen, served from its stored per-item outputs (d_model floats,
``trainer.serving.projection``) instead of the raw vectors; ``plugin_*_ratio`` divides its
p99 by the SDK raw-vector path's of the same run, ``direct_uncached_p99_ratio`` the direct
raw-vector path's. ``plugin_compiled_*``: the same plug-in requests with the champion's
forward compiled (``serving.compile``; ``compile_s``: the load that compiled it).
``bytes_per_item_raw`` / ``bytes_per_item_plugin``:
the vector bytes serving reads per item.

``http_*``: the cached requests again through the scoring server (``ppm serve``'s app on
uvicorn, in a thread of this process; one keep-alive connection, JSON both ways), each in
turn with the same request in process (``http_paired_p99_ms``), so both share the
machine's noise; ``http_p99_ratio`` divides the first p99 by the second.

Last line: ``{"candidates": 200, "p50_ms", "p99_ms", ...}``. Goal: p99 <= 20 ms.

``--against REF [--pairs N]`` instead runs this bench as it was at git commit REF (in a
temporary ``git worktree``, that code on the path) and as it is now, alternately, N pairs,
each in a process of its own, so machine noise hits both; the last line is then
``{"against", "pairs": [...], "plugin_p99_vs_against", "plugin_uncached_p99_vs_against",
...}``: per pair, the frozen plug-in's cached and uncached p99 now over REF's ``p99_ms`` and
``uncached_p99_ms`` (issue #15: at most a half and a quarter of the code when it was filed),
the same for the p50s (``plugin_p50_vs_against``, ``plugin_uncached_p50_vs_against``) and
for the compiled plug-in (``plugin_compiled_p99_vs_against``,
``plugin_compiled_uncached_p99_vs_against``), each side's ``forward_p50_ms``, and the
medians of those ratios.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--against", metavar="REF",
                        help="also run this bench at git commit REF, alternately, in pairs")
    parser.add_argument("--pairs", type=int, default=3, help="pairs of runs with --against")
    args = parser.parse_args()
    if args.against:
        return against(args)

    import torch

    from feature_repo.online_features import OnlineFeatures
    from ppm.config import Config, SimulatorConfig
    from ppm.heap import freeze_heap
    from streams.local_runner import LocalRunner
    from streams.sources.shop_simulator import ShopSimulator
    from trainer.registry import Registry
    from trainer.serving.http_server import BackgroundServer, make_app
    from trainer.serving.projection import project_catalog
    from trainer.serving.ranker import Ranker
    from trainer.train import IncrementalTrainer, train_batch
    from trainer.windows import closed_windows

    world = SimulatorConfig(seed=11, days=1.0, n_users=300, initial_items=300,
                            items_per_day=100)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(data_dir=Path(tmp))
        cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(
            update={"warmup_windows": 12, "initial_epochs": 1})})
        print("streaming a small shop and training a champion ...", file=sys.stderr)
        LocalRunner(cfg, resume=False).run(ShopSimulator(world).records(), "bench",
                                           progress=False)
        trainer = IncrementalTrainer(cfg, variant="ppm")
        if trainer.step() is None:
            raise SystemExit("not enough windows to train a champion")
        store = OnlineFeatures.open(cfg, apply=False)
        ranker = Ranker(store, trainer.registry, cache_s=cfg.features.serving_cache_s)
        uncached = Ranker(store, trainer.registry, cache_s=0.0)
        # The reference: the same store read through Feast's SDK (features.online_reads).
        sdk_store = OnlineFeatures(store.store, store.definitions, store.freshness_window_s,
                                   reads="feast")
        sdk = Ranker(sdk_store, trainer.registry, cache_s=cfg.features.serving_cache_s)
        sdk_uncached = Ranker(sdk_store, trainer.registry, cache_s=0.0)
        # The same windows' frozen plug-in: modal pre-trained, plugged into ppm, frozen.
        windows = closed_windows(cfg.paths.training)[:12]
        modal = train_batch(cfg, windows, "modal", 1, progress=False)
        source = Registry(cfg.paths.registry("modal")).register(modal.model, modal.meta())
        plugged = train_batch(cfg, windows, "ppm", 1, progress=False, plug_in_from=source,
                              freeze_plugin=True)
        plugin_registry = Registry(Path(tmp) / "plugin-registry")
        version = plugin_registry.register(plugged.model, plugged.meta())
        project_catalog(store, plugged.model, version.meta, cfg.paths.item_log)
        plugin_registry.promote(version)
        plugin = Ranker(store, plugin_registry, cache_s=cfg.features.serving_cache_s)
        plugin_uncached = Ranker(store, plugin_registry, cache_s=0.0)
        print("compiling the plug-in champion ...", file=sys.stderr)
        started = time.perf_counter()
        plugin_compiled = Ranker(store, plugin_registry, cache_s=cfg.features.serving_cache_s,
                                 compile=True)
        compile_s = time.perf_counter() - started
        plugin_compiled_uncached = Ranker(store, plugin_registry, cache_s=0.0, compile=True)
        sim = ShopSimulator(world)
        items = sim.catalog["item_id"].tolist()
        users = sim.user_tastes.index.tolist()
        clock = json.loads(cfg.paths.summary.read_text())["clock"]
        now = int(datetime.fromisoformat(clock).timestamp() * 1e6)
        rng = np.random.default_rng(0)
        requests = [(users[rng.integers(len(users))],
                     list(rng.choice(items, args.candidates, replace=False)))
                    for _ in range(args.requests)]

        # As ppm serve does after loading: the set-up's millions of objects (torch, Feast,
        # the models) move out of the collector's reach, else a full collection every few
        # seconds adds ~350 ms to one request in sixty, to both paths alike.
        gc.collect()
        freeze_heap()

        def timed(scorer: Ranker) -> list[float]:
            for user, candidates in requests[:20]:  # warm-up: first reads/forwards are slow
                scorer.rank(user, candidates, now=now)
            out = []
            for user, candidates in requests:
                started = time.perf_counter()
                result = scorer.rank(user, candidates, now=now)
                out.append((time.perf_counter() - started) * 1e3)
                assert len(result.item_ids) == args.candidates
            return out

        sdk_ms = timed(sdk)
        sdk_uncached_ms = timed(sdk_uncached)
        def timed_http(direct: Ranker, served: Ranker) -> tuple[list[float], list[float]]:
            """Each request in process to ``direct`` and through the scoring server to
            ``served`` (one keep-alive connection), in turn, so both share the machine's
            noise; the two rankers have caches of their own."""
            inproc, through = [], []
            with BackgroundServer(make_app(served, cfg.serving), cfg.serving) as server:
                host, port = server.url.removeprefix("http://").split(":")
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                for k, (user, candidates) in enumerate(requests[:20] + requests):
                    started = time.perf_counter()
                    direct.rank(user, candidates)  # wall clock, as the server judges
                    middle = time.perf_counter()
                    conn.request("POST", "/rank", json.dumps(
                        {"user_id": user, "item_ids": [str(i) for i in candidates]}),
                        {"Content-Type": "application/json"})
                    reply = conn.getresponse()
                    body = json.loads(reply.read())
                    if k >= 20:  # after the warm-up, as timed()
                        inproc.append((middle - started) * 1e3)
                        through.append((time.perf_counter() - middle) * 1e3)
                    assert reply.status == 200 and len(body["items"]) == args.candidates
                conn.close()
            return inproc, through

        rank_ms = timed(ranker)
        hits = ranker.items.counters
        paired_ms, http_ms = timed_http(
            *(Ranker(store, trainer.registry, cache_s=cfg.features.serving_cache_s)
              for _ in range(2)))
        uncached_ms = timed(uncached)
        plugin_ms = timed(plugin)
        plugin_uncached_ms = timed(plugin_uncached)
        plugin_compiled_ms = timed(plugin_compiled)
        plugin_compiled_uncached_ms = timed(plugin_compiled_uncached)
        if not plugin_compiled.counters["compiled_requests"]:
            raise SystemExit("the compiled ranker served nothing compiled (see the log)")
        champion = trainer.registry.champion()
        model = trainer.registry.load(champion)
        # The batch build alone, every item in a cache that never expires: no store reads
        # but the sequence's, so the figure does not depend on which entries expired when.
        warm = Ranker(store, trainer.registry, cache_s=float("inf"))
        warm.rank(requests[0][0], items, now=now)
        build_ms = []
        for user, candidates in requests:
            started = time.perf_counter()
            warm.build_batch(model, champion.meta["encoder_version"], user, candidates, now)
            build_ms.append((time.perf_counter() - started) * 1e3)
        batch, _ = ranker.build_batch(model, champion.meta["encoder_version"], *requests[0],
                                      now=now)
        tiled = {k: v.expand(args.candidates, -1) if k.startswith("seq_") else v
                 for k, v in batch.items()}
        forward_ms, tiled_ms = [], []
        with torch.inference_mode():
            for out, b in ((forward_ms, batch), (tiled_ms, tiled)):
                for i in range(min(len(requests), 100) + 5):
                    started = time.perf_counter()
                    model(b)
                    if i >= 5:
                        out.append((time.perf_counter() - started) * 1e3)

    def pct(values: list[float], q: float) -> float:
        return round(float(np.percentile(values, q)), 2)

    print(json.dumps({
        "candidates": args.candidates,
        "p50_ms": pct(rank_ms, 50),
        "p99_ms": pct(rank_ms, 99),
        "uncached_p50_ms": pct(uncached_ms, 50),
        "uncached_p99_ms": pct(uncached_ms, 99),
        "cache_hit_share": round(hits["hits"] / max(1, hits["hits"] + hits["misses"]), 3),
        "http_p50_ms": pct(http_ms, 50),
        "http_p99_ms": pct(http_ms, 99),
        "http_paired_p99_ms": pct(paired_ms, 99),
        "http_p99_ratio": round(pct(http_ms, 99) / pct(paired_ms, 99), 3),
        "sdk_p50_ms": pct(sdk_ms, 50),
        "sdk_p99_ms": pct(sdk_ms, 99),
        "sdk_uncached_p50_ms": pct(sdk_uncached_ms, 50),
        "sdk_uncached_p99_ms": pct(sdk_uncached_ms, 99),
        "plugin_p50_ms": pct(plugin_ms, 50),
        "plugin_p99_ms": pct(plugin_ms, 99),
        "plugin_uncached_p50_ms": pct(plugin_uncached_ms, 50),
        "plugin_uncached_p99_ms": pct(plugin_uncached_ms, 99),
        "plugin_compiled_p50_ms": pct(plugin_compiled_ms, 50),
        "plugin_compiled_p99_ms": pct(plugin_compiled_ms, 99),
        "plugin_compiled_uncached_p50_ms": pct(plugin_compiled_uncached_ms, 50),
        "plugin_compiled_uncached_p99_ms": pct(plugin_compiled_uncached_ms, 99),
        "compile_s": round(compile_s, 1),
        "plugin_p99_ratio": round(pct(plugin_ms, 99) / pct(sdk_ms, 99), 3),
        "plugin_uncached_p99_ratio": round(pct(plugin_uncached_ms, 99)
                                           / pct(sdk_uncached_ms, 99), 3),
        "direct_uncached_p99_ratio": round(pct(uncached_ms, 99) / pct(sdk_uncached_ms, 99), 3),
        "plugin_outputs_computed_share": round(
            plugin.counters["plugin_outputs_computed"] / max(1, plugin.counters[
                "plugin_outputs_computed"] + plugin.counters["plugin_outputs_read"]), 3),
        "bytes_per_item_raw": 4 * model.config.modal_dim,
        "bytes_per_item_plugin": 4 * plugged.model.config.d_model,
        "build_p50_ms": pct(build_ms, 50),
        "forward_p50_ms": pct(forward_ms, 50),
        "forward_tiled_p50_ms": pct(tiled_ms, 50),
        "requests": args.requests,
        "cache_s": cfg.features.serving_cache_s,
        "goal_p99_ms": 20,
    }))


def against(args: argparse.Namespace) -> None:
    """``--against``: REF's bench and today's, alternately, each run in its own process."""
    repo = Path(__file__).resolve().parents[1]
    size = ["--candidates", str(args.candidates), "--requests", str(args.requests)]

    def run(root: Path) -> dict:
        done = subprocess.run([sys.executable, str(root / "bench" / "serve.py"), *size],
                              cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "against"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(old),
                        args.against], check=True, capture_output=True)
        try:
            for pair in range(args.pairs):
                print(f"pair {pair + 1} of {args.pairs} ...", file=sys.stderr)
                then, now = run(old), run(repo)
                pairs.append({
                    # The medians and the forward alone beside the tails: a p99 of 300
                    # requests on a noisy machine may say more of the machine than the code.
                    "against_p50_ms": then["p50_ms"],
                    "against_uncached_p50_ms": then["uncached_p50_ms"],
                    "against_forward_p50_ms": then["forward_p50_ms"],
                    "plugin_p50_ms": now["plugin_p50_ms"],
                    "plugin_uncached_p50_ms": now["plugin_uncached_p50_ms"],
                    "forward_p50_ms": now["forward_p50_ms"],
                    "against_p99_ms": then["p99_ms"],
                    "against_uncached_p99_ms": then["uncached_p99_ms"],
                    "plugin_p99_ms": now["plugin_p99_ms"],
                    "plugin_uncached_p99_ms": now["plugin_uncached_p99_ms"],
                    "p99_ms": now["p99_ms"], "uncached_p99_ms": now["uncached_p99_ms"],
                    "http_p99_ratio": now["http_p99_ratio"],
                    "plugin_p99_vs_against": round(now["plugin_p99_ms"] / then["p99_ms"], 3),
                    "plugin_uncached_p99_vs_against": round(
                        now["plugin_uncached_p99_ms"] / then["uncached_p99_ms"], 3),
                    "plugin_p50_vs_against": round(now["plugin_p50_ms"] / then["p50_ms"], 3),
                    "plugin_uncached_p50_vs_against": round(
                        now["plugin_uncached_p50_ms"] / then["uncached_p50_ms"], 3),
                    "plugin_compiled_p50_ms": now["plugin_compiled_p50_ms"],
                    "plugin_compiled_p99_ms": now["plugin_compiled_p99_ms"],
                    "plugin_compiled_uncached_p99_ms": now["plugin_compiled_uncached_p99_ms"],
                    "plugin_compiled_p99_vs_against": round(
                        now["plugin_compiled_p99_ms"] / then["p99_ms"], 3),
                    "plugin_compiled_uncached_p99_vs_against": round(
                        now["plugin_compiled_uncached_p99_ms"] / then["uncached_p99_ms"], 3)})
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(old)],
                           check=False, capture_output=True)
    print(json.dumps({
        "against": args.against, "candidates": args.candidates, "requests": args.requests,
        "pairs": pairs,
        **{f"{k}_median": round(statistics.median(p[k] for p in pairs), 3)
           for k in ("plugin_p99_vs_against", "plugin_uncached_p99_vs_against",
                     "plugin_p50_vs_against", "plugin_uncached_p50_vs_against",
                     "plugin_compiled_p99_vs_against",
                     "plugin_compiled_uncached_p99_vs_against", "http_p99_ratio")},
        "goal_plugin_p99_vs_against": 0.5, "goal_plugin_uncached_p99_vs_against": 0.25,
    }))


if __name__ == "__main__":
    main()
