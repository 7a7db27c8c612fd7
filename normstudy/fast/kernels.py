"""Triton kernels for the network's memory-bound layers, on channels_last CUDA tensors.

:func:`relu_norm` (ReLU then BatchNorm or GroupNorm, plus a skip connection's add, as one
operation), :func:`max_pool` (2x2, stride 2), :func:`conv2d` (the first layer's 3x3
convolution of 3 channels, which cuDNN has no fast kernel for) and :func:`precompile` (compile
all of a model's kernels at once, in parallel). ``models.use_triton_kernels`` switches a model
to them; ``runtime.runtime_for`` does so on CUDA. Measured effect: ``benchmarks/NOTES.md``.

Every block of the network computes ``norm(relu(conv(x)))``. Done by PyTorch, that is a ReLU
kernel, then BatchNorm's statistics, its normalization, and as many kernels again backwards,
each a full pass over the activation; on the H100 those passes cost more than the convolutions
(``benchmarks/NOTES.md``). CUDA GroupNorm has no channels_last kernel at all, so every GN/LN
layer also pays two layout conversions. Here the ReLU is folded into the norm's loads (and its
gradient into the norm's gradient), and a channels_last activation is read as what it is in
memory: a row-major ``[N*H*W, C]`` matrix.

- BatchNorm, training: partial statistics per slice of rows, one program per channel that
  combines them (and updates the running statistics), one pass that normalizes. Backward likewise: partial
  sums, combine, one pass. Evaluation: one pass with the running statistics.
- GroupNorm: one program per image computes its statistics and normalizes it; backward is one
  program per image too (the image is re-read from L2, not from memory).

Statistics are accumulated in fp32 whatever the activation's dtype, and variances are combined
with Chan's parallel formula rather than ``E[x^2] - E[x]^2``, so they do not lose precision to
cancellation. The functions keep the modules' exact semantics: biased variance for normalizing,
unbiased for the running variance, momentum, ``num_batches_tracked``; ReLU's gradient at 0 is 0.

:func:`supports` says which modules and tensors the kernels take; :func:`relu_norm` falls back to
the PyTorch modules for anything else (so do the other functions). With ``TRITON_INTERPRET=1``
the kernels run on the CPU (Triton's interpreter), which is how the tests check them without a GPU.
"""
import concurrent.futures
import contextlib
import contextvars
import copy
import functools
import os
import time

import torch
import triton
import triton.language as tl
from torch import nn
from torch.nn import functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Sizes (rows, images, pixels) are not specialized on: Triton would compile a kernel anew for each
# new divisibility of a size (an epoch's last batch, the test batch), about a second each; the
# loads are vectorized along the channels, whose count is a compile-time constant anyway.
BLOCK_M = 128  # rows (pixels) per tile; a tile is BLOCK_M x C values
BLOCK_P = 512  # partial results summed per iteration of a combining program
POOL_BLOCK = 64  # output pixels per max-pooling program
CONV_BLOCK = 128  # pixels per tile of the first layer's convolution
CONV_K = 32  # its 27 taps (3x3 x 3 channels) padded to a matrix dimension


