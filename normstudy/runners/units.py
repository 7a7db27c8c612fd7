"""What every runner does with its runs, wherever they execute (this process or a Ray worker):

- **units**: what trains together, one run or a stack of runs that share a batch size and
  schedule (:func:`plan_units`; ``stack`` 1, K or ``"auto"``, see :mod:`normstudy.stack`);
- **datasets**: each kind of data the runs train on (CIFAR-10, synthetic, a holdout split) read
  once, moved to the device once and shared by every run and thread (:class:`Datasets`; each
  run's loaders then find it there: ``DeviceLoader``'s ``images.to(device)`` costs nothing);
- **training a unit** (:func:`run_unit`): :func:`run.run_one` for one run,
  :func:`stack.train_stack` for a stack; one outcome per run (its record, or why it failed);
- **streams** (:func:`own_stream`): on CUDA a unit that shares the GPU with others trains on a
  stream of its own, so that small runs that leave the GPU idle between launches overlap.

What a run computes does not depend on any of this (see :mod:`normstudy.runners.local`).
"""
import contextlib
import threading
import traceback
from pathlib import Path

import torch

from .. import run as run_lib
from ..runtime import DEVICE_LOCK
from .base import failure_line


class Stopped(BaseException):
    """Raised by a runner's ``epoch_hook`` at an epoch boundary once it is told to stop: it goes
    through :func:`run_unit` (it is no failure of the run). A ``BaseException``, as
    ``KeyboardInterrupt`` is: the handlers that turn a run's errors into its failure (``except
    Exception``, in :mod:`normstudy.stack` too) must not catch it, or a run finished just before
    the stop would be reported as failed."""


def data_key(config):
    """Runs with equal keys train on the same dataset."""
    return config.data, config.holdout


class Datasets(dict):
    """``{data_key: dataset on device}``, each loaded once (:func:`run.load_data`) when first asked
    for (:meth:`of`, safe from any thread) or all at once (:meth:`load`). With ``shared_folder``
    (several processes of a machine reading one ``data_dir``: Ray workers), CIFAR-10 is read
    holding a lock file in ``data_dir``, so that one process downloads and the others wait."""

    def __init__(self, *, data_dir="./data", download=True, device, shared_folder=False):
        super().__init__()
        self.data_dir, self.download, self.shared_folder = data_dir, download, shared_folder
        self.device = torch.device(device)
        self._lock = threading.Lock()

    def of(self, config):
        """The dataset ``config`` trains on, on the device."""
        key = data_key(config)
        with self._lock:
            if key not in self:
                with file_lock(Path(self.data_dir) / ".normstudy-data.lock",
                               enabled=self.shared_folder and config.data == "cifar10"):
                    dataset = run_lib.load_data(config, data_dir=self.data_dir, download=self.download)
                # A copy from the CPU and a device-wide synchronization invalidate a CUDA graph that
                # another thread is recording (seen on the H200: a grid started beside another
                # grid's runs failed here, and so did the run that was recording): alone.
                with DEVICE_LOCK.alone():
                    self[key] = {name: value.to(self.device) if torch.is_tensor(value) else value
                                 for name, value in dataset.items()}
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)  # the copies are done before other streams read them
            return self[key]

    def load(self, configs):
        """Every dataset ``configs`` train on (a missing one is raised here, before any run starts)."""
        for config in configs:
            self.of(config)
        return self


def check_stack(stack):
    """``ValueError`` (one line) unless ``stack`` is a stack size a runner takes: a whole number >= 1
    or ``"auto"``."""
    if stack != "auto" and (isinstance(stack, bool) or not isinstance(stack, int) or stack < 1):
        raise ValueError(f"stack={stack!r} must be a whole number >= 1 or auto")


def plan_units(configs, stack, *, device, datasets):
    """What trains together: one run each (``stack=1``), or stacks of up to ``stack`` runs
    (:func:`stack.plan_stacks`: runs of one norm a stack; ``"auto"``: :func:`stack.plan_auto`, on
    CUDA only, with :func:`stack.auto_size` for ``device`` and the runs' data in ``datasets``, a
    mapping by :func:`data_key`)."""
    if stack == 1:
        return [[config] for config in configs]
    from .. import stack as stack_lib
    if stack != "auto":
        return stack_lib.plan_stacks(configs, stack)
    if torch.device(device).type != "cuda":  # a CPU is busy with one model already
        return [[config] for config in configs]

    def largest(config):
        return stack_lib.auto_size(config, device=device, train_images=datasets[data_key(config)]["train_images"])
    return stack_lib.plan_auto(configs, largest=largest)


