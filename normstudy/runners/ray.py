"""The Ray runner: a grid's runs on long-lived Ray actors, on this machine or on a cluster.

    runner = RayRunner()                  # an embedded Ray on this machine, stopped at the end
    runner = RayRunner(address="auto")    # join the cluster that `ray start` runs here
    runner.run(configs, out="results", on_record=print)

**Workers.** One actor per GPU of the cluster (``num_gpus=1, num_cpus=0`` each). On a cluster
without GPUs (or with ``device="cpu"``) one actor per ``cpus_per_worker`` CPUs of a node
(default 2: the CNN trains best on a few threads per process, and processes share no GIL).
``workers=N`` asks for N (at most as many as fit). Each worker is a threaded actor that trains ``runs_per_worker`` runs at
once (default: 2 on a GPU, where one small run leaves the GPU partly idle; 1 on CPUs, which
one run keeps busy), each call in its own thread and, on CUDA, on its own stream. A worker
loads each dataset once (cached by ``(data, holdout, data_dir)``) and keeps its compiled Triton
kernels in memory for all its runs; its Triton and Inductor caches live in a folder of its own
(``$TMPDIR/normstudy-ray-<user>/worker-<i>/``, held under a file lock and reused by later
workers), since concurrent writers to one cache are a known source of errors.

**Results.** A worker trains into a scratch folder of its own and returns the record and the
run's files as bytes (nodes share no filesystem); the driver writes them into ``out/<run id>/``
atomically, ``record.json`` last (a run is finished when it has one), then calls
``on_record(record)``. So ``out`` looks as the local runner leaves it, and a grid stopped midway
continues on either runner. ``checkpoint.pt`` does not travel: it only serves to continue an
interrupted run, a finished run is never continued, and a run cut off on a worker starts over
(one left in ``out`` by an interrupted local run is removed when the run finishes here).

**Faults.** A worker that dies (killed process, lost node) is replaced; its unfinished runs go
back to the queue and run on another worker, up to ``max_attempts`` times each. A run id is
written and reported at most once. An exception raised by a run itself (a diverged run, a bad
folder) is raised here, as the local runner would.

Ray is optional (``requirements-ray.txt``) and imported only when a runner is made, so this
module imports without it; :class:`RayUnavailableError` then says in one line how to install it.
"""
import collections
import contextlib
import functools
import getpass
import logging
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

from .. import checkpoints
from .. import run as run_lib
from ..config import RunConfig

INSTALL_HINT = "pip install -r requirements-ray.txt"
# What a worker sends back, in the order the driver writes it: record.json last (finished).
RUN_FILES = ("config.json", "weights.pt", "curves.png", "misclassified.png", "record.json")
CPUS_PER_WORKER = 2
RUNS_PER_GPU_WORKER = 2
STALL_SECONDS = 60  # no worker started and nothing finished for this long: say so (once)
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # normstudy/, shipped to the cluster's workers


class RayRunnerError(RuntimeError):
    """The Ray runner cannot go on: one line for the user (the CLI prints it and exits)."""


class RayUnavailableError(RayRunnerError):
    """Ray is not installed, or no cluster answers at the given address (CLI: exit 2)."""


