"""Many runs, one model: K runs that share a batch size and schedule, trained as one stacked network.

Small batches leave a GPU idle: a batch-2 step of this network is ~100 tiny kernels (0.43 ms on an
H200), bound by launches, not arithmetic. K copies of the network side by side as one model
(:class:`models.CifarNet` with ``stack``: grouped convolutions, :class:`models.StackedNorm`) run
the same ~100 kernels, each K times wider: a probe on the H200 gave 4.2x / 8.4x / 11.9x the
throughput of one model at batch 2 for K = 9 / 27 / 81 (benchmarks/NOTES.md). This is HFTA's
horizontal fusion (Wang et al., MLSys 2021).

What stays each run's own: its seed's initialization (the model is built alone, whitening
included, then copied into its slice), its data order and augmentation (its own loader and
generator, exactly the draws it makes alone), its loss (the stack's loss is the sum of the runs'
losses, so each run gets exactly its own gradient) with its own label smoothing, its optimizer
state and weight decay, its norm (runs of any norms and group counts can share a stack: each
norm layer normalizes each run's channels as that run's own norm would; :func:`plan_stacks` gives
each norm its own stack, which measured faster, and mixes them only when asked). What the runs of a stack
share (:data:`SHARED`): the batch size, the schedule and the optimizer's momentum, the dropout
and the data. Under fp16 they also share one loss scale (an overflow in one run skips the step
for all).

Every run still ends as an ordinary run (:mod:`normstudy.run`): its folder, held and locked as
``run_one`` holds it, a checkpoint after every epoch in the format of a single run (so a stacked
run can resume alone and a single run in a stack), ``weights.pt``, figures and ``record.json``,
which says ``"stack": {"size": K, ...}``. A stopped stack resumes each run from its last complete
epoch; runs at different epochs train in different stacks; a finished run is never trained
again. A run whose loss turns NaN fails alone: the others continue in a smaller stack.

The stack runs PyTorch's modules (grouped convolutions, ``F.batch_norm`` / ``F.group_norm`` per
segment of runs), not the Triton kernels, and says so in one line; on CUDA its whole epochs
replay as CUDA graphs (:class:`fast.graph_epoch.GraphEpoch`) like a single run's.
"""
import contextlib
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import checkpoints
from . import data as data_lib
from . import fit as fit_lib
from . import loop
from . import models
from . import recipe as recipe_lib
from . import run as run_lib
from . import runtime as runtime_lib
from .fast.amp import LossScaler
from .fast.graph_epoch import GraphEpoch
from .runtime import DEVICE_LOCK

# Recipe values the runs of one stack must share: one optimizer step, one schedule, one batch.
SHARED = ("batch_size", "epochs", "lr_per_32", "pct_start", "div_factor", "final_div_factor", "momentum", "dropout")
# "auto" stack size on CUDA: at most this many runs, and at most this many images a step over the
# whole stack (a stack at batch 512 is compute-bound already: stacking gains little there and
# costs memory), and at most this share of the GPU's memory for the stack's copies of the data.
AUTO_MAX_RUNS = 32
AUTO_IMAGES_PER_STEP = 4096
AUTO_MEMORY_SHARE = 0.3
# ... and at least this many runs of one norm, else single runs on streams: on the H200 a stack of
# 9 (one norm) made 8,190 model-steps/s at batch 2 where 9 single runs on streams made 10,880;
# a stack of 27 made 16,000-19,100 against 10,400 (benchmarks/NOTES.md, profile_stack.py).
AUTO_MIN_RUNS = 27
# ... except at batches of at most this size, where a norm's runs stack by threes however few share
# it (the grids' 3 seeds): stacks of 3 side by side beat single runs with the Triton kernels on
# streams at batch 2 (9 stacks of 3: 16,023 model-steps/s; 27 single runs: 11,262), not at batch 8
# (9,782 against 10,400-10,900); at batch 4 they still gain a little (11,049 against 10,602)
# (H200, 2026-12-03, benchmarks/NOTES.md).
AUTO_SMALL_BATCH = 4
AUTO_SMALL_STACK = 3


