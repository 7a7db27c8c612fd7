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


def make_norm(norm, channels, *, groups=2, bn_momentum=0.1):
    """Return the normalization layer for ``channels`` feature maps.

    ``groups`` only matters for ``"gn"``; ``bn_momentum`` only for ``"bn"``.
    """
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


def norm_layer(norm, channels, *, groups, bn_momentum, stack=None):
    """``make_norm``'s layer, or for a stack (a tuple of :class:`NormSpec`) a :class:`StackedNorm`."""
    if stack is not None:
        return StackedNorm(stack, channels)
    return make_norm(norm, channels, groups=groups, bn_momentum=bn_momentum)


class ConvBlock(nn.Sequential):
    """Conv 3x3 (no bias) -> ReLU -> Norm -> Dropout, the seed's block order.

    With ``fused`` set (see :func:`use_triton_kernels`), ReLU and Norm run as one fused Triton
    operation (:mod:`normstudy.fast.kernels`) on the tensors it supports, and so does the first block's
    3-channel convolution: same parameters, same buffers, same results up to rounding, a
    fraction of the memory traffic. Unsupported tensors (the CPU, say) take the modules' path.
    """

    fused = False

    def __init__(self, c_in, c_out, *, padding=1, norm, groups, dropout, bn_momentum, stack=None):
        k = 1 if stack is None else len(stack)
        super().__init__(
            nn.Conv2d(c_in * k, c_out * k, kernel_size=3, padding=padding, bias=False, groups=k),
            nn.ReLU(),
            norm_layer(norm, c_out, groups=groups, bn_momentum=bn_momentum, stack=stack),
            nn.Dropout(dropout),
        )

    def forward(self, x, residual=None):
        """The block's output, plus ``residual`` when given (a skip connection: with the fused
        kernels the sum costs no extra pass)."""
        if not self.fused:
            out = super().forward(x)
            return out if residual is None else residual + out
        from .fast import kernels  # imports Triton: only when asked for
        conv, _, norm, dropout = self
        x = kernels.conv2d(x, conv)
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

    def __init__(self, norm="bn", *, groups=2, dropout=0.0, bn_momentum=0.1, stack=None):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        self.norm = norm if stack is None else None
        self.stack = None if stack is None else tuple(stack)
        k = 1 if stack is None else len(self.stack)
        block = dict(norm=norm, groups=groups, dropout=dropout, bn_momentum=bn_momentum, stack=self.stack)
        self.c1 = ConvBlock(3, 32, **block)
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


def fresh_model(norm, recipe, *, train_images, seed):
    """The network a run starts from: ``norm``'s variant built under ``seed`` (so its random
    initialization follows the seed), then the recipe's own initialization (the whitening of the
    first conv computed from ``train_images``). Holds :data:`GLOBAL_RNG_LOCK` throughout."""
    with GLOBAL_RNG_LOCK:
        torch.manual_seed(seed)
        model = CifarNet(norm, **recipe_lib.model_kwargs(recipe))
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
