"""Ray cluster launcher configs (`ray up FILE`): offline validation before a cluster exists.

Two layers. Ray's own, as `ray up` runs it before it contacts a cloud: the launcher's
``prepare_config`` fills in the provider's defaults and ``validate_config`` checks the
result against ``ray-schema.json`` (the provider's bootstrap, which calls the cloud's API,
is not run). Then this project's needs: every node installs hfedmoe the way the README
does and starts Ray from that install, Ray 2.60's token authentication reaches every node
(or is turned off deliberately), and the node types offer what the experiment and sweep
configs given with ``--for`` ask for: GPUs up when a run with ``runtime.device: cuda``
starts, CPUs for sweep trials' drivers, the MLflow server a tracking URI points at.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hfedmoe.platform.errors import ConfigError

DEFAULT_CLUSTER_FILE = "cluster.yaml"
TOKEN_PATH = "~/.ray/auth_token"  # where Ray 2.60 looks for the token on every node

# Provider keys Ray reads but its schema does not list (the schema lets any key through,
# so a misspelled one would be silently ignored: `regoin` leaves the region unset).
_EXTRA_PROVIDER_KEYS = {
    "aws": {"aws_credentials", "key_pair"},
    "local": {"coordinator_address", "external_head_ip", "use_external_head_ip"},
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_AUTH_MODE = re.compile(r"\bRAY_AUTH_MODE=[\"']?(\w+)")
_RAY_START = re.compile(r"\bray\s+start\b")
_INSTALL = re.compile(
    r"(?:^|[\s;&|(/])scripts/setup\b"  # the README's install
    r"|\bpip3?\s+install\b.*(?:hfedmoe|\s-e\s+\.|\s\.(?:\[[\w,]*\])?(?:\s|$))"  # pip install .
    r"|\bimport\s+hfedmoe\b"  # checks an install shared by the nodes (NFS home)
)
_SETUP_DIR = re.compile(r"\bcd\s+(\S+)\s*&&\s*(?:\./)?scripts/setup\b|(\S+)/scripts/setup\b")
_PIP_DIR = re.compile(r"\bpip3?\s+install\s+(?:\S+\s+)*?-e\s+([~/$][^\s\[]*)")
_GIT_CLONE = re.compile(r"\bgit\s+clone\s+(?:-\S+\s+)*\S+\s+(\S+)")
_MLFLOW = re.compile(r"\bmlflow[- ]server\b(?:.*?--port[= ](\d+))?")
_UNITS = {"cuda": "GPUs", "cpu": "CPUs", "auto": "CPUs or GPUs"}
_LOCAL_TRACKING = re.compile(r"^https?://(?:127\.0\.0\.1|localhost)(?::(\d+))?(?:/|$)")


@dataclass
class NodeType:
    """One node type of a prepared config, as the checks need it."""

    name: str
    resources: dict[str, float]
    declared: bool  # False: Ray detects the resources when the node starts
    min_workers: int
    max_workers: int
    head: bool


@dataclass(frozen=True)
class RunNeeds:
    """What one experiment (or sweep) config asks of a cluster."""

    path: str
    device: str
    address: str | None
    tracking_uri: str | None
    sweep: bool


@dataclass
class ClusterReport:
    """Problems (the cluster would not work) and warnings (it may, check by hand)."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None  # after Ray's prepare_config; None if it failed
    node_types: list[NodeType] = field(default_factory=list)


def validate_cluster_config(
    path: str | Path, experiment_configs: Sequence[str | Path] = ()
) -> list[str]:
    """Problems that would stop `ray up FILE` or the runs on it; empty when none."""
    return check_cluster_config(path, experiment_configs).problems


def check_cluster_config(
    path: str | Path, experiment_configs: Sequence[str | Path] = ()
) -> ClusterReport:
    """Check a cluster config against Ray's schema and this project's needs (offline)."""
    raw = load_cluster_yaml(path)
    needs = [run_needs(p) for p in experiment_configs]
    report = ClusterReport()
    report.problems += _provider_problems(raw)
    if report.problems:  # Ray's prepare_config cannot run without a usable provider
        return report
    report.config, ray_problems, ray_warnings = ray_validate(raw)
    report.problems += ray_problems
    report.warnings += ray_warnings
    if report.config is None:
        return report
    cfg = report.config
    report.node_types = node_types(cfg)
    report.problems += _install_problems(cfg, report.node_types)
    report.problems += _auth_problems(cfg, report.node_types)
    if cfg["provider"]["type"] == "aws" and not any(
        "boto3" in c for c in cfg["head_setup_commands"]
    ):
        report.problems.append(
            "head_setup_commands: install boto3 where the head's Ray runs (e.g. "
            "`~/hfedmoe/.venv/bin/pip install boto3`): its autoscaler launches the EC2 workers"
        )
    report.warnings += _local_path_warnings(cfg)
    for need in needs:
        problems, warnings = _run_problems(cfg, report.node_types, need)
        report.problems += problems
        report.warnings += warnings
    return report


