"""``ppm experiment worlds``: ``ppm eval --seeds``'s experiment on several simulated worlds.

One world is one draw of the simulator: its test period holds a few dozen clicks on items
new in it, so a difference between models on new items keeps a wide interval however many
training seeds run, and says nothing of another draw. Here worlds of simulator seeds
``simulator.seed``, +1, ..., +W-1 are each streamed through the local runner into a data
directory of their own (``DataDir.world``; a world streamed to the end before is reused, a
cut-off one resumes), fitted and scored as ``ppm eval --seeds N`` does
(:func:`trainer.experiment.score_models`, with the simulator's oracle), and pooled with each
world a stratum (:func:`trainer.experiment.pooled_summary`).
"""

from __future__ import annotations

from typing import Any

from ppm.config import Config
from trainer.baselines import Oracle
from trainer.experiment import Scored, pooled_summary, score_models


def stream_world(cfg: Config, seed: int, encoder=None, progress: bool = True) -> Config:
    """Stream the world of simulator seed ``seed`` (``cfg.simulator`` otherwise) into
    ``cfg.paths.world(seed)``, and its oracle beside it (``simulated_oracle``), unless a
    run there already finished. Returns the world's config (its data dir)."""
    from ppm.atomic_file import write_atomically
    from streams.local_runner import LocalRunner
    from streams.sources.shop_simulator import ShopSimulator

    world = cfg.simulator.model_copy(update={"seed": seed})
    world_cfg = cfg.model_copy(update={"data_dir": cfg.paths.world(seed),
                                       "simulator": world})
    simulator = ShopSimulator(world)
    source = f"simulate:{world.model_dump_json()}"
    runner = LocalRunner(world_cfg, encoder=encoder, resume=True)
    if runner.summary.finished and runner.summary.source != source:
        # A run would say so too, but a finished one is not run again.
        raise ValueError(f"{world_cfg.data_dir} holds a world streamed from other simulator "
                         f"settings ({runner.summary.source}); remove it, or give another "
                         "--data-dir")
    if not runner.summary.finished:
        runner.run(simulator.records(), source, progress=progress)
    oracle = world_cfg.paths.simulated_oracle
    if not oracle.is_file():
        oracle.parent.mkdir(parents=True, exist_ok=True)
        truth = simulator.oracle()  # the world simulated again: cheaper than streaming it
        write_atomically(oracle, lambda f: truth.to_parquet(f, index=False))
    return world_cfg


def run_worlds(cfg: Config, worlds: int, seeds: int, test_share: float = 0.2,
               valid_share: float = 0.1, epochs: int | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Stream ``worlds`` worlds (:func:`stream_world`), fit and score ``seeds`` seeds of
    each, and pool them: :func:`trainer.experiment.pooled_summary`'s dict, plus each
    world's data dir."""
    from encoders.item_encoder import ItemEncoder

    if worlds < 1:
        raise ValueError(f"--worlds must be at least 1, got {worlds}")
    encoder = ItemEncoder.from_config(cfg)  # loaded once, for every world
    scored: dict[str, Scored] = {}
    dirs = {}
    for seed in range(cfg.simulator.seed, cfg.simulator.seed + worlds):
        world_cfg = stream_world(cfg, seed, encoder, progress)
        name = f"seed-{seed}"
        dirs[name] = str(world_cfg.data_dir)
        scored[name] = score_models(world_cfg, seeds, test_share, valid_share, epochs,
                                    Oracle.read(world_cfg.paths.simulated_oracle), progress)
    return {"data_dirs": dirs, **pooled_summary(scored)}
