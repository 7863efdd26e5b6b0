"""Every path under a data directory, named once.

A data directory (``Config.data_dir``, ``ppm-data`` by default; ``Config.paths`` gives its
:class:`DataDir`) holds everything a deployment writes::

    feast/                          Feast's registry and (embedded) SQLite online store
    offline/item_embedding/         item log parts (Feast's offline source of item_embedding)
    offline/item_embedding-versions/  how each encoder version is made (<version>.json)
    training/                       the local runner's training log: windows/, late_events.jsonl
    training/partition-<p>/         a Faust worker's training log of partition p
    registry/<variant>/             model versions, the champion and the training curves
                                    (curves.jsonl) of each variant
    checkpoint.json  summary.json  dead_letters.jsonl  item_warnings.jsonl  freshness.json
                                    the local runner's state and side files
    freshness/<worker>.json  item_warnings/<worker>.jsonl  metrics/<worker>.json
                                    each Faust worker's own side files
    freshness-items/<writer>/part-<n>.parquet
                                    per-item freshness records, appended in parts
    faust/                          Faust's own data folder
    import/  simulated/  demo/      default outputs of ppm import, simulate and demo
    encoders/                       encoders ppm finetune wrote
    experiments/                    ppm eval --seeds results

Code asks :class:`DataDir` for a path instead of joining the root with a name, so the layout
can be read (and changed) here alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TRAINING_PARTITION_PREFIX = "partition-"
ORACLE_FILE = "oracle.parquet"
"""The simulator's truth, written beside its JSONL (``ShopSimulator.write_jsonl``)."""


@dataclass(frozen=True)
class TrainingLogDir:
    """The files in one training-log writer's folder (``streams.training_log.TrainingLogWriter``
    owns it; the trainer reads it)."""

    folder: Path

    @property
    def windows(self) -> Path:
        """Window files (``<start>.parquet``), written by the writer as windows close."""
        return self.folder / "windows"

    @property
    def manifest(self) -> Path:
        """The writer's list of recorded windows (JSON), rewritten atomically per window."""
        return self.windows / "manifest.json"

    @property
    def late_events(self) -> Path:
        """Follow-ups that labelled no sample, one JSON line each, appended by the writer."""
        return self.folder / "late_events.jsonl"


