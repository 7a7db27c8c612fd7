"""How a run executes (never what it computes): the device, one switch for the fast path, and
how the runs of one process share a GPU (:data:`DEVICE_LOCK`).

A runtime is a small dict:

    amp             None, "bf16" or "fp16": mixed precision of the forward pass (fp16 with dynamic
                    loss scaling, :class:`normstudy.fast.amp.LossScaler`)
    cuda_graph      record each training step once as a CUDA graph and replay it
    triton_kernels  the Triton kernels of :mod:`normstudy.fast.kernels` (fused ReLU + norm with the
                    residual add, 2x2 max-pool, the first 3-channel conv) instead of PyTorch's modules
    channels_last   activations in channels_last memory layout
    cudnn_benchmark cuDNN autotuning (off: 5-13 s on the first epoch for at most 5 % an epoch)
    compile         torch.compile of the training forward (experiments only: on the H100 it cost
                    20-35 s of compiling and ran slower than the Triton kernels; benchmarks/NOTES.md)

:data:`PRESETS` names the ones a user chooses between (``train.py --runtime``); ``fast`` is the
default: on CUDA it is everything above but compile, elsewhere it falls back to ``eager``.

The Triton kernels are a speed-up, never a requirement. Where Triton is missing or the GPU is
older than Ampere (compute capability 8.0, what Triton supports), and in a process where they
failed to compile or to pass their self-check (``fit.compile_kernels``), a run uses PyTorch's
modules instead and says so once, in one line on stderr (:func:`kernels_off`).
"""
import contextlib
import importlib.util
import os
import sys
import threading

import torch

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRESETS = {
    "fast": "CUDA graphs, Triton kernels, channels_last, bf16 (before Ampere, as a T4: fp16, no kernels)",
    "fp16": "as fast, but fp16 with dynamic loss scaling on every GPU (the T4's precision)",
    "fp32": "as fast, without mixed precision",
    "eager": "PyTorch's own modules, one step at a time, fp32: the reference",
}
# Triton's README: "Supported Hardware: NVIDIA GPUs (Compute Capability 8.0+)". Older GPUs (the
# T4 is 7.5) may run some kernels, but nothing here is tested on them: PyTorch's modules it is.
KERNELS_MIN_CAPABILITY = (8, 0)
BF16_MIN_CAPABILITY = (8, 0)  # cuDNN has no bf16 convolutions before Ampere


def pick_device(name="auto"):
    """``"auto"`` -> CUDA if present, else Apple's MPS, else CPU. Any other name must be a device
    this machine has; ``ValueError`` (one line) if not, before any data is read."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device name (try auto, cuda, cuda:0, mps or cpu)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    if not available.get(device.type, False):
        raise ValueError(f"device {name!r} is not available on this machine (try auto or cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def device_name(device):
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def triton_available():
    return importlib.util.find_spec("triton") is not None


def _stderr(line):
    print(line, file=sys.stderr, flush=True)


notice = _stderr  # where :func:`kernels_off` says its line; replace it to send the line elsewhere
_said = set()  # the lines said in this process
_kernels_broken = None  # why the kernels failed in this process (compile or self-check), if they did


def say_once(line):
    """``notice(line)``, unless this process has said that line before."""
    if line not in _said:
        _said.add(line)
        notice(line)


def kernels_off(reason, *, broken=False):
    """Say, once per process and reason, that the Triton kernels are off and why. ``broken``: they
    failed here (to compile, or their self-check), so no later run of this process uses them."""
    global _kernels_broken
    reason = " ".join(str(reason).split())[:300] or "unknown reason"  # one line, whatever the error
    if broken and _kernels_broken is None:
        _kernels_broken = reason
    say_once(f"normstudy: Triton kernels off ({reason}); using PyTorch's modules")


def kernels_unavailable(device):
    """Why the Triton kernels cannot run on the CUDA ``device``, or None if they can."""
    if _kernels_broken is not None:
        return _kernels_broken
    if not triton_available():
        return "Triton is not installed"
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < KERNELS_MIN_CAPABILITY:
        return (f"GPU of compute capability {capability[0]}.{capability[1]}; they need "
                f"{KERNELS_MIN_CAPABILITY[0]}.{KERNELS_MIN_CAPABILITY[1]} or newer")
    return None


def without_kernels(runtime, norm):
    """``runtime`` with PyTorch's modules instead of the Triton kernels: channels_last then only
    for BatchNorm (or under torch.compile), as :func:`runtime_for` chooses it."""
    return {**runtime, "triton_kernels": False,
            "channels_last": runtime["channels_last"] and (norm == "bn" or bool(runtime["compile"]))}


def runtime_for(device, preset="fast", *, norm=None, **overrides):
    """The runtime dict for ``device`` and ``norm`` under ``preset`` (see :data:`PRESETS`), with
    ``overrides`` on top.

    ``fast`` on CUDA: mixed precision, CUDA graphs, the Triton kernels and channels_last, the
    layout those kernels read. Mixed precision is bf16 on Ampere or newer (compute capability 8.0)
    and fp16 with dynamic loss scaling on older GPUs such as Colab's T4 (7.5), whose cuDNN has no
    bf16 convolutions; ``fp16`` asks for fp16 on any GPU, ``fp32`` for none. The kernels need
    Triton and compute capability 8.0 (:func:`kernels_unavailable`); without them, channels_last
    for BatchNorm only: CUDA GroupNorm converts channels_last to NCHW and back, which costs more
    than the faster convolutions gain. When the kernels are off for such a reason, one line says
    so (once per process). Off CUDA every preset is ``eager``.

    ``overrides`` win, except that kernels this process cannot run (Triton missing, or failed
    here) stay off.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown runtime {preset!r}; choose one of {', '.join(PRESETS)}")
    device = torch.device(device)
    cuda = device.type == "cuda" and preset != "eager"
    amp = None
    if cuda and preset in ("fast", "fp16"):
        bf16 = preset == "fast" and tuple(torch.cuda.get_device_capability(device)) >= BF16_MIN_CAPABILITY
        amp = "bf16" if bf16 else "fp16"
    compile = overrides.get("compile", False)
    wanted = cuda and not compile  # by default, the kernels wherever they can run
    reason = kernels_unavailable(device) if wanted else None
    kernels = wanted and reason is None
    runtime = {"amp": amp, "cuda_graph": cuda, "triton_kernels": kernels,
               "channels_last": cuda and (kernels or bool(compile) or norm == "bn"), "cudnn_benchmark": False,
               "compile": False}
    unknown = set(overrides) - set(runtime)
    if unknown:
        raise ValueError(f"unknown runtime keys: {', '.join(sorted(unknown))}")
    runtime = {**runtime, **overrides}
    if runtime["triton_kernels"] and (_kernels_broken is not None or not triton_available()):
        reason = _kernels_broken or "Triton is not installed"
        runtime = {**runtime, "triton_kernels": False}
        if "channels_last" not in overrides:
            runtime = without_kernels(runtime, norm)
    if reason is not None and not runtime["triton_kernels"]:
        kernels_off(reason)
    return runtime


