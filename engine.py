"""Running one experiment: seeding, the epoch loop, history, and crash-safe checkpoints.

:func:`fit` is what the CLI and the notebooks call. After every epoch it writes a checkpoint
(model, optimizer, scheduler, RNG states, history) atomically, so a run killed at any moment
keeps its last complete epoch and ``fit(..., resume=True)`` continues from there. On the CPU with
a fixed seed a resumed run reproduces an uninterrupted run's history exactly.

Checkpoints and weights are read with ``torch.load(weights_only=True)``: loading never runs code.
"""
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import data as data_lib
import network
import recipe as recipe_lib
import steps
import utils

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint or weights file is missing, corrupt, unsafe or belongs to another run."""


def pick_device(name="auto"):
    """``"auto"`` -> CUDA if present, else Apple's MPS, else CPU; any other name is used as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_runtime(device, norm, *, compile=False):
    """How to run (not what to compute): mixed precision, CUDA graphs, fused kernels, memory
    layout, autotuning, compilation.

    On CUDA: bf16 autocast, the whole step replayed as a CUDA graph, ReLU + norm as one fused
    Triton operation per block (:mod:`kernels`; where Triton is installed) and channels_last
    activations, the layout those kernels read. Without the fused kernels, channels_last for
    BatchNorm only: CUDA GroupNorm converts channels_last to NCHW and back, which costs more than
    the faster convolutions gain. cuDNN autotuning stays off: it costs 5-13 s on the first epoch
    for at most 5 % per epoch. Compilation stays off unless asked for (it costs 20-35 s on a cold
    cache, benchmarks/NOTES.md); it replaces the fused kernels with its own. Elsewhere fp32, and
    on GPUs older than Ampere (e.g. Colab's T4), whose cuDNN has no bf16 convolutions: PyTorch
    would fall back to slow generic kernels there.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    bf16 = cuda and torch.cuda.get_device_capability(device)[0] >= 8
    fused = cuda and not compile and importlib.util.find_spec("triton") is not None
    return {"amp": "bf16" if bf16 else None, "cuda_graph": cuda, "fused_norm": fused,
            "channels_last": cuda and (norm == "bn" or fused or bool(compile)), "cudnn_benchmark": False,
            "compile": compile}


def resolve_runtime(device, norm, overrides=None):
    """:func:`default_runtime` with ``overrides`` on top; the defaults follow the requested
    ``compile`` (it changes the memory layout)."""
    overrides = overrides or {}
    return {**default_runtime(device, norm, compile=overrides.get("compile", False)), **overrides}


def prepare_model(model, device, runtime):
    """Move ``model`` to ``device`` in the runtime's memory layout, with or without fused kernels."""
    network.use_fused_kernels(model, runtime["fused_norm"])
    return model.to(device, memory_format=torch.channels_last if runtime["channels_last"] else torch.preserve_format)


def compile_kernels(model, device, runtime, *, image_shape):
    """With the fused kernels, compile them all now, in parallel (:func:`kernels.precompile`),
    rather than one by one during the first epoch. ``image_shape`` is one image's (C, H, W)."""
    if not runtime["fused_norm"]:
        return
    import kernels
    example = torch.zeros(2, *image_shape, device=device).contiguous(memory_format=torch.channels_last)
    kernels.precompile(model, example, dtype=AMP_DTYPES[runtime["amp"]])


def make_step(model, optimizer, criterion, runtime):
    """The training step that ``runtime`` asks for (see :mod:`steps`)."""
    kind = steps.CudaGraphStep if runtime["cuda_graph"] else steps.EagerStep
    return kind(model, optimizer, criterion, amp_dtype=AMP_DTYPES[runtime["amp"]],
                channels_last=runtime["channels_last"], compile=runtime["compile"])


def _lr_as_device_tensor(optimizer, device):
    # A CUDA graph reads the learning rate from a fixed tensor; the scheduler fills it in place.
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), device=device)


def new_history():
    """Per-epoch lists, one entry per completed epoch."""
    keys = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds")
    return {key: [] for key in keys}


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
    """Load a ``state_dict`` saved by :func:`fit` (``weights.pt``) or a checkpoint into ``model``."""
    state = load_torch(path)
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: weights do not fit this model ({str(err).splitlines()[0]})") from None
    return model


# --- seeding and RNG state ----------------------------------------------------------------------

def seed_everything(seed):
    """Seed every generator this package draws from (torch on CPU and CUDA). Call it before
    building the model, so that its initialization follows the seed too."""
    torch.manual_seed(seed)


def _rng_state(generator):
    state = {"cpu": torch.get_rng_state(), "loader": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state, generator):
    torch.set_rng_state(state["cpu"])
    generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- the experiment -----------------------------------------------------------------------------

