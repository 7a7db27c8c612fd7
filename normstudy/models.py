"""The one network of this study, parametrized by its normalization layer.

A 48,736-parameter CNN for 32x32 CIFAR-10 images (the seed's architecture, layer for layer):

    C1  3->32 3x3 | C2 32->32 3x3, residual x + C2(x) | c3 1x1 32->16 | MaxPool 2   (32 -> 16)
    C4 16->32 3x3 | C5 32->32 3x3, residual x + C5(x) | c6 1x1 32->16 | MaxPool 2   (16 -> 8)
    C7 16->32 3x3 | C8 32->32 3x3 pad 0 (8 -> 6) | C9 32->32 3x3 pad 0 (6 -> 4)
    AvgPool 4 (global average) | c10 1x1 32->10 -> logits

Every 3x3 block is Conv(bias=False) -> ReLU -> Norm -> Dropout, as in the seed. The norm is one
of ``"bn"`` (BatchNorm2d), ``"ln"`` (GroupNorm with one group: each image normalized over C, H
and W) and ``"gn"`` (GroupNorm with ``groups`` groups). ``model_bn``, ``model_ln`` and
``model_gn`` are named variants of :class:`CifarNet`.

The network choices of issue 20 (``RunConfig``'s ``order``, ``norm_batch``, ``renorm``, ``ws``):
``order="norm-relu"`` makes every block Conv -> Norm -> ReLU (the modules keep their places, so
the parameter names are the same in both orders); ``norm_batch`` n makes BatchNorm a
:class:`GhostBatchNorm2d` (statistics over groups of n images); ``renorm`` a
:class:`BatchRenorm2d` (Batch Renormalization, schedule :data:`RENORM`); ``ws`` makes every 3x3
convolution after the first (each is followed by a norm) a :class:`WSConv2d`: the first keeps its
whitening initialization, which standardizing would undo. The fused Triton kernels implement none
of the first three (:func:`kernel_gaps`: such a model takes PyTorch's modules); with ``ws`` they
all stay (the first layer's Triton convolution, on its plain weight, too).

With ``order="norm-relu"`` a block with a skip connection is He et al.'s ResNet block (as in Wu &
He): ``relu(x + norm(conv(x)))``, the ReLU after the sum; the seed's order adds after its norm,
``x + norm(relu(conv(x)))``.

The forward pass returns raw logits; pair it with ``nn.CrossEntropyLoss``.

**A stack of K runs** (``CifarNet(stack=specs)``, one :class:`NormSpec` per run) is the same
network K times side by side, as one model (HFTA's horizontal fusion, Wang et al., MLSys 2021):
every convolution is grouped (``groups=K``, run k's filters in channels ``k*C..(k+1)*C``), and
each norm layer is a :class:`StackedNorm` that normalizes each run's channels as that run's own
norm would (BatchNorm over (N, H, W) per channel, GroupNorm per image over each run's groups).
Its input holds run k's images in channels ``3k..3k+2`` and its output run k's logits in columns
``10k..10k+9``. Nothing crosses from one run's channels to another's, so the sum of the runs'
losses gives each run exactly its own gradient. :func:`run_state` views one run's share of the
stack's parameters and buffers under the names a single ``CifarNet`` has.
:func:`fresh_model` builds the network a run starts from (seeded, then the recipe's
initialization).

:data:`GLOBAL_RNG_LOCK` is held by every step of a run that seeds or draws from torch's global
random generator (building a model here, seeding and restoring it in :mod:`normstudy.fit`), so
runs in several threads of one process (``runners.LocalRunner(concurrency=k)``) never interleave
one run's seeding with another's initialization. Dropout also draws from that generator while
training, unguarded: with a dropout above 0, concurrent runs are not reproducible (the recipe's
dropout is 0).
"""
import threading
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from . import recipe as recipe_lib
from .config import NORMS