# --- several runs in one process ------------------------------------------------------------------

class RecordingLock:
    """Several runs may train at once in threads of one process (the study's concurrent runs),
    each on its own CUDA stream. Some steps must not overlap any other CUDA work of the process:
    recording a CUDA graph (a device-wide synchronization, a cuDNN call, a copy from the CPU or
    seeding the CUDA generator elsewhere invalidates the capture: all seen on the H100), and a
    run's set-up (compiling Triton kernels while another thread launches them gave a self-check
    error of 130 % there). So every run's CUDA work holds this lock shared (:meth:`work`) and
    those steps hold it alone (:meth:`recording`, :meth:`alone`); a waiting one goes before new
    work. They happen twice per run, at its start. With one run per process the lock never waits.

    An epoch is long (tens of seconds for a small batch among many runs), so one holding the
    lock shared lets a waiting one go first between its graph replays (:meth:`let_waiting_go`):
    a run's start then waits for one replay of each run at work, not for all their epochs. Found on
    the H200 (``benchmarks/bench_together.py``, 36 runs, 27 at once): the run threads spent 40 % of
    their time waiting to record and 17 % waiting to start an epoch; stepping aside took that pass
    from 68.0 to 62.3 s (the starts themselves, one after another, are most of the rest)."""

    def __init__(self):
        self._changed = threading.Condition()
        self._working = 0
        self._recording = False
        self._waiting = 0
        self._depth = threading.local()  # how many times this thread holds the lock shared

    def _held(self):
        return getattr(self._depth, "count", 0)

    def _take_shared(self):
        # Call with self._changed held: waits behind any recording, held or waited for.
        self._changed.wait_for(lambda: not self._recording and not self._waiting)
        self._working += 1

    def _give_shared(self):
        # Call with self._changed held.
        self._working -= 1
        self._changed.notify_all()

    @contextlib.contextmanager
    def work(self):
        with self._changed:
            self._take_shared()
        self._depth.count = self._held() + 1
        try:
            yield
        finally:
            self._depth.count = self._held() - 1
            with self._changed:
                self._give_shared()

    def let_waiting_go(self, *, finish=None):
        """Called while holding :meth:`work` once: if a thread waits to hold the lock alone, call
        ``finish()`` (e.g. synchronize this thread's stream, so that the one going first has the
        GPU to itself, as it would after an epoch), step aside until it is done, and take the lock
        shared again; returns whether it did. Nothing happens when no one waits (one read of a
        counter: cheap enough between two graph replays) or when this thread holds the lock
        shared more than once (the waiting one could never go: stepping aside would deadlock)."""
        if not self._waiting or self._held() != 1:
            return False
        if finish is not None:
            finish()
        with self._changed:
            self._give_shared()
            self._take_shared()
        return True

    def alone(self):
        """Hold the lock alone: no other thread's CUDA work runs meanwhile."""
        return self.recording()

    @contextlib.contextmanager
    def recording(self):
        with self._changed:
            self._waiting += 1
            self._changed.wait_for(lambda: not self._recording and not self._working)
            self._waiting -= 1
            self._recording = True
        try:
            yield
        finally:
            with self._changed:
                self._recording = False
                self._changed.notify_all()