def load_cluster_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (cluster_name, provider, ...)")
    return raw


# Ray's layer ------------------------------------------------------------------------


def _provider_problems(raw: dict[str, Any]) -> list[str]:
    """What Ray's prepare_config would crash or abort on, and misspelled provider keys."""
    provider = raw.get("provider")
    if not isinstance(provider, dict) or not isinstance(provider.get("type"), str):
        return ["provider: missing, or without `type` (e.g. aws, gcp, azure, local)"]
    kind = provider["type"]
    problems = []
    if kind == "aws" and not provider.get("region"):
        problems.append("provider.region: missing (the AWS region to launch in, e.g. us-west-2)")
    if kind == "local":
        if "coordinator_address" not in provider:
            for key in ("head_ip", "worker_ips"):
                if key not in provider:
                    problems.append(
                        f"provider.{key}: missing (an on-premise cluster names its head_ip "
                        "and worker_ips, or a coordinator_address)"
                    )
        for key in ("available_node_types", "head_node_type", "head_node", "worker_nodes"):
            if raw.get(key):
                problems.append(
                    f"{key}: not supported with the local provider (Ray makes one node type "
                    "of head_ip and worker_ips and detects each node's resources)"
                )
    if kind in _EXTRA_PROVIDER_KEYS:
        known = _schema_provider_keys() | _EXTRA_PROVIDER_KEYS[kind]
        for key in sorted(set(provider) - known):
            problems.append(f"provider.{key}: not a key Ray reads{_did_you_mean(key, known)}")
    return problems


def ray_validate(raw: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str], list[str]]:
    """Ray's prepare_config then validate_config: (prepared config, problems, warnings).

    Ray prints its own notes (e.g. min_workers capped at the number of worker_ips); they
    come back as warnings instead.
    """
    import click
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = copy.deepcopy(raw)
    warnings = []
    if raw["provider"]["type"] == "aws":
        # `ray up` fills missing resources from the instance type through AWS's API.
        for name, node in (raw.get("available_node_types") or {}).items():
            if isinstance(node, dict) and "resources" not in node:
                node["resources"] = {}
                warnings.append(
                    f"available_node_types.{name}: no `resources`; Ray reads them from the "
                    "instance type at `ray up`, the checks here see none (declare CPU and GPU)"
                )
    printed = io.StringIO()
    with (
        _quiet_ray_logs(),
        contextlib.redirect_stdout(printed),
        contextlib.redirect_stderr(printed),
    ):
        config = raw
        try:
            config = prepare_config(raw)
            validate_config(config)
        except jsonschema.ValidationError:
            return None, _schema_problems(config), warnings
        except Exception as err:  # prepare_config trips over what the schema would reject
            if problems := _schema_problems(_with_defaults(raw)):
                return None, problems, warnings
            message = err.format_message() if isinstance(err, click.ClickException) else err
            return None, [f"Ray rejects the config: {type(err).__name__}: {message}"], warnings
    lines = _ANSI.sub("", printed.getvalue()).splitlines()
    warnings += [f"Ray: {line.strip()}" for line in lines if line.strip()]
    return config, [], warnings


def _with_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """The config over the provider's defaults, as prepare_config starts (no more)."""
    from ray.autoscaler._private.util import fillout_defaults

    try:
        return fillout_defaults(copy.deepcopy(raw))
    except Exception:
        return raw


@contextlib.contextmanager
def _quiet_ray_logs():
    """Ray's launcher logs its defaulting at INFO through handlers of its own."""
    ray_logger = logging.getLogger("ray.autoscaler")
    level = ray_logger.level
    ray_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ray_logger.setLevel(level)


def _ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _schema_provider_keys() -> set[str]:
    return set(_ray_schema()["properties"]["provider"]["properties"])


def _schema_problems(config: dict[str, Any]) -> list[str]:
    """Every schema error (Ray's validate_config stops at the first), with its path."""
    import jsonschema

    schema = _ray_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.path))):
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        message = err.message
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = set(err.schema.get("properties", {}))
            extra = sorted(set(err.instance) - allowed)
            message = "; ".join(
                f"unknown key `{key}`{_did_you_mean(key, allowed)}" for key in extra
            )
        problems.append(f"{where}: {message} (Ray's schema)")
    return problems