GLOBAL_RNG_LOCK = threading.RLock()  # see the module docstring


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that under mixed precision runs in the half-precision dtype it is given.

    Autocast would upcast its input to fp32 and return fp32, which the next convolution casts
    back: two extra passes over every activation, forward and backward. The CUDA kernel already
    accumulates the statistics in fp32, so only the stored output is rounded, as the convolution
    would round it anyway. Without autocast (CPU, fp32 runs) it is exactly ``nn.GroupNorm``.
    """

    def forward(self, x):
        if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return super().forward(x)


# Batch Renormalization's schedule (Ioffe 2017), in epochs, the same for every batch size: plain
# BatchNorm (r_max = 1, d_max = 0) through the first epoch, then r_max and d_max relaxed linearly to
# Wu & He's values (1.5 and 0.5, the best they found; Ioffe's were 3 and 5) by the end of epoch 5,
# where the one-cycle learning rate peaks, and held there. Ioffe states the schedule in steps (plain
# BN for 5,000 steps, r_max 3 at 40,000, d_max 5 at 25,000), but an epoch here is 98 steps at
# batch 512 and 25,000 at batch 2: in steps, batch 2 would relax within a fifth of its first epoch
# while batch 512 would never leave plain BatchNorm in its 1,960 steps. In epochs every batch size
# relaxes at the same point of its learning-rate schedule, after its running statistics (which r
# and d are measured against) have followed the network for one epoch: at least 98 updates, each
# with BatchNorm's momentum. See RenormSchedule.steps for what that is in steps per batch size.
RENORM = {"warmup_epochs": 1.0, "relaxed_epochs": 5.0, "r_max": 1.5, "d_max": 0.5}


class RenormSchedule(NamedTuple):
    """Batch Renormalization's limits over training: r_max = 1 and d_max = 0 (plain BatchNorm)
    until ``warmup_epochs``, then linear to ``r_max`` and ``d_max`` at ``relaxed_epochs``, held
    after; an epoch is ``steps_per_epoch`` training steps (see :data:`RENORM`)."""
    steps_per_epoch: int
    warmup_epochs: float = RENORM["warmup_epochs"]
    relaxed_epochs: float = RENORM["relaxed_epochs"]
    r_max: float = RENORM["r_max"]
    d_max: float = RENORM["d_max"]

    def progress(self, step):
        """How far the limits have relaxed at training ``step`` (a tensor, e.g. BatchNorm's
        ``num_batches_tracked``): 0 (plain BN) to 1, as a float tensor."""
        epoch = step.to(torch.float32) / self.steps_per_epoch
        span = max(self.relaxed_epochs - self.warmup_epochs, 1e-12)
        return ((epoch - self.warmup_epochs) / span).clamp(0.0, 1.0)

    def limits(self, step):
        """``(r_max, d_max)`` at training ``step``, as tensors (CUDA graphs replay them)."""
        t = self.progress(step)
        return 1.0 + t * (self.r_max - 1.0), t * self.d_max

    def steps(self):
        """The schedule in this run's steps: ``(last plain-BN step, first fully relaxed step)``."""
        return round(self.warmup_epochs * self.steps_per_epoch), round(self.relaxed_epochs * self.steps_per_epoch)


