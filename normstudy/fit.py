"""Training one model: the set-up, the epoch loop, the history and a checkpoint after every epoch.

:func:`prepare` is the one set-up code path (device, memory layout, kernels, loaders, optimizer,
schedule, training step); :func:`fit` and the benchmarks both call it. After every epoch
:func:`fit` writes a checkpoint (model, optimizer, schedule, RNG states, history) atomically, so a
run killed at any moment keeps its last complete epoch and ``fit(..., resume=True)`` continues
from there; on the CPU a resumed run reproduces an uninterrupted one exactly.
"""
import dataclasses
import os
import time
from collections.abc import Callable

import torch
from torch import nn

from . import checkpoints
from . import data as data_lib
from . import loop
from . import models
from . import recipe as recipe_lib
from . import runtime as runtime_lib
from .divergence import NonFiniteLossError, NonFiniteStateError
from .fast import self_check, steps
from .fast.amp import LossScaler
from .fast.graph_epoch import GraphEpoch
from .runtime import DEVICE_LOCK


def seed_everything(seed):
    """Seed every generator this package draws from (torch on CPU and CUDA). Call it before
    building the model, so that its initialization follows the seed too. (Under
    :data:`models.GLOBAL_RNG_LOCK`: never in the middle of another thread's model building.)"""
    with models.GLOBAL_RNG_LOCK:
        torch.manual_seed(seed)


def resolve_runtime(device, norm, runtime=None):
    """``runtime`` as a full dict: ``None`` (the ``fast`` preset), a preset name, or a dict of
    overrides of the ``fast`` preset (see :func:`runtime.runtime_for`)."""
    if runtime is None or isinstance(runtime, str):
        return runtime_lib.runtime_for(device, runtime or "fast", norm=norm)
    return runtime_lib.runtime_for(device, "fast", norm=norm, **runtime)


def prepare_model(model, device, runtime):
    """Move ``model`` to ``device`` in the runtime's memory layout, with or without Triton kernels."""
    models.use_triton_kernels(model, runtime["triton_kernels"])
    return model.to(device, memory_format=torch.channels_last if runtime["channels_last"] else torch.contiguous_format)


def kernels_for_choices(model, runtime, norm):
    """``runtime`` for ``model``'s network choices: without the Triton kernels where they do not
    implement one (:func:`models.kernel_gaps`: the Conv -> Norm -> ReLU order, ghost batches,
    Batch Renorm; one line says so, once per process). Weight Standardization keeps them: it never
    touches the first layer, the one convolution they compute."""
    if not runtime["triton_kernels"]:
        return runtime
    gaps = models.kernel_gaps(model)
    if gaps:
        runtime_lib.say_once(f"normstudy: the Triton kernels do not implement {' or '.join(gaps)}; "
                             "using PyTorch's modules")
        return runtime_lib.without_kernels(runtime, norm)
    return runtime


def compile_kernels(model, device, runtime, *, image_shape):
    """With the Triton kernels: compile them all now, in parallel, rather than one by one during
    the first epoch, then check them (:func:`fast.self_check.compile_and_check`). Return the
    runtime to train with: ``runtime``, or where importing, compiling or checking the kernels
    failed, the same without them (``model`` switched back to PyTorch's modules, one line says why,
    and no later run of this process tries them). ``image_shape`` is one image's (C, H, W)."""
    if not runtime["triton_kernels"]:
        return runtime
    runtime_lib.TRITON_KEY.wait()  # a head start's, if any: computed here too, it would cost twice
    problem = self_check.compile_and_check(model, _kernel_example(device, image_shape),
                                           runtime_lib.AMP_DTYPES[runtime["amp"]])
    if problem is None:
        return runtime
    runtime_lib.kernels_off(problem, broken=True)
    runtime = runtime_lib.without_kernels(runtime, getattr(model, "norm", None))
    prepare_model(model, device, runtime)
    return runtime


def uses_kernels(model, device, runtime=None):
    """Whether a run of ``model``'s network on ``device`` under ``runtime`` compiles the Triton
    kernels (the runtime asks for them and the network has no part they do not implement)."""
    return _kernels_runtime(model, torch.device(device), runtime) is not None


def _kernels_runtime(model, device, runtime):
    """The resolved runtime of a run of ``model``'s network if it compiles the Triton kernels, else ``None``."""
    resolved = resolve_runtime(device, getattr(model, "norm", None), runtime)
    return resolved if resolved["triton_kernels"] and not models.kernel_gaps(model) else None


