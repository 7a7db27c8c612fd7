"""How a run executes (never what it computes): the device, and one switch for the fast path.

A runtime is a small dict:

    amp             None, "bf16" or "fp16": mixed precision of the forward pass
    cuda_graph      record each training step once as a CUDA graph and replay it
    triton_kernels  the Triton kernels of :mod:`normstudy.fast.kernels` (fused ReLU + norm with the
                    residual add, 2x2 max-pool, the first 3-channel conv) instead of PyTorch's modules
    channels_last   activations in channels_last memory layout
    cudnn_benchmark cuDNN autotuning (off: 5-13 s on the first epoch for at most 5 % an epoch)
    compile         torch.compile of the training forward (experiments only: on the H100 it cost
                    20-35 s of compiling and ran slower than the Triton kernels; benchmarks/NOTES.md)

:data:`PRESETS` names the ones a user chooses between (``train.py --runtime``); ``fast`` is the
default: on CUDA it is everything above but compile, elsewhere it falls back to ``eager``.
"""
import importlib.util

import torch

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRESETS = {
    "fast": "CUDA graphs, Triton kernels, channels_last, bf16 (fp32 on GPUs older than Ampere)",
    "fp32": "as fast, without mixed precision",
    "eager": "PyTorch's own modules, one step at a time, fp32: the reference",
}


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


def runtime_for(device, preset="fast", *, norm=None, **overrides):
    """The runtime dict for ``device`` and ``norm`` under ``preset`` (see :data:`PRESETS`), with
    ``overrides`` on top.

    ``fast`` on CUDA: bf16 autocast (on Ampere or newer: older GPUs such as Colab's T4 have no
    bf16 convolutions in cuDNN, and train in fp32), CUDA graphs, the Triton kernels where Triton
    is installed, and channels_last, the layout those kernels read. Without the kernels,
    channels_last for BatchNorm only: CUDA GroupNorm converts channels_last to NCHW and back,
    which costs more than the faster convolutions gain. Off CUDA every preset is ``eager``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown runtime {preset!r}; choose one of {', '.join(PRESETS)}")
    device = torch.device(device)
    cuda = device.type == "cuda" and preset != "eager"
    bf16 = cuda and preset == "fast" and torch.cuda.get_device_capability(device)[0] >= 8
    compile = overrides.get("compile", False)
    kernels = cuda and not compile and triton_available()
    runtime = {"amp": "bf16" if bf16 else None, "cuda_graph": cuda, "triton_kernels": kernels,
               "channels_last": cuda and (kernels or bool(compile) or norm == "bn"), "cudnn_benchmark": False,
               "compile": False}
    unknown = set(overrides) - set(runtime)
    if unknown:
        raise ValueError(f"unknown runtime keys: {', '.join(sorted(unknown))}")
    return {**runtime, **overrides}

