"""Files that survive any interruption: atomic writes, the checkpoint format, safe loading.

Every file is written to a temporary file beside its target and renamed over it, so a reader
(or a run killed at any moment) sees the old file or the whole new one, never half of one.
Checkpoints and weights are read with ``torch.load(weights_only=True)``: loading never runs code.
They carry a sha256 of their contents (:func:`checksum`), checked on every load: ``torch.load``
itself reads damaged tensor data without complaint.
"""
import contextlib
import errno
import hashlib
import io
import json
import os
import secrets
import threading
from pathlib import Path

import torch

CHECKPOINT_FORMAT = 2  # 2: saved with a checksum (save_torch)
WRITING = {}  # thread id -> the temporary file it is writing: what a process ending at once waits for (stopping.py)


class CheckpointError(ValueError):
    """A checkpoint or weights file is missing, corrupt, unsafe or belongs to another run."""


# --- atomic files -------------------------------------------------------------------------------

def _create_temporary(path):
    """Create ``.NAME.<random>.tmp`` beside ``path``; return ``(fd, its path)``. Its mode is what
    ``open()`` would give ``path`` (0o666 less the umask): ``tempfile.mkstemp`` makes every file
    0600, which the rename would pass on to each result."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``:
    readers see the old file or the whole new one, never half of it. A failed write (a full disk)
    raises ``OSError("could not write PATH: reason")`` and leaves the old file and no temporary one."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = _create_temporary(path)
        WRITING[threading.get_ident()] = tmp
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):  # already renamed when interrupted after os.replace
                os.unlink(tmp)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"could not write {path}: {err.strerror or err}") from err
        raise
    finally:
        WRITING.pop(threading.get_ident(), None)


def _sync_folder(folder):
    """Flush ``folder``'s entries to disk: the rename itself lives in the folder, so without this a
    power loss can undo it (the file's contents were synced before). Where folders cannot be opened
    for syncing (Windows), the rename is left to the file system."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(folder):
    """Delete the temporary files (``.NAME.*.tmp``) that a writer killed outright (SIGKILL, power
    loss) left in ``folder``; return their names. Only while no one can be writing there: a run
    calls it holding the folder's lock."""
    stale = sorted(Path(folder).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return [path.name for path in stale]


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


def save_figure(path, fig, *, tight=True):
    """``fig`` as a PNG at ``path``, cropped to what it draws (``tight``: matplotlib then renders the
    figure twice, once to measure it); a figure laid out by ``tight_layout`` fills its canvas
    already, and ``tight=False`` saves it as it is, in one rendering (~0.1-0.2 s less a figure)."""
    import matplotlib.pyplot as plt
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight" if tight else None))
    plt.close(fig)


def save_torch(path, obj):
    """``torch.save`` of ``obj`` with its :func:`checksum`, which :func:`load_torch` verifies.

    It is serialized in memory first (a checkpoint is about 0.5 MB): written to the file by
    ``torch.save``, a full disk surfaces as ``RuntimeError: [enforce fail at inline_container.cc]
    unexpected pos``, with neither the path nor the cause; written by us, as the ``OSError`` it is."""
    buffer = io.BytesIO()
    torch.save({"sha256": checksum(obj), "payload": obj}, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


# --- checksums ----------------------------------------------------------------------------------

def _leaves(obj, where=""):
    """``(where, leaf)`` for every leaf of nested dicts, lists and tuples, in their stored order
    (pickling keeps a dict's order, so saving and loading walk the same sequence)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _leaves(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _leaves(value, f"{where}[{index}]")
    else:
        yield where, obj


def checksum(obj):
    """sha256 over everything in ``obj``: each tensor's dtype, shape and bytes (of its CPU,
    contiguous copy), every other value's ``repr`` (numbers, strings: exact for floats), each with
    the path that leads to it."""
    digest = hashlib.sha256()
    for where, leaf in _leaves(obj):
        digest.update(where.encode())
        if torch.is_tensor(leaf):
            tensor = leaf.detach().cpu().contiguous()
            digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        else:
            digest.update(f"{type(leaf).__name__} {leaf!r}".encode())
    return digest.hexdigest()


# --- safe loading -------------------------------------------------------------------------------

def one_line(err, limit=300):
    """An exception as one line of at most ``limit`` characters: its message's lines joined
    (PyTorch's state_dict errors name the first key on their second line)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_torch(path):
    """What :func:`save_torch` saved at ``path``: loaded without executing code, its checksum
    verified; every failure is one :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: corrupt, truncated or unsafe file, refused ({one_line(err)})") from None
    if not isinstance(saved, dict) or set(saved) != {"sha256", "payload"}:
        raise CheckpointError(f"{path}: no checksum (saved by an older version of this package, or not by it), "
                              "refused; train the run again to write it anew")
    if checksum(saved["payload"]) != saved["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch: its data are damaged, refused")
    return saved["payload"]


def load_weights(model, path):
    """Load a ``state_dict`` saved by a run (``weights.pt``) or a checkpoint into ``model``."""
    state = load_torch(path)
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: weights do not fit this model ({one_line(err)})") from None
    return model


# --- RNG state ----------------------------------------------------------------------------------

def rng_state(generator):
    """Every random generator a run draws from: torch's CPU (and CUDA) and the loader's."""
    state = {"cpu": torch.get_rng_state(), "loader": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, generator):
    torch.set_rng_state(state["cpu"])
    generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- checkpoints --------------------------------------------------------------------------------

def make_checkpoint(*, model, optimizer, scheduler, generator, history, run, scaler=None):
    """Everything needed to continue a run after its last complete epoch. ``run`` identifies what
    is being trained (recipe, norm, seed, data) and is compared on resume. ``scaler``: an fp16
    run's loss scaler (``fast.amp.LossScaler``), whose scale is kept too."""
    state = {"format": CHECKPOINT_FORMAT, "run": run, "epoch": len(history["test_acc"]),
             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": rng_state(generator), "history": history}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def check_resumable(state, path, run):
    """Refuse ``state`` unless it is a checkpoint of this package for the same ``run``."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or not isinstance(state.get("run"), dict):
        raise CheckpointError(f"{path}: not a checkpoint of this package")
    theirs = state["run"]
    differ = sorted(k for k in run.keys() | theirs.keys() if run.get(k) != theirs.get(k))
    if differ:
        raise CheckpointError(f"{path}: checkpoint is from another run (it differs in "
                              + ", ".join(f"{k}: {theirs.get(k)!r} vs {run.get(k)!r}" for k in differ) + ")")