def compile_ahead(model, device, runtime=None, *, image_shape=data_lib.IMAGE_SHAPE):
    """A head start on :func:`compile_kernels` for a run of ``model``'s network: the Triton
    kernels its set-up will compile, compiled now, nothing checked, nothing said. ``model`` gives
    the structure only (build it on the meta device, which draws no random numbers; it is
    materialized here with values that do not matter). The run's own set-up then finds the
    kernels in Triton's memory and checks them as always; whatever fails here it meets and
    reports itself. For a command to do on a thread while it reads the data
    (:func:`run.warm_up_in_background`); holds :data:`DEVICE_LOCK` alone meanwhile, as
    :func:`fit` does for the same work."""
    device = torch.device(device)
    runtime = _kernels_runtime(model, device, runtime)
    if runtime is None:
        return
    with DEVICE_LOCK.alone():
        runtime_lib.TRITON_KEY.wait()  # holding the lock: no other compile starts before the key is there
        model = prepare_model(model.to_empty(device=device), device, runtime)
        with torch.no_grad():
            for tensor in (*model.parameters(), *model.buffers()):
                tensor.zero_()  # defined values: the tiny step a compile takes must not meet NaNs
        self_check.precompile(model, _kernel_example(device, image_shape), runtime_lib.AMP_DTYPES[runtime["amp"]])


def _kernel_example(device, image_shape):
    # The input the kernels are compiled (and checked) for: compile_ahead's and compile_kernels'
    # must be the same, or the run's own compile finds nothing compiled ahead.
    return torch.zeros(2, *image_shape, device=device).contiguous(memory_format=torch.channels_last)


