"""The ``ppm`` command line.

Sub-commands import their heavy dependencies (torch, transformers, feast) only when they
run, so ``ppm --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from ppm.config import Config, load_config


def _simulate(args: argparse.Namespace, cfg: Config) -> int:
    from streams.shop_simulator import ShopSimulator

    out = Path(args.out) if args.out else cfg.data_dir / "simulated"
    summary = ShopSimulator(_simulator_config(args, cfg)).write_jsonl(out, progress=not args.quiet)
    print(
        f"wrote {summary.item_events:,} item events and {summary.behavior_events:,} behavior "
        f"events ({summary.malformed:,} malformed) to {out}/",
        file=sys.stderr,
    )
    print(json.dumps({"out": str(out), **summary.__dict__}))
    return 0


def _simulator_config(args: argparse.Namespace, cfg: Config):
    overrides = {
        "days": getattr(args, "days", None),
        "seed": getattr(args, "seed", None),
        "n_users": getattr(args, "users", None),
        "malformed_share": getattr(args, "malformed_share", None),
    }
    return cfg.simulator.model_copy(update={k: v for k, v in overrides.items() if v is not None})


def _stream(args: argparse.Namespace, cfg: Config) -> int:
    from streams.local_runner import LocalRunner, jsonl_records
    from streams.shop_simulator import ShopSimulator

    if args.jsonl:
        source = f"jsonl:{Path(args.jsonl).resolve()}"
        records = jsonl_records(Path(args.jsonl))
    else:
        world = _simulator_config(args, cfg)
        source = f"simulate:{world.model_dump_json()}"
        records = ShopSimulator(world).records()
    runner = LocalRunner(cfg, resume=not args.fresh)
    if runner.summary.finished:
        print(f"{cfg.data_dir} holds a finished run; use --fresh to start over", file=sys.stderr)
        return 1
    summary = runner.run(records, source, speed=args.speed, progress=not args.quiet)
    print(json.dumps(summary.__dict__, default=str))
    return 0


def _demo(args: argparse.Namespace, cfg: Config) -> int:
    from ppm.demo import run_demo

    report = run_demo(cfg, quick=args.quick, out_dir=Path(args.out) if args.out else None)
    print(report.text())
    if args.json:
        print(json.dumps(report.figures))
    return 0


def _features(args: argparse.Namespace, cfg: Config) -> int:
    from streams.online_features import OnlineFeatures

    store = OnlineFeatures.open(cfg, apply=args.action == "apply")
    if args.action == "apply":
        names = [getattr(o, "name", "?") for o in store.definitions.all()]
        print(f"registered {len(names)} Feast objects in {cfg.data_dir / 'feast'}: "
              + ", ".join(names))
        return 0
    if not (args.item or args.user):
        print("ppm features get: give --item ID and/or --user ID", file=sys.stderr)
        return 2
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
    state = cfg.data_dir / "summary.json"
    if at is None and state.exists():
        return datetime.fromisoformat(json.loads(state.read_text())["clock"])
    return datetime.now(UTC)


def _iso(us: int | None) -> str | None:
    return None if us is None else datetime.fromtimestamp(us / 1e6, UTC).isoformat()


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="simulate a shop and stream it through ppm (embedded)")
    demo.add_argument("--quick", action="store_true", help="a smaller world (about a minute)")
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
    source = stream.add_mutually_exclusive_group(required=True)
    source.add_argument("--jsonl", metavar="DIR", help="items.jsonl + behaviors.jsonl in DIR")
    source.add_argument("--simulate", action="store_true", help="a simulated shop (see options)")
    _add_world_options(stream)
    stream.add_argument("--speed", type=float, help="N x real time (default: as fast as possible)")
    stream.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    stream.add_argument("--quiet", action="store_true", help="no progress bar")
    stream.set_defaults(run=_stream)

    features = sub.add_parser("features", help="the Feast feature store: apply, get")
    features.add_argument("action", choices=["apply", "get"],
                          help="apply: register the feature repo (feast apply); get: show values")
    features.add_argument("--item", action="append", metavar="ID", help="an item id (repeatable)")
    features.add_argument("--user", action="append", metavar="ID", help="a user id (repeatable)")
    features.add_argument(
        "--at", metavar="TIME", help="judge freshness at this ISO time, or 'now' (default: the "
        "clock of the last stream run in DATA_DIR, else now)")
    features.set_defaults(run=_features)

    config = sub.add_parser("config", help="print the effective configuration as JSON")
    config.set_defaults(run=lambda args, cfg: print(cfg.model_dump_json(indent=2)) or 0)
    return parser


def _add_world_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--days", type=float, help="simulated days (default from config: 3)")
    p.add_argument("--seed", type=int, help="random seed (default from config: 1)")
    p.add_argument("--users", type=int, help="number of users (default from config)")
    p.add_argument("--malformed-share", type=float,
                   help="share of malformed records to mix in (0..1)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        if args.data_dir:
            cfg = cfg.model_copy(update={"data_dir": Path(args.data_dir)})
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        parser.error(f"bad configuration: {exc}")
    try:
        return args.run(args, cfg)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