# --- kernels ------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["M", "rows_per_prog", "P"])
def _bn_stats_kernel(X, MEAN_P, M2_P, M, rows_per_prog, P, C: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per program: mean and sum of squared deviations of relu(x) over its rows, per channel
    (stored as [C, P], so that each channel's partials lie side by side for the combine)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, C)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    mean = tl.zeros([C], dtype=tl.float32)
    m2 = tl.zeros([C], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = rows < end
        x = tl.load(X + rows[:, None] * C + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
        x = tl.maximum(x, 0.0)
        count = tl.minimum(end - r0, BLOCK_M).to(tl.float32)
        tile_mean = tl.sum(x, axis=0) / count
        dev = tl.where(mask[:, None], x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(dev * dev, axis=0)
        # Chan et al.: merge (seen, mean, m2) with the tile's (count, tile_mean, tile_m2).
        seen = (r0 - start).to(tl.float32)
        total = seen + count
        delta = tile_mean - mean
        mean += delta * (count / total)
        m2 += tile_m2 + delta * delta * (seen * count / total)
    tl.store(MEAN_P + cols * P + pid, mean)
    tl.store(M2_P + cols * P + pid, m2)


@triton.jit(do_not_specialize=["P", "M", "rows_per_prog"])
def _bn_combine_kernel(MEAN_P, M2_P, P, M, rows_per_prog, W, B, RUNNING_MEAN, RUNNING_VAR, BATCHES, STATS,
                       momentum, eps, C: tl.constexpr, BLOCK_P: tl.constexpr, UPDATE_RUNNING: tl.constexpr):
    """One channel per program: its batch mean and variance from the partials (Chan et al.:
    m2 = sum of the partial m2 + count * (partial mean - mean)^2), the scale and shift of the
    normalizing pass, and the running statistics."""
    c = tl.program_id(0)
    weighted = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        count = tl.where(ps < P, tl.minimum(M - ps * rows_per_prog, rows_per_prog), 0).to(tl.float32)
        weighted += count * tl.load(MEAN_P + c * P + ps, mask=ps < P, other=0.0)
    mean = tl.sum(weighted, axis=0) / M
    sq = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        count = tl.where(ps < P, tl.minimum(M - ps * rows_per_prog, rows_per_prog), 0).to(tl.float32)
        dev = tl.load(MEAN_P + c * P + ps, mask=ps < P, other=0.0) - mean
        sq += tl.load(M2_P + c * P + ps, mask=ps < P, other=0.0) + count * dev * dev
    m2 = tl.sum(sq, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / M + eps)
    scale = tl.load(W + c) * rstd
    tl.store(STATS + c, mean)
    tl.store(STATS + C + c, rstd)
    tl.store(STATS + 2 * C + c, scale)
    tl.store(STATS + 3 * C + c, tl.load(B + c) - mean * scale)
    if UPDATE_RUNNING:
        tl.store(RUNNING_MEAN + c, (1.0 - momentum) * tl.load(RUNNING_MEAN + c) + momentum * mean)
        tl.store(RUNNING_VAR + c, (1.0 - momentum) * tl.load(RUNNING_VAR + c) + momentum * (m2 / (M - 1)))
        if c == 0:
            tl.store(BATCHES, tl.load(BATCHES) + 1)


@triton.jit(do_not_specialize=["M"])
def _relu_scale_shift_kernel(X, Y, SCALE, SHIFT, RES, M, C: tl.constexpr, BLOCK_M: tl.constexpr,
                             HAS_RES: tl.constexpr):
    """y = relu(x) * scale + shift, per channel (+ res)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, C)
    mask = (rows < M)[:, None]
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.maximum(x, 0.0) * tl.load(SCALE + cols)[None, :] + tl.load(SHIFT + cols)[None, :]
    if HAS_RES:
        # Rounded as PyTorch rounds res + norm(...): the norm's output first, then the sum.
        y = y.to(Y.dtype.element_ty).to(tl.float32) + tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "rows_per_prog", "P"])
def _bn_grad_sums_kernel(X, DY, MEAN, RSTD, SUM_DY_P, SUM_DY_XHAT_P, M, rows_per_prog, P,
                         C: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per program: sums of dy and of dy * xhat over its rows, per channel (stored as [C, P])."""
    pid = tl.program_id(0)
    cols = tl.arange(0, C)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    mean = tl.load(MEAN + cols)[None, :]
    rstd = tl.load(RSTD + cols)[None, :]
    sum_dy = tl.zeros([C], dtype=tl.float32)
    sum_dy_xhat = tl.zeros([C], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < end)[:, None]
        offs = rows[:, None] * C + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (tl.maximum(x, 0.0) - mean) * rstd
        sum_dy += tl.sum(dy, axis=0)
        sum_dy_xhat += tl.sum(dy * xhat, axis=0)
    tl.store(SUM_DY_P + cols * P + pid, sum_dy)
    tl.store(SUM_DY_XHAT_P + cols * P + pid, sum_dy_xhat)


@triton.jit(do_not_specialize=["P", "M"])
def _bn_grad_combine_kernel(SUM_DY_P, SUM_DY_XHAT_P, P, M, W, STATS, GRADS, C: tl.constexpr, BLOCK_P: tl.constexpr):
    """One channel per program: weight and bias gradients, and the coefficients of the input
    gradient dx = coef * (dy - k1 - xhat * k2)."""
    c = tl.program_id(0)
    sum_dy = tl.zeros([BLOCK_P], dtype=tl.float32)
    sum_dy_xhat = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        sum_dy += tl.load(SUM_DY_P + c * P + ps, mask=ps < P, other=0.0)
        sum_dy_xhat += tl.load(SUM_DY_XHAT_P + c * P + ps, mask=ps < P, other=0.0)
    db = tl.sum(sum_dy, axis=0)
    dw = tl.sum(sum_dy_xhat, axis=0)
    tl.store(GRADS + c, dw)
    tl.store(GRADS + C + c, db)
    tl.store(GRADS + 2 * C + c, tl.load(W + c) * tl.load(STATS + C + c))
    tl.store(GRADS + 3 * C + c, db / M)
    tl.store(GRADS + 4 * C + c, dw / M)


@triton.jit(do_not_specialize=["M"])
def _bn_grad_input_kernel(X, DY, DX, MEAN, RSTD, COEF, M, C: tl.constexpr, BLOCK_M: tl.constexpr):
    # COEF holds coef, k1, k2 (three rows of C), as _bn_grad_combine_kernel wrote them.
    """dx = [x > 0] * w * rstd * (dy - mean(dy) - xhat * mean(dy * xhat))."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, C)
    mask = (rows < M)[:, None]
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = (tl.maximum(x, 0.0) - tl.load(MEAN + cols)[None, :]) * tl.load(RSTD + cols)[None, :]
    coef = tl.load(COEF + cols)[None, :]
    k1 = tl.load(COEF + C + cols)[None, :]
    k2 = tl.load(COEF + 2 * C + cols)[None, :]
    dx = tl.where(x > 0.0, coef * (dy - k1 - xhat * k2), 0.0)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _per_group(v, cols, C: tl.constexpr, G: tl.constexpr):
    """Each channel's entry replaced by the sum over its group (C // G consecutive channels)."""
    out = tl.zeros([C], dtype=tl.float32)
    for g in tl.static_range(G):
        in_group = (cols // (C // G)) == g
        out = tl.where(in_group, tl.sum(tl.where(in_group, v, 0.0), axis=0), out)
    return out


@triton.jit(do_not_specialize=["HW"])
def _gn_forward_kernel(X, Y, W, B, MEAN, RSTD, RES, HW, eps,
                       C: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, HAS_RES: tl.constexpr):
    """One image: group statistics of relu(x) (two passes: mean, then squared deviations), then
    y = (relu(x) - mean) * rstd * w + b. The second and third passes read the image from L2."""
    n = tl.program_id(0)
    cols = tl.arange(0, C)
    X += n * HW * C
    Y += n * HW * C
    RES += n * HW * C
    count = HW * (C // G) * 1.0
    total = tl.zeros([C], dtype=tl.float32)
    for r0 in range(0, HW, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        x = tl.load(X + rows[:, None] * C + cols[None, :], mask=(rows < HW)[:, None], other=0.0).to(tl.float32)
        total += tl.sum(tl.maximum(x, 0.0), axis=0)
    mean = _per_group(total, cols, C, G) / count
    sq = tl.zeros([C], dtype=tl.float32)
    for r0 in range(0, HW, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < HW)[:, None]
        x = tl.load(X + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dev = tl.where(mask, tl.maximum(x, 0.0) - mean[None, :], 0.0)
        sq += tl.sum(dev * dev, axis=0)
    rstd = 1.0 / tl.sqrt(_per_group(sq, cols, C, G) / count + eps)
    tl.store(MEAN + n * C + cols, mean)
    tl.store(RSTD + n * C + cols, rstd)
    scale = (tl.load(W + cols) * rstd)[None, :]
    shift = (tl.load(B + cols) - mean * tl.load(W + cols) * rstd)[None, :]
    for r0 in range(0, HW, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < HW)[:, None]
        offs = rows[:, None] * C + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.maximum(x, 0.0) * scale + shift
        if HAS_RES:
            y = y.to(Y.dtype.element_ty).to(tl.float32) + tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["HW", "N"])
def _gn_backward_kernel(X, DY, DX, W, MEAN, RSTD, DW_P, DB_P, HW, N,
                        C: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """One image: per-channel sums of dy and dy * xhat (the image's share of the weight and bias
    gradients), then dx = [x > 0] * rstd * (w*dy - mean_g(w*dy) - xhat * mean_g(w*dy*xhat))."""
    n = tl.program_id(0)
    cols = tl.arange(0, C)
    X += n * HW * C
    DY += n * HW * C
    DX += n * HW * C
    mean = tl.load(MEAN + n * C + cols)[None, :]
    rstd = tl.load(RSTD + n * C + cols)[None, :]
    w = tl.load(W + cols)
    sum_dy = tl.zeros([C], dtype=tl.float32)
    sum_dy_xhat = tl.zeros([C], dtype=tl.float32)
    for r0 in range(0, HW, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < HW)[:, None]
        offs = rows[:, None] * C + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        sum_dy += tl.sum(dy, axis=0)
        sum_dy_xhat += tl.sum(dy * (tl.maximum(x, 0.0) - mean) * rstd, axis=0)
    tl.store(DW_P + cols * N + n, sum_dy_xhat)
    tl.store(DB_P + cols * N + n, sum_dy)
    count = HW * (C // G) * 1.0
    k1 = (_per_group(w * sum_dy, cols, C, G) / count)[None, :]
    k2 = (_per_group(w * sum_dy_xhat, cols, C, G) / count)[None, :]
    w = w[None, :]
    for r0 in range(0, HW, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < HW)[:, None]
        offs = rows[:, None] * C + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (tl.maximum(x, 0.0) - mean) * rstd
        dx = tl.where(x > 0.0, rstd * (w * dy - k1 - xhat * k2), 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["P"])
def _row_sums_kernel(X, OUT, P, BLOCK_P: tl.constexpr):
    """OUT[k] = sum of row k of the [K, P] matrix X; one row per program."""
    k = tl.program_id(0)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(X + k * P + ps, mask=ps < P, other=0.0)
    tl.store(OUT + k, tl.sum(acc, axis=0))


@triton.jit
def _window_max(X, pixels, cols, H, W, OUT_PIXELS, C: tl.constexpr, BLOCK: tl.constexpr):
    """The 2x2 windows of output ``pixels`` (X is [N, H, W, C]): their maxima (fp32), which corner
    (0-3, row by row) holds each, the windows' top-left offsets, and the mask of valid pixels.
    PyTorch's order and rule: row by row, a value replaces the maximum if greater or NaN. Compared
    in fp32 (exact for every input dtype; Triton's CPU interpreter compares 16-bit floats wrongly)."""
    mask = (pixels < OUT_PIXELS)[:, None]
    ow = pixels % (W // 2)
    oh = (pixels // (W // 2)) % (H // 2)
    n = pixels // ((W // 2) * (H // 2))
    top_left = (((n * H + 2 * oh) * W + 2 * ow) * C)[:, None] + cols[None, :]
    best = tl.load(X + top_left, mask=mask, other=0.0).to(tl.float32)
    pick = tl.zeros([BLOCK, C], dtype=tl.int32)
    for corner in tl.static_range(1, 4):
        v = tl.load(X + top_left + ((corner // 2) * W + corner % 2) * C, mask=mask, other=0.0).to(tl.float32)
        better = (v > best) | (v != v)
        best = tl.where(better, v, best)
        pick = tl.where(better, corner, pick)
    return best, pick, top_left, mask


@triton.jit(do_not_specialize=["H", "W", "OUT_PIXELS"])
def _max_pool_2x2_kernel(X, Y, H, W, OUT_PIXELS, C: tl.constexpr, BLOCK: tl.constexpr):
    """2x2 max pooling, stride 2, channels_last: X is [N, H, W, C], Y is [N, H//2, W//2, C]."""
    pixels = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, C)
    best, _, _, mask = _window_max(X, pixels, cols, H, W, OUT_PIXELS, C, BLOCK)
    tl.store(Y + pixels[:, None] * C + cols[None, :], best.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["H", "W", "OUT_PIXELS"])
def _max_pool_2x2_backward_kernel(X, DY, DX, H, W, OUT_PIXELS, C: tl.constexpr, BLOCK: tl.constexpr):
    """Each output's gradient to the input that the forward pass picked (recomputed from X, same
    rule), zero to the three others; windows do not overlap, so every input is written once."""
    pixels = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, C)
    _, pick, top_left, mask = _window_max(X, pixels, cols, H, W, OUT_PIXELS, C, BLOCK)
    dy = tl.load(DY + pixels[:, None] * C + cols[None, :], mask=mask, other=0.0)
    for corner in tl.static_range(0, 4):
        tl.store(DX + top_left + ((corner // 2) * W + corner % 2) * C, tl.where(pick == corner, dy, 0.0).to(dy.dtype),
                 mask=mask)


@triton.jit(do_not_specialize=["H", "W", "PIXELS"])
def _conv3x3_few_channels_kernel(X, WT, Y, H, W, PIXELS, CIN: tl.constexpr, COUT: tl.constexpr, K: tl.constexpr,
                                 BLOCK: tl.constexpr):
    """3x3 convolution, padding 1, of a channels_last input with few channels, as one matrix
    product per tile: the [BLOCK pixels, K] patches (k = (kh * 3 + kw) * CIN + ci, zero past
    9 * CIN) times the [K, COUT] weight, accumulated in fp32."""
    pixels = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    k = tl.arange(0, K)
    cols = tl.arange(0, COUT)
    a = _patches(X, pixels, k, H, W, PIXELS, CIN)
    acc = tl.dot(a.to(WT.dtype.element_ty), tl.load(WT + k[:, None] * COUT + cols[None, :]))
    tl.store(Y + pixels[:, None] * COUT + cols[None, :], acc.to(Y.dtype.element_ty), mask=(pixels < PIXELS)[:, None])


@triton.jit
def _patches(X, pixels, k, H, W, PIXELS, CIN: tl.constexpr):
    """The 3x3 neighbourhoods of ``pixels`` (zero outside the image), one row per pixel."""
    w = pixels % W
    h = (pixels // W) % H
    n = pixels // (W * H)
    tap = k // CIN
    ih = h[:, None] + (tap // 3)[None, :] - 1
    iw = w[:, None] + (tap % 3)[None, :] - 1
    valid = ((pixels < PIXELS)[:, None] & (k < 9 * CIN)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
    return tl.load(X + ((n[:, None] * H + ih) * W + iw) * CIN + (k % CIN)[None, :], mask=valid, other=0.0)


@triton.jit(do_not_specialize=["H", "W", "PIXELS", "pixels_per_prog", "P"])
def _conv3x3_few_channels_wgrad_kernel(X, DY, DWT_P, H, W, PIXELS, pixels_per_prog, P, CIN: tl.constexpr,
                                       COUT: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    """Per program: patches^T @ dy over its pixels, the [K, COUT] weight gradient's share
    (stored transposed, [K * COUT, P], for _row_sums_kernel)."""
    pid = tl.program_id(0)
    k = tl.arange(0, K)
    cols = tl.arange(0, COUT)
    start = pid * pixels_per_prog
    end = tl.minimum(start + pixels_per_prog, PIXELS)
    acc = tl.zeros([K, COUT], dtype=tl.float32)
    for p0 in range(start, end, BLOCK):
        pixels = p0 + tl.arange(0, BLOCK)
        a = _patches(X, pixels, k, H, W, end, CIN).to(DY.dtype.element_ty)
        dy = tl.load(DY + pixels[:, None] * COUT + cols[None, :], mask=(pixels < end)[:, None], other=0.0)
        acc += tl.dot(tl.trans(a), dy)
    tl.store(DWT_P + (k[:, None] * COUT + cols[None, :]) * P + pid, acc)


# --- launching ----------------------------------------------------------------------------------

# While precompile() runs: the list that collects its compile jobs (else None). Autograd may run
# backward on one of its own threads, so each forward copies the value into its ctx.
_COMPILING = contextvars.ContextVar("kernels_compiling", default=None)


class _CompileJobs(list):
    def __init__(self, executor):
        super().__init__()
        self.executor = executor


def _launch(jobs, kernel, grid, *args, **constexprs):
    """``kernel[grid](*args, **constexprs)``; under :func:`precompile`, only compile it, on a
    worker thread."""
    if jobs is None:
        kernel[grid](*args, **constexprs)
    else:
        jobs.append(jobs.executor.submit(_compile, kernel, grid, args, constexprs))


def _compile(kernel, grid, args, constexprs):
    device = next((a.device for a in args if torch.is_tensor(a)), None)
    on_device = torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        compiled = kernel.warmup(*args, grid=grid, **constexprs)
        # Triton builds each kernel's C launcher (a compiler run, ~0.3 s) and loads it on the
        # first launch: do that here too, or the first epoch still pays for it one by one.
        init = getattr(compiled, "_init_handles", None)
        if init is not None:
            init()


def precompile(model, example, *, dtype=None, threads=None):
    """Compile every Triton kernel that training and evaluating ``model`` on inputs like
    ``example`` launches, all at once on ``threads`` threads; return the seconds it took.

    Triton compiles a kernel (and builds its C launcher) on its first launch, one after another:
    on an empty cache (a new machine) the twenty-odd kernels of a run took 4-6 s of the first
    epoch on the H100 machine, mostly in compilers, outside the GIL. Here a copy of the model runs one tiny
    training step and one evaluation in which every launch is replaced by a compile job, and
    the jobs run in parallel. With a warm cache (~/.triton/cache) each job is a file read.
    ``dtype`` is the autocast dtype of the real run (None: no autocast), or a tuple of them (each
    one's kernels, all compiled together). No-op in the interpreter.
    """
    if INTERPRET:
        return 0.0
    start = time.perf_counter()
    scratch = copy.deepcopy(model)
    dtypes = dtype if isinstance(dtype, (tuple, list)) else (dtype,)
    threads = threads or max(8, os.cpu_count() or 1)  # the threads mostly wait for compilers
    with concurrent.futures.ThreadPoolExecutor(threads) as executor:
        jobs = _CompileJobs(executor)
        token = _COMPILING.set(jobs)
        try:
            for each in dtypes:  # the kernels' outputs are left unwritten: only their shapes matter
                with torch.autocast(example.device.type, dtype=each, enabled=each is not None):
                    scratch.zero_grad(set_to_none=True)
                    scratch.train()(example).float().sum().backward()
                    with torch.no_grad():
                        scratch.eval()(example)
        finally:
            _COMPILING.reset(token)
        for job in jobs:
            job.result()
    return time.perf_counter() - start


@functools.lru_cache(maxsize=None)
def _programs_for_reductions(device):
    """How many programs share a reduction over all rows: a few per multiprocessor."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _rows(x):
    """The channels_last activation as the [N*H*W, C] matrix it is in memory."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _res_rows(residual, x):
    # Without a residual the kernel's RES argument is never read; any tensor will do.
    return _rows(x) if residual is None else _rows(residual)


def _split_rows(m, device):
    rows_per_prog = triton.cdiv(triton.cdiv(m, _programs_for_reductions(device)), BLOCK_M) * BLOCK_M
    return rows_per_prog, triton.cdiv(m, rows_per_prog)


class _ReLUBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, eps):
        ctx.jobs = _COMPILING.get()  # backward may run on another thread: keep it
        n, c, h, w = x.shape
        m = n * h * w
        rows = _rows(x)
        rows_per_prog, programs = _split_rows(m, x.device)
        f32 = dict(device=x.device, dtype=torch.float32)
        partial = torch.empty(2, c, programs, **f32)  # mean, m2 per channel and program
        _launch(ctx.jobs, _bn_stats_kernel, (programs,), rows, partial[0], partial[1], m, rows_per_prog, programs,
                C=c, BLOCK_M=BLOCK_M)
        stats = torch.empty(4, c, **f32)  # mean, rstd, scale, shift
        update = running_mean is not None
        _launch(ctx.jobs, _bn_combine_kernel, (c,), partial[0], partial[1], programs, m, rows_per_prog, weight, bias,
                running_mean if update else stats, running_var if update else stats,
                num_batches_tracked if update else stats, stats, momentum, eps,
                C=c, BLOCK_P=BLOCK_P, UPDATE_RUNNING=update)
        y = torch.empty_like(x)
        _launch(ctx.jobs, _relu_scale_shift_kernel, (triton.cdiv(m, BLOCK_M),), rows, _rows(y), stats[2], stats[3],
                _res_rows(residual, x), m, C=c, BLOCK_M=BLOCK_M, HAS_RES=residual is not None)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(x, weight, stats)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, stats = ctx.saved_tensors
        n, c, h, w = x.shape
        m = n * h * w
        rows, dy_rows = _rows(x), _rows(dy.contiguous(memory_format=torch.channels_last))
        rows_per_prog, programs = _split_rows(m, x.device)
        f32 = dict(device=x.device, dtype=torch.float32)
        partial = torch.empty(2, c, programs, **f32)  # sum of dy, sum of dy * xhat
        _launch(ctx.jobs, _bn_grad_sums_kernel, (programs,), rows, dy_rows, stats[0], stats[1], partial[0], partial[1],
                m, rows_per_prog, programs, C=c, BLOCK_M=BLOCK_M)
        grads = torch.empty(5, c, **f32)  # dw, db, coef, k1, k2
        _launch(ctx.jobs, _bn_grad_combine_kernel, (c,), partial[0], partial[1], programs, m, weight, stats, grads,
                C=c, BLOCK_P=BLOCK_P)
        dx = torch.empty_like(x)
        _launch(ctx.jobs, _bn_grad_input_kernel, (triton.cdiv(m, BLOCK_M),), rows, dy_rows, _rows(dx), stats[0],
                stats[1], grads[2], m, C=c, BLOCK_M=BLOCK_M)
        return (dx, grads[0].to(weight.dtype), grads[1].to(weight.dtype), dy if ctx.has_residual else None,
                None, None, None, None, None)


class _ReLUGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, groups, eps):
        ctx.jobs = _COMPILING.get()  # backward may run on another thread: keep it
        n, c, h, w = x.shape
        f32 = dict(device=x.device, dtype=torch.float32)
        mean, rstd = torch.empty(n, c, **f32), torch.empty(n, c, **f32)
        y = torch.empty_like(x)
        _launch(ctx.jobs, _gn_forward_kernel, (n,), _rows(x), _rows(y), weight, bias, mean, rstd,
                _res_rows(residual, x), h * w, eps, C=c, G=groups, BLOCK_M=BLOCK_M, HAS_RES=residual is not None)
        ctx.groups, ctx.has_residual = groups, residual is not None
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        dx = torch.empty_like(x)
        partial = torch.empty(2 * c, n, device=x.device, dtype=torch.float32)  # dw, db rows per image
        _launch(ctx.jobs, _gn_backward_kernel, (n,), _rows(x), _rows(dy.contiguous(memory_format=torch.channels_last)),
                _rows(dx), weight, mean, rstd, partial[:c], partial[c:], h * w, n, C=c, G=ctx.groups, BLOCK_M=BLOCK_M)
        grads = torch.empty(2 * c, device=x.device, dtype=torch.float32)
        _launch(ctx.jobs, _row_sums_kernel, (2 * c,), partial, grads, n, BLOCK_P=BLOCK_P)
        return (dx, grads[:c].to(weight.dtype), grads[c:].to(weight.dtype), dy if ctx.has_residual else None,
                None, None)


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.jobs = _COMPILING.get()  # backward may run on another thread: keep it
        n, c, h, w = x.shape
        y = torch.empty(n, c, h // 2, w // 2, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
        pixels = n * (h // 2) * (w // 2)
        _launch(ctx.jobs, _max_pool_2x2_kernel, (triton.cdiv(pixels, POOL_BLOCK),), _rows(x), _rows(y), h, w, pixels,
                C=c, BLOCK=POOL_BLOCK)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        n, c, h, w = x.shape
        # An odd last row or column belongs to no window: its gradient is zero.
        dx = torch.empty_like(x) if h % 2 == 0 and w % 2 == 0 else torch.zeros_like(x)
        pixels = n * (h // 2) * (w // 2)
        _launch(ctx.jobs, _max_pool_2x2_backward_kernel, (triton.cdiv(pixels, POOL_BLOCK),),
                _rows(x), _rows(dy.contiguous(memory_format=torch.channels_last)), _rows(dx), h, w, pixels,
                C=c, BLOCK=POOL_BLOCK)
        return dx


class _Conv3x3FewChannels(torch.autograd.Function):
    """The first layer's convolution (3 input channels) under autocast; its input needs no gradient."""

    @staticmethod
    def forward(ctx, x, weight, dtype):
        ctx.jobs = _COMPILING.get()  # backward may run on another thread: keep it
        n, cin, h, w = x.shape
        cout = weight.shape[0]
        wt = torch.zeros(CONV_K, cout, device=x.device, dtype=dtype)
        wt[:9 * cin] = weight.detach().permute(2, 3, 1, 0).reshape(9 * cin, cout)
        y = torch.empty(n, cout, h, w, device=x.device, dtype=dtype, memory_format=torch.channels_last)
        pixels = n * h * w
        _launch(ctx.jobs, _conv3x3_few_channels_kernel, (triton.cdiv(pixels, CONV_BLOCK),), _rows(x), wt, _rows(y),
                h, w, pixels, CIN=cin, COUT=cout, K=CONV_K, BLOCK=CONV_BLOCK)
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        n, cin, h, w = x.shape
        cout = weight.shape[0]
        pixels = n * h * w
        per_prog, programs = _split_rows(pixels, x.device)
        partial = torch.empty(CONV_K * cout, programs, device=x.device, dtype=torch.float32)
        _launch(ctx.jobs, _conv3x3_few_channels_wgrad_kernel, (programs,), _rows(x),
                _rows(dy.contiguous(memory_format=torch.channels_last)), partial, h, w, pixels, per_prog, programs,
                CIN=cin, COUT=cout, K=CONV_K, BLOCK=CONV_BLOCK)
        dwt = torch.empty(CONV_K * cout, device=x.device, dtype=torch.float32)
        _launch(ctx.jobs, _row_sums_kernel, (CONV_K * cout,), partial, dwt, programs, BLOCK_P=BLOCK_P)
        dw = dwt.view(CONV_K, cout)[:9 * cin].view(3, 3, cin, cout).permute(3, 2, 0, 1)
        return None, dw.to(weight.dtype).contiguous(memory_format=torch.channels_last), None


# --- the public functions -----------------------------------------------------------------------

def _supports_tensor(x):
    c = x.shape[1] if x.dim() == 4 else 0
    return (x.dim() == 4 and (x.is_cuda or INTERPRET) and x.numel() > 0 and 0 < c <= 256 and not c & (c - 1)
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16))


def supports(x, norm):
    """Whether :func:`relu_norm` runs ``norm`` on ``x`` with the fused kernels.

    The kernels take 4-d activations on a CUDA device (any device under the interpreter), in
    fp32, fp16 or bf16, with a power-of-two number of channels up to 256, and the usual
    configurations of the two modules: affine BatchNorm2d with running statistics and a numeric
    momentum, affine GroupNorm.
    """
    if not _supports_tensor(x):
        return False
    if isinstance(norm, nn.BatchNorm2d):
        return norm.affine and norm.track_running_stats and norm.momentum is not None
    if isinstance(norm, nn.GroupNorm):
        return norm.affine
    return False


def relu_norm(x, norm, residual=None):
    """``norm(relu(x))``, plus ``residual`` when given, for a BatchNorm2d or GroupNorm module
    ``norm``: fused where :func:`supports` allows, else by the modules themselves. The result is
    channels_last. The residual is added in the same pass (the network's skip connections)."""
    if not (supports(x, norm) and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype))):
        y = norm(F.relu(x))
        return y if residual is None else residual + y
    x = x.contiguous(memory_format=torch.channels_last)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    if isinstance(norm, nn.GroupNorm):
        return _ReLUGroupNorm.apply(x, norm.weight, norm.bias, residual, norm.num_groups, norm.eps)
    if norm.training:
        if x.numel() // x.shape[1] < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        return _ReLUBatchNorm.apply(x, norm.weight, norm.bias, residual, norm.running_mean, norm.running_var,
                                    norm.num_batches_tracked, norm.momentum, norm.eps)
    return _relu_batch_norm_eval(x, norm, residual)


def _relu_batch_norm_eval(x, norm, residual):
    """Evaluation: one pass with the running statistics. Where a gradient is wanted (say, for a
    saliency map) the modules compute it."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, norm.weight, residual)):
        y = norm(F.relu(x))
        return y if residual is None else residual + y
    with torch.no_grad():
        scale = (norm.weight * torch.rsqrt(norm.running_var + norm.eps)).float()
        shift = (norm.bias - norm.running_mean * scale).float()
        n, c, h, w = x.shape
        y = torch.empty_like(x)
        _launch(_COMPILING.get(), _relu_scale_shift_kernel, (triton.cdiv(n * h * w, BLOCK_M),), _rows(x), _rows(y),
                scale, shift, _res_rows(residual, x), n * h * w, C=c, BLOCK_M=BLOCK_M, HAS_RES=residual is not None)
    return y


def max_pool(x, pool):
    """``pool(x)`` for an ``nn.MaxPool2d``; the 2x2, stride-2 case on supported tensors by the
    Triton kernels (channels_last result, no index tensor: backward recomputes the choice)."""
    simple = (pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0))
              and pool.dilation in (1, (1, 1)) and not pool.ceil_mode and not pool.return_indices)
    if not (simple and _supports_tensor(x) and x.shape[2] >= 2 and x.shape[3] >= 2):
        return pool(x)
    return _MaxPool2x2.apply(x.contiguous(memory_format=torch.channels_last))



def conv2d(x, conv):
    """``conv(x)``; the first layer's 3x3 convolution of 3 channels (padding 1, no bias) under
    CUDA autocast by the Triton kernels above. cuDNN has no fast kernel for 3 input channels:
    on the H100 its forward and weight gradient took 136 us of a 1.4 ms step (benchmarks/NOTES.md)."""
    cin = conv.in_channels
    eligible = (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
                and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None and conv.padding_mode == "zeros"
                and 9 * cin <= CONV_K and 16 <= conv.out_channels <= 256
                and not conv.out_channels & (conv.out_channels - 1)
                and x.dim() == 4 and (x.is_cuda or INTERPRET) and not x.requires_grad
                and torch.is_autocast_enabled(x.device.type))
    if not eligible:
        return conv(x)
    dtype = torch.get_autocast_dtype(x.device.type)
    if dtype not in (torch.float16, torch.bfloat16):
        return conv(x)
    return _Conv3x3FewChannels.apply(x.contiguous(memory_format=torch.channels_last), conv.weight, dtype)