def import_ray():
    """``ray``, or :class:`RayUnavailableError` saying in one line how to install it."""
    try:
        import ray
    except ImportError:
        raise RayUnavailableError(f"the ray runner needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def init_ray(address=None, **kwargs):
    """Connect to Ray unless connected already: to the cluster at ``address`` (``"auto"``: the one
    ``ray start`` runs on this machine) or, with none, an embedded Ray on this machine. The
    package travels to every worker (``runtime_env.py_modules``), so nodes need only its
    requirements. ``kwargs`` go to ``ray.init`` (e.g. ``num_cpus`` for an embedded Ray).
    Returns True if this call connected (and so should ``ray.shutdown()``), False if Ray was
    connected already. Raises :class:`RayUnavailableError` if no cluster answers."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    runtime_env = kwargs.pop("runtime_env", None) or {}
    runtime_env = {**runtime_env, "py_modules": [*runtime_env.get("py_modules", []), str(PACKAGE_DIR)],
                   "excludes": [*runtime_env.get("excludes", []), "__pycache__", "*.pyc"]}
    options = dict(log_to_driver=False, logging_level=logging.WARNING, runtime_env=runtime_env)
    if address is None:
        options["include_dashboard"] = False
    try:
        ray.init(address=address, **{**options, **kwargs})
    except (ConnectionError, TimeoutError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RayUnavailableError(f"ray: no Ray cluster at address {address!r} ({first}); start one with "
                                  "`ray start --head`, or leave out --address for a Ray on this machine only") from None
    return True


class RayRunner:
    """Run configs on Ray actors (see the module docstring).

    ``address``: ``None`` starts an embedded Ray on this machine (stopped when :meth:`run`
    returns); ``"auto"`` or ``"HOST:PORT"`` joins a running cluster. If Ray is connected already
    (``ray.init`` called by the program), that connection is used and left open.
    ``workers``: how many actors (default: one per GPU; without GPUs one per ``cpus_per_worker``
    CPUs). ``runs_per_worker``: runs a worker trains at once (default 2 on a GPU, 1 on CPUs).
    ``cpus_per_worker``: CPUs (torch threads) per CPU worker (default 2, or CPUs / ``workers``).
    ``max_attempts``: how often a run is started before a lost worker fails the grid.
    ``log``: receives the runner's few lines (the cluster at the start, lost workers).
    """

    def __init__(self, address=None, *, workers=None, runs_per_worker=None, cpus_per_worker=None, max_attempts=3,
                 log=print, init_kwargs=None):
        import_ray()  # fail now, in one line, if Ray is missing
        for name, value in (("workers", workers), ("runs_per_worker", runs_per_worker),
                            ("cpus_per_worker", cpus_per_worker), ("max_attempts", max_attempts)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a whole number >= 1")
        self.address = address
        self.workers = workers
        self.runs_per_worker = runs_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.max_attempts = max_attempts
        self.log = log
        self.init_kwargs = dict(init_kwargs or {})
        self.retries = 0  # runs started again after their worker was lost, over all calls of run()
        self._pool = None

    @property
    def actors(self):
        """Handles of the live workers while :meth:`run` runs (for tests and monitoring)."""
        return [worker.actor for worker in self._pool.live()] if self._pool else []

    def run(self, configs, *, out, data_dir="./data", download=True, device="auto", runtime=None, on_record=None):
        """Train each config into ``out/<run id>/`` on the workers; call ``on_record(record)`` here,
        in the calling thread, as each finishes. A config whose folder holds a finished run is
        not trained again (its record is reported as it is). Returns the records in the order
        of ``configs``."""
        ray = import_ray()
        on_record = on_record or (lambda record: None)
        out = Path(out)
        unique = list({config.run_id: config for config in configs}.values())
        records, pending = {}, []
        for config in unique:
            run_dir = out / config.run_id
            record = run_lib.read_record(run_dir)
            if record is not None:
                if RunConfig.from_dict(record["config"]) != config:
                    raise run_lib.RunFolderError(f"{run_dir} holds another configuration; use another --out")
                records[config.run_id] = record
                on_record(record)
                continue
            run_lib.claim_folder(run_dir, config)
            with run_lib.folder_lock(run_dir):  # refuse now a folder another process trains in
                pass
            pending.append(config)
        if pending:
            started = init_ray(self.address, **self.init_kwargs)
            try:
                self._pool = _Pool(ray, self, device=device)
                self._schedule(ray, pending, out=out, records=records, on_record=on_record,
                               call=dict(data_dir=str(Path(data_dir).expanduser().resolve()), download=download,
                                         runtime=runtime))
            finally:
                if self._pool is not None:
                    self._pool.close()
                    self._pool = None
                if started:
                    ray.shutdown()
        return [records[config.run_id] for config in unique]

    def _schedule(self, ray, pending, *, out, records, on_record, call):
        pool = self._pool
        queue = collections.deque((config, 1) for config in pending)
        in_flight = {}  # object ref -> (worker, config, attempt)
        stalled = False

        def dispatch():  # fill every ready worker's free slots from the queue
            for worker in pool.ready():
                while queue and worker.running < pool.runs_per_worker:
                    config, attempt = queue.popleft()
                    ref = worker.actor.run.remote(config.to_dict(), device=pool.device, **call)
                    in_flight[ref] = (worker, config, attempt)
                    worker.running += 1

        while queue or in_flight:
            dispatch()
            waiting = list(in_flight) + pool.starting_refs()
            if not waiting:
                raise RayRunnerError("ray: no worker left to run on")  # not reached: lost workers are replaced
            done, _ = ray.wait(waiting, num_returns=1, timeout=STALL_SECONDS)
            if not done:
                if not in_flight and not stalled:  # say once why nothing happens
                    self.log(f"ray: waiting for {len(pool.starting_refs())} worker(s) to start: the cluster has "
                             "no free resources for them (see `ray status`)")
                stalled = True
                continue
            [ref], stalled = done, False
            if ref not in in_flight:
                pool.started(ref)
                continue
            worker, config, attempt = in_flight.pop(ref)
            worker.running -= 1
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as err:  # the run itself raised: as the local runner would
                cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
                if cause is not err and hasattr(cause, "add_note"):
                    cause.add_note(f"raised in a Ray worker:\n{err}")
                raise cause from None
            except ray.exceptions.RayError as err:  # the worker (or its node) is lost: run it again elsewhere
                pool.lost(worker, err)
                if attempt >= self.max_attempts:
                    raise RayRunnerError(f"ray: {config.run_id} lost its worker {attempt} times (last: "
                                         f"{_one_line(err)}); see the Ray logs (/tmp/ray/session_latest/logs)") from None
                self.retries += 1
                self.log(f"ray: {config.run_id} goes back to the queue (attempt {attempt + 1} of {self.max_attempts})")
                queue.appendleft((config, attempt + 1))
                continue
            if config.run_id in records:  # never written or reported twice
                continue
            pool.succeeded()
            dispatch()  # the worker's next run starts while its last one is written and reported
            record = result["record"]
            if record.get("id") != config.run_id:
                raise RayRunnerError(f"ray: a worker returned {record.get('id')!r} for {config.run_id}")
            write_run_files(out / config.run_id, result["files"])
            records[config.run_id] = record
            on_record(record)


def write_run_files(run_dir, files):
    """Write a run's files (name -> bytes) into ``run_dir``, each atomically, ``record.json``
    last; a ``checkpoint.pt`` left there by an interrupted attempt goes before it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(files) - set(RUN_FILES)
    if unknown or "record.json" not in files:
        raise RayRunnerError(f"ray: a worker returned the files {sorted(files)} for {run_dir.name}")
    with run_lib.folder_lock(run_dir):
        for name in RUN_FILES[:-1]:
            if name in files:
                checkpoints.atomic_write(run_dir / name, lambda f, data=files[name]: f.write(data))
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
        checkpoints.atomic_write(run_dir / "record.json", lambda f: f.write(files["record.json"]))


def _one_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --- the workers, as the driver sees them ---------------------------------------------------------

class _Handle:
    def __init__(self, index, actor):
        self.index, self.actor = index, actor
        self.ready_ref = actor.ready.remote()
        self.state = "starting"  # -> "ready" -> "dead"
        self.running = 0


class _Pool:
    """The workers: started, replaced when lost, killed at the end."""

    def __init__(self, ray, runner, *, device):
        self.ray, self.runner = ray, runner
        if device not in ("auto", "cpu") and not str(device).startswith("cuda"):
            raise RayRunnerError(f"ray: device {device!r}: the ray runner trains on cuda or cpu (try auto)")
        # Workers are sized per node: an actor's CPUs or GPU must all be on one node.
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        node_gpus = [int(resources.get("GPU", 0)) for resources in nodes]
        node_cpus = [int(resources.get("CPU", 0)) for resources in nodes]
        gpus, cpus = sum(node_gpus), sum(node_cpus)
        use_gpus = str(device).startswith("cuda") or (device == "auto" and gpus > 0)
        if use_gpus and not gpus:
            raise RayUnavailableError(f"ray: device {device!r} but the Ray cluster has no GPUs "
                                      "(start its nodes with --num-gpus, or use --device cpu)")
        if not use_gpus and not cpus:
            raise RayUnavailableError("ray: the Ray cluster has neither GPUs nor CPUs to run on")
        if use_gpus:
            fit = gpus
            self.options = dict(num_gpus=1, num_cpus=0)  # a GPU node with few CPUs still takes workers
            self.device = "cuda"
            self.runs_per_worker = runner.runs_per_worker or RUNS_PER_GPU_WORKER
            threads = None
        else:
            per = runner.cpus_per_worker or (max(1, cpus // runner.workers) if runner.workers else CPUS_PER_WORKER)
            per = min(per, max(node_cpus))
            fit = sum(n // per for n in node_cpus)
            self.options = dict(num_cpus=per, num_gpus=0)
            self.device = "cpu"
            self.runs_per_worker = runner.runs_per_worker or 1
            threads = per
        count = min(runner.workers or fit, fit)
        if runner.workers and runner.workers > fit:
            runner.log(f"ray: {runner.workers} workers asked for, {fit} fit in the cluster")
        kind = (f"GPUs: {count} of {gpus}, one per worker" if use_gpus else
                f"GPUs: {gpus} (CPU workers, {self.options['num_cpus']} CPU(s) each)")
        runner.log(f"ray: {count} worker(s) on {len(nodes)} node(s), {kind}, "
                   f"{self.runs_per_worker} run(s) at a time per worker")
        self.actor_class = ray.remote(_Worker).options(
            **self.options, max_concurrency=self.runs_per_worker, max_restarts=0, scheduling_strategy="SPREAD")
        self.worker_args = dict(device=self.device, threads=threads, runs_at_once=self.runs_per_worker)
        self.handles = []
        self.count = count
        self.failures_in_a_row = 0
        for index in range(count):
            self._start(index)

    def _start(self, index):
        handle = _Handle(index, self.actor_class.remote(**self.worker_args))
        self.handles.append(handle)
        return handle

    def live(self):
        return [h for h in self.handles if h.state != "dead"]

    def ready(self):
        return [h for h in self.handles if h.state == "ready"]

    def starting_refs(self):
        return [h.ready_ref for h in self.handles if h.state == "starting"]

    def started(self, ref):
        handle = next(h for h in self.handles if h.state == "starting" and h.ready_ref == ref)
        try:
            handle.info = self.ray.get(ref)
        except self.ray.exceptions.RayError as err:
            self.lost(handle, err)
            return
        handle.state = "ready"

    def succeeded(self):
        self.failures_in_a_row = 0

    def lost(self, handle, err):
        """``handle``'s worker died (or never started): replace it, unless workers keep dying."""
        if handle.state == "dead":
            return
        handle.state = "dead"
        with contextlib.suppress(Exception):
            self.ray.kill(handle.actor, no_restart=True)
        self.failures_in_a_row += 1
        if self.failures_in_a_row > self.count * self.runner.max_attempts:
            raise RayRunnerError(f"ray: {self.failures_in_a_row} workers lost in a row, none finished a run "
                                 f"(last: {_one_line(err)}); see the Ray logs (/tmp/ray/session_latest/logs)")
        self.runner.log(f"ray: worker {handle.index} lost ({_one_line(err)}); starting another")
        self._start(handle.index)

    def close(self):
        for handle in self.handles:
            if handle.state != "dead":
                with contextlib.suppress(Exception):
                    self.ray.kill(handle.actor, no_restart=True)
                handle.state = "dead"


# --- the worker: one actor process -----------------------------------------------------------------

class _Worker:
    """A Ray actor that trains runs, ``runs_at_once`` at a time, each in its own thread (and CUDA
    stream). Made with ``ray.remote(_Worker)`` by the driver; Ray is never imported here."""

    def __init__(self, *, device, threads=None, runs_at_once=1):
        self.cache_dir, self._cache_lock_file = _claim_cache_dir()
        os.environ["TRITON_CACHE_DIR"] = str(self.cache_dir / "triton")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.cache_dir / "inductor")
        import torch
        if threads:
            torch.set_num_threads(threads)
        if runs_at_once > 1:
            _make_runs_thread_safe()
        self.device = device
        self.scratch = self.cache_dir / "runs"
        shutil.rmtree(self.scratch, ignore_errors=True)  # what a dead worker of this folder left
        self.scratch.mkdir(parents=True)
        self._datasets = {}
        self._data_lock = threading.Lock()

    def ready(self):
        """Where this worker runs: host, process, device (the first call waits for start-up)."""
        import torch
        name = torch.cuda.get_device_name(0) if self.device == "cuda" else "cpu"
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": name, "cache_dir": str(self.cache_dir)}

    def dataset(self, config, data_dir, download):
        """The dataset of ``config``, loaded once per worker (one lock: loads never race)."""
        key = (config.data, config.holdout, data_dir)
        with self._data_lock:
            if key not in self._datasets:
                with _file_lock(Path(data_dir) / ".normstudy-data.lock", enabled=config.data == "cifar10"):
                    self._datasets[key] = run_lib.load_data(config, data_dir=data_dir, download=download)
            return self._datasets[key]

    def run(self, config, *, device, data_dir, download, runtime):
        """Train one run (a ``RunConfig.to_dict()``) in a scratch folder; return its record and
        its files as bytes (see ``RUN_FILES``)."""
        config = RunConfig.from_dict(config)
        dataset = self.dataset(config, data_dir, download)
        scratch = Path(tempfile.mkdtemp(prefix=f"{config.run_id}.", dir=self.scratch))
        try:
            with _own_stream(device):
                record = run_lib.run_one(config, scratch, dataset=dataset, data_dir=data_dir, download=download,
                                         device=device, runtime=runtime, progress=False,
                                         log=lambda line: print(f"{config.run_id}: {line}", flush=True))
            run_dir = scratch / config.run_id
            files = {name: (run_dir / name).read_bytes() for name in RUN_FILES if (run_dir / name).is_file()}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return {"record": record, "files": files}


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


@contextlib.contextmanager
def _file_lock(path, *, enabled=True):
    """Hold an exclusive lock on ``path`` (workers of one node share a data folder: one downloads,
    the others wait); nothing where the folder cannot take a lock file."""
    if not enabled:
        yield
        return
    import fcntl
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _own_stream(device):
    """On CUDA, the calling thread's work on a stream of its own, so runs overlap on the GPU."""
    if device != "cuda":
        yield
        return
    import torch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


_THREAD_SAFE = False


def _make_runs_thread_safe():
    """Make a worker process safe for several runs at once, in threads: the three places where
    :func:`run.run_one` relies on process-wide state get a lock.

    - Seeding and building a model (``models.fresh_model``, ``fit.seed_everything``) use torch's
      global random generator: one at a time, so each run's initialization follows its own seed.
    - The figures (``run.write_run_figures``) use pyplot, which is not thread-safe: one at a time.
    - CUDA graph capture (``torch.cuda.graph``, used by ``fast.steps``): one capture at a time, on
      a stream of its own, in ``thread_local`` error mode, so that the other runs' work on their
      own streams goes on while one run records its graph (the default ``global`` mode turns
      any allocation in another thread into an error).

    Only ever called inside a worker process, never in the driver. (Runs with ``dropout > 0``
    still share the global generator while they train: valid, but not the draws of a run alone.)
    """
    global _THREAD_SAFE
    if _THREAD_SAFE:
        return
    import torch
    from .. import fit, models
    seeding, figures = threading.RLock(), threading.Lock()
    models.fresh_model = _locked(models.fresh_model, seeding)
    fit.seed_everything = _locked(fit.seed_everything, seeding)
    run_lib.write_run_figures = _locked(run_lib.write_run_figures, figures)
    if torch.cuda.is_available():
        torch.cuda.graph = _one_capture_at_a_time(torch.cuda.graph)
    _THREAD_SAFE = True


def _locked(function, lock):
    @functools.wraps(function)
    def locked(*args, **kwargs):
        with lock:
            return function(*args, **kwargs)
    return locked


def _one_capture_at_a_time(graph_class):
    lock = threading.Lock()

    class graph(graph_class):
        def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="thread_local"):
            import torch
            super().__init__(cuda_graph, pool=pool, stream=stream if stream is not None else torch.cuda.Stream(),
                             capture_error_mode=capture_error_mode)

        def __enter__(self):
            lock.acquire()
            try:
                return super().__enter__()
            except BaseException:
                lock.release()
                raise

        def __exit__(self, *exc):
            try:
                return super().__exit__(*exc)
            finally:
                lock.release()

    graph.__qualname__ = graph.__name__ = "graph"
    return graph
