"""The Triton kernels' self-check: does a model compute with them what it computes with PyTorch's
modules? Run once per process, after the kernels compiled (:func:`compile_and_check`), by the
set-up of a run (``fit.compile_kernels``), which switches them off where they fail.

The kernels are switched per module by its ``fused`` attribute (``models.ConvBlock`` and
``models.MaxPool2d`` have one; ``models.use_triton_kernels`` sets it): the check works on copies
of the model, so it needs nothing of :mod:`normstudy.models`, and leaves the model and the random
generators as they are.
"""
import copy

import torch
from torch import nn

from . import steps as steps_lib


def use_kernels(model, fused):
    """``model`` with every module that can run on the kernels (one with a ``fused`` switch)
    switched to them (``fused=True``) or to PyTorch's modules."""
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = fused
    return model


def compile_and_check(model, example, dtype=None):
    """Compile the kernels ``model`` launches, all at once and in parallel (``kernels.precompile``),
    for inputs like ``example`` in fp32 and, if given, under autocast in ``dtype``; then check them
    (:func:`kernels_self_check`). ``None`` if all is well, else what failed (one line, which may
    name an exception: importing Triton, compiling or checking). A check that passed for the same
    kernels on this machine before (:mod:`normstudy.fast.checked`) is not repeated, nor are its fp32
    kernels compiled: 0.84 s and ~0.4 s of a run's start on the H200."""
    try:
        memo, known_good = precompile(model, example, dtype)
    except Exception as err:  # noqa: BLE001 - any failure means: run without them
        return f"they failed to compile: {type(err).__name__}: {err}"
    if known_good:
        return None
    try:
        problem = kernels_self_check(model, example, dtype)
    except Exception as err:  # noqa: BLE001
        return f"self-check failed: {type(err).__name__}: {err}"
    if problem is None and memo is not None:
        from . import checked
        checked.remember(memo)
    return problem


def precompile(model, example, dtype=None):
    """Compile what :func:`compile_and_check` compiles (``kernels.precompile``), check nothing;
    return ``(memo, known_good)``: the check's name (:func:`checked.key`) and whether it passed on
    this machine before. Also a command's head start while it reads the data (``fit.compile_ahead``):
    Triton keeps what it compiled in memory, so the run's own call then costs almost nothing."""
    from . import checked, kernels
    memo = checked.key(model, device=example.device, dtype=dtype)
    known_good = memo is not None and checked.passed(memo)
    # The self-check runs in fp32 too: its kernels are compiled with the run's unless it is skipped
    # (any others, as the final evaluation's, compile when first launched).
    kernels.precompile(model, example, dtype=(dtype, None) if dtype is not None and not known_good else dtype)
    return memo, known_good


# Largest relative error (max |difference| / max |reference|) of the kernels' self-check in fp32,
# outputs and buffers / gradients. The kernels agree with the modules to ~1e-5 (tests/test_kernels.py
# asks 1e-4 / 1e-3); a kernel that computes something else misses by orders of magnitude.
SELF_CHECK_FP32 = (1e-3, 1e-2)
# In 16 bits a batch of two images differs from fp32 by up to 5 % (bf16) in the outputs and by up
# to 90 % in some gradients (BatchNorm's backward over 2x4x4 values cancels), for the modules
# themselves: only the outputs are compared, loosely, and the gradients checked to be finite.
SELF_CHECK_16BIT_OUTPUT = 0.25