DEVICE_LOCK = RecordingLock()  # one per process: CUDA graph capture is a process-wide affair


# CUDA gives a process 8 hardware work queues by default; the streams of more runs than that share
# them, and a stream's kernels wait behind another's in the same queue. On the H200 (27 runs at
# once, batches 2-512, benchmarks/bench_together.py) 32 queues took a pass from 68.0 to 44.5 s, and
# from 62.3 to 38.0 s with the lock's fix (benchmarks/NOTES.md). CUDA reads the variable when the
# process's context is created, so it must be set before.
QUEUES_VARIABLE = "CUDA_DEVICE_MAX_CONNECTIONS"
MANY_QUEUES = 32  # CUDA's most
DEFAULT_QUEUES = 8


def ask_for_queues(concurrency, *, environ=os.environ):
    """Before CUDA starts in a process that trains ``concurrency`` runs at once: ask for
    :data:`MANY_QUEUES` hardware queues where more runs than the default 8 share the GPU. A value
    the user set is kept; where CUDA has started already (a notebook that trained before) the
    variable would change nothing, so it is left alone. Returns the value set, or ``None``."""
    if concurrency <= DEFAULT_QUEUES or QUEUES_VARIABLE in environ or torch.cuda.is_initialized():
        return None
    environ[QUEUES_VARIABLE] = str(MANY_QUEUES)
    return environ[QUEUES_VARIABLE]


# --- start-up ---------------------------------------------------------------------------------------

def warm_up_device(device):
    """Create ``device``'s CUDA context and load cuDNN's convolutions (a tiny bf16, channels_last
    convolution forward and backward): ~0.35 + 0.26 s of a run's start on the H200
    (benchmarks/startup.py's ``cuda_init`` and ``kernels``). Draws no random numbers, so a run's
    generators are left as they are, whenever this runs."""
    device = torch.device(device)
    with DEVICE_LOCK.work():
        images = torch.ones(2, 3, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
        weight = torch.ones(4, 3, 3, 3, device=device, requires_grad=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = torch.nn.functional.conv2d(images.requires_grad_(), weight, padding=1)
        out.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _warm_up(device, then):
    warm_up_device(device)
    if then is not None:
        then()


def _triton_key():
    """Triton's cache-key function (``triton_key``: in ``triton.runtime.cache`` since 3.3 or so,
    in ``triton.compiler.compiler`` before), or ``None`` where Triton or the function is missing."""
    for module in ("triton.runtime.cache", "triton.compiler.compiler"):
        try:
            key = getattr(importlib.import_module(module), "triton_key", None)
        except ImportError:
            continue
        if callable(key):
            return key
    return None


class TritonKey:
    """Triton's own cache key, computed on a thread of its own ahead of the first compile.

    Before Triton looks up any kernel in its cache it hashes its whole package, once a process
    (``triton_key``: every compiler and language source file and the ~500 MB ``libtriton``):
    0.92 s of a warm run's 1.42 s of kernel loading on the H200 (benchmarks/NOTES.md). File reads
    and hashlib leave the GIL, so on a thread this overlaps the data's reading and the CUDA
    context's creation instead of following them. Triton caches the key (``functools.lru_cache``)
    but does not lock it: whoever compiles first calls :meth:`wait` (holding the device lock, so
    that no compile starts meanwhile), or the key is computed twice at once."""

    def __init__(self):
        self._thread = None
        self._started = threading.Lock()

    def start(self, *, when):
        """Compute the key on a daemon thread if ``when()`` (called there: e.g. whether the run
        will use the kernels at all, which may ask CUDA for the GPU's capability) is true; once a
        process. Returns the thread, or ``None`` without Triton."""
        with self._started:
            if self._thread is None and triton_available():
                self._thread = threading.Thread(target=_quietly, args=(lambda: self._compute(when),),
                                                name="triton-key", daemon=True)
                self._thread.start()
            return self._thread

    @staticmethod
    def _compute(when):
        key = _triton_key() if when() else None
        if key is not None:
            key()

    def wait(self):
        """Until the key's thread (if one was started) has ended."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()


TRITON_KEY = TritonKey()  # one per process, as Triton's own cache of the key


def _quietly(work, *args):
    """``work(*args)`` on a head-start thread: any error is left for the run to meet and report."""
    try:
        work(*args)
    except Exception:  # noqa: BLE001 - a head start only: the run meets any such error itself and reports it
        pass


def warm_up_device_in_background(device, *, then=None):
    """:func:`warm_up_device` on a daemon thread, then ``then()`` there if given (a run's kernels:
    ``run.warm_up_in_background``), for a command to start before it reads the data (file reads
    and PyTorch's calls leave the GIL, so the two overlap); returns the thread, or ``None`` off
    CUDA (nothing to warm)."""
    if torch.device(device).type != "cuda":
        return None
    thread = threading.Thread(target=_quietly, args=(_warm_up, device, then), name="device-warm-up", daemon=True)
    thread.start()
    return thread
