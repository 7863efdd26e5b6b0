"""``ppm experiment worlds``: ``ppm eval --seeds``'s experiment on several simulated worlds.

One world is one draw of the simulator: its test period holds a few dozen clicks on items
new in it, so a difference between models on new items keeps a wide interval however many
training seeds run, and says nothing of another draw. Here worlds of simulator seeds
``simulator.seed``, +1, ..., +W-1 are each streamed through the local runner into a data
directory of their own (``DataDir.world``; a world streamed to the end before is reused, a
cut-off one resumes, one streamed with other settings is refused), then fitted and scored
as ``ppm eval --seeds N`` does (:func:`trainer.experiment.score_models`, with the
simulator's oracle; the scores kept beside the world, and reused by a run with the same
settings), and pooled with each world a stratum (:func:`trainer.experiment.pooled_summary`).
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, Literal

from ppm.config import Config
from trainer.baselines import Oracle
from trainer.experiment import BASELINES, ORACLE, TRAINED, Scored, pooled_summary, score_models
from trainer.train import TEST_BUCKETS

if TYPE_CHECKING:
    from encoders.item_encoder import ItemEncoder


def world_source(cfg: Config, encoder_version: str) -> str:
    """What a world's stream is of: the simulator's settings, and the pipeline's, the
    features' and the encoders' that shape its windows and vectors. A world dir streamed
    under another source is not reused."""
    return (f"{cfg.simulator.source} pipeline:{cfg.pipeline.model_dump_json()} "
            f"features:{cfg.features.model_dump_json()} encoder:{encoder_version}")


def stream_world(cfg: Config, seed: int, encoder: ItemEncoder, progress: bool = True
                 ) -> Config:
    """Stream the world of simulator seed ``seed`` (``cfg.simulator`` otherwise) into
    ``cfg.paths.world(seed)``, and its oracle beside it (``simulated_oracle``), unless a
    run of the same source (:func:`world_source`) finished there. Returns the world's
    config (its data dir).

    Raises:
        ValueError: the world dir holds a run of another source, finished or not."""
    from streams.local_runner import LocalRunner
    from streams.sources.shop_simulator import ShopSimulator

    world_cfg = cfg.model_copy(update={
        "data_dir": cfg.paths.world(seed),
        "simulator": cfg.simulator.model_copy(update={"seed": seed})})
    source = world_source(world_cfg, encoder.encoder_version)
    paths = world_cfg.paths
    # The checkpoint says what is there (summary.json, written after it, can be one behind),
    # before a runner restores state that may not fit these settings.
    done = (json.loads(paths.checkpoint.read_bytes())["summary"] if paths.checkpoint.is_file()
            else {})
    if done.get("records") and done.get("source") != source:
        raise ValueError(f"{world_cfg.data_dir} holds a world streamed with other settings "
                         f"({done.get('source')}); remove it, or give another --data-dir")
    oracle = paths.simulated_oracle
    if done.get("finished") and oracle.is_file():
        return world_cfg
    simulator = ShopSimulator(world_cfg.simulator)  # builds its catalog: only when needed
    if not done.get("finished"):
        oracle.unlink(missing_ok=True)  # whatever was there is not this stream's
        LocalRunner(world_cfg, encoder=encoder, resume=True).run(
            simulator.records(), source, progress=progress)
    simulator.write_oracle(oracle)  # the simulation again, without rendering: cheap
    return world_cfg


SCORES_FORMAT = 2
"""Of :meth:`trainer.experiment.Scored.save`'s files as :func:`run_worlds` reads them. 2:
the baselines fit on the windows the models read (``trainer.history_share``); scores of
format 1 are fitted again."""
_NOT_SCORING = {"threads", "metrics_host", "metrics_port", "promote_tolerance", "seed",
                "variant"}
"""``[trainer]`` fields a world's scores do not depend on: ``score_models`` sets the seed
and variant of each fit itself, and the others do not reach a batch fit's numbers."""


def fit_spec(world_cfg: Config, encoder_version: str, seeds: int, test_share: float,
             valid_share: float, epochs: int | None, period: str = "test") -> dict[str, Any]:
    """What a world's scores are of: the world's stream (:func:`world_source`), the split
    and the period scored, seeds and epochs, the ``[trainer]`` settings that shape a fit
    and every ``[model]`` one, and the models and buckets the code scores. Scores saved
    under an equal spec are reused (:meth:`trainer.experiment.Scored.load`)."""
    return {"format": SCORES_FORMAT, "source": world_source(world_cfg, encoder_version),
            "period": period, "seeds": seeds, "test_share": test_share,
            "valid_share": valid_share, "epochs": epochs,
            "trainer": world_cfg.trainer.model_dump(mode="json", exclude=_NOT_SCORING),
            "model": world_cfg.model.model_dump(mode="json"),
            "models": [*TRAINED, *BASELINES, ORACLE], "buckets": list(TEST_BUCKETS)}


def run_worlds(cfg: Config, worlds: int, seeds: int, test_share: float = 0.2,
               valid_share: float = 0.1, epochs: int | None = None,
               progress: bool = True, refit: bool = False,
               period: Literal["test", "validation"] = "test") -> dict[str, Any]:
    """Stream ``worlds`` worlds (:func:`stream_world`), all of them first (a world that
    cannot be used fails before any fit), then fit and score ``seeds`` seeds of each and
    pool them: :func:`trainer.experiment.pooled_summary`'s dict, plus each world's data
    dir and which worlds' scores were reused.

    Each world's scores are saved beside it (``DataDir.world_scores``) as soon as they are
    made, so a killed run resumes with the next world, and a rerun with the same settings
    (:func:`fit_spec`) skips the fits. ``refit``: fit anyway (after a change to the code,
    which the settings do not see; a killed ``refit`` run resumes without it).
    ``period="validation"`` scores each world's validation period instead (the split moved
    one period back, as ``ppm eval --validation``; the test period is not read), its scores
    kept apart from the test period's."""
    from encoders.item_encoder import ItemEncoder

    if worlds < 1:
        raise ValueError(f"--worlds must be at least 1, got {worlds}")
    encoder = ItemEncoder.from_config(cfg)  # loaded once, for every world
    streamed = {f"seed-{seed}": stream_world(cfg, seed, encoder, progress)
                for seed in range(cfg.simulator.seed, cfg.simulator.seed + worlds)}
    scored: dict[str, Scored] = {}
    reused: list[str] = []
    for name, world_cfg in streamed.items():
        spec = fit_spec(world_cfg, encoder.encoder_version, seeds, test_share, valid_share,
                        epochs, period)
        kept = world_cfg.paths.world_scores(period)
        saved = None if refit else Scored.load(kept, spec)
        if saved is not None:
            print(f"{name}: the scores of an earlier run with these settings are reused "
                  f"({kept}; --refit fits again)", file=sys.stderr)
            scored[name] = saved
            reused.append(name)
            continue
        if kept.is_file() and not refit:
            print(f"{name}: the scores kept in {kept} are of other settings (or unreadable): "
                  "fitting again", file=sys.stderr)
        scored[name] = score_models(world_cfg, seeds, test_share, valid_share, epochs,
                                    Oracle.read(world_cfg.paths.simulated_oracle), progress,
                                    period=period)
        scored[name].save(kept, spec)
    return {"data_dirs": {name: str(c.data_dir) for name, c in streamed.items()},
            "reused_scores": reused, **pooled_summary(scored)}
