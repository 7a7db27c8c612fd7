"""The Ray runner's driver: a grid's runs on long-lived Ray actors, on this machine or on a cluster.

    runner = RayRunner()                  # an embedded Ray on this machine, stopped at the end
    runner = RayRunner(address="auto")    # join the cluster that `ray start` runs here
    runner.run(configs, out="results", on_record=print)

It keeps the runners' interface (:mod:`normstudy.runners`); this module connects to Ray, sizes
and starts the workers (:class:`~normstudy.runners.ray_worker.Worker`, which trains what it is
sent), schedules, stops and writes what comes back. What is particular to it:

**Workers.** One actor per GPU of the cluster (``num_gpus=1, num_cpus=0`` each). On a cluster
without GPUs (or with ``device="cpu"``) one actor per ``cpus_per_worker`` CPUs of a node
(default 2: the CNN trains best on a few threads per process, and processes share no GIL).
``workers=N`` asks for N (at most as many as fit). Each worker is a threaded actor that trains
``runs_per_worker`` units at once (default: 2 on a GPU, where one small run leaves the GPU partly
idle; 1 on CPUs, which one run keeps busy), each call in its own thread and, on CUDA, on its own
stream. A unit is what the local runner trains as one (:mod:`normstudy.runners.units`): one run,
or with ``stack`` K (or ``"auto"``) a stack of runs trained as one model, as one task on one
worker. A worker loads each dataset once, at its start (a missing dataset is raised there,
before any run starts); its caches are its own (see :mod:`normstudy.runners.ray_worker`).

**Run folders travel.** Nodes share no filesystem: a unit's interrupted run folders
(``config.json``, ``checkpoint.pt``) go to the worker, which continues them in a scratch folder
of its own; each finished folder comes back as bytes (:func:`~normstudy.runners.pack_run_folder`,
checkpoint included: ``out`` ends as the local runner leaves it) and is written into
``out/<run id>/`` atomically, ``record.json`` last, before ``on_record`` hears of it. A relative
``data_dir`` is taken from the driver's working directory; on other nodes the dataset is read (or
downloaded) at that same path.

**Faults.** A worker that dies (killed process, lost node) is restarted by Ray (the actor's
``max_restarts``, ``max_attempts`` times; on another node if its own is gone) and takes units
again once it answers; the units it was training go back to the queue and start again (from the
checkpoints they came with) on whichever worker is free first, up to ``max_attempts`` times each,
then count as failed. (Ray's own task retries would send them to the same, restarting worker, and
silently.) Once Ray has given every worker up the runner stops in one line. A run id is written
and reported at most once.

**Stopping.** On Ctrl-C (or an exception from ``on_record``) no new unit starts, each running
run's last complete epoch comes back from its worker as its checkpoint (at once: a worker writes
one after every epoch), and the exception goes on; a second Ctrl-C quits without waiting.

Ray is optional (``requirements-ray.txt``) and imported only when a runner is made, so this
module imports without it; :class:`RayUnavailableError` then says in one line how to install it.
"""
import collections
import contextlib
import logging
import os
import socket
from pathlib import Path

from .. import checkpoints
from .. import run as run_lib
from . import units as units_lib
from .base import RunsFailed, failure_line, pack_run_folder, unpack_run_folder
from .ray_worker import Worker

INSTALL_HINT = "pip install -r requirements-ray.txt"
CPUS_PER_WORKER = 2
RUNS_PER_GPU_WORKER = 2
STALL_SECONDS = 60  # no worker started and nothing finished for this long: say so (once)
STOP_SECONDS = 60  # on Ctrl-C, how long to wait for the running runs' checkpoints
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # normstudy/, shipped to the cluster's workers


class RayRunnerError(ValueError):
    """The Ray runner cannot go on: one line for the user (a ``ValueError``: the CLIs print it
    and exit 2)."""


class RayUnavailableError(RayRunnerError):
    """Ray is not installed, or no cluster answers at the given address, or it has no GPUs for
    ``device="cuda"``."""


def import_ray():
    """``ray``, or :class:`RayUnavailableError` saying in one line how to install it, or, when Ray is
    installed but fails to import (a missing or broken dependency), why."""
    try:
        import ray
    except ModuleNotFoundError as err:
        if err.name != "ray":  # one of Ray's own imports failed
            raise RayUnavailableError(_broken_ray(err)) from None
        raise RayUnavailableError(f"the ray runner needs Ray, which is not installed: {INSTALL_HINT}") from None
    except Exception as err:  # noqa: BLE001 - whatever Ray raises while it imports, one line
        raise RayUnavailableError(_broken_ray(err)) from None
    return ray


