"""Colab and older GPUs: fp16 with dynamic loss scaling, and the fallback to PyTorch's modules.

The CUDA-graph step cannot run here; it records the very calls that the eager step makes
(``EagerStep.forward_backward``: the scaler's ``scale``, ``unscale_and_check``, the optimizer's
``step(found_inf=...)`` and ``update``), which these tests run on the CPU. The fallback is
tested by simulating each failure: Triton missing, a GPU older than Ampere, kernels that fail to
compile, and kernels that compute something else (or raise) in the self-check.
"""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from normstudy import checkpoints
from normstudy import cli
from normstudy import fit as fit_lib
from normstudy import models
from normstudy import recipe as recipe_lib
from normstudy import run as run_lib
from normstudy import runtime as runtime_lib
from normstudy import data
from normstudy.fast import self_check, steps
from normstudy.fast.amp import LossScaler
from normstudy.fast.optimizers import SGD
from normstudy.config import RunConfig

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch):
    """Each test starts as a new process would: nothing said yet, no kernels found broken."""
    monkeypatch.setattr(runtime_lib, "_said", set())
    monkeypatch.setattr(runtime_lib, "_kernels_broken", None)


def said(capsys):
    """The lines the package said on stderr since the last call."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("normstudy:")]


def fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


# --- fp16: the loss scaler and the step it skips ---------------------------------------------------

def tiny_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = SGD([{"params": decay, "weight_decay": 5e-3}, {"params": no_decay, "weight_decay": 0.0}],
                    lr=0.1, momentum=0.9, nesterov=True)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    return model, optimizer, x, y


def state_of(model, optimizer):
    return ([p.detach().clone() for p in model.parameters()],
            [s["momentum_buffer"].clone() for s in optimizer.state.values()])


def scaled_step(model, optimizer, scaler, x, y, poison=False):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    if poison:  # an overflow in one gradient, as fp16 would produce it
        next(model.parameters()).grad[0, 0] = float("inf")
    return scaler.step(optimizer)


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_sgd_with_found_inf_zero_is_the_plain_step_bit_for_bit(tensor_lr):
    (model_a, opt_a, x, y), (model_b, opt_b, _, _) = tiny_problem(), tiny_problem()
    if tensor_lr:  # as under CUDA graphs
        for opt in (opt_a, opt_b):
            for group in opt.param_groups:
                group["lr"] = torch.tensor(0.1)
    for _ in range(3):
        for model, opt, found_inf in ((model_a, opt_a, None), (model_b, opt_b, torch.zeros(()))):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step() if found_inf is None else opt.step(found_inf=found_inf)
    for a, b in zip(state_of(model_a, opt_a), state_of(model_b, opt_b)):
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_loss_scaler_skips_exactly_the_overflowing_step():
    model, optimizer, x, y = tiny_problem()
    reference, ref_optimizer, _, _ = tiny_problem()  # the same run without the bad step, unscaled
    scaler = LossScaler("cpu", init_scale=2.0 ** 10)

    assert scaled_step(model, optimizer, scaler, x, y).item() == 0
    before = state_of(model, optimizer)
    assert scaled_step(model, optimizer, scaler, x, y, poison=True).item() == 1
    after = state_of(model, optimizer)
    for a, b in zip(before, after):  # parameters and momentum buffers untouched
        assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert scaler.get_scale() == 2.0 ** 9 and int(scaler.growth_tracker) == 0
    assert scaled_step(model, optimizer, scaler, x, y).item() == 0  # the next step applies
    assert not torch.equal(state_of(model, optimizer)[0][0], after[0][0])

    for _ in range(2):
        ref_optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters()):  # powers of two scale exactly
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_loss_scale_grows_after_growth_interval_good_steps_and_state_round_trips():
    model, optimizer, x, y = tiny_problem()
    scaler = LossScaler("cpu", init_scale=8.0, growth_interval=3)
    assert (scaler.growth_factor, scaler.backoff_factor, LossScaler("cpu").growth_interval) == (2.0, 0.5, 2000)
    scales = []
    for poison in (False, False, False, False, True, False, False, False):
        scaled_step(model, optimizer, scaler, x, y, poison=poison)
        scales.append(scaler.get_scale())
    assert scales == [8, 8, 16, 16, 8, 8, 8, 16]
    other = LossScaler("cpu")
    other.load_state_dict(scaler.state_dict())
    assert other.state_dict() == scaler.state_dict() == {
        "scale": 16.0, "growth_tracker": 0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3}


def test_eager_step_in_fp16_scales_the_loss_and_skips_an_overflow_on_cpu():
    torch.manual_seed(0)
    model = models.CifarNet("gn")
    optimizer = recipe_lib.make_optimizer(model, recipe_lib.recipe_for("gn"))
    step = steps.EagerStep(model, optimizer, nn.CrossEntropyLoss(), amp_dtype=torch.float16)
    assert isinstance(step.scaler, LossScaler) and step.scaler.get_scale() == 2.0 ** 16
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    poison = {"on": False}
    first = next(model.parameters())
    first.register_hook(lambda grad: grad * float("inf") if poison["on"] else grad)
    losses = []
    for poisoned in (False, True, False):
        poison["on"] = poisoned
        before = [p.detach().clone() for p in model.parameters()]
        loss, correct = step(images, labels)
        losses.append(float(loss))
        changed = any(not torch.equal(p, q) for p, q in zip(before, model.parameters()))
        assert changed != poisoned
    assert step.scaler.get_scale() == 2.0 ** 15
    assert all(0 < loss < 10 for loss in losses)  # the unscaled loss is returned
    # Without fp16 there is no scaler: bf16 and fp32 steps are as before.
    assert steps.EagerStep(model, optimizer, nn.CrossEntropyLoss(), amp_dtype=torch.bfloat16).scaler is None


def test_an_fp16_run_checkpoints_its_loss_scale_and_resumes_with_it(dataset, tmp_path, monkeypatch):
    recipe = recipe_lib.recipe_for("bn", epochs=1, batch_size=50, lr_per_32=0.032)
    path = tmp_path / "checkpoint.pt"
    dataset = {**dataset, "train_images": dataset["train_images"][:150], "train_labels": dataset["train_labels"][:150],
               "test_images": dataset["test_images"][:50], "test_labels": dataset["test_labels"][:50]}  # fp16 on a CPU is slow

    def run(resume):
        model = models.fresh_model("bn", recipe, train_images=dataset["train_images"], seed=0)
        return fit_lib.fit(model, dataset, norm="bn", recipe=recipe, runtime={"amp": "fp16"},
                           checkpoint_path=path, resume=resume, progress=False, log=lambda line: None)

    run(False)
    saved = checkpoints.load_torch(path)["scaler"]
    assert saved["scale"] == 2.0 ** 16 and saved["growth_tracker"] == 3  # 3 good steps of 50 images
    loaded = []
    real_load = LossScaler.load_state_dict
    monkeypatch.setattr(LossScaler, "load_state_dict", lambda self, state: loaded.append(state) or real_load(self, state))
    history = run(True)  # nothing left to train: the resume only loads the checkpoint
    assert loaded == [saved] and len(history["test_acc"]) == 1


# --- runtime presets ---------------------------------------------------------------------------

@pytest.mark.parametrize("capability, fast_amp", [((9, 0), "bf16"), ((8, 6), "bf16"), ((7, 5), "fp16")])
def test_presets_pick_the_precision_by_compute_capability(monkeypatch, capability, fast_amp):
    fake_gpu(monkeypatch, capability)
    assert runtime_lib.runtime_for(CUDA, "fast", norm="bn")["amp"] == fast_amp
    assert runtime_lib.runtime_for(CUDA, "fp16", norm="bn")["amp"] == "fp16"
    assert runtime_lib.runtime_for(CUDA, "fp32", norm="bn")["amp"] is None
    fp16 = runtime_lib.runtime_for(CUDA, "fp16", norm="gn")
    assert fp16["cuda_graph"] and fp16["triton_kernels"] == (capability >= (8, 0))
    for preset in runtime_lib.PRESETS:  # off CUDA every preset is the eager reference
        assert runtime_lib.runtime_for("cpu", preset, norm="bn") == runtime_lib.runtime_for("cpu", "eager")


def test_help_explains_every_runtime_in_one_line(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--runtime {fast,fp16,fp32,eager}" in out
    for name, what in runtime_lib.PRESETS.items():
        assert f"  {name:<6} {what}\n" in out and len(f"  {name:<6} {what}") <= 100


# --- the fallback to PyTorch's modules ------------------------------------------------------------

def test_without_triton_every_norm_uses_the_modules_and_says_so_once(monkeypatch, capsys):
    fake_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(runtime_lib, "triton_available", lambda: False)
    for norm in ("bn", "ln", "gn", "bn"):
        runtime = runtime_lib.runtime_for(CUDA, norm=norm)
        assert not runtime["triton_kernels"] and runtime["channels_last"] == (norm == "bn")
        assert runtime["amp"] == "bf16" and runtime["cuda_graph"]
    # Asking for the kernels cannot turn them on without Triton.
    assert not runtime_lib.runtime_for(CUDA, norm="gn", triton_kernels=True)["triton_kernels"]
    assert said(capsys) == ["normstudy: Triton kernels off (Triton is not installed); using PyTorch's modules"]


def test_a_gpu_older_than_ampere_uses_the_modules_in_fp16_and_says_so_once(monkeypatch, capsys):
    fake_gpu(monkeypatch, (7, 5))  # Colab's T4
    for norm in ("gn", "bn", "ln"):
        runtime = runtime_lib.runtime_for(CUDA, norm=norm)
        assert runtime == {"amp": "fp16", "cuda_graph": True, "triton_kernels": False,
                           "channels_last": norm == "bn", "cudnn_benchmark": False, "compile": False}
    lines = said(capsys)
    assert len(lines) == 1 and "compute capability 7.5" in lines[0] and "8.0" in lines[0]
    # The eager preset never wanted them: nothing to say.
    runtime_lib._said.clear()
    runtime_lib.runtime_for(CUDA, "eager", norm="bn")
    assert said(capsys) == []


def test_kernels_that_fail_to_compile_are_dropped_for_the_process(dataset, monkeypatch, capsys):
    from normstudy.fast import kernels

    def broken(*args, **kwargs):
        raise RuntimeError("PTXAS error: Internal Triton PTX codegen error\nptxas fatal")

    monkeypatch.setattr(kernels, "precompile", broken)
    for norm in ("gn", "bn"):  # two runs of one process (the CPU stands in for the GPU here)
        recipe = recipe_lib.recipe_for(norm, batch_size=100)
        model = models.fresh_model(norm, recipe, train_images=dataset["train_images"], seed=0)
        training = fit_lib.prepare(model, dataset, recipe=recipe, device="cpu", seed=0, norm=norm,
                                   runtime={"triton_kernels": True, "channels_last": True})
        assert not training.runtime["triton_kernels"] and training.runtime["channels_last"] == (norm == "bn")
        assert not any(m.fused for m in model.modules() if isinstance(m, (models.ConvBlock, models.MaxPool2d)))
        assert model.c1[0].weight.is_contiguous(memory_format=torch.channels_last) == (norm == "bn")
    # Later runs of this process do not try them again, on any device.
    fake_gpu(monkeypatch, (9, 0))
    assert not runtime_lib.runtime_for(CUDA, norm="ln")["triton_kernels"]
    lines = said(capsys)
    assert lines == ["normstudy: Triton kernels off (they failed to compile: RuntimeError: PTXAS error: "
                     "Internal Triton PTX codegen error ptxas fatal); using PyTorch's modules"]


def wrong_relu_norm(x, norm, residual=None):
    y = norm(F.relu(x)) * 1.01  # one per cent off
    return y if residual is None else residual + y


def raising_relu_norm(x, norm, residual=None):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def kernels_device():
    """The device the real Triton kernels run on here (the GPU, else Triton's CPU interpreter);
    skips the test where they cannot run at all."""
    pytest.importorskip("triton")
    from normstudy.fast import kernels
    if not kernels.INTERPRET and not torch.cuda.is_available():
        pytest.skip("no GPU and Triton's interpreter is off")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# fp32 steps with the Triton kernels: what compile_kernels checks in the tests below.
FP32_KERNELS = {"amp": None, "cuda_graph": False, "triton_kernels": True, "channels_last": True,
                "cudnn_benchmark": False, "compile": False}


@pytest.mark.parametrize("fake, expected", [(wrong_relu_norm, "self-check failed in fp32: output"),
                                            (raising_relu_norm, "self-check failed")])
def test_kernels_that_fail_their_self_check_are_dropped(monkeypatch, capsys, fake, expected):
    device = kernels_device()
    from normstudy.fast import kernels
    monkeypatch.setattr(kernels, "relu_norm", fake)
    monkeypatch.setattr(kernels, "max_pool", lambda x, pool: F.max_pool2d(x, 2))  # fast in the interpreter
    torch.manual_seed(0)
    model = models.CifarNet("gn")
    runtime = dict(FP32_KERNELS)
    fit_lib.prepare_model(model, device, runtime)
    weights = copy.deepcopy(model.state_dict())
    used = fit_lib.compile_kernels(model, device, runtime, image_shape=(3, 32, 32))
    assert used == {**runtime, "triton_kernels": False, "channels_last": False}
    assert not model.c1.fused and all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    lines = said(capsys)
    assert len(lines) == 1 and expected in lines[0] and "\n" not in lines[0]


def test_the_real_kernels_pass_their_self_check(capsys):
    device = kernels_device()
    torch.manual_seed(0)
    model = models.CifarNet("bn")
    runtime = dict(FP32_KERNELS)
    fit_lib.prepare_model(model, device, runtime)
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    assert fit_lib.compile_kernels(model, device, runtime, image_shape=(3, 32, 32)) is runtime
    assert model.c1.fused and said(capsys) == []
    # The check leaves the model (BatchNorm's running statistics too) and the random stream alone.
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_self_check_does_not_blame_the_kernels_for_an_ill_conditioned_network():
    """InstanceNorm (GroupNorm with 32 groups of 1 channel) on 4x4 maps amplifies rounding layer
    after layer: end to end the fused and plain networks differed by 96-130 % on the H100, and the
    kernels were switched off for the whole grid. Block by block they agree, which is what counts."""
    device = kernels_device()
    torch.manual_seed(0)
    model = models.CifarNet("gn", groups=32).to(device, memory_format=torch.channels_last)
    example = torch.zeros(2, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    assert self_check.kernels_self_check(model, example) is None


def test_a_run_records_the_runtime_it_trained_with(tmp_path, monkeypatch):
    """The record's runtime is the one fit set up (kernels switched off by their self-check show
    there), not one resolved again afterwards: by then a run in another thread may have switched
    the kernels off for the whole process, though this run trained with them."""
    from normstudy import run as run_lib
    from normstudy.config import RunConfig
    real_prepare = fit_lib.prepare

    def prepare(*args, **kwargs):  # a set-up that changed its runtime, as compile_kernels may
        training = real_prepare(*args, **kwargs)
        training.runtime = {**training.runtime, "cudnn_benchmark": True}
        return training

    monkeypatch.setattr(fit_lib, "prepare", prepare)
    config = RunConfig("bn", epochs=1, batch_size=256, data="synthetic")
    record = run_lib.run_one(config, tmp_path, device="cpu", figures=False, progress=False, log=lambda line: None)
    assert record["runtime"]["cudnn_benchmark"] is True
    assert fit_lib.resolve_runtime("cpu", "bn")["cudnn_benchmark"] is False


def test_a_passed_self_check_is_remembered_per_machine_and_kernels(monkeypatch, tmp_path):
    """fast.checked: a pass is a file in Triton's cache folder, named by what decides the kernels'
    results (norm layers, dtype, GPU, versions); off CUDA there is nothing to remember."""
    from types import SimpleNamespace
    from normstudy.fast import checked
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(name="Fake GPU", major=9, minor=0))
    bn, gn4 = models.CifarNet("bn"), models.CifarNet("gn", groups=4)
    key = checked.key(bn, device="cuda", dtype=torch.bfloat16)
    others = {checked.key(gn4, device="cuda", dtype=torch.bfloat16), checked.key(bn, device="cuda", dtype=None),
              checked.key(models.CifarNet("gn", groups=2), device="cuda", dtype=torch.bfloat16),
              # review: a WS model's check never runs the first layer's Triton convolution
              checked.key(models.CifarNet("bn", ws=True), device="cuda", dtype=torch.bfloat16),
              checked.key(models.CifarNet("bn", order="norm-relu"), device="cuda", dtype=torch.bfloat16)}
    assert key not in others and len(others) == 5
    assert checked.key(models.CifarNet("bn"), device="cuda", dtype=torch.bfloat16) == key  # the same model, the same key
    assert checked.key(bn, device="cpu", dtype=torch.bfloat16) is None
    assert not checked.passed(key)
    checked.remember(key)
    assert checked.passed(key) and not any(checked.passed(other) for other in others)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton" / checked.FOLDER / key))  # a file: unwritable
    checked.remember(key)  # no error: the check just runs again next time


def test_compile_kernels_skips_a_self_check_that_passed_before(monkeypatch, capsys):
    device = kernels_device()
    from normstudy.fast import checked
    memo = set()
    monkeypatch.setattr(checked, "key", lambda model, *, device, dtype: "k")
    monkeypatch.setattr(checked, "passed", lambda name: name in memo)
    monkeypatch.setattr(checked, "remember", memo.add)
    checks = []
    monkeypatch.setattr(self_check, "kernels_self_check", lambda *args: checks.append(args) or None)
    model = models.CifarNet("bn")
    runtime = dict(FP32_KERNELS)
    fit_lib.prepare_model(model, device, runtime)
    assert fit_lib.compile_kernels(model, device, runtime, image_shape=(3, 32, 32)) is runtime
    assert len(checks) == 1 and memo == {"k"}
    assert fit_lib.compile_kernels(model, device, runtime, image_shape=(3, 32, 32)) is runtime
    assert len(checks) == 1 and said(capsys) == []  # the second run trusts the first's check


def test_device_warm_up_starts_nothing_off_cuda():
    # Only a CUDA device has a context and cuDNN to load (runtime.warm_up_device, started by train.py
    # while it reads the data); on the CPU no thread is left behind.
    import threading
    before = {t.name for t in threading.enumerate()}
    assert runtime_lib.warm_up_device_in_background(torch.device("cpu")) is None
    assert "device-warm-up" not in {t.name for t in threading.enumerate()} - before


def test_train_command_joins_its_device_warm_up(tmp_path, monkeypatch):
    # The warm-up thread is joined before the command ends, whatever happens (a process that exits
    # under a thread inside CUDA's calls aborts): here the data cannot be read (exit 2).
    joined = []

    class Thread:
        def join(self):
            joined.append(True)

    monkeypatch.setattr(run_lib, "warm_up_in_background", lambda config, **kw: Thread())
    code = cli.main(["--norm", "bn", "--data-dir", str(tmp_path / "none"), "--no-download", "--out",
                     str(tmp_path / "out"), "--quiet", "--device", "cpu"])
    assert code == 2 and joined == [True]


def test_a_ray_worker_of_many_runs_asks_cuda_for_more_queues_too(tmp_path, monkeypatch):
    # The local runner asked for 32 queues from the start; Ray workers, each a process of its own
    # with --concurrency runs at once, did not (found reading the code after the H200's numbers).
    import os
    import tempfile
    from normstudy.runners import ray_worker
    queues = runtime_lib.QUEUES_VARIABLE
    for name in (queues, "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.setenv(name, "set by the test")  # each restored afterwards
    monkeypatch.delenv(queues)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    seen, workers = [], []
    try:
        for device, concurrency in (("cpu", 27), ("cuda", 2), ("cuda", 27)):
            workers.append(ray_worker.Worker(device=device, data_dir=tmp_path, download=False, concurrency=concurrency))
            seen.append(os.environ.get(queues))
    finally:
        for worker in workers:
            worker._cache_lock_file.close()
    assert seen == [None, None, "32"]


def test_tritons_cache_key_is_computed_on_a_thread_and_kept():
    # Triton hashes its whole package (~500 MB) once a process before it looks any kernel up in
    # its cache: 0.92 s of the H200's warm start, on the main thread until it moved to one of its
    # own. The thread must leave the key in Triton's own cache, the value Triton computes itself;
    # it starts once a process, and only computes where the run will use the kernels.
    key = runtime_lib._triton_key()
    if key is None or not hasattr(key, "cache_clear"):
        pytest.skip("no Triton, or its triton_key is not the cached function this version expects")
    key.cache_clear()
    unused = runtime_lib.TritonKey()
    unused.start(when=lambda: False)
    unused.wait()
    assert key.cache_info().currsize == 0
    triton_key = runtime_lib.TritonKey()
    thread = triton_key.start(when=lambda: True)
    assert triton_key.start(when=lambda: True) is thread  # once
    triton_key.wait()
    assert thread.name == "triton-key" and key.cache_info().currsize == 1
    assert key().startswith(__import__("triton").__version__) and key.cache_info().hits == 1


def test_the_head_start_computes_tritons_key_only_for_a_run_that_uses_the_kernels(monkeypatch):
    # On CUDA the key's thread starts with the device's warm-up and asks, on its own thread, whether
    # the run uses the kernels at all (fit.uses_kernels: runtime and network); off CUDA nothing starts.
    started, asked = [], []
    monkeypatch.setattr(runtime_lib.TRITON_KEY, "start", lambda *, when: started.append(when))
    monkeypatch.setattr(runtime_lib, "warm_up_device_in_background", lambda device, *, then: "thread")
    monkeypatch.setattr(fit_lib, "uses_kernels", lambda model, device, runtime: asked.append(
        (type(model).__name__, str(device), runtime)) or True)
    assert run_lib.warm_up_in_background(RunConfig(norm="bn"), device="cpu") is None and started == []
    assert run_lib.warm_up_in_background(RunConfig(norm="bn"), device="cuda", runtime="fp16") == "thread"
    assert len(started) == 1 and started[0]() is True and asked == [("CifarNet", "cuda", "fp16")]


def test_a_compile_waits_for_tritons_key_holding_the_device_lock(monkeypatch):
    # Triton caches the key but does not lock it: a compile that started while the key's thread
    # still hashed would compute it again, at once. Both compiles (the head start and the run's
    # own) wait for the thread first, holding the device lock alone, so that no compile starts
    # before the key is there; where the run takes PyTorch's modules nothing waits.
    device = kernels_device()
    from normstudy.fast import kernels
    events = []

    def wait():
        events.append(("waited", runtime_lib.DEVICE_LOCK._recording))
    monkeypatch.setattr(runtime_lib.TRITON_KEY, "wait", wait)
    monkeypatch.setattr(kernels, "precompile", lambda *args, **kw: events.append("compiled ahead"))
    monkeypatch.setattr(self_check, "compile_and_check", lambda *args: events.append("compiled") or None)
    fit_lib.compile_ahead(run_lib.network(RunConfig(norm="bn")), device, FP32_KERNELS)
    assert events == [("waited", True), "compiled ahead"]
    model = models.fresh_model("bn", RunConfig(norm="bn").recipe, seed=0,
                               train_images=data.load_synthetic_cifar10(n_train=64)["train_images"])
    fit_lib.prepare_model(model, device, FP32_KERNELS)
    events.clear()
    with runtime_lib.DEVICE_LOCK.alone():  # as fit holds it
        assert fit_lib.compile_kernels(model, device, FP32_KERNELS, image_shape=(3, 32, 32)) is FP32_KERNELS
    assert events == [("waited", True), "compiled"]
    events.clear()
    fit_lib.compile_ahead(run_lib.network(RunConfig(norm="gn", order="norm-relu")), device, FP32_KERNELS)
    assert events == []


def test_device_warm_up_draws_no_random_numbers():
    # It may run while a run seeds and draws (train.py starts it before reading the data): a draw
    # would shift the run's random stream and break its bit-reproducibility.
    torch.manual_seed(0)
    state = torch.get_rng_state()
    runtime_lib.warm_up_device(torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)


def _what_is_compiled(calls):
    """What ``kernels.precompile`` was asked for: the network (each module and its kernels switch),
    its parameters' shapes, layouts and device, the example and the dtypes."""
    def describe(model, example, dtype):
        return ([(name, type(module).__name__, getattr(module, "fused", None)) for name, module in model.named_modules()],
                [(name, tuple(p.shape), p.stride(), p.dtype, p.device.type) for name, p in model.named_parameters()],
                (tuple(example.shape), example.stride(), example.dtype, example.device.type), dtype)
    return [describe(*call) for call in calls]


