"""Which Triton kernels passed their self-check on this machine already, so a later run skips it.

The self-check (``fit.kernels_self_check``: one step with the kernels and one with PyTorch's
modules, compared) guards against a kernel that compiles but computes something else on a new GPU,
driver or Triton. Once it passed for a combination of those, the same compiled kernels give the same
results, so repeating it each run only costs start-up: 0.84 s of a 4.7 s start on the H200
(benchmarks/NOTES.md), and the fp32 kernels it needs another ~0.4 s to load.

A pass is remembered as an empty file named by a hash of everything that decides what the kernels
compute: the kernels' source and that of the model's own modules (where a block chooses between
them and PyTorch's), the versions of torch, Triton and CUDA and the driver, the GPU, the autocast
dtype, the model's modules in order (their classes, so that a Weight-Standardized convolution is
not a plain one, and whether each block is fusable) and its norm layers (kinds and group counts). The files live
in Triton's own cache folder (``TRITON_CACHE_DIR``, else ``~/.triton/cache``): emptying that cache,
as a new machine has it, brings the self-check back with the compilations.
"""
import hashlib
import os
import sys
from pathlib import Path

import torch
from torch import nn

FOLDER = "normstudy-self-check"


def _cache_dir():
    root = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return Path(root) / FOLDER


def _modules(model):
    """The model's modules in order as the kernels meet them, one line each: class; where a block
    has the choice, whether it is fusable; for a norm layer, its channels and groups. And the source
    files those classes are defined in (torch's own left out)."""
    lines, files = [], {}
    for module in model.modules():
        cls = type(module)
        line = f"{cls.__module__}.{cls.__qualname__}:{getattr(module, 'fusable', '')}"
        if isinstance(module, nn.BatchNorm2d):
            line += f":bn{module.num_features}"
        elif isinstance(module, nn.GroupNorm):
            line += f":gn{module.num_groups}/{module.num_channels}"
        lines.append(line)
        path = getattr(sys.modules.get(cls.__module__), "__file__", None)
        if path and not cls.__module__.startswith("torch."):
            files[path] = True
    return lines, [Path(path).read_bytes() for path in sorted(files)]


def key(model, *, device, dtype):
    """The hash naming ``model``'s kernels under autocast ``dtype`` on ``device``; None off CUDA
    (Triton's CPU interpreter, the tests: the check is cheap there and always runs)."""
    if torch.device(device).type != "cuda":
        return None
    import triton
    from . import kernels
    props = torch.cuda.get_device_properties(device)
    driver = getattr(torch._C, "_cuda_getDriverVersion", lambda: None)()
    kinds, sources = _modules(model)
    parts = [Path(kernels.__file__).read_bytes(), *sources, torch.__version__, triton.__version__,
             torch.version.cuda, driver, props.name, f"{props.major}.{props.minor}", str(dtype), *kinds]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def passed(name):
    """Whether the self-check named ``name`` (see :func:`key`) passed on this machine before."""
    return (_cache_dir() / name).is_file()


def remember(name):
    """Remember that the self-check named ``name`` passed; a cache that cannot be written is no error
    (the check simply runs again next time)."""
    try:
        folder = _cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()
    except OSError:
        pass