def _broken_ray(err):
    return (f"the ray runner could not import Ray, which is installed but failed ({type(err).__name__}: "
            f"{_one_line(err)}); reinstall it: {INSTALL_HINT}")


def init_ray(address=None, **kwargs):
    """Connect to Ray unless connected already: to the cluster at ``address`` (``"auto"``: the one
    ``ray start`` runs on this machine) or, with none, an embedded Ray on this machine. The
    package travels to every worker (``runtime_env.py_modules``), so nodes need only its
    requirements. ``kwargs`` go to ``ray.init`` (e.g. ``num_cpus`` for an embedded Ray).
    Returns True if this call connected (and so should ``ray.shutdown()``), False if Ray was
    connected already. Raises :class:`RayUnavailableError` if no cluster answers (an address that
    is not a Ray cluster's is refused even then: it is a mistake either way)."""
    ray = import_ray()
    _check_answers(address)
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
        raise RayUnavailableError(f"ray: no Ray cluster at address {address!r} ({_one_line(err)}); start one with "
                                  "`ray start --head`, or leave out --address for a Ray on this machine only") from None
    except Exception as err:  # noqa: BLE001 - e.g. "The current node timed out during startup": one line
        where = f"join the Ray cluster at {address!r}" if address else "start Ray on this machine"
        raise RayUnavailableError(f"ray: could not {where} ({type(err).__name__}: {_one_line(err)})") from None
    return True


def host_port(address):
    """``(host, port)`` of a ``HOST:PORT`` address, an IPv6 host in brackets or not (``[::1]:6379``
    gives ``("::1", 6379)``); ``None`` for the addresses Ray resolves itself (``None``, ``"auto"``,
    ``ray://...``)."""
    host, sep, port = (address or "").rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


# An HTTP/2 client's opening (its preface and an empty SETTINGS frame): Ray's GCS, a gRPC server,
# answers it with a SETTINGS frame of its own (frame type 4, the fourth byte of its header).
HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS = 4
NO_CLUSTER_HINT = "start one with `ray start --head`, or leave out --address for a Ray on this machine only"


def _check_answers(address, timeout=5):
    """Raise :class:`RayUnavailableError` within seconds unless a Ray cluster answers at a
    ``HOST:PORT`` address: when nothing listens there, and when what listens does not speak Ray's
    protocol (gRPC; e.g. the dashboard's port, 8265). Ray itself retries either for minutes, printing
    warnings, in calls that signals cannot interrupt. With TLS (``RAY_USE_TLS``) only the port is
    checked."""
    where = host_port(address)
    if where is None:
        return
    try:
        with socket.create_connection(where, timeout=timeout) as conn:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", ""):
                conn.sendall(HTTP2_HELLO)
                reply = _receive(conn, 9)
                if len(reply) < 9 or reply[3] != HTTP2_SETTINGS:
                    raise RayUnavailableError(
                        f"ray: {address} answers, but not as a Ray cluster (is it another service, such as the "
                        "dashboard at 8265? Give the port `ray start --head` listens on, 6379 unless told); "
                        + NO_CLUSTER_HINT)
    except (socket.timeout, TimeoutError):
        raise RayUnavailableError(f"ray: {address} accepts connections but does not answer as a Ray cluster "
                                  f"within {timeout:g} s; {NO_CLUSTER_HINT}") from None
    except OSError as err:
        raise RayUnavailableError(f"ray: no Ray cluster answers at {address} ({err.strerror or err}); "
                                  + NO_CLUSTER_HINT) from None


