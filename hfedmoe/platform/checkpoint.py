"""Run directories and round checkpoints (tensors in safetensors, the rest in JSON).

A run directory holds the resolved ``config.yaml`` and the checkpoints.

A checkpoint is a directory ``round-NNNNN`` under ``<run_dir>/checkpoints`` holding
``state.safetensors`` (the global ModelState) and ``progress.json`` (the completed round,
the simulated clock, the history so far and anything the caller adds). It is written
under a temporary name and renamed into place, then ``LATEST`` is replaced atomically, so
a crash at any instant leaves the previous checkpoint intact. Every random draw of a run
derives from (seed, round, client), so this is all a resumed run needs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from safetensors.numpy import load_file, save_file

from hfedmoe.platform.config import ExperimentConfig, load_config
from hfedmoe.platform.errors import ConfigError
from hfedmoe.platform.records import ModelState

KEEP = 2  # checkpoints kept; older ones are removed after a new one is in place


def new_run_dir(cfg: ExperimentConfig, run_dir: Path | None = None) -> Path:
    """Create a run directory (default: output_dir/NAME-TIME) and write the config into it.

    Refuses a directory that already holds a run: that one is continued with --resume.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(run_dir or Path(cfg.output_dir) / f"{cfg.name}-{stamp}").resolve()
    if load_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds a run; resume it with --resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return run_dir


def run_config(run_dir: Path) -> ExperimentConfig:
    """The config a run directory was started with (what --resume continues)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml; is this a run directory?")
    return load_config(path)


def state_to_flat(state: ModelState) -> dict[str, np.ndarray]:
    flat = {f"shared/{k}": v for k, v in state.shared.items()}
    flat.update({f"gate/{k}": v for k, v in state.gates.items()})
    for layer, arrays in enumerate(state.experts):
        flat.update({f"expert/{layer}/{k}": v for k, v in arrays.items()})
    return {k: np.ascontiguousarray(v) for k, v in flat.items()}


def state_from_flat(flat: dict[str, np.ndarray]) -> ModelState:
    state = ModelState(shared={}, gates={}, experts=[])
    for key, value in flat.items():
        kind, rest = key.split("/", 1)
        if kind == "shared":
            state.shared[rest] = value
        elif kind == "gate":
            state.gates[rest] = value
        else:
            layer, name = rest.split("/", 1)
            while len(state.experts) <= int(layer):
                state.experts.append({})
            state.experts[int(layer)][name] = value
    return state


def save_checkpoint(
    run_dir: Path, round_index: int, state: ModelState, progress: dict[str, Any]
) -> Path:
    """Write the checkpoint of a completed round; return its directory."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"round-{round_index:05d}"
    staging = root / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file(state_to_flat(state), str(staging / "state.safetensors"))
    _fsync(staging / "state.safetensors")
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


def load_checkpoint(run_dir: Path) -> tuple[ModelState, dict[str, Any]] | None:
    """The latest checkpoint of a run directory, or None if it has none."""
    root = Path(run_dir) / "checkpoints"
    latest = root / "LATEST"
    if not latest.is_file():
        return None
    directory = root / latest.read_text().strip()
    state = state_from_flat(load_file(str(directory / "state.safetensors")))
    progress = json.loads((directory / "progress.json").read_text())
    return state, progress


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