@pytest.mark.parametrize("config", [RunConfig(norm="bn"), RunConfig(norm="gn", groups=4), RunConfig(norm="ln", ws=True)],
                         ids=lambda config: config.run_id)
def test_the_kernels_head_start_compiles_what_the_run_compiles_and_draws_nothing(config, monkeypatch):
    # train.py compiles a run's Triton kernels on a thread while it reads the data (run.warm_up_in_background,
    # fit.compile_ahead: ~1 s of the H200's start-up); the run's own set-up then finds them compiled only if
    # it asks for the very same kernels. The head start runs while the run seeds and draws: it draws nothing.
    device = kernels_device()
    from normstudy.fast import kernels
    ahead, run = [], []
    calls = ahead
    monkeypatch.setattr(kernels, "precompile", lambda model, example, *, dtype=None: calls.append((model, example, dtype)))
    monkeypatch.setattr(self_check, "kernels_self_check", lambda *args: None)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    fit_lib.compile_ahead(run_lib.network(config), device, FP32_KERNELS)
    assert torch.equal(torch.get_rng_state(), state)
    calls = run
    model = models.fresh_model(config.norm, config.recipe, train_images=data.load_synthetic_cifar10(n_train=64)["train_images"],
                               seed=0, choices=config.choices)
    fit_lib.prepare_model(model, device, FP32_KERNELS)
    assert fit_lib.compile_kernels(model, device, FP32_KERNELS, image_shape=(3, 32, 32)) is FP32_KERNELS
    assert len(ahead) == len(run) == 1 and _what_is_compiled(ahead) == _what_is_compiled(run)


