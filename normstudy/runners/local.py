"""Runs in this process: one after another, or ``concurrency`` at a time in threads.

The dataset is read once per kind of data in the list (CIFAR-10, synthetic, a holdout split),
moved to the device once and shared by every run (:class:`~normstudy.runners.units.Datasets`).
Runs write straight into ``out``.

With ``concurrency > 1`` each run trains in a thread of its own, on CUDA under a CUDA stream of its
own (``torch.cuda.stream``), so that small runs that leave the GPU idle between launches overlap.
What a run computes does not depend on it: model building holds ``models.GLOBAL_RNG_LOCK``, and
everything else a run draws at random comes from its own generator. (Dropout draws from the global
generator unguarded: with a dropout above 0 concurrent runs are not reproducible; the recipe's
dropout is 0.) How well runs overlap on a GPU is a matter of tuning, not of this module.

With ``stack`` (an int, or ``"auto"``), runs that share a batch size and schedule train as stacks
of up to that many runs, each stack one model (:mod:`normstudy.stack`); ``concurrency`` then
counts stacks at once. Stacks hold runs of one norm (faster than mixed ones). ``"auto"`` stacks on
CUDA only, where it paid on the H200 (:func:`stack.plan_auto`: groups of at least
``stack.AUTO_MIN_RUNS`` runs of one norm, and threes at the smallest batches; elsewhere small
stacks lose to single runs on streams); 1 is one run at a time, as before stacks existed. What
trains together, and how, is :mod:`normstudy.runners.units` (the Ray workers train the same units).

Stopping (Ctrl-C, SIGTERM) with ``concurrency=1`` interrupts the run at once, as ``train.py``
does: its last complete epoch is in its checkpoint. With threads, the running runs stop at the
end of their current epoch, its checkpoint written (a second Ctrl-C quits without waiting: the
command ends its process at once, see :mod:`normstudy.stopping`; called in-process, the threads
are daemons and die with the process).

A run whose folder another process holds (a second command into the same ``out``) is not a
failure: it goes to the back of the queue and is tried again, once a second, after the others;
when its holder has finished it, its record is delivered as any finished run's.
"""
import collections
import queue
import threading
import time

import torch

from .. import run as run_lib
from .. import runtime as runtime_lib
from . import units as units_lib
from .base import RunsFailed, failure_line
from .units import Stopped

BUSY_POLL_SECONDS = 1.0  # how often a run whose folder another process holds is tried again


class _Todo:
    """The units left to start (lists of configs: one run, or a stack), in order, for any number of
    threads. A run whose folder another process holds (:meth:`busy`) goes to the back, alone,
    behind every unit not tried yet, and is tried again after a pause (its holder may have
    finished it meanwhile); ``log`` hears of it once."""

    def __init__(self, units, log):
        self._left = collections.deque(units)
        self._busy = set()
        self._lock = threading.Lock()
        self._log = log

    def take(self, pause=time.sleep):
        """The next unit, or ``None`` when none is left; ``pause(seconds)`` before a busy run."""
        with self._lock:
            if not self._left:
                return None
            unit = self._left.popleft()
        if unit[0].run_id in self._busy:
            pause(BUSY_POLL_SECONDS)
        return unit

    def busy(self, config, err):
        with self._lock:
            self._left.append([config])
            first = config.run_id not in self._busy
            self._busy.add(config.run_id)
        if first and self._log is not None:
            self._log(f"{config.run_id}: in use by {err.holder}, another command that trains it; waiting for "
                      "it to finish, after the other runs")


def _quietly(on_record):
    """``on_record`` for the runs that finish while the runner stops: their records still reach
    the caller (its summary), an error there no longer matters."""
    def deliver(record):
        try:
            on_record(record)
        except Exception:  # noqa: BLE001
            pass
    return deliver