def describe(units, *, at_once):
    """One line saying how ``units`` train, ``at_once`` units at a time: ``"81 runs as 27 stacks of
    3; 27 stacks at once (up to 81 runs)"``. Said at a grid's start: with stacks, ``concurrency`` counts
    stacks, not runs (a session once asked for 27 at once meaning runs and got 81)."""
    runs = sum(len(unit) for unit in units)
    stacks = [len(unit) for unit in units if len(unit) > 1]
    singles = len(units) - len(stacks)
    parts = []
    if stacks:
        sizes = f"{min(stacks)}" if min(stacks) == max(stacks) else f"{min(stacks)}-{max(stacks)}"
        parts.append(f"{len(stacks)} stack{'s' * (len(stacks) != 1)} of {sizes}")
    if singles:
        parts.append(f"{singles} single run{'s' * (singles != 1)}")
    at_once = min(at_once, len(units))
    most = sum(sorted((len(unit) for unit in units), reverse=True)[:at_once])
    what = "unit" if stacks and singles else "stack" if stacks else "run"
    return (f"{runs} run{'s' * (runs != 1)} as {' and '.join(parts)}; {at_once} {what}{'s' * (at_once != 1)} "
            f"at once (up to {most} run{'s' * (most != 1)})")


def run_unit(unit, out, *, dataset, device, runtime, figures=True, log=None, epoch_hook=None):
    """Train ``unit`` (a list of configs: one run, or a stack) into ``out`` on ``dataset``,
    resuming what was interrupted; ``[(config, record or exception)]`` in the unit's order (a
    failed run does not stop the others). ``log`` receives one line per epoch of each run
    (prefixed with its run id), or nothing; ``epoch_hook()`` is called after each, and may raise
    :class:`Stopped`, which goes through, as does ``KeyboardInterrupt``."""
    def say(line, prefix=""):
        if log is not None:
            log(f"{prefix}{line}")
        if epoch_hook is not None:
            epoch_hook()
    if len(unit) > 1:
        from .. import stack as stack_lib
        outcomes = stack_lib.train_stack(unit, out, dataset=dataset, device=device, runtime=runtime, resume=True,
                                         figures=figures, log=say)
        note_failures(outcomes, out)
        return outcomes
    config = unit[0]
    try:
        outcomes = [(config, run_lib.run_one(config, out, dataset=dataset, device=device, runtime=runtime,
                                             resume=True, figures=figures, progress=False,
                                             log=lambda line: say(line, prefix=f"{config.run_id}: ")))]
    except Stopped:
        raise
    except Exception as err:  # noqa: BLE001 - one failed run must not stop the grid
        outcomes = [(config, err)]
    note_failures(outcomes, out)
    return outcomes


def note_failures(outcomes, out):
    """Each failed run's reason in its folder (:func:`run.note_failure`), where the runner's own
    report may never come (a grid killed before its end). Not for a run another command holds
    (no failure) or a folder that belongs to another configuration (not this run's to write in)."""
    for config, outcome in outcomes:
        if isinstance(outcome, Exception) and not isinstance(outcome, run_lib.RunFolderError):
            run_lib.note_failure(Path(out) / config.run_id, reason=failure_line(outcome),
                                 details="".join(traceback.format_exception(outcome)))


@contextlib.contextmanager
def own_stream(device):
    """On CUDA, the calling thread's work on a stream of its own (waiting for what the thread's
    current stream has queued, and done when this ends), so that units in threads overlap."""
    if torch.device(device).type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


@contextlib.contextmanager
def file_lock(path, *, enabled=True):
    """Hold an exclusive lock on ``path`` (processes of one machine sharing a data folder: one
    downloads, the others wait); nothing where the folder cannot take a lock file, or where
    ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        enabled = False
    if not enabled:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
