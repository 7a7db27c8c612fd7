"""The Triton kernels of kernels.py against the PyTorch modules they replace.

On a machine without a GPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py before Triton is imported), on small tensors whose shapes leave partial tiles. fp32 results
must agree to float rounding; 16-bit results to their last bit. (The interpreter
mishandles bf16 in comparisons and matrix products, so the convolution is checked in fp16 there.)
"""
import concurrent.futures
import copy
import importlib
import threading

import pytest
import torch
from torch import nn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytest.importorskip("triton")  # conftest.py has switched its interpreter on where there is no GPU
kernels = importlib.import_module("normstudy.fast.kernels")
if DEVICE == "cpu" and not kernels.INTERPRET:
    pytest.skip("no GPU and Triton's interpreter is off", allow_module_level=True)

from normstudy import runtime as runtime_lib  # noqa: E402
from normstudy import models  # noqa: E402

SHAPES = [(3, 32, 6, 6), (2, 16, 17, 9), (5, 32, 4, 4)]  # 108, 153 and 16 pixels per image


def make_norm(kind, channels):
    norm = nn.BatchNorm2d(channels) if kind == "bn" else nn.GroupNorm(int(kind[2:]), channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm.to(DEVICE)


def channels_last(*shape, dtype=torch.float32, scale=2.0, shift=0.3):
    return (torch.randn(shape, device=DEVICE) * scale + shift).to(dtype).contiguous(memory_format=torch.channels_last)


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("kind", ["bn", "gn1", "gn2", "gn4"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_relu_norm_matches_the_modules_in_fp32(kind, shape, training):
    torch.manual_seed(0)
    ref = make_norm(kind, shape[1]).train(training)
    if kind == "bn" and not training:
        with torch.no_grad():
            ref.running_mean.uniform_(0, 1)
            ref.running_var.uniform_(0.5, 2)
    fused = copy.deepcopy(ref)
    x = channels_last(*shape)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert kernels.supports(x, fused)
    y_ref, y_fused = ref(torch.relu(x_ref)), kernels.relu_norm(x_fused, fused)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_fused.backward(grad)
    assert y_fused.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y_fused, y_ref) < 1e-5
    assert rel_err(x_fused.grad, x_ref.grad) < 1e-5
    assert rel_err(fused.weight.grad, ref.weight.grad) < 1e-5
    assert rel_err(fused.bias.grad, ref.bias.grad) < 1e-5
    for name, buffer in ref.named_buffers():  # running mean, unbiased running var, batch count
        assert torch.allclose(dict(fused.named_buffers())[name], buffer, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("kind", ["bn", "gn2"])
def test_relu_norm_in_bf16_is_within_one_unit_of_the_last_bit(kind):
    torch.manual_seed(1)
    ref = make_norm(kind, 32)
    fused = copy.deepcopy(ref)
    x = channels_last(4, 32, 8, 8, dtype=torch.bfloat16)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = ref(torch.relu(x_ref.float()))  # what the kernels compute, before rounding to bf16
    y_fused = kernels.relu_norm(x_fused, fused)
    assert y_fused.dtype == torch.bfloat16
    # One bf16 ulp (2^-7 relative): round-to-nearest on a GPU is within half of it, the CPU
    # interpreter may truncate.
    assert ((y_fused.float() - y_ref).abs() <= y_ref.abs() * 2 ** -7 + 1e-6).all()
    grad = torch.randn_like(y_ref)  # (a constant would give a zero gradient through the norm)
    y_ref.backward(grad)
    y_fused.backward(grad.to(torch.bfloat16))
    assert x_fused.grad.dtype == torch.bfloat16
    assert rel_err(x_fused.grad, x_ref.grad) < 2 ** -7


@pytest.mark.parametrize("kind", ["bn", "gn2"])
@pytest.mark.parametrize("training", [True, False])
def test_the_residual_is_added_in_the_same_pass(kind, training):
    torch.manual_seed(2)
    ref = make_norm(kind, 16).train(training)
    fused = copy.deepcopy(ref)
    x, res = channels_last(3, 16, 5, 6), channels_last(3, 16, 5, 6)
    x1, x2, r1, r2 = (t.clone().requires_grad_() for t in (x, x, res, res))
    y_ref = r1 + ref(torch.relu(x1))
    y_fused = kernels.relu_norm(x2, fused, residual=r2)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_fused.backward(grad)
    assert rel_err(y_fused, y_ref) < 1e-5
    assert rel_err(x2.grad, x1.grad) < 1e-5
    assert torch.equal(r2.grad, r1.grad)


def test_unsupported_configurations_fall_back_to_the_modules():
    x = channels_last(2, 24, 4, 4)  # 24 channels: not a power of two
    bn = make_norm("bn", 24)
    assert not kernels.supports(x, bn)
    cumulative = nn.BatchNorm2d(32, momentum=None).to(DEVICE)  # cumulative average: not fused
    assert not kernels.supports(channels_last(2, 32, 4, 4), cumulative)
    assert torch.equal(kernels.relu_norm(x, bn), copy.deepcopy(bn)(torch.relu(x)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        kernels.relu_norm(channels_last(1, 32, 1, 1), make_norm("bn", 32))


@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (3, 32, 7, 9), (1, 16, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_pool_matches_pytorch_exactly_ties_and_odd_sizes_included(shape, dtype):
    torch.manual_seed(3)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    x[:, :, 0, 1] = x[:, :, 0, 0]  # ties: the first maximum in row order takes the gradient
    x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    pool = nn.MaxPool2d(2)
    y1, y2 = pool(x1), kernels.max_pool(x2, pool)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    assert torch.equal(y2, y1)
    assert torch.equal(x2.grad, x1.grad)


def test_first_convolution_matches_cudnn_under_autocast():
    torch.manual_seed(4)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    conv = nn.Conv2d(3, 32, 3, padding=1, bias=False).to(DEVICE)
    x = channels_last(3, 3, 5, 7, scale=1.0, shift=0.0)
    with torch.autocast(DEVICE, dtype=dtype):
        y_ref, y = conv(x), kernels.conv2d(x, conv)
    assert y.dtype == y_ref.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, y_ref) < 2e-2
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    expected, conv.weight.grad = conv.weight.grad, None
    y.backward(grad)
    assert rel_err(conv.weight.grad, expected) < 2e-2
    # Outside autocast, or when the input needs a gradient, the module itself runs.
    assert torch.equal(kernels.conv2d(x, conv), conv(x))


@pytest.mark.parametrize("norm", ["bn", "ln", "gn"])
def test_fused_network_computes_what_the_plain_one_does(norm, monkeypatch):
    # Plain fp32 convolutions on both sides (a GPU would use TF32, whose rounding both
    # networks would then amplify differently). The network has no matrix products.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(5)
    plain = models.CifarNet(norm).to(DEVICE)
    fused = models.use_triton_kernels(copy.deepcopy(plain))
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert all(m.fused for m in fused.modules() if isinstance(m, (models.ConvBlock, models.MaxPool2d)))
    x = channels_last(2, 3, 32, 32, scale=1.0, shift=0.0)
    y_plain, y_fused = plain(x), fused(x)
    grad = torch.randn_like(y_plain)
    y_plain.backward(grad)
    y_fused.backward(grad)
    assert rel_err(y_fused, y_plain) < 1e-4
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert rel_err(q.grad, p.grad) < 1e-3, name
    models.use_triton_kernels(fused, False)
    assert not any(m.fused for m in fused.modules() if isinstance(m, (models.ConvBlock, models.MaxPool2d)))


def test_cuda_runtime_uses_the_fused_kernels_and_channels_last_for_every_norm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    for norm in ("bn", "ln", "gn"):
        runtime = runtime_lib.runtime_for(torch.device("cuda"), norm=norm)
        assert runtime["triton_kernels"] and runtime["channels_last"]
    assert not runtime_lib.runtime_for(torch.device("cuda"), norm="gn", compile=True)["triton_kernels"]
    assert not runtime_lib.runtime_for("cpu", norm="bn")["triton_kernels"]


def test_under_precompile_launches_only_compile_on_worker_threads():
    class FakeKernel:
        def __init__(self):
            self.launched, self.compiled = [], []

        def __getitem__(self, grid):
            return lambda *args, **kw: self.launched.append((grid, args, kw))

        def warmup(self, *args, grid, **kw):
            self.compiled.append((grid, args, kw, threading.current_thread().name))
            return self

        def _init_handles(self):  # Triton's compiled kernel: builds its launcher, loads the binary
            self.loaded = True

    kernel = FakeKernel()
    kernels._launch(None, kernel, (3,), "x", C=32)
    assert kernel.launched == [((3,), ("x",), {"C": 32})] and not kernel.compiled
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="compile") as executor:
        jobs = kernels._CompileJobs(executor)
        kernels._launch(jobs, kernel, (5,), "y", C=16)
        [job.result() for job in jobs]
    assert len(kernel.launched) == 1
    grid, args, kw, thread = kernel.compiled[0]
    assert (grid, args, kw) == ((5,), ("y",), {"C": 16}) and thread.startswith("compile") and kernel.loaded
