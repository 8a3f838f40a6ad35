"""Run directories and round checkpoints (tensors in safetensors, the rest in JSON).

A run directory holds the resolved ``config.yaml``, the history and the checkpoints.

The history, ``history.jsonl``, gets one fsynced line per completed round (its metrics,
client records and mean expert usage), so a checkpoint costs O(model + one round) however
long the run. A checkpoint is a directory ``round-NNNNN`` under ``<run_dir>/checkpoints``
holding ``state.safetensors`` (the global ModelState) and ``progress.json`` (the completed
round, the simulated clock and the callbacks' notes), and ``server.safetensors`` when the
strategy keeps server state (a server optimiser's moments, SCAFFOLD's c: O(model)). It is
written under a temporary name
and renamed into place, then ``LATEST`` is replaced atomically, so a crash at any instant
leaves the previous checkpoint intact; a checkpoint damaged anyway (a full disk, a torn
copy) is skipped for the previous one, with a warning. Every random draw of a run derives
from (seed, round, client), so this is all a resumed run needs.

SCAFFOLD's per-client control variates live beside the checkpoints, in
``<run_dir>/variates/client-CCCCCCC-round-RRRRR.safetensors``: a client's file is written
after each round that changed its variates (before that round's checkpoint), so a round
costs O(its clients' trained rows), never all clients'. A resume takes each client's
newest file of a round up to the checkpoint's; the two newest per client are kept, which
covers the KEEP checkpoints.

Tensors are only ever read through safetensors: a checkpoint never unpickles anything.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from hfedmoe.platform.config import ExperimentConfig, load_config
from hfedmoe.platform.errors import ConfigError
from hfedmoe.platform.plugins import load_recorded_plugins
from hfedmoe.platform.records import History, ModelState, ServerState, Variates

log = logging.getLogger(__name__)

KEEP = 2  # checkpoints kept; older ones are removed after a new one is in place
HISTORY = "history.jsonl"
VARIATES = "variates"


@dataclass
class Checkpoint:
    """What a resumed run continues from: the state and history after ``round``."""

    round: int
    clock: float  # simulated seconds
    notes: dict[str, Any]
    state: ModelState
    history: History
    path: Path
    server_state: ServerState | None = None  # None: the run kept none (or an older version)
    variates: dict[int, Variates] = field(default_factory=dict)


def new_run_dir(cfg: ExperimentConfig, run_dir: Path | None = None) -> Path:
    """The directory of a new run (default: output_dir/NAME-TIME), not yet created.

    Refuses a directory that already holds a run: that one is continued with --resume.
    Nothing is written before the run has started (``write_run_config``), so a run that
    fails to start (bad data, no cluster) leaves no half-made run directory behind.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(run_dir or Path(cfg.output_dir) / f"{cfg.name}-{stamp}").resolve()
    if has_checkpoint(run_dir):
        raise ConfigError(f"{run_dir} already holds a run; resume it with --resume {run_dir}")
    return run_dir