def _statistics_dtype(x):
    """``x`` in fp32 when it is in 16 bits (statistics are computed in fp32, as BatchNorm's), else as it is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class BatchRenorm2d(nn.BatchNorm2d):
    """Batch Renormalization (Ioffe, NeurIPS 2017) over (N, H, W) per channel, with
    ``nn.BatchNorm2d``'s parameters, buffers and evaluation (the running statistics).

    Training normalizes with the batch's statistics and corrects them towards the running ones:
    ``y = ((x - mean_B) / std_B * r + d) * weight + bias`` with ``r = clip(std_B / std_run,
    1/r_max, r_max)`` and ``d = clip((mean_B - mean_run) / std_run, -d_max, d_max)``, both held
    constant in the backward pass, ``std = sqrt(var + eps)`` (biased batch variance, as
    BatchNorm). With r_max = 1 and d_max = 0 that is BatchNorm exactly. The limits follow
    ``schedule`` (:class:`RenormSchedule`) by ``num_batches_tracked``, the training steps so far;
    the running statistics are updated as BatchNorm updates them (unbiased variance, momentum).
    """

    def __init__(self, channels, *, schedule, momentum=0.1, eps=1e-5):
        super().__init__(channels, momentum=momentum, eps=eps)
        self.schedule = schedule

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        xf = _statistics_dtype(x)
        mean = xf.mean(dim=(0, 2, 3))
        var = xf.var(dim=(0, 2, 3), unbiased=False)
        std = torch.sqrt(var + self.eps)
        r_max, d_max = self.schedule.limits(self.num_batches_tracked)
        with torch.no_grad():
            running_std = torch.sqrt(self.running_var + self.eps)
            r = torch.minimum(torch.maximum(std / running_std, 1.0 / r_max), r_max)
            d = torch.minimum(torch.maximum((mean - self.running_mean) / running_std, -d_max), d_max)
            count = xf.numel() // xf.shape[1]
            self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(var * (count / max(count - 1, 1)), alpha=self.momentum)
            self.num_batches_tracked.add_(1)
        scale = (r / std * self.weight)[None, :, None, None]
        shift = (self.bias + (d - mean * r / std) * self.weight)[None, :, None, None]
        return (xf * scale + shift).to(x.dtype)


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from groups of ``norm_batch`` images (ghost
    batches; Hoffer et al. 2017): each group of n consecutive images of the batch is normalized
    over its own (n, H, W) per channel, as n images on one of several GPUs would be. The
    optimizer still steps on the whole batch; evaluation uses the running statistics.

    A batch that ``norm_batch`` does not divide (an epoch's last, smaller batch) is cut into
    groups of n and its remainder of r < n images normalized as one more group of r images; a
    batch of at most n images is one group. The running statistics are updated once per step, as
    BatchNorm's, with the groups' means and unbiased variances averaged, each weighted by its
    images: the statistics of n images, as each GPU's BatchNorm would keep. With one group (n at
    least the batch) all of this is BatchNorm exactly.
    """

    def __init__(self, channels, *, norm_batch, momentum=0.1, eps=1e-5):
        if isinstance(norm_batch, bool) or not isinstance(norm_batch, int) or norm_batch < 1:
            raise ValueError(f"norm_batch={norm_batch!r} must be a whole number >= 1")
        super().__init__(channels, momentum=momentum, eps=eps)
        self.norm_batch = norm_batch

    def _groups(self, x):
        """``x`` as a list of (groups, images per group, C, H, W) views: the full groups of n, then the remainder."""
        n = self.norm_batch
        full = len(x) - len(x) % n
        pieces = [x[:full].unflatten(0, (full // n, n))] if full else []
        return pieces + ([x[full:].unsqueeze(0)] if full < len(x) else [])

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        outs, means, variances = [], [], []
        weight, bias = self.weight[None, None, :, None, None], self.bias[None, None, :, None, None]
        for piece in self._groups(x):
            xf = _statistics_dtype(piece)
            mean = xf.mean(dim=(1, 3, 4), keepdim=True)
            var = xf.var(dim=(1, 3, 4), unbiased=False, keepdim=True)
            outs.append(((xf - mean) * torch.rsqrt(var + self.eps) * weight + bias).flatten(0, 1).to(x.dtype))
            count = piece.shape[1] * piece.shape[3] * piece.shape[4]  # values per group and channel
            images = piece.shape[1]  # each group's weight in the running statistics
            means.append(mean.flatten(1) * images)
            variances.append(var.flatten(1) * (count / max(count - 1, 1)) * images)
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(torch.cat(means).sum(0) / len(x), alpha=self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(torch.cat(variances).sum(0) / len(x), alpha=self.momentum)
            self.num_batches_tracked.add_(1)
        return torch.cat(outs) if len(outs) > 1 else outs[0]


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` with Weight Standardization (Qiao et al. 2019): each output channel's filter
    is standardized before it is used, ``w_hat = (w - mean(w)) / sqrt(var(w) + eps)`` over its
    C_in x kH x kW weights (biased variance, the paper's equations), in every forward pass; the
    stored weight stays free (and is what the optimizer and weight decay see)."""

    def __init__(self, *args, ws_eps=1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.ws_eps = ws_eps

    def standardized_weight(self):
        flat = self.weight.flatten(1)
        mean = flat.mean(dim=1, keepdim=True)
        var = flat.var(dim=1, unbiased=False, keepdim=True)
        return ((flat - mean) * torch.rsqrt(var + self.ws_eps)).view_as(self.weight)

    def forward(self, x):
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def make_norm(norm, channels, *, groups=2, bn_momentum=0.1, norm_batch=None, renorm=None):
    """Return the normalization layer for ``channels`` feature maps.

    ``groups`` only matters for ``"gn"``; ``bn_momentum``, ``norm_batch`` (a
    :class:`GhostBatchNorm2d`) and ``renorm`` (a :class:`RenormSchedule`: a
    :class:`BatchRenorm2d`) only for ``"bn"``, which they refuse elsewhere.
    """
    if norm != "bn" and (norm_batch is not None or renorm is not None):
        raise ValueError(f"norm_batch and renorm apply to BatchNorm only, not to {norm!r}")
    if norm_batch is not None and renorm is not None:
        raise ValueError("norm_batch and renorm do not combine: choose ghost batches or Batch Renormalization")
    if norm == "bn" and norm_batch is not None:
        return GhostBatchNorm2d(channels, norm_batch=norm_batch, momentum=bn_momentum)
    if norm == "bn" and renorm is not None:
        return BatchRenorm2d(channels, schedule=renorm, momentum=bn_momentum)
    if norm == "bn":
        return nn.BatchNorm2d(channels, momentum=bn_momentum)
    if norm == "ln":
        # LayerNorm over (C, H, W) of each image == GroupNorm with a single group; it keeps a
        # per-channel affine transform (64 parameters), which nn.LayerNorm over (C, H, W) would not.
        return GroupNorm(1, channels)
    if norm == "gn":
        if not isinstance(groups, int) or groups < 1 or channels % groups:
            raise ValueError(
                f"GroupNorm groups={groups!r} must be a positive integer that divides the "
                f"{channels} channels of each normalized layer (try 1, 2, 4, 8, 16 or 32)")
        return GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


class NormSpec(NamedTuple):
    """One run's norm in a stack: ``kind`` "bn" or "gn" (LayerNorm is "gn" with one group),
    GroupNorm's ``groups``, BatchNorm's ``momentum``."""
    kind: str
    groups: int = None
    momentum: float = None


def norm_spec(norm, *, groups=2, bn_momentum=0.1):
    """The :class:`NormSpec` of ``norm`` as :func:`make_norm` would build it."""
    if norm == "bn":
        return NormSpec("bn", None, bn_momentum)
    make_norm(norm, 32, groups=groups)  # the same refusals
    return NormSpec("gn", 1 if norm == "ln" else groups, None)


class StackedNorm(nn.Module):
    """The norm layers of K runs side by side over ``K * channels`` channels (see the module
    docstring). Consecutive runs of one :class:`NormSpec` form a segment, normalized by one call
    of ``F.batch_norm`` or ``F.group_norm`` (a stack sorted by spec has one segment per kind);
    the segments' outputs are concatenated. Parameters and running statistics cover every
    channel (a GroupNorm run's running statistics are unused), under BatchNorm's names."""

    def __init__(self, specs, channels, *, eps=1e-5):
        super().__init__()
        self.specs, self.channels, self.eps = tuple(specs), channels, eps
        width = len(self.specs) * channels
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("running_mean", torch.zeros(width))
        self.register_buffer("running_var", torch.ones(width))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.segments = []  # (first channel, end channel, spec, runs)
        start = 0
        for k, spec in enumerate(self.specs + (None,)):
            if k == len(self.specs) or spec != self.specs[start]:
                if k:
                    self.segments.append((start * channels, k * channels, self.specs[start], k - start))
                start = k

    def _segment(self, x, a, b, spec, runs):
        if spec.kind == "bn":
            return F.batch_norm(x, self.running_mean[a:b], self.running_var[a:b], self.weight[a:b], self.bias[a:b],
                                self.training, spec.momentum, self.eps)
        weight, bias = self.weight[a:b], self.bias[a:b]
        if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):  # as GroupNorm above: stay in 16 bits
                return F.group_norm(x, runs * spec.groups, weight.to(x.dtype), bias.to(x.dtype), self.eps)
        return F.group_norm(x, runs * spec.groups, weight, bias, self.eps)

    def forward(self, x):
        if self.training and any(spec.kind == "bn" for spec in self.specs):
            self.num_batches_tracked.add_(1)
        if len(self.segments) == 1:
            return self._segment(x, *self.segments[0])
        return torch.cat([self._segment(x[:, a:b], a, b, spec, runs) for a, b, spec, runs in self.segments], dim=1)


def norm_layer(norm, channels, *, groups, bn_momentum, stack=None, norm_batch=None, renorm=None):
    """``make_norm``'s layer, or for a stack (a tuple of :class:`NormSpec`) a :class:`StackedNorm`."""
    if stack is not None:
        return StackedNorm(stack, channels)
    return make_norm(norm, channels, groups=groups, bn_momentum=bn_momentum, norm_batch=norm_batch, renorm=renorm)


class ConvBlock(nn.Sequential):
    """Conv 3x3 (no bias) -> ReLU -> Norm -> Dropout, the seed's block order; with ``order``
    ``"norm-relu"``, Conv -> Norm -> ReLU -> Dropout (the modules keep their places, ``self[1]``
    the ReLU and ``self[2]`` the norm, so both orders have the same parameter names). ``ws``: the
    convolution is a :class:`WSConv2d`; ``norm_batch``, ``renorm``: see :func:`make_norm`.

    With ``fused`` set (see :func:`use_triton_kernels`), ReLU and Norm run as one fused Triton
    operation (:mod:`normstudy.fast.kernels`) on the tensors it supports, and so does the first block's
    3-channel convolution: same parameters, same buffers, same results up to rounding, a
    fraction of the memory traffic. Unsupported tensors (the CPU, say) take the modules' path,
    and so does a block the kernels do not implement (:attr:`fusable`).
    """

    fused = False

    def __init__(self, c_in, c_out, *, padding=1, norm, groups, dropout, bn_momentum, stack=None,
                 order="relu-norm", norm_batch=None, renorm=None, ws=False):
        k = 1 if stack is None else len(stack)
        conv = WSConv2d if ws else nn.Conv2d
        super().__init__(
            conv(c_in * k, c_out * k, kernel_size=3, padding=padding, bias=False, groups=k),
            nn.ReLU(),
            norm_layer(norm, c_out, groups=groups, bn_momentum=bn_momentum, stack=stack, norm_batch=norm_batch,
                       renorm=renorm),
            nn.Dropout(dropout),
        )
        self.norm_first = order == "norm-relu"

    @property
    def fusable(self):
        """Whether the fused kernels compute this block: the seed's order and a plain BatchNorm2d or
        GroupNorm (not a ghost batch or Batch Renormalization, which subclass BatchNorm2d)."""
        return not self.norm_first and type(self[2]) in (nn.BatchNorm2d, GroupNorm)

    def forward(self, x, residual=None):
        """The block's output, plus ``residual`` when given (a skip connection: with the fused
        kernels the sum costs no extra pass)."""
        if not (self.fused and self.fusable):
            conv, relu, norm, dropout = self
            x = conv(x)
            if self.norm_first:  # He et al.'s (and Wu & He's) ResNet block: the sum, then the ReLU
                out = dropout(norm(x))
                return relu(out if residual is None else residual + out)
            out = dropout(norm(relu(x)))
            return out if residual is None else residual + out
        from .fast import kernels  # imports Triton: only when asked for
        conv, _, norm, dropout = self
        # The first layer's Triton convolution reads the raw weight: a standardized one runs as PyTorch's.
        x = conv(x) if isinstance(conv, WSConv2d) else kernels.conv2d(x, conv)
        if dropout.p and dropout.training:  # dropout sits between the norm and the sum
            out = dropout(kernels.relu_norm(x, norm))
            return out if residual is None else residual + out
        return kernels.relu_norm(x, norm, residual=residual)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that with ``fused`` set runs on the channels_last Triton kernels."""

    fused = False

    def forward(self, x):
        if not self.fused:
            return super().forward(x)
        from .fast import kernels
        return kernels.max_pool(x, self)


def kernel_gaps(model):
    """What of ``model`` the fused Triton kernels do not implement, in words (``[]``: nothing):
    the Conv -> Norm -> ReLU order, ghost batches, Batch Renormalization. A model with any of
    these trains on PyTorch's modules (``fit.prepare`` says so in one line)."""
    gaps = []
    for module in model.modules():
        if isinstance(module, ConvBlock):
            gaps += ["the Conv -> Norm -> ReLU order"] if module.norm_first else []
            gaps += ["ghost batches"] if isinstance(module[2], GhostBatchNorm2d) else []
            gaps += ["Batch Renormalization"] if isinstance(module[2], BatchRenorm2d) else []
    return list(dict.fromkeys(gaps))


def use_triton_kernels(model, enabled=True):
    """Switch ``model``'s blocks and poolings to the Triton kernels of :mod:`normstudy.fast.kernels`
    (fused ReLU + norm with the residual add, 2x2 max-pool, the first 3-channel conv) or back."""
    for module in model.modules():
        if isinstance(module, (ConvBlock, MaxPool2d)):
            module.fused = enabled
    return model


class CifarNet(nn.Module):
    """The seed's CNN with the normalization layer chosen by ``norm`` (see module docstring);
    with ``stack`` (one :class:`NormSpec` per run) K such networks as one, ``norm`` and
    ``groups`` then unused."""

    def __init__(self, norm="bn", *, groups=2, dropout=0.0, bn_momentum=0.1, stack=None, order="relu-norm",
                 norm_batch=None, renorm=False, ws=False, steps_per_epoch=None):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        if order not in ("relu-norm", "norm-relu"):
            raise ValueError(f"order={order!r}: choose relu-norm or norm-relu")
        if stack is not None and (order != "relu-norm" or norm_batch is not None or renorm or ws):
            raise ValueError("a stack of runs takes the seed's network only (no order, norm_batch, renorm or ws)")
        if renorm and not steps_per_epoch:
            raise ValueError("renorm needs steps_per_epoch: its schedule is in epochs (RENORM)")
        self.norm = norm if stack is None else None
        self.stack = None if stack is None else tuple(stack)
        k = 1 if stack is None else len(self.stack)
        block = dict(norm=norm, groups=groups, dropout=dropout, bn_momentum=bn_momentum, stack=self.stack,
                     order=order, norm_batch=norm_batch, ws=ws,
                     renorm=RenormSchedule(steps_per_epoch) if renorm else None)
        # The first convolution is never standardized: its whitening initialization (recipe) would
        # not survive WS, which removes each filter's mean, the luminance filter's almost all of it.
        self.c1 = ConvBlock(3, 32, **{**block, "ws": False})
        self.c2 = ConvBlock(32, 32, **block)
        self.c3 = nn.Conv2d(32 * k, 16 * k, kernel_size=1, bias=False, groups=k)
        self.pool1 = MaxPool2d(2)
        self.c4 = ConvBlock(16, 32, **block)
        self.c5 = ConvBlock(32, 32, **block)
        self.c6 = nn.Conv2d(32 * k, 16 * k, kernel_size=1, bias=False, groups=k)
        self.pool2 = MaxPool2d(2)
        self.c7 = ConvBlock(16, 32, **block)
        self.c8 = ConvBlock(32, 32, padding=0, **block)
        self.c9 = ConvBlock(32, 32, padding=0, **block)
        self.gap = nn.AvgPool2d(4)
        self.c10 = nn.Conv2d(32 * k, 10 * k, kernel_size=1, bias=False, groups=k)

    def forward(self, x):
        x = self.c1(x)
        x = self.c2(x, residual=x)  # x + c2(x)
        x = self.pool1(self.c3(x))
        x = self.c4(x)
        x = self.c5(x, residual=x)  # x + c5(x)
        x = self.pool2(self.c6(x))
        x = self.c9(self.c8(self.c7(x)))
        x = self.c10(self.gap(x))
        return x.flatten(1)


def fresh_model(norm, recipe, *, train_images, seed, choices=None):
    """The network a run starts from: ``norm``'s variant built under ``seed`` (so its random
    initialization follows the seed), then the recipe's own initialization (the whitening of the
    first conv computed from ``train_images``). ``choices``: the run's network choices
    (``RunConfig.choices``; Batch Renormalization's schedule counts epochs of ``train_images``
    at the recipe's batch size). Holds :data:`GLOBAL_RNG_LOCK` throughout."""
    choices = dict(choices or {})
    if choices.get("renorm"):
        choices["steps_per_epoch"] = -(-len(train_images) // recipe["batch_size"])  # the loader keeps the last batch
    with GLOBAL_RNG_LOCK:
        torch.manual_seed(seed)
        model = CifarNet(norm, **recipe_lib.model_kwargs(recipe), **choices)
        return recipe_lib.initialize(model, recipe, train_images)


def run_state(stacked, position, single):
    """Run ``position``'s share of the stacked model ``stacked`` as ``{name: view}`` under the
    names of ``single``'s state_dict (a ``CifarNet`` of that run): each tensor's slice along its
    first dimension (the output channels), and shared counters (``num_batches_tracked``) as they
    are. Copying into the views writes the stack; copying from them reads it."""
    theirs = stacked.state_dict(keep_vars=True)
    views = {}
    for name, tensor in single.state_dict(keep_vars=True).items():
        full = theirs[name].detach()
        if tensor.dim() == 0:
            views[name] = full
            continue
        size = tensor.shape[0]
        if full.shape[1:] != tensor.shape[1:] or full.shape[0] % size:
            raise ValueError(f"{name}: stacked shape {tuple(full.shape)} does not hold {tuple(tensor.shape)}")
        views[name] = full.narrow(0, position * size, size)
    return views