@dataclass(frozen=True)
class DataDir:
    """The paths under one data directory ``root`` (nothing is created or read here, except
    by :meth:`training_logs`, which lists the folders on disk)."""

    root: Path

    def holds_run(self) -> bool:
        """Whether anything has been streamed, imported or trained here: the local
        runner's summary, a training log (the runner's or a Faust worker's), the item log
        or a model registry exists. Not the Feast folder alone: opening the store (``ppm
        serve`` on a mistyped dir) creates it. Commands that only read a run refuse a
        directory without one instead of creating an empty store there. Reads the disk."""
        return any(p.exists() for p in (self.summary, self.training, self.item_log,
                                        self.registry_dir))

    # ------------------------------------------------------------------ feature store

    @property
    def feast_repo(self) -> Path:
        """Feast's files: the registry and (embedded) the SQLite online store, named by the
        store yaml as ``${PPM__DATA_DIR}/feast/...``; relative paths in a yaml resolve here.
        No ``feature_store.yaml`` lives here (``feature_repo.online_features.store_config``),
        so ``feast apply`` in this folder cannot delete the views."""
        return self.root / "feast"

    @property
    def offline(self) -> Path:
        """The pipeline's own parquet logs, which the Feast push sources name as their
        offline sources (``feature_repo.feature_definitions``)."""
        return self.root / "offline"

    @property
    def item_log(self) -> Path:
        """Item log parts (every embedding written online), written by ``ItemEmbedder``
        through ``feature_repo.item_log.ItemLog``; the trainer reads the modal vectors here."""
        return self.offline / "item_embedding"

    @property
    def item_profile_log(self) -> Path:
        """The offline source declared for the item_profile view; ppm writes nothing here."""
        return self.offline / "item_profile"

    @property
    def user_sequence_log(self) -> Path:
        """The offline source declared for the user_sequence view; ppm writes nothing here."""
        return self.offline / "user_sequence"

    # ------------------------------------------------------------------ training log

    @property
    def training(self) -> Path:
        """Every training log: the local runner's in this folder itself, each Faust
        partition's in :meth:`training_partition`; the trainer reads them all."""
        return self.root / "training"

    @property
    def training_log(self) -> TrainingLogDir:
        """The local runner's training-log files (its writer's folder is :attr:`training`)."""
        return TrainingLogDir(self.training)

    def training_partition(self, partition: int) -> Path:
        """The folder of the Faust worker's training-log writer for ``partition``."""
        return self.training / f"{TRAINING_PARTITION_PREFIX}{partition}"

    def training_logs(self) -> list[TrainingLogDir]:
        """Every writer's folder on disk (:func:`training_logs`)."""
        return training_logs(self.training)

    # ------------------------------------------------------------------ models

    @property
    def registry_dir(self) -> Path:
        """Every variant's model registry (:meth:`registry`)."""
        return self.root / "registry"

    def registry(self, variant: str) -> Path:
        """``trainer.registry.Registry`` of ``variant``: its versions and champion, written
        by the trainer, read by the ranker."""
        return self.registry_dir / variant

    # ------------------------------------------------------------------ the local runner

    @property
    def checkpoint(self) -> Path:
        """The local runner's checkpoint (input position and every processor's state),
        written atomically; a restarted runner resumes from it."""
        return self.root / "checkpoint.json"

    @property
    def summary(self) -> Path:
        """The local runner's counts and stream clock as readable JSON, written with each
        checkpoint; ``ppm features get`` reads the clock."""
        return self.root / "summary.json"

    @property
    def dead_letters(self) -> Path:
        """The local runner's dead letters, one JSON line each (a Faust worker sends them
        to ``<topic>-dead`` instead)."""
        return self.root / "dead_letters.jsonl"

    @property
    def item_warnings(self) -> Path:
        """Photos the local runner could not use (``{"item_id", "reason"}`` lines)."""
        return self.root / "item_warnings.jsonl"

    @property
    def freshness(self) -> Path:
        """The local runner's freshness histogram (JSON, ``streams.freshness``), saved with
        each checkpoint."""
        return self.root / "freshness.json"

    @property
    def freshness_items(self) -> Path:
        """Every writer's per-item freshness records (:meth:`freshness_items_of`)."""
        return self.root / "freshness-items"

    def freshness_items_of(self, worker: str) -> Path:
        """The folder of one writer's per-item freshness records (``part-<n>.parquet``,
        appended, never rewritten): a Faust worker's name, or ``local`` for the local
        runner."""
        return self.freshness_items / worker

    # ------------------------------------------------------------------ Faust workers

    @property
    def freshness_dir(self) -> Path:
        """Every Faust worker's freshness file (:meth:`worker_freshness`)."""
        return self.root / "freshness"

    def worker_freshness(self, worker: str) -> Path:
        """Freshness histogram (JSON) of the Faust worker named ``worker``, saved by it
        alone every ``kafka.freshness_save_s``; ``ppm status`` reads them all."""
        return self.freshness_dir / f"{worker}.json"

    @property
    def metrics_dir(self) -> Path:
        """Every running Faust worker's metrics address (:meth:`worker_metrics`)."""
        return self.root / "metrics"

    def worker_metrics(self, worker: str) -> Path:
        """Where the Faust worker named ``worker`` serves its Prometheus metrics
        (``{"worker", "url", "pid"}``); written when it starts, removed when it stops."""
        return self.metrics_dir / f"{worker}.json"

    @property
    def item_warnings_dir(self) -> Path:
        """Every Faust worker's photo warnings (:meth:`worker_item_warnings`)."""
        return self.root / "item_warnings"

    def worker_item_warnings(self, worker: str) -> Path:
        """Photos the Faust worker named ``worker`` could not use, appended by it alone."""
        return self.item_warnings_dir / f"{worker}.jsonl"

    @property
    def faust(self) -> Path:
        """Faust's own data folder (``faust.App(datadir=...)``)."""
        return self.root / "faust"

    # ------------------------------------------------------------------ commands

    @property
    def import_events(self) -> Path:
        """``ppm import``'s events (items.jsonl, behaviors.jsonl, rejected.jsonl), replaced
        by each import and then streamed into this data directory."""
        return self.root / "import"

    @property
    def simulated(self) -> Path:
        """``ppm simulate``'s default output folder (items.jsonl, behaviors.jsonl)."""
        return self.root / "simulated"

    @property
    def simulated_oracle(self) -> Path:
        """The oracle of ``ppm simulate``'s default output (each impression's true click
        logit, for evaluation only): ``ppm eval --seeds`` reads it where there is one."""
        return self.simulated / ORACLE_FILE

    @property
    def experiments(self) -> Path:
        """``ppm eval --seeds`` results, one JSON file per run (:meth:`experiment`), the
        staleness lab's folders (:meth:`staleness`), and in a world's data dir its kept
        scores (:meth:`world_scores`)."""
        return self.root / "experiments"

    def staleness(self, preset: str, period: str = "test") -> Path:
        """``ppm experiment staleness --preset PRESET``'s runs and results by default; with
        ``--validation`` (``period`` "validation"), ``staleness-PRESET-validation``."""
        return self.experiments / _marked(f"staleness-{preset}", period)

    def world_scores(self, period: str = "test") -> Path:
        """In a world's data dir (:meth:`world`): every model's scores of ``period`` (test,
        or validation: ``--validation``) of the last ``ppm experiment worlds`` run on it,
        with the settings they were fitted under (a later run with the same settings reuses
        them: ``trainer.experiment.Scored.load``)."""
        return self.experiments / f"{_marked('world-scores', period)}.npz"

    def experiment(self, name: str) -> Path:
        """The result file of the ``ppm eval --seeds`` run ``name`` (its start, UTC)."""
        return self.experiments / f"{name}.json"

    def encoder(self, name: str) -> Path:
        """A fine-tuned encoder ``ppm finetune`` wrote (``text-qm``: a model directory;
        ``image-ep``: a weights file and its report), which ``encoders.text_model`` or
        ``encoders.image_weights`` can name."""
        return self.root / "encoders" / name

    def world(self, seed: int) -> Path:
        """``ppm experiment worlds``' simulated world of simulator seed ``seed``: a data
        directory of its own."""
        return self.root / "worlds" / f"seed-{seed}"

    @property
    def demo(self) -> Path:
        """``ppm demo``'s default output folder: a data directory of its own."""
        return self.root / "demo"

    @property
    def demo_windows(self) -> Path:
        """``ppm demo``'s per-window click AUCs of each variant (JSON), in the demo's own
        data directory."""
        return self.root / "demo_windows.json"


def training_logs(training: Path) -> list[TrainingLogDir]:
    """The training-log writers' folders in ``training`` (:attr:`DataDir.training`): the
    local runner's first (listed even when it has written nothing), then each
    ``partition-<p>`` folder on disk by number (a name whose ``<p>`` is not a number is
    not a partition)."""
    training = Path(training)
    partitions = sorted(
        (p for p in training.glob(f"{TRAINING_PARTITION_PREFIX}*")
         if p.name.removeprefix(TRAINING_PARTITION_PREFIX).isdigit()),
        key=lambda p: int(p.name.removeprefix(TRAINING_PARTITION_PREFIX)))
    return [TrainingLogDir(training), *(TrainingLogDir(p) for p in partitions)]


def _marked(name: str, period: str) -> str:
    """``name`` of an experiment's output, ``-PERIOD`` added unless it scored the test
    period: a validation run's outputs never take the place of the test period's."""
    return name if period == "test" else f"{name}-{period}"
