"""Round checkpoints: tensors in safetensors, everything else in JSON, written atomically.

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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from hfedmoe.platform.models.adapter import ModelState
from hfedmoe.platform.simulation import ClientRecord, History, RoundMetrics

KEEP = 2  # checkpoints kept; older ones are removed after a new one is in place


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


def history_to_json(history: History) -> dict[str, Any]:
    return {
        "rounds": [asdict(r) for r in history.rounds],
        "clients": [asdict(c) for c in history.clients],
        "usage": [u.tolist() for u in history.usage],
    }


def history_from_json(raw: dict[str, Any]) -> History:
    return History(
        rounds=[RoundMetrics(**r) for r in raw["rounds"]],
        clients=[ClientRecord(**c) for c in raw["clients"]],
        usage=[np.asarray(u) for u in raw["usage"]],
    )


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
