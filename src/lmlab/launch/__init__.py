"""Launch runs and grids: locally as subprocesses now, on Slurm (submitit) behind the same ``run_grid`` later.

Usage::

    from lmlab.config import load_grid
    from lmlab.launch import run_grid
    outcomes = run_grid(load_grid("apps/memory/grid.yaml"), jobs=2)
"""

from lmlab.launch.local import (
    Executor,
    GridInterrupted,
    LocalExecutor,
    RunHandle,
    RunOutcome,
    default_threads,
    exit_on_grid_interrupt,
    grid_app_arguments,
    has_checkpoint,
    is_finished,
    log_tail,
    parse_grid_app,
    read_summary,
    run_grid,
    run_state,
)

__all__ = [
    "Executor",
    "GridInterrupted",
    "LocalExecutor",
    "RunHandle",
    "RunOutcome",
    "default_threads",
    "exit_on_grid_interrupt",
    "grid_app_arguments",
    "has_checkpoint",
    "is_finished",
    "log_tail",
    "parse_grid_app",
    "read_summary",
    "run_grid",
    "run_state",
]