def _did_you_mean(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


# This project's layer ---------------------------------------------------------------


def node_types(cfg: dict[str, Any]) -> list[NodeType]:
    raw_types = cfg["available_node_types"]
    local = cfg["provider"]["type"] == "local"
    types = []
    for name, node in raw_types.items():
        head = name == cfg["head_node_type"]
        resources = {k: float(v) for k, v in (node.get("resources") or {}).items()}
        types.append(
            NodeType(
                name=name,
                resources=resources,
                declared=bool(resources) and not local,
                min_workers=int(node.get("min_workers", 0)),
                max_workers=int(node.get("max_workers", 0)),
                head=head,
            )
        )
    return types


def _worker_setup(cfg: dict[str, Any], node: NodeType) -> list[str]:
    own = cfg["available_node_types"][node.name].get("worker_setup_commands")
    return list(own) if own is not None else list(cfg["worker_setup_commands"])


def _launched_workers(cfg: dict[str, Any], types: list[NodeType]) -> list[NodeType]:
    """Worker node types that can exist (the local provider's one type serves both)."""
    if cfg["provider"]["type"] == "local":
        return [t for t in types if t.max_workers > 0]
    return [t for t in types if not t.head and t.max_workers > 0]


def _install_problems(cfg: dict[str, Any], types: list[NodeType]) -> list[str]:
    """Every node installs the project, from a directory that exists there, and runs
    Ray from that install."""
    problems = []
    lists = {"setup_commands + head_setup_commands": cfg["head_setup_commands"]}
    for node in _launched_workers(cfg, types):
        lists[f"worker setup commands of `{node.name}`"] = _worker_setup(cfg, node)
    for where, commands in lists.items():
        if not any(_INSTALL.search(c) for c in commands):
            problems.append(
                f"{where}: nothing installs hfedmoe; run the README's install on every node "
                "(e.g. `cd ~/hfedmoe && scripts/setup` with the tree in file_mounts)"
            )
    all_setup = cfg["head_setup_commands"] + cfg["worker_setup_commands"]
    mounted = {_norm(k) for k in cfg["file_mounts"]}
    cloned = {
        _norm(m.group(1))
        for c in all_setup + cfg["initialization_commands"]
        for m in _GIT_CLONE.finditer(c)
    }
    for project in sorted(_project_dirs(all_setup)):
        if project not in mounted | cloned:
            problems.append(
                f"setup installs from {project}, but neither file_mounts nor a `git clone` "
                "puts the project there"
            )
            continue
        # Ray runs each command in a shell of its own: the venv must be named in the
        # `ray start` command itself, or activated from ~/.bashrc by the setup.
        venv = f"{project}/.venv/bin"
        starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
        in_bashrc = any(f"{venv}/activate" in _norm_cmd(c) and "bashrc" in c for c in all_setup)
        if not in_bashrc and not all(venv in _norm_cmd(c) for c in starts if _RAY_START.search(c)):
            problems.append(
                f"start commands: `ray start` is not the one scripts/setup installed; call "
                f"{venv}/ray (or `source {venv}/activate;` first)"
            )
    return problems


def _project_dirs(commands: list[str]) -> set[str]:
    dirs = set()
    for command in commands:
        for m in _SETUP_DIR.finditer(command):
            found = m.group(1) or m.group(2)
            if found and found not in (".", ""):
                dirs.add(_norm(found))
        dirs.update(_norm(m.group(1)) for m in _PIP_DIR.finditer(command))
    return dirs


def _norm(path: str) -> str:
    """`$HOME/x`, `${HOME}/x/`, `~/x` -> `~/x`, for comparing remote paths."""
    path = path.strip("\"'")
    path = re.sub(r"^(\$HOME|\$\{HOME\})", "~", path)
    return path.rstrip("/") or "/"


def _norm_cmd(command: str) -> str:
    return re.sub(r"(\$HOME|\$\{HOME\})/", "~/", command)


def _auth_mode(commands: list[str]) -> tuple[bool, set[str]]:
    """(whether the list runs `ray start`, the RAY_AUTH_MODE values each start sees)."""
    modes, exported, starts = set(), None, False
    for command in commands:
        found = _AUTH_MODE.findall(command)
        if _RAY_START.search(command):
            starts = True
            modes.add(found[-1].lower() if found else (exported or "unset"))
        elif found and "export" in command:
            exported = found[-1].lower()
    return starts, modes


def _auth_problems(cfg: dict[str, Any], types: list[NodeType]) -> list[str]:
    """Ray 2.60: a head turns token auth on when it finds a token, a worker never does;
    so both must say RAY_AUTH_MODE, alike, and the token must reach every node."""
    lists = {"head_start_ray_commands": cfg["head_start_ray_commands"]}
    if _launched_workers(cfg, types):
        lists["worker_start_ray_commands"] = cfg["worker_start_ray_commands"]
    problems, seen = [], {}
    for where, commands in lists.items():
        starts, modes = _auth_mode(commands)
        if not starts:
            problems.append(f"{where}: no `ray start`")
        elif "unset" in modes:
            problems.append(
                f"{where}: `ray start` without RAY_AUTH_MODE. Ray 2.60 enables token auth on a "
                "head that finds ~/.ray/auth_token and never on a worker, so workers cannot "
                "join: set RAY_AUTH_MODE=token (and mount the token) or, deliberately, "
                "RAY_AUTH_MODE=disabled"
            )
        seen[where] = modes - {"unset"}
    if len({m for modes in seen.values() for m in modes}) > 1:
        problems.append(f"RAY_AUTH_MODE differs between head and workers: {seen}")
    if any("token" in modes for modes in seen.values()):
        mounted = {_norm(k) for k in cfg["file_mounts"]}
        starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
        if TOKEN_PATH not in mounted and not re.search(r"\bRAY_AUTH_TOKEN(_PATH)?=", starts):
            problems.append(
                f"token auth, but no token on the nodes: add `{TOKEN_PATH}: {TOKEN_PATH}` "
                "to file_mounts (create it once with `ray get-auth-token --generate`)"
            )
    return problems


def _local_path_warnings(cfg: dict[str, Any]) -> list[str]:
    """Local sources `ray up` reads: relative paths are taken from the current directory."""
    warnings = []
    for remote, local in cfg["file_mounts"].items():
        source = Path(os.path.expanduser(str(local)))
        if not source.exists():
            hint = " (ray get-auth-token --generate)" if _norm(remote) == TOKEN_PATH else ""
            warnings.append(f"file_mounts: {local} does not exist here{hint}")
        elif (
            _norm(remote) in _project_dirs(cfg["head_setup_commands"])
            and not (source / "scripts" / "setup").is_file()
        ):
            warnings.append(
                f"file_mounts: {remote} <- {local} ({source.resolve()}) is not an hfedmoe "
                "checkout; run `ray up` from the repository root"
            )
    key = cfg["auth"].get("ssh_private_key")
    if key and not Path(os.path.expanduser(key)).is_file():
        warnings.append(f"auth.ssh_private_key: {key} does not exist here")
    return warnings


# Experiment and sweep configs -------------------------------------------------------


def run_needs(path: str | Path) -> RunNeeds:
    """Read what a run needs from an experiment config, or from a sweep (a file with
    `base:` and `search:`) as its base experiment with its overrides applied; search
    dimensions are not expanded."""
    # The config validates strategy names against their registry, which imports torch:
    # only `--for` pays for it, not every `hfedmoe` command.
    from hfedmoe.platform.config import load_config, parse_config, set_dotted

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) if path.is_file() else None
        if isinstance(raw, dict) and "base" in raw and "search" in raw:
            base = yaml.safe_load((path.parent / str(raw["base"])).read_text()) or {}
            for key, value in (raw.get("overrides") or {}).items():
                set_dotted(base, key, value)
            cfg, uri = parse_config(base), raw.get("tracking_uri")
            uri = uri if uri is not None else cfg.tracking.uri
        else:
            cfg = load_config(path)
            uri = cfg.tracking.uri
    except (ConfigError, OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--for {path}: {err}") from None
    enabled = cfg.tracking.enabled
    sweep = isinstance(raw, dict) and "search" in raw
    return RunNeeds(
        str(path), cfg.runtime.device, cfg.runtime.address, uri if enabled else None, sweep
    )


def _at_start(types: list[NodeType], unit: str) -> float:
    """`unit` present when the cluster is up: the head plus every type's min_workers."""
    return sum(t.resources.get(unit, 0.0) * (1 if t.head else t.min_workers) for t in types)


def _run_problems(
    cfg: dict[str, Any], types: list[NodeType], need: RunNeeds
) -> tuple[list[str], list[str]]:
    problems, warnings = [], []
    name = need.path
    if not any(t.declared for t in types):
        warnings.append(
            f"{name}: node resources are detected when Ray starts; check with `ray status` "
            f"that the {_UNITS[need.device]} it needs are there"
        )
    else:
        problems += _resource_problems(types, need)
        gpu_types = [t.name for t in types if t.resources.get("GPU", 0) > 0]
        if need.device == "auto" and gpu_types and _at_start(types, "GPU") == 0:
            warnings.append(
                f"{name}: runtime.device auto finds no GPU when the run starts (min_workers 0 "
                f"on {', '.join(gpu_types)}), so its clients run on CPUs"
            )
    if need.tracking_uri and (m := _LOCAL_TRACKING.match(need.tracking_uri)):
        port = m.group(1) or ("443" if need.tracking_uri.startswith("https") else "80")
        head = cfg["head_setup_commands"] + cfg["head_start_ray_commands"]
        ports = {pm.group(1) or "5000" for c in head for pm in _MLFLOW.finditer(c)}
        if port not in ports:
            problems.append(
                f"{name}: tracking goes to {need.tracking_uri}, but the head starts no MLflow "
                f"server on port {port} (e.g. `~/hfedmoe/scripts/mlflow-server --port {port}` "
                "in head_start_ray_commands)"
            )
    if need.address is None and not need.sweep:
        warnings.append(
            f"{name}: runtime.address unset: fine under `ray job submit` (it sets RAY_ADDRESS), "
            "but `ray exec ... hfedmoe run` would start a private Ray; set runtime.address: auto"
        )
    return problems, warnings


def _resource_problems(types: list[NodeType], need: RunNeeds) -> list[str]:
    """The driver sizes its client pools from the resources present when it starts, so
    what autoscaling could add later does not count."""
    name, problems = need.path, []
    if need.device == "cuda":
        gpu_types = [t.name for t in types if t.resources.get("GPU", 0) > 0]
        if not gpu_types:
            problems.append(
                f"{name}: runtime.device is cuda, but no node type declares GPUs "
                "(resources: {GPU: n})"
            )
        elif _at_start(types, "GPU") == 0:
            problems.append(
                f"{name}: runtime.device is cuda, but no GPU is up when the run starts (the "
                f"driver sizes its pools then): set min_workers >= 1 on {' or '.join(gpu_types)}"
            )
    cpus_needed = need.device == "cpu" or need.sweep
    if cpus_needed and _at_start(types, "CPU") == 0:
        why = "sweep trials reserve CPUs for their drivers" if need.sweep else "clients run on CPUs"
        problems.append(f"{name}: no CPU is up when the run starts ({why})")
    return problems


# Command line -----------------------------------------------------------------------


def add_cluster_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `hfedmoe cluster validate [FILE] [--for CONFIG ...]`."""
    cluster = subparsers.add_parser("cluster", help="Ray cluster launcher configs (ray up FILE)")
    actions = cluster.add_subparsers(dest="cluster_command", required=True)
    validate = actions.add_parser(
        "validate",
        help="check a cluster config offline: Ray's schema and this project's needs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate.add_argument(
        "file", nargs="?", default=DEFAULT_CLUSTER_FILE, help="cluster YAML (default: %(default)s)"
    )
    validate.add_argument(
        "--for",
        dest="configs",
        action="append",
        default=[],
        metavar="CONFIG",
        help="an experiment or sweep YAML to run there (repeatable)",
    )
    validate.set_defaults(handler=cmd_cluster_validate)


def cmd_cluster_validate(args: argparse.Namespace) -> int:
    report = check_cluster_config(args.file, args.configs)
    if report.config is not None:
        print(f"{args.file}: {describe(report.config, report.node_types)}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    for problem in report.problems:
        print(f"problem: {problem}")
    if report.problems:
        print(f"{args.file}: {len(report.problems)} problem(s)")
        return 1
    print(f"{args.file}: ok")
    return 0


def describe(cfg: dict[str, Any], types: list[NodeType]) -> str:
    """One line: provider, head and worker node types with resources and counts."""

    def resources(t: NodeType) -> str:
        shown = ", ".join(f"{k} {v:g}" for k, v in sorted(t.resources.items()))
        return shown or "resources detected at start"

    provider = cfg["provider"]["type"]
    parts = [f"provider {provider}, cluster {cfg['cluster_name']}"]
    for t in types:
        if t.head:
            parts.append(f"head {t.name} ({resources(t)})")
        if (not t.head or provider == "local") and t.max_workers > 0:
            parts.append(f"workers {t.name} ({resources(t)}) x{t.min_workers}-{t.max_workers}")
    return "; ".join(parts)
