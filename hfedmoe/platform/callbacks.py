"""Callbacks every executor shares: checkpoints, a progress bar, early stop at a target."""

from __future__ import annotations

import sys

from tqdm import tqdm

from hfedmoe.platform.checkpoint import (
    append_history,
    save_checkpoint,
    save_variates,
    write_run_config,
)
from hfedmoe.platform.engine import Callback, Run
from hfedmoe.platform.plugins import record_plugins
from hfedmoe.platform.records import RoundMetrics


class Checkpointer(Callback):
    """Checkpoint after every round, so ``hfedmoe run --resume RUN_DIR`` continues the run.

    The run directory, its config and the plugins it imports are written when the run has
    started (the data, the model and the executor are ready). After each round its history
    record and the control variates it changed are written first, then the state, server
    state and progress: a checkpoint never refers to a round the history or the variates
    lack.
    """

    def __init__(self, plugins: list[str] | None = None) -> None:
        self.plugins = plugins or []

    def on_run_begin(self, run: Run) -> None:
        if run.next_round == 0:  # a resumed run keeps the config and plugins it started with
            write_run_config(run.run_dir, run.cfg)
            record_plugins(run.run_dir, self.plugins)

    def after_round(self, run: Run, metrics: RoundMetrics) -> bool:
        append_history(run.run_dir, run.history.last_round_record())
        changed = {c: run.variates[c] for c in run.variates_changed}
        if changed:
            save_variates(run.run_dir, metrics.round, changed)
        progress = {"clock": run.clock, "notes": run.notes}
        save_checkpoint(run.run_dir, metrics.round, run.state, progress, run.server_state)
        return False


class Progress(Callback):
    """A progress bar with the round's accuracy, failures and simulated clock."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None

    def on_run_begin(self, run: Run) -> None:
        rounds = run.cfg.federation.rounds
        self.bar = tqdm(
            total=rounds, initial=run.next_round, disable=not self.enabled, unit="round"
        )

    def after_round(self, run: Run, metrics: RoundMetrics) -> bool:
        self.bar.update(1)
        self.bar.set_postfix_str(describe_round(metrics))
        return False

    def on_run_end(self, run: Run, status: str) -> None:
        self.bar.close()
        if status != "FINISHED" and run.run_dir is not None and run.next_round > 0:
            print(
                f"{status}: rounds 1-{run.next_round} are checkpointed; continue with "
                f"hfedmoe run --resume {run.run_dir}",
                file=sys.stderr,
                flush=True,
            )


class EarlyStop(Callback):
    """Stop once the evaluated accuracy reaches ``target`` (``federation.stop_at_target``)."""

    def __init__(self, target: float) -> None:
        self.target = target

    def after_round(self, run: Run, metrics: RoundMetrics) -> bool:
        return metrics.accuracy is not None and metrics.accuracy >= self.target


def describe_round(m: RoundMetrics) -> str:
    failed = m.sampled - m.succeeded
    acc = "-" if m.accuracy is None else f"{m.accuracy:.3f}"
    return f"acc={acc} failed={failed}/{m.sampled} sim={m.simulated_seconds:.1f}s"