def _receive(conn, size):
    """Up to ``size`` bytes from ``conn``, fewer when it closes first."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


class RayRunner:
    """Run configs on Ray actors (see the module docstring).

    ``address``: ``None`` starts an embedded Ray on this machine (stopped when :meth:`run`
    returns); ``"auto"`` or ``"HOST:PORT"`` joins a running cluster. If Ray is connected already
    (``ray.init`` called by the program), that connection is used and left open.
    ``workers``: how many actors (default: one per GPU; without GPUs one per ``cpus_per_worker``
    CPUs). ``runs_per_worker``: units (runs, or stacks) a worker trains at once (default 2 on a
    GPU, 1 on CPUs). ``cpus_per_worker``: CPUs (torch threads) per CPU worker (default 2, or CPUs /
    ``workers``). ``stack``: runs trained as one model (an int or ``"auto"``, as the local runner's;
    ``"auto"`` is sized on a worker, for its device). ``max_attempts``: how often a run is started
    on a worker that then dies before it counts as failed, and how often Ray restarts a lost
    worker. ``log``: receives the runner's few
    lines (the cluster at the start, lost workers, stopping). ``init_kwargs``: for ``ray.init``
    when this runner connects.
    """

    def __init__(self, address=None, *, workers=None, runs_per_worker=None, cpus_per_worker=None, max_attempts=3,
                 stack=1, log=print, init_kwargs=None):
        import_ray()  # fail now, in one line, if Ray is missing
        for name, value in (("workers", workers), ("runs_per_worker", runs_per_worker),
                            ("cpus_per_worker", cpus_per_worker), ("max_attempts", max_attempts)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a whole number >= 1")
        units_lib.check_stack(stack)
        self.address = address
        self.workers = workers
        self.runs_per_worker = runs_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.max_attempts = max_attempts
        self.stack = stack
        self.log = log or (lambda line: None)
        self.init_kwargs = dict(init_kwargs or {})
        self.retries = 0  # units started again after their worker was lost, over all calls of run()
        self._pool = None

    @property
    def actors(self):
        """Handles of the workers while :meth:`run` runs (for tests and monitoring)."""
        return [worker.actor for worker in self._pool.handles] if self._pool else []

    def run(self, configs, *, out, data_dir="./data", download=True, device="auto", runtime=None, on_record):
        """Run ``configs`` into ``out``; ``on_record(record)`` in this thread as each finishes
        (the interface is in :mod:`normstudy.runners`). Raises :class:`RunsFailed` at the end
        if runs failed, the others having finished."""
        ray = import_ray()
        out = Path(out)
        failures, pending = {}, []
        for config in dict.fromkeys(configs):
            try:
                record = run_lib.finished_record(out / config.run_id, config)
            except run_lib.RunFolderError as err:
                failures[config.run_id] = failure_line(err)
                continue
            if record is not None:
                on_record(record)
            else:
                pending.append(config)
        if pending:
            started = init_ray(self.address, **self.init_kwargs)  # first: no folder is claimed in vain
            try:
                pending = [config for config in pending if self._claim(out / config.run_id, config, failures)]
                if pending:
                    plan = None if self.stack != "auto" else ([c.to_dict() for c in pending], self.stack)
                    self._pool = _Pool(ray, self, device=device, data=_data_configs(pending), plan=plan,
                                       data_dir=str(Path(data_dir).expanduser().resolve()), download=download)
                    failures.update(self._schedule(ray, pending, out=out, on_record=on_record, runtime=runtime))
            finally:
                if self._pool is not None:
                    self._pool.close()
                    self._pool = None
                if started:
                    ray.shutdown()
        if failures:
            raise RunsFailed(failures)

    def _claim(self, run_dir, config, failures):
        """Claim ``run_dir`` for ``config`` (as run_one does); a refused folder fails its run, and
        one that another process trains in is left to it (said in one line)."""
        try:
            run_lib.claim_folder(run_dir, config)
            with run_lib.folder_lock(run_dir):  # refused now if another process trains in it
                pass
        except run_lib.RunFolderBusy as err:
            self.log(f"ray: {config.run_id}: in use by {err.holder}, another command that trains it; left to it")
            return False
        except run_lib.RunFolderError as err:
            failures[config.run_id] = failure_line(err)
            return False
        return True

    def _units(self, pending, info):
        """The units ``pending`` trains as (:func:`units.plan_units`): planned here for a fixed
        ``stack``, on the first worker that started for ``"auto"`` (its ``info``)."""
        if self.stack != "auto":
            return units_lib.plan_units(pending, self.stack, device=None, datasets=None)
        by_id = {config.run_id: config for config in pending}
        return [[by_id[run_id] for run_id in unit] for unit in info["units"]]

    def _schedule(self, ray, pending, *, out, on_record, runtime):
        """Keep every ready worker's slots full until each unit finished or failed; returns the
        failures ``{run id: why}``."""
        pool = self._pool
        queue = None if self.stack == "auto" else collections.deque((unit, 1) for unit in self._units(pending, None))
        in_flight = {}  # object ref -> (worker, unit, attempt, the worker's life it was sent to)
        finished, failures = set(), {}
        stalled = False

        def dispatch():
            for worker in pool.ready():
                while queue and worker.running < pool.runs_per_worker:
                    unit, attempt = queue.popleft()
                    files = {config.run_id: pack_run_folder(out / config.run_id) for config in unit
                             if (out / config.run_id / "checkpoint.pt").exists()}
                    ref = worker.actor.run.remote([config.to_dict() for config in unit], files=files, runtime=runtime)
                    in_flight[ref] = (worker, unit, attempt, worker.life)
                    worker.running += 1

        try:
            while queue is None or queue or in_flight:
                dispatch()
                waiting = list(in_flight) + pool.starting_refs()
                if not waiting:
                    raise RayRunnerError("ray: no worker left to run on")  # not reached: see _Pool.started
                done, _ = ray.wait(waiting, num_returns=1, timeout=STALL_SECONDS)
                if not done:
                    if not in_flight and not stalled:  # say once why nothing happens
                        self.log(f"ray: waiting for {len(pool.starting_refs())} worker(s) to start: the cluster has "
                                 "no free resources for them (see `ray status`)")
                    stalled = True
                    continue
                [ref], stalled = done, False
                if ref not in in_flight:
                    info = pool.started(ref)
                    if queue is None and info is not None:  # stack="auto": the first worker planned the units
                        queue = collections.deque((unit, 1) for unit in self._units(pending, info))
                    continue
                # A finished unit stays in flight until its files are written: stopping meanwhile
                # (Ctrl-C while they come back) delivers it rather than losing it.
                worker, unit, attempt, life = in_flight[ref]
                worker.running -= 1
                try:
                    results = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # the unit itself failed: the others go on
                    del in_flight[ref]
                    failures.update((config.run_id, failure_line(_cause(err))) for config in unit)
                    continue
                except ray.exceptions.RayError as err:  # the worker (or its node) is lost: run it again elsewhere
                    del in_flight[ref]
                    pool.lost(worker, err, life=life)
                    ids = ", ".join(config.run_id for config in unit)
                    if attempt >= self.max_attempts:
                        failures.update((config.run_id, f"lost its worker {attempt} times (last: {_one_line(err)})")
                                        for config in unit)
                        continue
                    self.retries += 1
                    self.log(f"ray: {ids} goes back to the queue (attempt {attempt + 1} of {self.max_attempts})")
                    queue.appendleft((unit, attempt + 1))
                    continue
                dispatch()  # the worker's next unit starts while this one is written and reported
                self._deliver(results, out=out, finished=finished, failures=failures, on_record=on_record)
                del in_flight[ref]
        except BaseException:
            self._stop(ray, in_flight, out=out, finished=finished, on_record=on_record)
            raise
        return failures

    @staticmethod
    def _deliver(results, *, out, finished, failures, on_record):
        """Write each finished run of a unit's ``results`` into ``out`` and report it, once."""
        for result in results:
            if result["id"] in finished:  # never written or reported twice
                continue
            if "failed" in result:
                failures[result["id"]] = result["failed"]
                continue
            try:
                record = _write_run(out / result["id"], result["files"])
            except run_lib.RunFolderBusy as err:  # another command took the run meanwhile: its result stands
                failures[result["id"]] = (f"trained, but {err.holder} holds its folder (another command training "
                                          "it): left to that one, this result not written")
                continue
            finished.add(result["id"])
            on_record(record)

    def _stop(self, ray, in_flight, *, out, finished, on_record):
        """Stopping: the units that finished are delivered, and each running run's last complete
        epoch comes from its worker into its folder (its checkpoint)."""
        if not in_flight:
            return
        self.log(f"ray: stopping; the {len(in_flight)} running unit(s) keep their last complete epoch "
                 "(Ctrl-C again to quit now)")
        done, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)
        running = [worker.actor.snapshot.remote([config.run_id for config in unit])
                   for ref, (worker, unit, _, _) in in_flight.items() if ref not in done and worker.state == "ready"]
        answered, _ = ray.wait(running, num_returns=len(running), timeout=STOP_SECONDS) if running else ([], [])
        for ref in [*done, *answered]:
            try:
                got = ray.get(ref)
                files = [(r["id"], r["files"]) for r in got if "files" in r] if ref in done else list(got.items())
            except Exception:  # noqa: BLE001 - stopping: what cannot be saved is run again next time
                continue
            for run_id, run_files in files:
                if run_id in finished:
                    continue
                try:
                    record = _write_run(out / run_id, run_files)
                    if record is not None:
                        finished.add(run_id)
                        on_record(record)
                except Exception:  # noqa: BLE001
                    pass