def stack_key(config):
    """Runs with equal keys can share a stack (see :data:`SHARED`). A run with network choices
    (``RunConfig.choices``: block order, ghost batches, Batch Renorm, WS), which stacks do not
    implement, has a key of its own: it trains alone."""
    recipe = config.recipe
    alone = (config.run_id,) if config.choices else ()
    return (config.data, config.holdout) + tuple(recipe[key] for key in SHARED) + alone


def norm_spec(config):
    """The run's norm as a stack lays it out (:class:`models.NormSpec`)."""
    recipe = config.recipe
    return models.norm_spec(config.norm, groups=recipe["gn_groups"], bn_momentum=recipe["bn_momentum"])


def _spec_order(config):
    spec = norm_spec(config)
    return spec.kind, spec.groups or 0, spec.momentum or 0.0


def plan_stacks(configs, size, *, min_size=1, mix_norms=False):
    """``configs`` cut into stacks: runs that share :func:`stack_key` and (unless ``mix_norms``)
    one norm, at most ``size`` a stack (an int, or a function of a config giving the size for its
    key), as evenly as possible; a stack of fewer than ``min_size`` runs becomes single runs.
    Stacks come in the order of their first run; within a mixed stack runs are ordered by norm,
    so that each norm layer normalizes one segment per kind of norm.

    One norm a stack by default, because it is faster: a mixed stack's norm layers slice, normalize
    and concatenate a segment per norm; on the H200 27 runs as one mixed stack made 10,600
    model-steps/s at batch 2, as three stacks of one norm side by side 16,000 (benchmarks/NOTES.md)."""
    groups = {}
    for config in configs:
        key = stack_key(config) if mix_norms else (stack_key(config), _spec_order(config))
        groups.setdefault(key, []).append(config)
    stacks = []
    for members in groups.values():
        limit = size(members[0]) if callable(size) else size
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"stack size {limit!r} must be a whole number >= 1")
        count = -(-len(members) // limit)
        per = -(-len(members) // count)
        for i in range(0, len(members), per):
            stack = sorted(members[i:i + per], key=_spec_order)
            stacks += [stack] if len(stack) >= min_size else [[config] for config in stack]
    return _in_order_of(configs, stacks)


def _in_order_of(configs, stacks):
    """``stacks`` in the order of their first run in ``configs``."""
    first = {config.run_id: k for k, config in enumerate(configs)}
    return sorted(stacks, key=lambda stack: min(first[config.run_id] for config in stack))


def plan_auto(configs, *, largest):
    """The stacks ``"auto"`` means (one norm a stack, see :func:`plan_stacks`): where at least
    :data:`AUTO_MIN_RUNS` runs can share a stack, stacks of up to ``largest(config)`` runs; else, at
    batches of at most :data:`AUTO_SMALL_BATCH`, stacks of :data:`AUTO_SMALL_STACK` (fewer left over
    train alone); else single runs."""
    stacks = []
    for group in plan_stacks(configs, max(1, len(configs))):  # every group of runs that can share a stack
        if len(group) >= AUTO_MIN_RUNS:
            stacks += plan_stacks(group, largest)
        elif group[0].batch_size <= AUTO_SMALL_BATCH:
            for i in range(0, len(group), AUTO_SMALL_STACK):
                part = group[i:i + AUTO_SMALL_STACK]
                stacks += [part] if len(part) == AUTO_SMALL_STACK else [[config] for config in part]
        else:
            stacks += [[config] for config in group]
    return _in_order_of(configs, stacks)


def auto_size(config, *, device, train_images):
    """The stack size "auto" means for ``config``'s runs: 1 off CUDA (a CPU is busy with one
    model already), else as many runs as pay off (:data:`AUTO_MAX_RUNS`,
    :data:`AUTO_IMAGES_PER_STEP`) and fit (:data:`AUTO_MEMORY_SHARE`)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    by_batch = AUTO_IMAGES_PER_STEP // config.batch_size
    per_run = 3 * train_images.numel() * train_images.element_size()  # the stacked copies of the images
    by_memory = int(AUTO_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory // per_run)
    return max(1, min(AUTO_MAX_RUNS, by_batch, by_memory))


def stack_runtime(device, runtime):
    """The runtime a stack trains with: ``runtime`` (see :func:`fit.resolve_runtime`) without the
    Triton kernels, which take one network's channels only (one line says so)."""
    resolved = fit_lib.resolve_runtime(device, None, runtime)
    if resolved["triton_kernels"]:
        runtime_lib.say_once("normstudy: stacked runs use PyTorch's modules (grouped convolutions), "
                             "not the Triton kernels")
    return {**resolved, "triton_kernels": False}


# --- the pieces of a stack ----------------------------------------------------------------------

class StackLoss(nn.Module):
    """The stack's criterion: every run's cross-entropy with its own label smoothing, as a vector
    of K losses (their sum is what is trained; each run's is what its history shows). Logits
    ``(N, K * classes)``, labels ``(N, K)``. One computation for all runs, not K: at small batches
    K separate losses would cost more launches than the network."""

    def __init__(self, smoothings, device):
        super().__init__()
        self.runs = len(smoothings)
        self.register_buffer("smoothing", torch.tensor(smoothings, dtype=torch.float64, device=device))

    def forward(self, logits, labels):
        if logits.dtype in (torch.float16, torch.bfloat16):  # as autocast runs cross-entropy: in fp32
            logits = logits.float()
        logp = F.log_softmax(logits.view(len(labels), self.runs, -1), dim=2)
        nll = -logp.gather(2, labels.unsqueeze(2)).squeeze(2)
        uniform = -logp.mean(dim=2)  # the smoothed target's share: cross-entropy against 1/classes
        smoothing = self.smoothing.to(logp.dtype)
        return ((1 - smoothing) * nll + smoothing * uniform).mean(dim=0)


class StackedLoader:
    """The runs' training loaders as one: each epoch every run's own shuffled, augmented images
    (its own generator), run k's in channels ``3k..3k+2``, and its labels in column k."""

    def __init__(self, loaders):
        self.loaders = list(loaders)
        first = self.loaders[0]
        self.device, self.batch_size, self.train = first.device, first.batch_size, True
        k = len(self.loaders)
        self.images = first.images.repeat(1, k, 1, 1)  # shapes and warm-up data for fast.graph_epoch
        self.labels = first.labels.unsqueeze(1).repeat(1, k)
        self.mean = data_lib.channel_tensor(data_lib.MEAN * k, device=self.device)
        self.std = data_lib.channel_tensor(data_lib.STD * k, device=self.device)

    def __len__(self):
        return len(self.loaders[0])

    def epoch_tensors(self):
        parts = [loader.epoch_tensors() for loader in self.loaders]
        return torch.cat([images for images, _ in parts], dim=1), torch.stack([labels for _, labels in parts], dim=1)


class _Replicated(nn.Module):
    """The stack seen as one model of one image: every run gets the same test images."""

    def __init__(self, stacked):
        super().__init__()
        self.stacked, self.runs = stacked, len(stacked.stack)

    def forward(self, images):
        return self.stacked(images.repeat(1, self.runs, 1, 1))


def _pairs(stacked, single):
    """(stacked parameter, single parameter) by name."""
    theirs = dict(single.named_parameters())
    return [(param, theirs[name]) for name, param in stacked.named_parameters()]


class Stack:
    """K set-up runs (:class:`fit.Training`, each alone) and the one stacked model that trains them.

    :meth:`train_epoch` trains all K for an epoch; :meth:`evaluate` tests each; :meth:`copy_back`
    writes the stack's state into each run's own model, optimizer and schedule, from where its
    checkpoint, figures and record are made as a single run's are."""

    def __init__(self, trainings, specs, *, runtime):
        self.trainings, self.runtime = list(trainings), runtime
        first = self.trainings[0]
        self.device, self.recipe, k = first.device, first.recipe, len(self.trainings)
        self.model = models.CifarNet(stack=specs, **recipe_lib.model_kwargs(self.recipe))
        self.model.to(dtype=next(first.model.parameters()).dtype)  # fp32, or fp64 in the tests
        fit_lib.prepare_model(self.model, self.device, runtime)
        self.optimizer = recipe_lib.make_optimizer(self.model, self.recipe)
        decays = [training.recipe["weight_decay"] for training in self.trainings]
        if len(set(decays)) > 1:  # each run its own decay over its slice of every decayed parameter
            group = self.optimizer.param_groups[0]
            group["weight_decay"] = [self._per_run(param, decays) for param in group["params"]]
        for group in self.optimizer.param_groups:  # a CUDA graph reads the lr from a fixed tensor
            group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
        self.loader = StackedLoader([training.train_loader for training in self.trainings])
        self.scheduler = recipe_lib.make_scheduler(self.optimizer, self.recipe, steps_per_epoch=len(self.loader))
        self.scaler = None
        if runtime["amp"] == "fp16":
            self.scaler = LossScaler(self.device)
            scales = [t.scaler.state_dict() for t in self.trainings if t.scaler is not None]
            if scales:  # one scale for all: the smallest, the one no run overflowed with
                self.scaler.load_state_dict(min(scales, key=lambda state: state["scale"]))
        self.criterion = StackLoss([t.recipe["label_smoothing"] for t in self.trainings], self.device)
        self._copy_in()
        self.epoch_trainer = GraphEpoch(
            self.model, self.optimizer, self.criterion, self.scheduler, self.loader,
            amp_dtype=runtime_lib.AMP_DTYPES[runtime["amp"]], channels_last=runtime["channels_last"],
            total_steps=self.recipe["epochs"] * len(self.loader), scaler=self.scaler, graphs=runtime["cuda_graph"])
        self.test_loader = data_lib.test_loader(
            {"test_images": first.test_loader.images, "test_labels": first.test_loader.labels}, device=self.device,
            batch_size=max(1, first.test_loader.batch_size // k))

    def _per_run(self, param, values):
        rows = torch.tensor(values, dtype=param.dtype, device=param.device).repeat_interleave(
            param.shape[0] // len(values))
        return rows.view(-1, *([1] * (param.dim() - 1)))

    @torch.no_grad()
    def _copy_in(self):
        for k, training in enumerate(self.trainings):
            state = training.model.state_dict()
            for name, view in models.run_state(self.model, k, training.model).items():
                view.copy_(state[name])
            for stacked, single in _pairs(self.model, training.model):
                size = single.shape[0]
                self.optimizer.state[stacked]["momentum_buffer"].narrow(0, k * size, size).copy_(
                    training.optimizer.state[single]["momentum_buffer"])
        self.scheduler.last_epoch = self.trainings[0].scheduler.last_epoch
        self.scheduler._apply()

    @torch.no_grad()
    def copy_back(self):
        """Each run's share of the stack into its own model, optimizer, schedule and loss scale."""
        for k, training in enumerate(self.trainings):
            state = training.model.state_dict()
            for name, view in models.run_state(self.model, k, training.model).items():
                state[name].copy_(view)
            for stacked, single in _pairs(self.model, training.model):
                size = single.shape[0]
                training.optimizer.state[single]["momentum_buffer"].copy_(
                    self.optimizer.state[stacked]["momentum_buffer"].narrow(0, k * size, size))
            training.scheduler.last_epoch = self.scheduler.last_epoch
            training.scheduler._apply()
            if training.scaler is not None and self.scaler is not None:
                training.scaler.load_state_dict(self.scaler.state_dict())

    def train_epoch(self):
        """One epoch of every run: ``(losses, accuracies, first bad batches)``, one entry per run."""
        return self.epoch_trainer.train_epoch()

    def evaluate(self):
        """``[(test loss, test accuracy in %), ...]``, one per run, as ``loop.test`` gives them alone."""
        amp_dtype = runtime_lib.AMP_DTYPES[self.runtime["amp"]]
        logits, labels = loop.predict(_Replicated(self.model), self.device, self.test_loader, amp_dtype=amp_dtype)
        logits = logits.view(len(labels), len(self.trainings), -1)
        results = []
        for k, training in enumerate(self.trainings):
            mine = logits[:, k].contiguous()
            results.append((training.criterion(mine, labels).item(),
                            100.0 * loop.GetCorrectPredCount(mine, labels) / len(labels)))
        return results


# --- training a stack ---------------------------------------------------------------------------

class _Member:
    """One run of a stack: its config, folder, set-up (:class:`fit.Training`), history, checkpoint."""

    def __init__(self, config, run_dir):
        self.config, self.run_dir = config, run_dir
        self.checkpoint, self.resume = run_dir / "checkpoint.pt", False
        self.training = self.history = self.identity = None
        self.stacked_with = None  # the run ids of the stack it trained in (first, if several)


def train_stack(configs, out, *, dataset, device, runtime=None, resume=True, restart=False, figures=True,
                log=print):
    """Train ``configs`` (runs sharing :func:`stack_key`) as stacks into ``out/<run id>/`` and
    return ``[(config, record or exception), ...]`` in the order given: each run's record as
    :func:`run.run_one` returns it, or why it failed (the others go on). A finished run is
    returned as it is; an interrupted one resumes from its checkpoint (``resume``) or starts over
    (``restart``). ``dataset`` on ``device`` (see ``runners.local``); ``log`` gets one line per
    run and epoch, prefixed with nothing (the caller adds the run id if it likes: the lines say
    the norm as single runs' do)."""
    configs = list(configs)
    keys = {stack_key(config) for config in configs}
    if len(keys) > 1:
        raise ValueError("a stack's runs must share " + ", ".join(SHARED) + " and the data")
    if any(config.choices for config in configs):  # the stack would build the seed's network instead
        raise ValueError("a stack trains the seed's network only: runs with network choices (order, norm_batch, "
                         "renorm, ws) train alone")
    device = runtime_lib.pick_device(device) if isinstance(device, str) else torch.device(device)
    outcomes, said = {}, []  # lines said while setting up wait until then (log may stop the runner)
    with contextlib.ExitStack() as held:
        members = []
        for config in configs:
            try:
                member = _hold(config, Path(out), held=held, log=said.append, outcomes=outcomes)
                if member is not None:
                    member.checkpoint, member.resume = run_lib.checkpoint_to_resume(
                        member.run_dir, resume=resume, restart=restart)
                    members.append(member)
            except Exception as err:  # noqa: BLE001 - this run fails, the others go on
                outcomes[config.run_id] = err
        _train_members(members, dataset=dataset, device=device, runtime=runtime, figures=figures, log=log,
                       said=said, outcomes=outcomes)
    return [(config, outcomes[config.run_id]) for config in configs]


def _hold(config, out, *, held, log, outcomes):
    """Hold ``config``'s folder as :func:`run.run_one` does; ``None`` when the run is finished
    (its record goes to ``outcomes``)."""
    run_dir = out / config.run_id
    record = run_lib.finished_record(run_dir, config)
    if record is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        held.enter_context(run_lib.folder_lock(run_dir))
        record = run_lib.finished_record(run_dir, config)  # another process may have finished it meanwhile
    if record is not None:
        outcomes[config.run_id] = record
        return None
    run_lib.prepare_folder(run_dir, config, log=log)
    return _Member(config, run_dir)


def _set_up(member, *, dataset, device, runtime, log):
    """The run alone: its seeded model (whitening included), loaders, optimizer and schedule,
    resumed from its checkpoint when there is one."""
    config, recipe = member.config, member.config.recipe
    model = models.fresh_model(config.norm, recipe, train_images=dataset["train_images"], seed=config.seed)
    member.training = fit_lib.prepare(model, dataset, recipe=recipe, device=device, seed=config.seed,
                                      runtime={**runtime, "cuda_graph": False}, norm=config.norm)
    member.identity = fit_lib.run_identity(norm=config.norm, seed=config.seed, recipe=recipe, dataset=dataset)
    member.history = fit_lib.new_history()
    if member.resume:
        state = checkpoints.load_torch(member.checkpoint)
        checkpoints.check_resumable(state, member.checkpoint, member.identity)
        member.history = fit_lib._restore(member.training, state, member.checkpoint)
        log(f"{config.run_id}: resumed from {member.checkpoint} after epoch {state['epoch']}")


def _train_members(members, *, dataset, device, runtime, figures, log, said, outcomes):
    start = time.perf_counter()
    runtime = stack_runtime(device, runtime)
    with DEVICE_LOCK.alone():  # seeding and set-up: nothing else on the GPU meanwhile (see fast.graph_epoch)
        for member in list(members):
            try:
                _set_up(member, dataset=dataset, device=device, runtime=runtime, log=said.append)
            except Exception as err:  # noqa: BLE001
                outcomes[member.config.run_id] = err
                members.remove(member)
    for line in said:
        log(line)
    by_epoch = {}
    for member in members:  # runs stopped at different epochs cannot step together
        by_epoch.setdefault(len(member.history["test_acc"]), []).append(member)
    for group in by_epoch.values():
        active = group
        while active:
            active = _train_group(active, runtime=runtime, log=log, outcomes=outcomes)
    for member in members:
        if member.config.run_id in outcomes:
            continue
        runs = member.stacked_with or [member.config.run_id]
        try:
            outcomes[member.config.run_id] = run_lib.finish_run(
                member.config, member.run_dir, model=member.training.model, history=member.history,
                runtime=runtime, device=device, dataset=dataset, figures=figures,
                seconds=time.perf_counter() - start, extra={"stack": {"size": len(runs), "runs": runs}}, log=log)
        except Exception as err:  # noqa: BLE001
            outcomes[member.config.run_id] = err


def _train_group(members, *, runtime, log, outcomes):
    """Train ``members`` (all at the same epoch) as one stack to their last epoch; returns the
    runs still to train when some failed (they continue in a new, smaller stack), else ``[]``."""
    with DEVICE_LOCK.alone():
        stack = Stack([m.training for m in members], [norm_spec(m.config) for m in members], runtime=runtime)
    for member in members:
        member.stacked_with = member.stacked_with or [m.config.run_id for m in members]
    epochs = members[0].config.epochs
    for epoch in range(len(members[0].history["test_acc"]) + 1, epochs + 1):
        stack.epoch_trainer.record()  # outside DEVICE_LOCK.work(): recording takes it alone
        begin = time.perf_counter()
        lr = float(stack.optimizer.param_groups[0]["lr"])
        with DEVICE_LOCK.work():
            losses, accuracies, bad = stack.train_epoch()
            tests = stack.evaluate()
            stack.copy_back()
            seconds = time.perf_counter() - begin
            failed, lines = [], []
            for k, member in enumerate(members):
                try:
                    if bad[k] >= 0:
                        raise loop.NonFiniteLossError(bad[k], epoch)
                    fit_lib.check_finite_state(member.training.model, epoch)
                    _checkpoint(member, epoch_figures=(losses[k], accuracies[k], *tests[k], lr, seconds))
                except Exception as err:  # noqa: BLE001 - this run fails; the others go on
                    outcomes[member.config.run_id] = err
                    failed.append(member)
                    continue
                lines.append(f"{member.config.run_id} epoch {epoch:2d}/{epochs}  train loss {losses[k]:.4f} "
                             f"acc {accuracies[k]:5.2f}%  test loss {tests[k][0]:.4f} acc {tests[k][1]:5.2f}%  "
                             f"({seconds:.2f} s, stack of {len(members)})")
        for line in lines:  # after every checkpoint of the epoch is written: a stop here loses nothing
            log(line)
        if failed:
            return [m for m in members if m not in failed] if epoch < epochs else []
    return []


def _checkpoint(member, *, epoch_figures):
    """Append the epoch's figures to the run's history and write its checkpoint, as a single run's."""
    for key, value in zip(fit_lib.new_history(), epoch_figures):
        member.history[key].append(value)
    training = member.training
    checkpoints.save_torch(member.checkpoint, checkpoints.make_checkpoint(
        model=training.model, optimizer=training.optimizer, scheduler=training.scheduler,
        generator=training.train_loader.generator, history=member.history, run=member.identity,
        scaler=training.scaler))
