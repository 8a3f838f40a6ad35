"""The ``hfedmoe`` command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from hfedmoe.cluster import add_cluster_commands
from hfedmoe.platform.errors import ConfigError, Terminated


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["federation.rounds=3", "hfedmoe.tau=0.1"]`` -> typed values (YAML scalars)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. federation.rounds=3")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or err
            raise ConfigError(
                f"--set {pair!r}: the value is not valid YAML ({problem}); quote it, "
                "e.g. --set 'data.path=\"my: file.csv\"'"
            ) from None
    return overrides


def cmd_run(args: argparse.Namespace) -> int:
    from hfedmoe.launch import launch
    from hfedmoe.platform.config import load_config
    from hfedmoe.platform.plugins import load_plugins

    if args.resume is None and args.config is None:
        raise ConfigError("give a CONFIG file, or --resume RUN_DIR to continue a run")
    if args.resume is not None and (args.config or args.set or args.run_dir):
        raise ConfigError(
            "--resume RUN_DIR continues with the config saved in RUN_DIR; drop CONFIG, "
            "--set and --run-dir (start a new run to change them)"
        )
    plugins = load_plugins(args.plugin)  # before the config names their classes
    cfg = None if args.resume else load_config(args.config, parse_overrides(args.set))
    result = launch(
        cfg,
        run_dir=args.run_dir,
        resume=args.resume,
        in_process=args.in_process,
        progress=not args.no_progress,
        plugins=plugins,
    )
    _print_summary(result)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from hfedmoe.tuning.sweep import run_sweep

    result = run_sweep(args.sweep, progress=not args.no_progress, plugins=args.plugin)
    print(f"sweep directory {result.sweep_dir}; MLflow parent run {result.parent_run_id}")
    failed = sum(1 for r in result.rows if r["status"] != "OK")
    return 1 if failed == len(result.rows) else 0


def cmd_ui(args: argparse.Namespace) -> int:
    from hfedmoe.tracking.ui import runs_table_urls, start_server, stop_server, store_uri

    def stop(signum: int, _frame) -> None:
        raise Stopped(signum)

    # SIGTERM and SIGHUP unwind like Ctrl-C, so the server stops with this process.
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
    backend, process = store_uri(args.store), None
    try:
        process, url = start_server(backend, args.port)
        print(f"MLflow UI for {args.store}: {url}  (Ctrl-C to stop)")
        for name, page in runs_table_urls(url).items():
            print(f"  runs of experiment {name}: {page}")
        print(end="", flush=True)
        process.wait()
    except KeyboardInterrupt:
        pass
    except Stopped as signalled:
        return 128 + signalled.signum
    finally:
        for signum in previous:  # a second signal waits for the stop
            signal.signal(signum, signal.SIG_IGN)
        if process is not None:  # else the guard sees this process end, and stops the server
            stop_server(process)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


class Stopped(BaseException):
    """A signal that ends ``hfedmoe ui``; the exit status is 128 + its number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def cmd_export_mlflow(args: argparse.Namespace) -> int:
    from hfedmoe.tracking.export import export_run

    run_id = export_run(args.run_dir, args.uri)
    print(f"MLflow run {run_id} holds {args.run_dir}")
    return 0


def _print_summary(run) -> None:
    history, run_dir = run.history, run.run_dir
    last = history.rounds[-1]
    accuracy = history.final_accuracy()
    shown = "-" if accuracy is None else f"{accuracy:.4f}"
    print(
        f"done: {len(history.rounds)} rounds, final accuracy {shown}, "
        f"simulated {last.simulated_seconds:.1f} s, run directory {run_dir}"
    )
    run_id = run.notes.get("mlflow_run_id")
    if run_id is not None:
        print(f"MLflow run {run_id}: hfedmoe ui --store {run_dir.parent / 'mlflow.db'}")


def _plugin_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a dotted module or a .py file first, so its @register'ed strategies "
        "and client/server updates are valid config names (repeatable)",
    )


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
    run.add_argument("--in-process", action="store_true", help="in-process executor, no Ray")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    _plugin_argument(run)
    run.set_defaults(handler=cmd_run)

    sweep = commands.add_parser("sweep", help="a Ray Tune sweep; each trial is a federation")
    sweep.add_argument("sweep", help="sweep YAML (e.g. configs/sweep_smoke.yaml)")
    sweep.add_argument("--no-progress", action="store_true", help="quiet Tune output")
    _plugin_argument(sweep)
    sweep.set_defaults(handler=cmd_sweep)

    ui = commands.add_parser("ui", help="serve an MLflow store on 127.0.0.1")
    ui.add_argument("--store", default="runs", help="mlflow.db, its directory, or a URI")
    ui.add_argument("--port", type=int, help="port (default: a free one)")
    ui.set_defaults(handler=cmd_ui)

    export = commands.add_parser(
        "export-mlflow", help="log a run to MLflow from its run directory alone"
    )
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory")
    export.add_argument("--uri", help="tracking URI (default: the run's, else runs/mlflow.db)")
    export.set_defaults(handler=cmd_export_mlflow)

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
    except KeyboardInterrupt:
        return 130
    except Terminated:  # SIGTERM during a run
        return 143


if __name__ == "__main__":
    sys.exit(main())
