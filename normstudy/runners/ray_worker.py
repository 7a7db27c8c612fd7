"""A Ray worker: one actor process that trains units (one run, or a stack of runs) for the Ray
runner's driver (:mod:`normstudy.runners.ray`). Ray is never imported here: the driver makes the
actor (``ray.remote(Worker)``), and Ray restarts it when its process dies (the driver then sends
its units elsewhere, see the driver's module docstring).

Each call of :meth:`Worker.run` trains one unit, as the local runner does
(:func:`~normstudy.runners.units.run_unit`), in its own thread (the actor's ``max_concurrency``)
and on CUDA on a stream of its own. A worker loads each dataset once (on its device; a missing
one is raised by :meth:`Worker.ready`, before any run starts) and keeps its compiled Triton kernels
in memory for all its runs; its Triton and Inductor caches live in a folder of its own
(``$TMPDIR/normstudy-ray-<user>/worker-<i>/``, held under a file lock and found warm by later
workers), since concurrent writers to one cache are a known source of errors.

Nodes share no filesystem: a unit's interrupted run folders come with the call (as bytes), the
runs continue in a scratch folder of the worker, and the finished folders go back as bytes
(:func:`~normstudy.runners.base.pack_run_folder`, checkpoint included).
"""
import getpass
import os
import shutil
import socket
import tempfile
from pathlib import Path

from .. import runtime as runtime_lib
from ..config import RunConfig
from . import units as units_lib
from .base import failure_line, pack_run_folder, unpack_run_folder


class Worker:
    """A Ray actor that trains several units at once, each call in its own thread (and CUDA
    stream). ``device``: ``"cuda"`` (the GPU Ray gave it) or ``"cpu"`` with ``threads`` torch
    threads; ``data_dir``, ``download``: where its runs find CIFAR-10, as on the driver;
    ``concurrency``: units at once (more than 8 on a GPU ask CUDA for more hardware queues,
    :func:`runtime.ask_for_queues`)."""

    def __init__(self, *, device, threads=None, data_dir, download, concurrency=1):
        if device == "cuda":  # before CUDA starts in this process, as the local runner does
            runtime_lib.ask_for_queues(concurrency)
        self.cache_dir, self._cache_lock_file = _claim_cache_dir()
        os.environ["TRITON_CACHE_DIR"] = str(self.cache_dir / "triton")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.cache_dir / "inductor")
        import torch
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.scratch = self.cache_dir / "runs"
        shutil.rmtree(self.scratch, ignore_errors=True)  # what a dead worker of this folder left
        self.scratch.mkdir(parents=True)
        self.datasets = units_lib.Datasets(data_dir=data_dir, download=download, device=device, shared_folder=True)
        self._running = {}  # run id -> its folder, for snapshot()

    def ready(self, *, configs, plan=None):
        """Load the datasets of ``configs`` (``RunConfig.to_dict()``s; a missing one raises here,
        before any run starts); return where this worker runs and, with ``plan`` (``(configs,
        stack)``), the units they make here (:func:`units.plan_units`, as run ids)."""
        import torch
        self.datasets.load([RunConfig.from_dict(config) for config in configs])
        name = torch.cuda.get_device_name(0) if self.device == "cuda" else "cpu"
        info = {"host": socket.gethostname(), "pid": os.getpid(), "device": name, "cache_dir": str(self.cache_dir)}
        if plan is not None:
            configs, stack = [RunConfig.from_dict(config) for config in plan[0]], plan[1]
            self.datasets.load(configs)
            info["units"] = [[config.run_id for config in unit] for unit in units_lib.plan_units(
                configs, stack, device=self.device, datasets=self.datasets)]
        return info

    def run(self, unit, *, files, runtime):
        """Train ``unit`` (``RunConfig.to_dict()``s; ``files``: ``{run id: folder files}`` of its
        interrupted runs, to continue) in a scratch folder; return one result per run, in order:
        ``{"id", "files"}`` (the finished folder) or ``{"id", "failed"}`` (one line why)."""
        configs = [RunConfig.from_dict(config) for config in unit]
        dataset = self.datasets.of(configs[0])
        scratch = Path(tempfile.mkdtemp(prefix=f"{configs[0].run_id}.", dir=self.scratch))
        for run_id, folder in files.items():
            unpack_run_folder(folder, scratch / run_id)
        for config in configs:
            self._running[config.run_id] = scratch / config.run_id
        try:
            with units_lib.own_stream(self.device):
                outcomes = units_lib.run_unit(configs, scratch, dataset=dataset, device=self.device,
                                              runtime=runtime, log=lambda line: print(line, flush=True))
            return [{"id": config.run_id, "failed": failure_line(outcome)} if isinstance(outcome, BaseException)
                    else {"id": config.run_id, "files": pack_run_folder(scratch / config.run_id)}
                    for config, outcome in outcomes]
        finally:
            for config in configs:
                self._running.pop(config.run_id, None)
            shutil.rmtree(scratch, ignore_errors=True)

    def snapshot(self, run_ids):
        """``{run id: files}`` of the running runs' folders now (their checkpoints: the last
        complete epoch); a run whose folder is gone (finished meanwhile) is left out."""
        snapshots = {}
        for run_id in run_ids:
            run_dir = self._running.get(run_id)
            try:
                if run_dir is not None:
                    snapshots[run_id] = pack_run_folder(run_dir)
            except OSError:  # it finished and its folder went meanwhile
                pass
        return snapshots


def _claim_cache_dir():
    """The first ``$TMPDIR/normstudy-ray-<user>/worker-<i>`` no live worker holds (its ``.lock``
    is held until this process ends), so each worker has caches of its own and later workers
    find them warm."""
    import fcntl
    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid())
    base = Path(tempfile.gettempdir()) / f"normstudy-ray-{user}"
    for index in range(10_000):
        folder = base / f"worker-{index}"
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".lock", "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        return folder, lock
    raise RuntimeError(f"no free cache folder under {base}")
