"""Files that survive any interruption: atomic writes, the checkpoint format, safe loading.

Every file is written to a temporary file beside its target and renamed over it, so a reader
(or a run killed at any moment) sees the old file or the whole new one, never half of one.
Checkpoints and weights are read with ``torch.load(weights_only=True)``: loading never runs code.
"""
import json
import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint or weights file is missing, corrupt, unsafe or belongs to another run."""


# --- atomic files -------------------------------------------------------------------------------

def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``:
    readers see the old file or the whole new one, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


def save_figure(path, fig):
    import matplotlib.pyplot as plt
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def save_torch(path, obj):
    atomic_write(path, lambda f: torch.save(obj, f))


# --- safe loading -------------------------------------------------------------------------------

def load_torch(path):
    """``torch.load`` that never executes code and turns every failure into :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: corrupt, truncated or unsafe file, refused ({reason})") from None


def load_weights(model, path):
    """Load a ``state_dict`` saved by a run (``weights.pt``) or a checkpoint into ``model``."""
    state = load_torch(path)
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: weights do not fit this model ({str(err).splitlines()[0]})") from None
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
