"""Runners: who executes a list of runs, and where. The study (:func:`normstudy.study.run_grid`)
hands one a list of :class:`~normstudy.config.RunConfig` and gets each run's record back.

The interface every runner keeps (``LocalRunner`` in ``runners/local.py``, a Ray runner whose
driver is ``runners/ray.py`` and whose workers are ``runners/ray_worker.py``)::

    runner.run(configs, *, out, data_dir, download, device, runtime, on_record) -> None

- ``configs``: a list of :class:`RunConfig`, distinct, in the order they should start. The caller
  has left out the finished ones; a runner still returns a finished run's record as it is
  (:func:`run.run_one` does) rather than train it again.
- ``out``: the folder of the grid. Every run owns ``out/<run id>/`` as :mod:`normstudy.run`
  describes it. A run is finished once ``out/<run id>/record.json`` exists, on the machine that
  called ``run``: a runner whose runs execute elsewhere ships the run's folder back (see
  :func:`pack_run_folder` / :func:`unpack_run_folder`) *before* it reports the record.
- ``data_dir``, ``download``: where the runs find CIFAR-10 (``data_dir`` as seen where they run).
- ``device``: a device name (``"auto"``, ``"cuda"``, ``"cpu"``...), resolved where the runs
  execute; ``runtime``: a preset name, a dict of overrides, or ``None`` (see
  :func:`fit.resolve_runtime`). Both are plain JSON data, as are configs (``to_dict``) and records.
- ``on_record(record)``: called once per finished run, in the thread that called ``run``, as
  each run finishes (in the order they finish). The record is :func:`run.run_one`'s return value,
  plain JSON data. If ``on_record`` raises, the runner stops as on an interruption and lets the
  exception through.
- Interrupted runs (a folder with ``checkpoint.pt`` and no record) continue from their
  checkpoints (``run_one(..., resume=True)``): a grid resumes by running the same list again.
- A run that fails (diverges, a refused folder) does not stop the others: once every run has
  finished or failed, ``run`` raises :class:`RunsFailed` naming each failed run.
- ``KeyboardInterrupt`` / ``SystemExit`` in the calling thread stop the runner: no new run starts,
  the running ones stop with their last complete epoch in their checkpoints, the finished ones
  are kept, and the exception goes on to the caller.
- Errors that concern every run (no such device, the dataset missing) are raised before any run
  starts, as they are (``ValueError``, ``data.DatasetError``...).

:func:`make_runner` builds a runner by name (``train``'s ``--runner`` option). What runners do alike
with their runs (units of one run or a stack, datasets loaded once, a CUDA stream per unit) is
:mod:`normstudy.runners.units`; ``base`` holds the failure report and run folders as bytes. Inside
the package: ``base`` and ``units`` first, then ``local``, ``ray_worker`` and ``ray``, each
importing only from those before it.
"""
from .base import RunsFailed, failure_line, pack_run_folder, unpack_run_folder  # noqa: F401

RUNNERS = ("local", "ray")


def make_runner(name="local", *, concurrency=None, address=None, log=None, stack=1):
    """The runner called ``name``: ``"local"`` (:class:`~normstudy.runners.local.LocalRunner`, in this
    process; ``concurrency`` runs at once, default 1) or ``"ray"`` (:class:`~normstudy.runners.ray.RayRunner`,
    Ray actors on this machine or a cluster; ``concurrency`` is then the runs each worker trains at
    once, default 2 on a GPU and 1 on CPUs). ``stack``: runs trained as one model (an int or
    ``"auto"``, see :mod:`normstudy.stack`; ``concurrency`` then counts stacks). ``log`` receives progress
    lines (local: one per epoch of each run; ray: the cluster and lost workers), or nothing.
    ``ValueError`` (one line) for an unknown or unavailable runner or an option it does not take."""
    if name == "local":
        if address is not None:
            raise ValueError("--address applies to --runner ray only")
        from .local import LocalRunner
        return LocalRunner(concurrency=1 if concurrency is None else concurrency, log=log, stack=stack)
    if name == "ray":
        from . import ray as ray_runner  # imports without Ray; RayRunner says how to install it
        try:
            return ray_runner.RayRunner(address=address, runs_per_worker=concurrency, stack=stack,
                                        log=log or (lambda line: None))
        except ray_runner.RayRunnerError as err:
            raise ValueError(str(err)) from None
    raise ValueError(f"unknown runner {name!r}; choose one of {', '.join(RUNNERS)}")