class LocalRunner:
    """Runs in this process, ``concurrency`` at a time (see the module docstring). ``log``
    receives one line per epoch of each run (prefixed with its run id), or nothing when ``None``.
    ``figures``: each run's ``curves.png`` and ``misclassified.png``."""

    def __init__(self, concurrency=1, *, log=None, figures=True, stack=1):
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency={concurrency!r} must be a whole number >= 1")
        units_lib.check_stack(stack)
        self.concurrency = concurrency
        self.stack = stack
        self.log = log
        self.figures = figures

    def run(self, configs, *, out, data_dir="./data", download=True, device="auto", runtime=None, on_record):
        """Run ``configs`` into ``out``; ``on_record(record)`` in this thread as each finishes
        (the interface is in :mod:`normstudy.runners`)."""
        configs = list(configs)
        if not configs:
            return
        runtime_lib.ask_for_queues(self.concurrency)  # before the data goes to the GPU and CUDA starts
        device = runtime_lib.pick_device(device) if isinstance(device, str) else torch.device(device)
        datasets = self._load_datasets(configs, data_dir=data_dir, download=download, device=device)
        options = dict(out=out, datasets=datasets, device=device, runtime=runtime)
        units = self._units(configs, datasets=datasets, device=device)
        if self.log is not None and len(units) < len(configs):
            self.log(units_lib.describe(units, at_once=self.concurrency))
        if self.concurrency == 1 or len(units) == 1:
            failures = self._run_in_turn(units, on_record=on_record, **options)
        else:
            failures = self._run_in_threads(units, on_record=on_record, **options)
        if failures:
            raise RunsFailed(failures)

    # --- the pieces ---------------------------------------------------------------------------

    def _load_datasets(self, configs, *, data_dir, download, device):
        """One dataset per kind of data among ``configs``, on ``device`` (by :func:`units.data_key`)."""
        return units_lib.Datasets(data_dir=data_dir, download=download, device=device).load(configs)

    def _units(self, configs, *, datasets, device):
        """What trains together: one run each (``stack=1``) or stacks (:func:`units.plan_units`)."""
        return units_lib.plan_units(configs, self.stack, device=device, datasets=datasets)

    def _run_unit(self, unit, *, out, datasets, device, runtime, epoch_hook=None):
        """Train ``unit`` (:func:`units.run_unit`): ``[(config, record or exception)]``."""
        return units_lib.run_unit(unit, out, dataset=datasets[units_lib.data_key(unit[0])], device=device,
                                  runtime=runtime, figures=self.figures, log=self.log, epoch_hook=epoch_hook)

    def _run_in_turn(self, units, *, on_record, **options):
        failures = {}
        todo = _Todo(units, self.log)
        while (unit := todo.take()) is not None:
            for config, outcome in self._run_unit(unit, **options):
                if isinstance(outcome, run_lib.RunFolderBusy):
                    todo.busy(config, outcome)
                elif isinstance(outcome, BaseException):
                    failures[config.run_id] = failure_line(outcome)
                else:
                    on_record(outcome)
        return failures

    def _run_in_threads(self, units, *, on_record, device, **options):
        todo = _Todo(units, self.log)
        results = queue.SimpleQueue()  # (kind, config, payload); kind "done" once per worker
        stop = threading.Event()

        def check_stop():
            if stop.is_set():
                raise Stopped

        def worker():
            try:
                while not stop.is_set():
                    unit = todo.take(pause=stop.wait)
                    if unit is None or stop.is_set():
                        return
                    try:
                        with units_lib.own_stream(device):
                            outcomes = self._run_unit(unit, device=device, epoch_hook=check_stop, **options)
                    except Stopped:
                        continue
                    except BaseException as err:  # noqa: BLE001 - reported to the driver thread
                        for config in unit:
                            results.put(("failed", config, err))
                        continue
                    for config, outcome in outcomes:
                        if isinstance(outcome, run_lib.RunFolderBusy):
                            todo.busy(config, outcome)
                        else:
                            results.put(("failed" if isinstance(outcome, BaseException) else "record", config,
                                         outcome))
            finally:
                results.put(("done", None, None))

        workers = [threading.Thread(target=worker, name=f"normstudy-run-{k}", daemon=True)
                   for k in range(min(self.concurrency, len(units)))]
        failures, running = {}, len(workers)
        for thread in workers:
            thread.start()
        try:
            while running:
                running -= self._deliver(results, failures, on_record)
        except BaseException:
            stop.set()  # no new run starts; running ones stop after their current epoch
            if self.log is not None:
                self.log("stopping: the running runs end with their current epoch (Ctrl-C again to quit now)")
            while running:  # a second Ctrl-C leaves this loop; the daemon threads die with the process
                running -= self._deliver(results, failures, _quietly(on_record))
            raise
        finally:
            if not running:
                for thread in workers:
                    thread.join()
        return failures

    @staticmethod
    def _deliver(results, failures, on_record):
        """Handle one message of a worker (waiting for it); returns 1 when a worker has ended."""
        while True:
            try:
                kind, config, payload = results.get(timeout=0.2)  # a timeout keeps Ctrl-C responsive
                break
            except queue.Empty:
                continue
        if kind == "done":
            return 1
        if kind == "failed":
            failures[config.run_id] = failure_line(payload)
        else:
            on_record(payload)
        return 0