def _write_run(run_dir, files):
    """Write a run folder's files (as ``pack_run_folder`` gives them) into ``run_dir`` under its
    lock, ``record.json`` last; returns the record, if any. The temporary files a driver killed
    while writing left there go (as run_one removes them: these folders never go through it here)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lib.folder_lock(run_dir):
        checkpoints.remove_stale_temporaries(run_dir)
        return unpack_run_folder(files, run_dir)


def _cause(err):
    """The exception a Ray worker raised, as raised there (its traceback as a note)."""
    cause = getattr(err, "cause", None)
    if not isinstance(cause, BaseException):
        return err
    if hasattr(cause, "add_note"):
        cause.add_note(f"raised in a Ray worker:\n{err}")
    return cause


def _one_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _data_configs(configs):
    """One config per dataset the configs train on (data and holdout): what a worker loads."""
    return [config.to_dict() for config in {(c.data, c.holdout): c for c in configs}.values()]


# --- the workers, as the driver sees them ---------------------------------------------------------

class _Handle:
    def __init__(self, index, actor, ready_ref):
        self.index, self.actor, self.ready_ref = index, actor, ready_ref
        self.state = "starting"  # -> "ready"; back to "starting" while Ray restarts it; "dead" once given up
        self.running = 0
        self.life = 0  # how often it was lost: a unit sent to an earlier life that fails is no new loss
        self.info = None


class _Pool:
    """The workers: started, restarted by Ray when lost (``max_restarts``), killed at the end."""

    def __init__(self, ray, runner, *, device, data, plan, data_dir, download):
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
                   f"{self.runs_per_worker} {'unit' if runner.stack != 1 else 'run'}(s) at a time per worker")
        # One thread more than units: a worker always answers the driver (snapshot on Ctrl-C).
        # Ray restarts a worker whose process or node is lost, up to max_attempts times; the units
        # it was training come back to the driver as errors and go back to the queue, to whichever
        # worker is free first (no task retries for them: Ray would send them to the same worker,
        # and say nothing). Its ready() is retried by Ray until it has restarted.
        self.actor_class = ray.remote(Worker).options(
            **self.options, max_concurrency=self.runs_per_worker + 1, max_restarts=runner.max_attempts,
            max_task_retries=0, scheduling_strategy="SPREAD")
        self.ready_args = dict(configs=data, plan=plan)
        self.handles = []
        for index in range(count):
            actor = self.actor_class.remote(device=self.device, threads=threads, data_dir=data_dir, download=download,
                                            concurrency=self.runs_per_worker)
            self.handles.append(_Handle(index, actor, self._ready(actor)))

    def _ready(self, actor):
        """``actor.ready()``, sent again by Ray until the actor has (re)started; it fails only
        once Ray gives the actor up."""
        return actor.ready.options(max_task_retries=-1).remote(**self.ready_args)

    def ready(self):
        return [h for h in self.handles if h.state == "ready"]

    def starting_refs(self):
        return [h.ready_ref for h in self.handles if h.state == "starting"]

    def started(self, ref):
        """A worker answered its ``ready()``: its info, or ``None`` if Ray gave it up (lost more
        than ``max_attempts`` times, or it could not start): it is gone, and when all are, the
        runner stops in one line."""
        handle = next(h for h in self.handles if h.state == "starting" and h.ready_ref == ref)
        try:
            handle.info = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as err:  # e.g. no dataset: it concerns every run
            raise _cause(err) from None
        except self.ray.exceptions.RayError as err:
            handle.state = "dead"
            if all(h.state == "dead" for h in self.handles):
                raise RayRunnerError(f"ray: every worker lost for good (the last: {_one_line(err)}); see the Ray "
                                     "logs (/tmp/ray/session_latest/logs)") from None
            self.runner.log(f"ray: worker {handle.index} lost for good ({_one_line(err)})")
            return None
        handle.state = "ready"
        return handle.info

    def lost(self, handle, err, *, life):
        """``handle``'s worker died in its life ``life`` (a unit sent to it failed so): Ray starts
        it again, and it takes units once it answers ``ready()`` (its datasets loaded again). Said
        once for all the units that failed with that life."""
        if life != handle.life or handle.state == "dead":
            return
        handle.life += 1
        self.runner.log(f"ray: worker {handle.index} lost ({_one_line(err)}); starting another")
        handle.state = "starting"
        handle.ready_ref = self._ready(handle.actor)

    def close(self):
        for handle in self.handles:
            with contextlib.suppress(Exception):
                self.ray.kill(handle.actor, no_restart=True)
        self.handles = []