def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def kernels_self_check(model, example, dtype=None):
    """None if ``model`` computes the same with the Triton kernels as with PyTorch's modules, else
    what differs (one line).

    One training step's forward and backward on a random batch shaped like ``example`` (copies of
    the model, dropout off; the model and the random generators are left as they are): in fp32,
    with TF32 off, the outputs, the parameters' gradients and the buffers (BatchNorm's running
    statistics) must agree to :data:`SELF_CHECK_FP32`; under autocast in ``dtype`` as well, if
    given (the kernels a run launches), the outputs loosely and every gradient must be finite.
    """
    device = example.device
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(example.shape, generator=generator, device=device).contiguous(
        memory_format=torch.channels_last)
    grad_out = None

    def run(fused, autocast_dtype):
        nonlocal grad_out
        net = use_kernels(copy.deepcopy(model), fused).train()
        for module in net.modules():
            if isinstance(module, nn.Dropout):
                module.eval()  # its masks would differ between the two copies
        with steps_lib.autocast(device.type, autocast_dtype):
            out = net(images)
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=generator, device=device)
        out.float().backward(grad_out)
        return out.detach(), net

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions would amplify the rounding differences
    try:
        (plain_out, plain), (fused_out, fused) = run(False, None), run(True, None)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    output_tol, grad_tol = SELF_CHECK_FP32
    checks = [("output", fused_out, plain_out, output_tol)]
    checks += [(f"gradient of {name}", q.grad, p.grad, grad_tol)
               for (name, p), q in zip(plain.named_parameters(), fused.parameters())]
    checks += [(name, q, p, output_tol) for (name, p), q in zip(plain.named_buffers(), fused.buffers())
               if p.is_floating_point()]
    for what, got, expected, tol in checks:
        if got is None or not torch.isfinite(got).all() or _rel_err(got, expected) > tol:
            error = "missing" if got is None else f"relative error {_rel_err(got, expected):.2g}"
            # A network can amplify rounding (InstanceNorm on a 4x4 map whose channel is almost
            # constant, seen on the H100 with 32 groups): then judge the kernels block by block.
            problem = _blockwise_check(model, images, generator)
            if problem is not None:
                return f"self-check failed in fp32: {what}, {error}; {problem}"
            break
    if dtype is not None:
        (plain_out, _), (fused_out, fused) = run(False, dtype), run(True, dtype)
        name = str(dtype).replace("torch.", "")
        if not torch.isfinite(fused_out).all():
            return f"self-check failed in {name}: output not finite"
        if _rel_err(fused_out, plain_out) > SELF_CHECK_16BIT_OUTPUT:
            problem = _blockwise_check(model, images, generator)  # as above: amplified rounding, or a bug?
            if problem is not None:
                return f"self-check failed in {name}: output, relative error {_rel_err(fused_out, plain_out):.2g}; {problem}"
        for param_name, p in fused.named_parameters():
            if p.grad is None or not torch.isfinite(p.grad).all():
                return f"self-check failed in {name}: gradient of {param_name} missing or not finite"
    return None


def _blockwise_check(model, images, generator):
    """None if every block (conv + ReLU + norm, max-pool) computes with the Triton kernels what it
    computes with PyTorch's modules, forward and backward, on the input the plain network gives
    it; else which block differs. Unlike the end-to-end check, no rounding is amplified."""
    plain = use_kernels(copy.deepcopy(model), False).train()
    calls = []
    hooks = [module.register_forward_hook(lambda module, args, kwargs, out: calls.append((module, args, kwargs)),
                                          with_kwargs=True)
             for module in plain.modules() if hasattr(module, "fused")]
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            plain(images)
        for hook in hooks:
            hook.remove()
        for index, (module, args, kwargs) in enumerate(calls):
            results = []
            for fused in (False, True):
                block = copy.deepcopy(module).train()
                block.fused = fused
                x = args[0].detach().clone().requires_grad_()
                out = block(x, **{key: value.detach() for key, value in kwargs.items()})
                if not results:
                    grad = torch.randn(out.shape, generator=generator, device=out.device)
                out.backward(grad)
                results.append([out.detach(), x.grad] + [p.grad for p in block.parameters()])
            output_tol, grad_tol = SELF_CHECK_FP32
            for k, (expected, got) in enumerate(zip(*results)):
                if got is None or not torch.isfinite(got).all() or _rel_err(got, expected) > (output_tol if k == 0 else grad_tol):
                    return f"block {index} ({type(module).__name__}) differs"
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return None