def test_no_head_start_where_the_run_takes_pytorchs_modules(monkeypatch, capsys):
    # The Conv -> Norm -> ReLU order has no kernels: nothing to compile, and nothing said (the run says it).
    device = kernels_device()
    from normstudy.fast import kernels
    calls = []
    monkeypatch.setattr(kernels, "precompile", lambda *args, **kw: calls.append(args))
    fit_lib.compile_ahead(run_lib.network(RunConfig(norm="gn", order="norm-relu")), device, FP32_KERNELS)
    fit_lib.compile_ahead(run_lib.network(RunConfig(norm="bn")), "cpu", "eager")
    assert calls == [] and said(capsys) == []


def test_many_runs_at_once_ask_cuda_for_more_hardware_queues(monkeypatch):
    """27 runs at once on the H200 shared CUDA's default 8 hardware queues: 32 took a pass of
    bench_together.py from 62 to 38 s. More than 8 runs at once ask for 32, before CUDA starts;
    a user's own value, a CUDA already started and 8 runs or fewer leave the variable alone."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    environ = {}
    assert runtime_lib.ask_for_queues(8, environ=environ) is None and environ == {}
    assert runtime_lib.ask_for_queues(9, environ=environ) == "32" and environ == {"CUDA_DEVICE_MAX_CONNECTIONS": "32"}
    mine = {"CUDA_DEVICE_MAX_CONNECTIONS": "16"}
    assert runtime_lib.ask_for_queues(27, environ=mine) is None and mine == {"CUDA_DEVICE_MAX_CONNECTIONS": "16"}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    late = {}
    assert runtime_lib.ask_for_queues(27, environ=late) is None and late == {}


def test_the_local_runner_asks_for_queues_before_the_data_goes_to_the_device(monkeypatch):
    from normstudy.runners import local
    asked = []
    monkeypatch.setattr(runtime_lib, "ask_for_queues", lambda concurrency: asked.append(concurrency))
    monkeypatch.setattr(runtime_lib, "pick_device", lambda name: (_ for _ in ()).throw(RuntimeError(f"after {asked}")))
    with pytest.raises(RuntimeError, match=r"after \[12\]"):
        local.LocalRunner(12).run([object()], out="unused", on_record=print)
