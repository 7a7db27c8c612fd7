"""The network choices of issue 20 (RunConfig's order, norm_batch, renorm, ws): their ids and
refusals, each layer against BatchNorm or a direct computation (fp64, CPU), the Conv -> Norm ->
ReLU block against PyTorch's modules, the kernels' fallback line, and stacks that never take them."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from normstudy import data
from normstudy import fit as fit_lib
from normstudy import models
from normstudy import run as run_lib
from normstudy import runtime as runtime_lib
from normstudy import stack as stack_lib
from normstudy.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent


# --- RunConfig ----------------------------------------------------------------------------------

def test_choices_have_readable_ids_and_defaults_leave_ids_unchanged():
    assert RunConfig("bn", norm_batch=16).run_id == "bn-ghost16-b512-e20-s0"
    assert RunConfig("bn", renorm=True, batch_size=4).run_id == "bn-renorm-b4-e20-s0"
    assert RunConfig("gn", groups=4, ws=True, batch_size=2, seed=1).run_id == "gn-g4-ws-b2-e20-s1"
    assert RunConfig("ln", order="norm-relu", batch_size=16).cell == "ln-normrelu-b16-e20"
    assert RunConfig("bn", order="relu-norm", norm_batch=None, renorm=False, ws=False).run_id == "bn-b512-e20-s0"
    # n equal to the batch is plain BatchNorm, so it combines with Batch Renorm as plain BN does (review)
    assert RunConfig("bn", renorm=True, norm_batch=512, batch_size=512) == RunConfig("bn", renorm=True)
    # n equal to the batch is plain BatchNorm: the same run, the same folder
    assert RunConfig("bn", batch_size=16, norm_batch=16) == RunConfig("bn", batch_size=16)
    assert RunConfig("bn", norm_batch=8).label == "BatchNorm, statistics over 8 images"
    assert RunConfig("gn", ws=True, order="norm-relu").label == "GroupNorm (2 groups), Conv→Norm→ReLU + WS"


def test_choices_round_trip_and_are_left_out_of_records_at_their_defaults():
    config = RunConfig("bn", norm_batch=4, batch_size=32, seed=2)
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.to_dict()["norm_batch"] == 4 and config.choices == {"norm_batch": 4}
    assert set(RunConfig("gn").to_dict()) == {"norm", "seed", "batch_size", "epochs", "groups", "overrides", "data",
                                             "holdout"}
    assert RunConfig("bn").differences(config) == ["seed: 2 vs 0", "batch_size: 32 vs 512", "norm_batch: 4 vs None"]


PART_TWO_CHOICES = {"ghost": {"norm_batch"}, "order": {"order"}, "remedies": {"renorm", "ws"}}


def test_committed_results_are_still_finished_runs_of_their_configs():
    records = sorted(ROOT.glob("results/**/record.json"))
    assert records
    for path in records:
        stored = json.loads(path.read_text())["config"]
        config = RunConfig.from_dict(stored)
        assert config.to_dict() == stored and config.run_id == path.parent.name
        # Network choices only in part two's grids, each grid its own: the others are the seed's network.
        grid = path.parent.parent.name
        assert set(config.choices) <= PART_TWO_CHOICES.get(grid, set()), (grid, config.run_id)
        assert run_lib.finished_record(path.parent, config) is not None


@pytest.mark.parametrize("kwargs, message", [
    (dict(norm="bn", order="norm-first"), r"order='norm-first': choose relu-norm .* or norm-relu"),
    (dict(norm="gn", norm_batch=4), "norm_batch \\(ghost batches\\) applies to BatchNorm only, not to gn"),
    (dict(norm="bn", norm_batch=3), "norm_batch=3 must divide the batch size 512"),
    (dict(norm="bn", batch_size=8, norm_batch=16), "norm_batch=16 must divide the batch size 8"),
    (dict(norm="bn", norm_batch=0), "norm_batch=0 must be a whole number >= 1"),
    (dict(norm="bn", norm_batch=2.0), "norm_batch=2.0 must be a whole number"),
    (dict(norm="ln", renorm=True), "renorm \\(Batch Renormalization\\) applies to BatchNorm only, not to ln"),
    (dict(norm="bn", renorm=True, norm_batch=4), "norm_batch and renorm do not combine"),
    (dict(norm="gn", ws="yes"), "ws='yes': expected true or false"),
    (dict(norm="bn", renorm=1), "renorm=1: expected true or false"),
])
def test_bad_choices_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as refused:
        RunConfig(**kwargs)
    assert "\n" not in str(refused.value)


# --- the layers, in fp64 ------------------------------------------------------------------------

def twins(make, *, channels=6):
    """Two layers with the same random affine parameters (fp64)."""
    torch.manual_seed(0)
    layers = [make().double() for _ in range(2)]
    weight, bias = torch.rand(channels, dtype=torch.float64) + 0.5, torch.randn(channels, dtype=torch.float64)
    mean, var = torch.randn(channels), torch.rand(channels) + 0.5
    for layer in layers:
        with torch.no_grad():
            for name, value in (("weight", weight), ("bias", bias), ("running_mean", mean), ("running_var", var)):
                getattr(layer, name).copy_(value)
    return layers


def step(layer, x, grad):
    """One training forward and backward: (output, input gradient, weight and bias gradients)."""
    x = x.clone().requires_grad_()
    out = layer.train()(x)
    out.backward(grad)
    return out.detach(), x.grad, layer.weight.grad, layer.bias.grad


def assert_same_step(a, b, x, grad):
    for got, expected in zip(step(a, x, grad), step(b, x, grad)):
        torch.testing.assert_close(got, expected)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name))


def test_ghost_batches_of_the_whole_batch_are_batchnorm():
    ghost, plain = twins(lambda: models.GhostBatchNorm2d(6, norm_batch=8, momentum=0.1))
    plain.__class__ = nn.BatchNorm2d
    x, grad = torch.randn(8, 6, 5, 5, dtype=torch.float64) * 3 + 1, torch.randn(8, 6, 5, 5, dtype=torch.float64)
    assert_same_step(ghost, plain, x, grad)  # forward, backward, running statistics
    small = torch.randn(3, 6, 5, 5, dtype=torch.float64)  # a batch smaller than n: one group, still BN
    assert_same_step(ghost, plain, small, torch.randn_like(small))
    torch.testing.assert_close(ghost.eval()(x), plain.eval()(x))  # evaluation: the running statistics


def test_ghost_batches_normalize_each_group_of_n_images_alone():
    torch.manual_seed(1)
    ghost = models.GhostBatchNorm2d(4, norm_batch=4).double()
    x = torch.randn(10, 4, 3, 3, dtype=torch.float64) * 2 + 5  # groups of 4, 4 and the remainder, 2
    out = ghost.train()(x)
    groups = (x[:4], x[4:8], x[8:])
    expected = torch.cat([F.batch_norm(g, None, None, ghost.weight, ghost.bias, True, 0.0, ghost.eps) for g in groups])
    torch.testing.assert_close(out, expected)
    # running statistics: one update, the groups' means and unbiased variances weighted by images
    mean = sum(len(g) * g.mean(dim=(0, 2, 3)) for g in groups) / 10
    var = sum(len(g) * g.transpose(0, 1).flatten(1).var(dim=1) for g in groups) / 10
    torch.testing.assert_close(ghost.running_mean, 0.1 * mean)
    torch.testing.assert_close(ghost.running_var, 0.9 + 0.1 * var)
    assert int(ghost.num_batches_tracked) == 1


def test_batch_renorm_with_rmax_1_and_dmax_0_is_batchnorm():
    schedule = models.RenormSchedule(steps_per_epoch=10, r_max=1.0, d_max=0.0)
    renorm, plain = twins(lambda: models.BatchRenorm2d(6, schedule=schedule, momentum=0.1))
    plain.__class__ = nn.BatchNorm2d
    for _ in range(3):
        x = torch.randn(8, 6, 5, 5, dtype=torch.float64) * 3 + 1
        assert_same_step(renorm, plain, x, torch.randn_like(x))
    # the schedule's warm-up (the first epoch) is plain BN as well, whatever its final limits
    warm = models.RenormSchedule(steps_per_epoch=100)
    renorm, plain = twins(lambda: models.BatchRenorm2d(6, schedule=warm, momentum=0.1))
    plain.__class__ = nn.BatchNorm2d
    x = torch.randn(8, 6, 5, 5, dtype=torch.float64) * 3 + 1
    assert_same_step(renorm, plain, x, torch.randn_like(x))


def test_batch_renorm_corrects_towards_the_running_statistics_within_its_limits():
    schedule = models.RenormSchedule(steps_per_epoch=2)  # relaxed from step 2, fully at step 10
    renorm = models.BatchRenorm2d(3, schedule=schedule).double()
    with torch.no_grad():
        renorm.num_batches_tracked.fill_(10)
        renorm.running_mean.copy_(torch.tensor([0.0, 5.0, 1.0]))
        renorm.running_var.copy_(torch.tensor([1.0, 1.0, 100.0]))
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64)
    out = renorm.train()(x)
    mean, std = x.mean(dim=(0, 2, 3)), (x.var(dim=(0, 2, 3), unbiased=False) + renorm.eps).sqrt()
    running_std = (torch.tensor([1.0, 1.0, 100.0], dtype=torch.float64) + renorm.eps).sqrt()
    r = (std / running_std).clamp(1 / 1.5, 1.5)
    d = ((mean - torch.tensor([0.0, 5.0, 1.0], dtype=torch.float64)) / running_std).clamp(-0.5, 0.5)
    expected = (x - mean[:, None, None]) / std[:, None, None] * r[:, None, None] + d[:, None, None]
    torch.testing.assert_close(out, expected)  # weight 1, bias 0
    assert d[1] == -0.5 and r[2] == 1 / 1.5  # the limits bind on these channels


def test_batch_renorm_schedule_is_in_epochs_whatever_the_batch():
    for steps_per_epoch in (98, 25_000):  # batch 512 and batch 2 on CIFAR-10
        schedule = models.RenormSchedule(steps_per_epoch)
        at = [schedule.limits(torch.tensor(int(e * steps_per_epoch))) for e in (0, 1, 3, 5, 20)]
        assert [(round(float(r), 6), round(float(d), 6)) for r, d in at] == [
            (1.0, 0.0), (1.0, 0.0), (1.25, 0.25), (1.5, 0.5), (1.5, 0.5)]
        assert schedule.steps() == (steps_per_epoch, 5 * steps_per_epoch)


def test_weight_standardized_convolution_against_a_direct_computation():
    torch.manual_seed(0)
    conv = models.WSConv2d(4, 5, kernel_size=3, padding=1, bias=False).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    w = conv.weight.detach()
    direct = torch.empty_like(w)
    for o in range(w.shape[0]):  # each output channel's 4 x 3 x 3 filter to mean 0, variance 1
        values = w[o].flatten()
        mean = values.sum() / values.numel()
        var = ((values - mean) ** 2).sum() / values.numel()
        direct[o] = (w[o] - mean) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(conv(x), F.conv2d(x, direct, padding=1))
    scaled = models.WSConv2d(4, 5, kernel_size=3, padding=1, bias=False).double()
    with torch.no_grad():
        scaled.weight.copy_(w * 7 + 3)  # standardization removes a filter's scale and offset (up to eps)
    torch.testing.assert_close(scaled(x), conv(x), atol=2e-2, rtol=2e-3)


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_norm_relu_block_is_conv_norm_relu_of_pytorch_modules(norm):
    torch.manual_seed(0)
    block = models.ConvBlock(8, 8, norm=norm, groups=4, dropout=0.0, bn_momentum=0.1, order="norm-relu").double()
    conv, _, layer, _ = block
    reference = nn.Sequential(conv, layer, nn.ReLU())  # the same modules, in Wu & He's order
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    residual = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    out = block.train()(x, residual=residual)
    out.sum().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    block.load_state_dict(state)
    block.zero_grad()
    # He et al.'s ResNet block (Wu & He's): the sum, then the ReLU (review: it once added after the ReLU)
    expected = F.relu(residual + nn.Sequential(conv, layer).train()(x))
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, [p.grad for p in block.parameters()]):
        torch.testing.assert_close(got, want)
    # the seed's order is unchanged: norm(relu(conv(x)))
    seed = models.ConvBlock(8, 8, norm=norm, groups=4, dropout=0.0, bn_momentum=0.1).double().eval()
    torch.testing.assert_close(seed(x), seed[2](F.relu(seed[0](x))))
    block.load_state_dict(state)
    torch.testing.assert_close(block.eval()(x), reference.eval()(x))  # no skip connection: conv, norm, relu


def test_the_network_with_each_choice_keeps_the_seeds_parameters_and_names():
    plain = models.CifarNet("gn")
    for options in (dict(order="norm-relu"), dict(ws=True)):
        model = models.CifarNet("gn", **options)
        assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in plain.named_parameters()]
    model = models.CifarNet("bn", renorm=True, steps_per_epoch=98)
    assert sum(isinstance(m, models.BatchRenorm2d) for m in model.modules()) == 7
    assert sum(p.numel() for p in model.parameters()) == 48_736
    ws = models.CifarNet("ln", ws=True)
    assert [n for n, m in ws.named_modules() if isinstance(m, models.WSConv2d)] == [
        f"c{k}.0" for k in (2, 4, 5, 7, 8, 9)]  # the convolutions a norm follows; not the 1x1s, not the first
    # ... whose whitening initialization WS would undo (review: the luminance filter is nearly all mean)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    recipe = RunConfig("ln").recipe
    plain = models.fresh_model("ln", recipe, train_images=images, seed=0)
    standardized = models.fresh_model("ln", recipe, train_images=images, seed=0, choices={"ws": True})
    assert type(standardized.c1[0]) is nn.Conv2d and isinstance(standardized.c2[0], models.WSConv2d)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(standardized.c1[0](x), plain.c1[0](x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="renorm needs steps_per_epoch"):
        models.CifarNet("bn", renorm=True)
    with pytest.raises(ValueError, match="apply to BatchNorm only"):
        models.CifarNet("gn", norm_batch=4)


def test_fresh_model_builds_the_runs_choices():
    images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
    config = RunConfig("bn", renorm=True, batch_size=32)
    model = models.fresh_model("bn", config.recipe, train_images=images, seed=0, choices=config.choices)
    assert model.c1[2].schedule.steps_per_epoch == 4  # 100 images, batches of 32: the last one kept
    config = RunConfig("bn", norm_batch=4, batch_size=32)
    model = models.fresh_model("bn", config.recipe, train_images=images, seed=0, choices=config.choices)
    assert {m.norm_batch for m in model.modules() if isinstance(m, models.GhostBatchNorm2d)} == {4}


# --- the fast path and stacks -------------------------------------------------------------------

def test_choices_the_kernels_lack_take_pytorchs_modules_with_one_line(monkeypatch):
    said = []
    monkeypatch.setattr(runtime_lib, "notice", said.append)
    monkeypatch.setattr(runtime_lib, "_said", set())
    fast = {"amp": "bf16", "cuda_graph": True, "triton_kernels": True, "channels_last": True,
            "cudnn_benchmark": False, "compile": False}
    for _ in range(2):  # said once per process
        runtime = fit_lib.kernels_for_choices(models.CifarNet("gn", order="norm-relu"), fast, "gn")
    assert not runtime["triton_kernels"] and not runtime["channels_last"]
    assert said == ["normstudy: the Triton kernels do not implement the Conv -> Norm -> ReLU order; "
                    "using PyTorch's modules"]
    runtime = fit_lib.kernels_for_choices(models.CifarNet("bn", norm_batch=4), fast, "bn")
    assert not runtime["triton_kernels"] and runtime["channels_last"] and "ghost batches" in said[-1]
    runtime = fit_lib.kernels_for_choices(models.CifarNet("bn", renorm=True, steps_per_epoch=9), fast, "bn")
    assert not runtime["triton_kernels"] and "Batch Renormalization" in said[-1]
    assert fit_lib.kernels_for_choices(models.CifarNet("gn", ws=True), fast, "gn") == fast  # WS keeps them all
    assert fit_lib.kernels_for_choices(models.CifarNet("gn"), fast, "gn") == fast and len(said) == 3
    blocks = [m for m in models.CifarNet("bn", renorm=True, steps_per_epoch=9).modules()
              if isinstance(m, models.ConvBlock)]
    assert not any(b.fusable for b in blocks)  # even with kernels switched on, these blocks run the modules


def test_runs_with_choices_never_share_a_stack():
    plain = [RunConfig("bn", seed=s, batch_size=8, epochs=2) for s in (0, 1)]
    chosen = [RunConfig("bn", seed=s, batch_size=8, epochs=2, norm_batch=4) for s in (0, 1)]
    chosen += [RunConfig("gn", seed=0, batch_size=8, epochs=2, order="norm-relu"),
               RunConfig("ln", seed=0, batch_size=8, epochs=2, ws=True)]
    stacks = stack_lib.plan_stacks(plain + chosen, 32)
    assert [[c.run_id for c in s] for s in stacks] == [[c.run_id for c in plain]] + [[c.run_id] for c in chosen]
    with pytest.raises(ValueError, match="runs with network choices .* train alone"):
        stack_lib.train_stack(chosen[:1], "unused", dataset=None, device="cpu")
    with pytest.raises(ValueError, match="a stack of runs takes the seed's network only"):
        models.CifarNet(stack=[models.NormSpec("bn", None, 0.1)], ws=True)


@pytest.mark.parametrize("choices", [dict(norm="bn", renorm=True), dict(norm="gn", order="norm-relu", ws=True)])
def test_a_run_with_choices_trains_and_records_them(choices, tmp_path):
    """(Ghost batches train in tests/test_study_questions.py's smoke grid.)"""
    dataset = data.load_synthetic_cifar10(n_train=128, n_test=64)
    config = RunConfig(**choices, batch_size=64, epochs=1, data="synthetic")
    record = run_lib.run_one(config, tmp_path, dataset=dataset, device="cpu", figures=False, progress=False,
                             log=lambda line: None)
    assert record["config"] == config.to_dict() and RunConfig.from_dict(record["config"]) == config
    assert run_lib.finished_record(tmp_path / config.run_id, config) is not None