def make_loaders(dataset, *, recipe, device, seed):
    """Training and test loaders over ``dataset`` (as :func:`data.load_cifar10` returns it)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    train_loader = data_lib.DeviceLoader(
        dataset["train_images"], dataset["train_labels"], batch_size=recipe["batch_size"], train=True,
        device=device, augment_kwargs=recipe_lib.augment_kwargs(recipe), generator=generator)
    return train_loader, data_lib.test_loader(dataset, device=device)


def _checkpoint(*, model, optimizer, scheduler, generator, history, config):
    return {"format": CHECKPOINT_FORMAT, "config": config, "epoch": len(history["test_acc"]),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": _rng_state(generator), "history": history}


def _check_resumable(state, path, config):
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this package")
    theirs = state["config"]
    for key in ("norm", "seed"):
        if theirs.get(key) != config.get(key):
            raise CheckpointError(f"{path}: checkpoint is from another run ({key}={theirs.get(key)!r}, "
                                  f"this run has {key}={config.get(key)!r})")
    recipe, their_recipe = config["recipe"], theirs.get("recipe", {})
    differ = sorted(k for k in recipe.keys() | their_recipe.keys() if recipe.get(k) != their_recipe.get(k))
    if differ:
        raise CheckpointError(f"{path}: checkpoint is from another run (its recipe differs in "
                              + ", ".join(f"{k}: {their_recipe.get(k)!r} vs {recipe.get(k)!r}" for k in differ) + ")")


def fit(model, dataset, *, norm, recipe=None, device="cpu", seed=0, checkpoint_path=None,
        resume=False, progress=True, log=print, runtime=None):
    """Train ``model`` for ``recipe["epochs"]`` epochs, testing after each; return the history.

    For a reproducible run, call :func:`seed_everything` before building ``model``.

    ``norm`` names the variant (stored in the checkpoint, so a resume cannot mix variants).
    ``runtime`` overrides entries of :func:`default_runtime` (see :func:`resolve_runtime`).
    With ``checkpoint_path`` a checkpoint is written after every epoch; with ``resume`` the run
    continues from it. ``log`` receives one line per epoch.
    """
    recipe = recipe or recipe_lib.recipe_for(norm)
    device = torch.device(device)
    runtime = resolve_runtime(device, norm, runtime)
    seed_everything(seed)
    torch.backends.cudnn.benchmark = runtime["cudnn_benchmark"]
    if not resume:  # a resumed model gets its weights from the checkpoint
        recipe_lib.initialize(model, recipe, dataset["train_images"])
    prepare_model(model, device, runtime)
    amp_dtype = AMP_DTYPES[runtime["amp"]]
    compile_kernels(model, device, runtime, image_shape=dataset["train_images"].shape[1:])
    train_loader, test_loader = make_loaders(dataset, recipe=recipe, device=device, seed=seed)
    optimizer = recipe_lib.make_optimizer(model, recipe)
    scheduler = recipe_lib.make_scheduler(optimizer, recipe, steps_per_epoch=len(train_loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
    config = {"norm": norm, "seed": seed, "recipe": recipe}  # epochs and batch size are in the recipe
    history = new_history()

    if resume:
        state = load_torch(checkpoint_path)
        _check_resumable(state, checkpoint_path, config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], train_loader.generator)
        history = state["history"]
        log(f"{norm}: resumed from {checkpoint_path} after epoch {state['epoch']}")
    if runtime["cuda_graph"]:
        _lr_as_device_tensor(optimizer, device)
    step = make_step(model, optimizer, criterion, runtime)

    for epoch in range(len(history["test_acc"]) + 1, recipe["epochs"] + 1):
        start = time.perf_counter()
        lr = float(optimizer.param_groups[0]["lr"])  # a tensor under CUDA graphs: read it now
        try:
            train_loss, train_acc = utils.train(model, device, train_loader, optimizer, criterion,
                                                scheduler, progress=progress, desc=f"{norm} epoch {epoch}", step=step)
        except utils.NonFiniteLossError as err:
            raise utils.NonFiniteLossError(err.batch, epoch) from None
        test_loss, test_acc = utils.test(model, device, test_loader, criterion, amp_dtype=amp_dtype)
        seconds = time.perf_counter() - start
        for key, value in zip(new_history(), (train_loss, train_acc, test_loss, test_acc, lr, seconds)):
            history[key].append(value)
        if checkpoint_path is not None:
            save_torch(checkpoint_path, _checkpoint(model=model, optimizer=optimizer, scheduler=scheduler,
                                                    generator=train_loader.generator, history=history,
                                                    config=config))
        log(f"{norm} epoch {epoch:2d}/{recipe['epochs']}  train loss {train_loss:.4f} acc {train_acc:5.2f}%  "
            f"test loss {test_loss:.4f} acc {test_acc:5.2f}%  ({seconds:.2f} s)")
    return history
