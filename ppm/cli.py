"""The ``ppm`` command line.

Sub-commands import their heavy dependencies (torch, transformers, feast) only when they
run, so ``ppm --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ppm.config import Config, load_config


def _simulate(args: argparse.Namespace, cfg: Config) -> int:
    from streams.shop_simulator import ShopSimulator

    sim = cfg.simulator.model_copy(
        update={
            k: v
            for k, v in {
                "days": args.days,
                "seed": args.seed,
                "n_users": args.users,
                "malformed_share": args.malformed_share,
            }.items()
            if v is not None
        }
    )
    out = Path(args.out) if args.out else cfg.data_dir / "simulated"
    summary = ShopSimulator(sim).write_jsonl(out, progress=not args.quiet)
    print(
        f"wrote {summary.item_events:,} item events and {summary.behavior_events:,} behavior "
        f"events ({summary.malformed:,} malformed) to {out}/",
        file=sys.stderr,
    )
    print(json.dumps({"out": str(out), **summary.__dict__}))
    return 0


def _demo(args: argparse.Namespace, cfg: Config) -> int:
    from ppm.demo import run_demo

    report = run_demo(cfg, quick=args.quick, out_dir=Path(args.out) if args.out else None)
    print(report.text())
    if args.json:
        print(json.dumps(report.figures))
    return 0


def _config(args: argparse.Namespace, cfg: Config) -> int:
    print(cfg.model_dump_json(indent=2))
    return 0


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="simulate a shop and run it through ppm-stream (embedded)")
    demo.add_argument("--quick", action="store_true", help="a smaller world (about a minute)")
    demo.add_argument("--json", action="store_true", help="print the figures as a JSON last line")
    demo.add_argument("--out", metavar="DIR", help="output folder (default: DATA_DIR/demo)")
    demo.set_defaults(run=_demo)

    sim = sub.add_parser("simulate", help="write a seeded shop's item and behavior events as JSONL")
    sim.add_argument("--days", type=float, help="simulated days (default from config: 3)")
    sim.add_argument("--seed", type=int, help="random seed (default from config: 1)")
    sim.add_argument("--users", type=int, help="number of users (default from config)")
    sim.add_argument(
        "--malformed-share", type=float, help="share of malformed records to mix in (0..1)"
    )
    sim.add_argument("--out", metavar="DIR", help="output folder (default: DATA_DIR/simulated)")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    sim.set_defaults(run=_simulate)

    config = sub.add_parser("config", help="print the effective configuration as JSON")
    config.set_defaults(run=_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        parser.error(f"bad configuration: {exc}")
    started = time.perf_counter()
    try:
        return args.run(args, cfg)
    except KeyboardInterrupt:
        print(f"interrupted after {time.perf_counter() - started:.1f}s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
