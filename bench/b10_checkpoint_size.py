"""B10: bytes a checkpoint writes per round, against the round number.

Runs the tiny Qwen3-MoE of the tests (configs/tiny.yaml) in-process for --rounds rounds
with the standard Checkpointer and, after each round, measures what that round's
checkpoint wrote: the bytes appended to history.jsonl and the size of the new
checkpoint directory (the model state in safetensors and progress.json). With an
append-only history these stay flat; rewriting the whole history would make them grow
linearly with the round (O(rounds^2) bytes over a run).

    python bench/b10_checkpoint_size.py [--rounds 60] [--out bench/results/b10.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import yaml
from common import REPO, machine_info

from hfedmoe.platform.callbacks import Checkpointer
from hfedmoe.platform.checkpoint import HISTORY
from hfedmoe.platform.config import parse_config
from hfedmoe.platform.engine import Callback, run
from hfedmoe.platform.executors import InProcessExecutor


class Measure(Callback):
    """After the Checkpointer: bytes this round added to the history and its checkpoint."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.history_bytes = 0

    def after_round(self, run_state, metrics) -> bool:
        history = (run_state.run_dir / HISTORY).stat().st_size
        checkpoint = run_state.run_dir / "checkpoints" / f"round-{metrics.round:05d}"
        files = sum(f.stat().st_size for f in checkpoint.iterdir())
        self.rows.append(
            {
                "round": metrics.round,
                "history_appended": history - self.history_bytes,
                "checkpoint_dir": files,
            }
        )
        self.history_bytes = history
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="tiny settings, for smoke tests")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "b10.json")
    args = parser.parse_args(argv)
    rounds = 12 if args.quick else args.rounds
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["federation"].update(rounds=rounds, eval_every=rounds)
    raw["tracking"] = {"enabled": False}
    measure = Measure()
    with tempfile.TemporaryDirectory() as tmp:
        run(parse_config(raw), InProcessExecutor(), [Checkpointer(), measure], Path(tmp) / "run")
    rows = measure.rows
    written = np.array([r["history_appended"] + r["checkpoint_dir"] for r in rows], dtype=float)
    slope = float(np.polyfit(np.arange(len(written)), written, 1)[0])
    report = {
        "machine": machine_info(),
        "command": "python bench/b10_checkpoint_size.py"
        + (" --quick" if args.quick else f" --rounds {rounds}"),
        "rounds": rounds,
        "bytes_per_round_first": int(written[0]),
        "bytes_per_round_last": int(written[-1]),
        "bytes_per_round_mean": float(written.mean()),
        "bytes_per_round_slope": slope,  # bytes more per round, per round: ~0 when flat
        "history_appended_min": min(r["history_appended"] for r in rows),
        "history_appended_max": max(r["history_appended"] for r in rows),
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("rows", "machine")}, indent=1))


if __name__ == "__main__":
    main()
