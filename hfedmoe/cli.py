"""The ``hfedmoe`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from hfedmoe.cluster import add_cluster_commands
from hfedmoe.platform.config import ConfigError, load_config


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["federation.rounds=3", "hfedmoe.tau=0.1"]`` -> typed values (YAML scalars)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. federation.rounds=3")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume is None and args.config is None:
        raise ConfigError("give a CONFIG file, or --resume RUN_DIR to continue a run")
    if args.resume is not None and (args.config or args.set or args.run_dir):
        raise ConfigError(
            "--resume RUN_DIR continues with the config saved in RUN_DIR; drop CONFIG, "
            "--set and --run-dir (start a new run to change them)"
        )
    if args.in_process:
        return _run_in_process(args)
    from hfedmoe.actors.federation import run_federation

    cfg = None if args.resume else load_config(args.config, parse_overrides(args.set))
    result = run_federation(
        cfg,
        run_dir=args.run_dir,
        resume=args.resume,
        progress=not args.no_progress,
    )
    _print_summary(result.history, result.run_dir, result.mlflow_run_id)
    return 0


def _run_in_process(args: argparse.Namespace) -> int:
    """The reference runner in this process, tracked to MLflow (no Ray, no checkpoints)."""
    from hfedmoe.actors.federation import new_run_dir
    from hfedmoe.platform.config import check_paths
    from hfedmoe.platform.simulation import run_simulation
    from hfedmoe.tuning.tracking import RunTracker, summarise

    if args.resume is not None:
        raise ConfigError("--resume needs the Ray runner (drop --in-process)")
    cfg = load_config(args.config, parse_overrides(args.set))
    check_paths(cfg)
    run_dir = Path(args.run_dir).resolve() if args.run_dir else new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker = RunTracker(cfg, run_dir) if cfg.tracking.enabled else None

    def on_round(metrics, _state):
        print(f"round {metrics.round + 1}/{cfg.federation.rounds}: accuracy={metrics.accuracy} "
              f"failed={metrics.sampled - metrics.succeeded}", flush=True)  # fmt: skip
        if tracker is not None:
            tracker.log_round(metrics)

    history, _ = run_simulation(cfg, on_round=on_round)
    if tracker is not None:
        tracker.log_summary(summarise(history, cfg.federation.target_accuracy))
        tracker.log_artifacts(cfg, history, run_dir, {})
        tracker.finish()
    _print_summary(history, run_dir, tracker.run_id if tracker else None)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from hfedmoe.tuning.sweep import run_sweep

    result = run_sweep(args.sweep, progress=not args.no_progress)
    print(f"sweep directory {result.sweep_dir}; MLflow parent run {result.parent_run_id}")
    failed = sum(1 for r in result.rows if r["status"] != "OK")
    return 1 if failed == len(result.rows) else 0


def cmd_ui(args: argparse.Namespace) -> int:
    from hfedmoe.tuning.ui import start_server, stop_server, store_uri

    process, url = start_server(store_uri(args.store), args.port)
    print(f"MLflow UI for {args.store}: {url}  (Ctrl-C to stop)", flush=True)
    try:
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(process)
    return 0


def _print_summary(history, run_dir: Path, run_id: str | None) -> None:
    last = history.rounds[-1]
    print(
        f"done: {len(history.rounds)} rounds, final accuracy {history.final_accuracy():.4f}, "
        f"simulated {last.simulated_seconds:.1f} s, run directory {run_dir}"
    )
    if run_id is not None:
        print(f"MLflow run {run_id}: hfedmoe ui --store {run_dir.parent / 'mlflow.db'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfedmoe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one federation (on Ray unless --in-process)")
    run.add_argument("config", nargs="?", help="experiment YAML (e.g. configs/default.yaml)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set federation.rounds=3")  # fmt: skip
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue from a checkpoint")
    run.add_argument("--run-dir", type=Path, help="where to write (default: output_dir/NAME-TIME)")
    run.add_argument("--in-process", action="store_true", help="reference runner, no Ray")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(handler=cmd_run)

    sweep = commands.add_parser("sweep", help="a Ray Tune sweep; each trial is a federation")
    sweep.add_argument("sweep", help="sweep YAML (e.g. configs/sweep_tau_beta.yaml)")
    sweep.add_argument("--no-progress", action="store_true", help="quiet Tune output")
    sweep.set_defaults(handler=cmd_sweep)

    ui = commands.add_parser("ui", help="serve an MLflow store on 127.0.0.1")
    ui.add_argument("--store", default="runs", help="mlflow.db, its directory, or a URI")
    ui.add_argument("--port", type=int, help="port (default: a free one)")
    ui.set_defaults(handler=cmd_ui)

    add_cluster_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except ConfigError as err:
        print(f"hfedmoe: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
