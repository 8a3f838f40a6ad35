"""One federation, launched: the engine with an executor and the standard callbacks.

What ``hfedmoe run`` and every sweep trial call. The executor is Ray's unless
``in_process``; the callbacks are MLflow tracking (when ``tracking.enabled``), a
checkpoint per round, a progress bar, early stop at the target (when asked), and any
extra ones (a Tune trial adds its reporter). Tracking runs before the checkpoint, so a
crash in between logs a round twice on resume (harmless) instead of never.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hfedmoe.platform.callbacks import Checkpointer, EarlyStop, Progress
from hfedmoe.platform.checkpoint import new_run_dir, run_config
from hfedmoe.platform.config import ExperimentConfig, check_paths
from hfedmoe.platform.engine import Callback, Executor, Run, run
from hfedmoe.platform.executors import InProcessExecutor


def launch(
    cfg: ExperimentConfig | None = None,
    run_dir: Path | None = None,
    resume: Path | None = None,
    in_process: bool = False,
    progress: bool = True,
    parent_run_id: str | None = None,
    callbacks: Sequence[Callback] = (),
    placement: tuple[str, float, float] | None = None,
    plugins: Sequence[str] = (),
) -> Run:
    """Run ``cfg`` in a new run directory, or continue the run in ``resume``.

    ``plugins`` (already imported, ``plugins.load_plugins``) are recorded in a new run
    directory; a resumed run imports the ones its directory recorded.
    """
    if resume is not None:
        run_dir = Path(resume).resolve()
        cfg = run_config(run_dir)
    else:
        check_paths(cfg)
    if not in_process:
        from hfedmoe.actors.executor import RayExecutor, check_address  # imports ray

        check_address(cfg.runtime.address)  # before the data and model are built
    standard: list[Callback] = []
    if cfg.tracking.enabled:
        from hfedmoe.tracking.mlflow_run import MLflowTracking, check_tracking  # imports mlflow

        check_tracking(cfg)  # before anything starts: an unreachable server fails or warns
        standard.append(MLflowTracking(parent_run_id))
    if resume is None:
        run_dir = new_run_dir(cfg, run_dir)
    executor: Executor = InProcessExecutor() if in_process else RayExecutor(placement)
    standard += [Checkpointer(list(plugins)), Progress(progress)]
    if cfg.federation.stop_at_target:
        standard.append(EarlyStop(cfg.federation.target_accuracy))
    return run(cfg, executor, [*standard, *callbacks], run_dir, resume=resume is not None)