def write_run_config(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Create the run directory and write the config a resume continues with."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))


def run_config(run_dir: Path) -> ExperimentConfig:
    """The config a run directory was started with (what --resume continues), after
    importing the plugins it recorded (their classes are names in that config)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml; is this a run directory?")
    load_recorded_plugins(run_dir)
    return load_config(path)


def state_to_flat(state: ModelState) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v) for k, v in state.to_flat().items()}


def append_history(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one round's record (``History.last_round_record``) to the run's history."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, allow_nan=True).encode() + b"\n"
    with open(Path(run_dir) / HISTORY, "ab+") as f:
        # A crash mid-append leaves a torn last line: end it, or it swallows this record.
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_history(run_dir: Path, up_to_round: int) -> History:
    """Rounds 0..``up_to_round`` of the history.

    Records past the checkpoint (a crash between append and checkpoint) are ignored; a
    round recorded twice (rerun after such a crash) counts once, as last written.
    """
    by_round: dict[int, dict[str, Any]] = {}
    path = Path(run_dir) / HISTORY
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a torn last line: its round was never checkpointed
            continue
        if record["round"] <= up_to_round:
            by_round[record["round"]] = record
    missing = sorted(set(range(up_to_round + 1)) - set(by_round))
    if missing:
        raise ValueError(f"{path} lacks round(s) {missing}")
    return History.from_round_records([by_round[r] for r in range(up_to_round + 1)])


def save_variates(run_dir: Path, round_index: int, variates: dict[int, Variates]) -> None:
    """Write the control variates of the clients a round changed (before its checkpoint)."""
    root = Path(run_dir) / VARIATES
    root.mkdir(parents=True, exist_ok=True)
    for client, arrays in variates.items():
        path = root / f"client-{client:07d}-round-{round_index:05d}.safetensors"
        staging = path.with_name(f".{path.name}.tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(staging))
        _fsync(staging)
        os.replace(staging, path)
        for old in sorted(root.glob(f"client-{client:07d}-round-*.safetensors"))[:-KEEP]:
            old.unlink(missing_ok=True)
    _fsync(root)


def load_variates(run_dir: Path, up_to_round: int) -> dict[int, Variates]:
    """Each client's newest control variates written for a round <= ``up_to_round``."""
    newest: dict[int, tuple[int, Path]] = {}
    for path in (Path(run_dir) / VARIATES).glob("client-*-round-*.safetensors"):
        _, client, _, round_index = path.name.removesuffix(".safetensors").split("-")
        client, round_index = int(client), int(round_index)
        if round_index <= up_to_round and round_index > newest.get(client, (-1, None))[0]:
            newest[client] = (round_index, path)
    return {client: load_file(str(path)) for client, (_, path) in sorted(newest.items())}


def save_checkpoint(
    run_dir: Path,
    round_index: int,
    state: ModelState,
    progress: dict[str, Any],
    server_state: ServerState | None = None,
) -> Path:
    """Write the checkpoint of a completed round (its history appended already)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"round-{round_index:05d}"
    staging = root / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file(state_to_flat(state), str(staging / "state.safetensors"))
    _fsync(staging / "state.safetensors")
    if server_state:
        flat = {k: np.ascontiguousarray(v) for k, v in server_state.items()}
        save_file(flat, str(staging / "server.safetensors"))
        _fsync(staging / "server.safetensors")
    _write_json(staging / "progress.json", {"round": round_index, **progress})
    _fsync(staging)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _fsync(root)
    _write_text_atomic(root / "LATEST", name)
    _fsync(root)
    for old in sorted(p for p in root.glob("round-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run directory holds a checkpoint, intact or not."""
    root = Path(run_dir) / "checkpoints"
    return (root / "LATEST").is_file() or any(root.glob("round-*"))


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The latest intact checkpoint of a run directory, or None if it has none.

    A damaged latest one (unreadable LATEST, truncated state, missing progress or history)
    falls back to the previous checkpoint with a warning; none intact is an error.
    """
    root = Path(run_dir) / "checkpoints"
    candidates = sorted((p for p in root.glob("round-*") if p.is_dir()), reverse=True)
    if not candidates:
        return None
    latest = _read_latest(root)
    problems = []
    if latest in candidates:  # LATEST is the truth; a newer directory lacks its rename
        candidates.remove(latest)
        candidates.insert(0, latest)
    else:
        problems.append("LATEST names no checkpoint")
    for directory in candidates:
        try:
            checkpoint = _load(run_dir, directory)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            problems.append(f"{directory.name}: {err}")
            continue
        if problems:
            log.warning(
                "checkpoint(s) damaged, continuing from %s: %s", directory, "; ".join(problems)
            )
        return checkpoint
    raise ConfigError(f"{run_dir}: no intact checkpoint ({'; '.join(problems)})")


def _read_latest(root: Path) -> Path | None:
    try:
        name = (root / "LATEST").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return root / name if name.startswith("round-") and "/" not in name else None


def _load(run_dir: Path, directory: Path) -> Checkpoint:
    progress = json.loads((directory / "progress.json").read_text())
    server = directory / "server.safetensors"
    return Checkpoint(
        round=progress["round"],
        clock=progress["clock"],
        notes=progress["notes"],
        state=ModelState.from_flat(load_file(str(directory / "state.safetensors"))),
        history=read_history(run_dir, progress["round"]),
        path=directory,
        server_state=load_file(str(server)) if server.is_file() else None,
        variates=load_variates(run_dir, progress["round"]),
    )


def _fsync(path: Path) -> None:
    """Flush a file's or directory's contents to disk (renames need the directory's)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    _write_text_atomic(path, json.dumps(payload, indent=1, allow_nan=True))


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