def make_loaders(dataset, *, recipe, device, seed):
    """Training and test loaders over ``dataset`` (as :func:`data.load_cifar10` returns it)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    train_loader = data_lib.DeviceLoader(
        dataset["train_images"], dataset["train_labels"], batch_size=recipe["batch_size"], train=True,
        device=device, augment_kwargs=recipe_lib.augment_kwargs(recipe), generator=generator)
    return train_loader, data_lib.test_loader(dataset, device=device)


def make_step(model, optimizer, criterion, runtime, scaler=None):
    """The training step that ``runtime`` asks for (see :mod:`normstudy.fast.steps`); ``scaler``:
    the loss scaler of an fp16 run (the step makes one if none is given)."""
    kind = steps.CudaGraphStep if runtime["cuda_graph"] else steps.EagerStep
    return kind(model, optimizer, criterion, amp_dtype=runtime_lib.AMP_DTYPES[runtime["amp"]],
                channels_last=runtime["channels_last"], compile=runtime["compile"], scaler=scaler)


@dataclasses.dataclass
class Training:
    """Everything one run trains with, as :func:`prepare` built it."""
    model: nn.Module
    device: torch.device
    runtime: dict
    recipe: dict
    train_loader: data_lib.DeviceLoader
    test_loader: data_lib.DeviceLoader
    optimizer: object
    scheduler: object
    criterion: nn.Module
    scaler: LossScaler = None  # fp16 runs: the loss scale (checkpointed with the optimizer)
    step: object = None

    @property
    def amp_dtype(self):
        return runtime_lib.AMP_DTYPES[self.runtime["amp"]]

    def _lr_on_device(self):
        # A CUDA graph reads the learning rate from a fixed tensor, which the schedule fills in place.
        for group in self.optimizer.param_groups:
            if not torch.is_tensor(group["lr"]):
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)

    def make_step(self):
        """One training step as ``runtime`` asks (eager, or one recorded step replayed per batch)."""
        if self.runtime["cuda_graph"]:
            self._lr_on_device()
        self.step = make_step(self.model, self.optimizer, self.criterion, self.runtime, scaler=self.scaler)
        return self.step

    def epoch_trainer(self, *, progress=True, desc="train"):
        """What trains one epoch (``train_epoch(epoch)`` gives ``(mean loss, accuracy in %)``) and
        prepares the next (``record()``: call it outside ``DEVICE_LOCK.work()``). Under CUDA graphs
        a whole epoch replays as a few recorded graphs of many steps each
        (:class:`fast.graph_epoch.GraphEpoch`); otherwise :class:`EagerEpoch`, the plain loop."""
        if not self.runtime["cuda_graph"]:
            return EagerEpoch(self, self.make_step(), progress=progress, desc=desc)
        self._lr_on_device()
        return GraphEpoch(self.model, self.optimizer, self.criterion, self.scheduler, self.train_loader,
                          amp_dtype=self.amp_dtype, channels_last=self.runtime["channels_last"],
                          total_steps=self.recipe["epochs"] * len(self.train_loader), scaler=self.scaler)


class EagerEpoch:
    """An epoch of the plain loop (:func:`loop.train`, one eager step a batch, a progress bar),
    with the face of :class:`fast.graph_epoch.GraphEpoch`: nothing to record before an epoch."""

    def __init__(self, training, step, *, progress=True, desc="train"):
        self.training, self.step, self.progress, self.desc = training, step, progress, desc

    def record(self):
        """Nothing to record: the steps run as they come."""

    def train_epoch(self, epoch=None):
        """One epoch; ``(mean loss, accuracy in %)``, or :class:`NonFiniteLossError`."""
        t = self.training
        return loop.train(t.model, t.device, t.train_loader, t.optimizer, t.criterion, t.scheduler,
                          progress=self.progress, desc=f"{self.desc} epoch {epoch}", step=self.step)


def prepare(model, dataset, *, recipe, device, seed, runtime=None, norm=None, on_stage=None):
    """Set up ``model`` (freshly built, see :func:`models.fresh_model`) for training on ``dataset``:
    device and layout, compiled kernels, loaders, optimizer, schedule and loss. ``on_stage(name)``
    is called after each stage (the start-up benchmark times them). The step itself is made by
    :meth:`Training.make_step`, after a resume has loaded the optimizer's state.

    The runtime may end up other than asked for: where the Triton kernels fail to compile or their
    self-check, they are off (:func:`compile_kernels`); ``Training.runtime`` is the one used."""
    on_stage = on_stage or (lambda name: None)
    device = torch.device(device)
    runtime = resolve_runtime(device, norm or getattr(model, "norm", None), runtime)
    runtime = kernels_for_choices(model, runtime, norm or getattr(model, "norm", None))
    seed_everything(seed)
    torch.backends.cudnn.benchmark = runtime["cudnn_benchmark"]
    prepare_model(model, device, runtime)
    on_stage("to_device")
    if runtime["triton_kernels"]:
        runtime = compile_kernels(model, device, runtime, image_shape=dataset["train_images"].shape[1:])
        on_stage("compile_triton_kernels")
    train_loader, test_loader = make_loaders(dataset, recipe=recipe, device=device, seed=seed)
    on_stage("loaders")
    optimizer = recipe_lib.make_optimizer(model, recipe)
    scheduler = recipe_lib.make_scheduler(optimizer, recipe, steps_per_epoch=len(train_loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
    scaler = LossScaler(device) if runtime["amp"] == "fp16" else None
    return Training(model=model, device=device, runtime=runtime, recipe=recipe, train_loader=train_loader,
                    test_loader=test_loader, optimizer=optimizer, scheduler=scheduler, criterion=criterion,
                    scaler=scaler)


def new_history():
    """Per-epoch lists, one entry per completed epoch."""
    keys = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds")
    return {key: [] for key in keys}


def run_identity(*, norm, seed, recipe, dataset):
    """What a checkpoint must match to be resumed: the variant, the seed, every recipe value
    and the data it was trained and evaluated on (sizes and a checksum, :func:`data.fingerprint`)."""
    return {"norm": norm, "seed": seed, "data": data_lib.fingerprint(dataset),
            **{f"recipe.{key}": value for key, value in recipe.items()}}


def check_finite_state(model, epoch):
    """Raise :class:`divergence.NonFiniteStateError` if a parameter or buffer (e.g. BatchNorm's
    running variance) is NaN or infinite: the loss can stay finite while they diverge."""
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise NonFiniteStateError(name, epoch)


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """How :func:`fit` trains a model, never what it computes (the model, its data, norm, recipe
    and seed say that): one value that :func:`run.run_one` hands on to :func:`fit`.

    ``device``: a name or ``torch.device``; ``runtime``: see :func:`resolve_runtime`. With
    ``checkpoint_path`` a checkpoint is written after every epoch; with ``resume`` the run
    continues from it. ``progress``: a progress bar per epoch (eager runs). ``log`` receives one
    line per epoch. ``on_prepared(training)`` is called once the run is set up (:class:`Training`;
    its ``runtime`` is the one used, which is ``runtime`` less the Triton kernels where they failed
    to compile or their self-check)."""
    device: str | torch.device = "cpu"
    runtime: str | dict | None = None
    checkpoint_path: str | os.PathLike | None = None
    resume: bool = False
    progress: bool = True
    log: Callable[[str], object] = print
    on_prepared: Callable[[Training], object] | None = None


def fit(model, dataset, *, norm, recipe=None, seed=0, options: FitOptions | None = None, **how):
    """Train ``model`` for ``recipe["epochs"]`` epochs, testing after each; return the history.

    ``model`` is trained as given: build it with :func:`models.fresh_model` (seeded, whitening
    initialization) or load weights into it first. ``norm`` names the variant (stored in the
    checkpoint, so a resume cannot mix variants). How it trains is ``options``
    (:class:`FitOptions`); keywords named as its fields (``device=``, ``resume=``, ``log=``...)
    change single ones, e.g. ``fit(model, dataset, norm="bn", device="cuda", progress=False)``.
    """
    options = dataclasses.replace(options or FitOptions(), **how)
    recipe = recipe or recipe_lib.recipe_for(norm)
    checkpoint_path, log = options.checkpoint_path, options.log
    with DEVICE_LOCK.alone():  # compiling and checking kernels, seeding: nothing else on the GPU meanwhile
        training = prepare(model, dataset, recipe=recipe, device=options.device, seed=seed, runtime=options.runtime,
                           norm=norm)
        if options.on_prepared is not None:
            options.on_prepared(training)
        identity = run_identity(norm=norm, seed=seed, recipe=recipe, dataset=dataset)
        history = new_history()
        if options.resume:
            state = checkpoints.load_torch(checkpoint_path)
            checkpoints.check_resumable(state, checkpoint_path, identity)
            history = _restore(training, state, checkpoint_path)
            log(f"{norm}: resumed from {checkpoint_path} after epoch {state['epoch']}")
        trainer = training.epoch_trainer(progress=options.progress, desc=norm)
    for epoch in range(len(history["test_acc"]) + 1, recipe["epochs"] + 1):
        trainer.record()  # outside DEVICE_LOCK.work(): recording takes it alone
        with DEVICE_LOCK.work():
            _epoch(training, trainer, epoch, history=history, identity=identity,
                   checkpoint_path=checkpoint_path, log=log, norm=norm)
    return history


def _epoch(training, trainer, epoch, *, history, identity, checkpoint_path, log, norm):
    """Train and test one epoch, append its figures to ``history``, write the checkpoint."""
    model, device, optimizer, recipe = training.model, training.device, training.optimizer, training.recipe
    start = time.perf_counter()
    lr = float(optimizer.param_groups[0]["lr"])  # a tensor under CUDA graphs: read it now
    try:
        train_loss, train_acc = trainer.train_epoch(epoch)
    except NonFiniteLossError as err:
        raise NonFiniteLossError(err.batch, epoch) from None
    check_finite_state(model, epoch)
    test_loss, test_acc = loop.test(model, device, training.test_loader, training.criterion,
                                    amp_dtype=training.amp_dtype)
    seconds = time.perf_counter() - start
    for key, value in zip(new_history(), (train_loss, train_acc, test_loss, test_acc, lr, seconds)):
        history[key].append(value)
    if checkpoint_path is not None:
        checkpoints.save_torch(checkpoint_path, checkpoints.make_checkpoint(
            model=model, optimizer=optimizer, scheduler=training.scheduler,
            generator=training.train_loader.generator, history=history, run=identity, scaler=training.scaler))
    log(f"{norm} epoch {epoch:2d}/{recipe['epochs']}  train loss {train_loss:.4f} acc {train_acc:5.2f}%  "
        f"test loss {test_loss:.4f} acc {test_acc:5.2f}%  ({seconds:.2f} s)")


def _restore(training, state, path):
    """Load a checkpoint's model, optimizer, schedule and RNG states; return its history. A
    checkpoint of the right format but the wrong structure is refused with one line."""
    try:
        training.model.load_state_dict(state["model"])
        training.optimizer.load_state_dict(state["optimizer"])
        training.scheduler.load_state_dict(state["scheduler"])
        if training.scaler is not None and state.get("scaler") is not None:
            training.scaler.load_state_dict(state["scaler"])  # else (not an fp16 run before) it starts afresh
        with models.GLOBAL_RNG_LOCK:
            checkpoints.set_rng_state(state["rng"], training.train_loader.generator)
        history = state["history"]
        if set(history) != set(new_history()) or len({len(v) for v in history.values()}) != 1:
            raise ValueError("its history is incomplete")
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        # one_line: load_state_dict names the offending key on its message's second line
        reason = checkpoints.one_line(err)
        raise checkpoints.CheckpointError(f"{path}: damaged checkpoint, refused ({reason})") from None
    return history
