"""The network: exact architecture, norm placement, residual adds, shapes and argument checks."""
from pathlib import Path

import pytest
import torch
from torch import nn
from torchsummary import summary

import model_bn
import model_gn
import model_ln
from normstudy import models
import utils

SEED_TABLES = Path(__file__).parent / "data"
VARIANTS = {"bn": model_bn, "ln": model_ln, "gn": model_gn}


@pytest.mark.parametrize("norm", VARIANTS)
def test_parameter_count_is_the_seeds(norm):
    model = VARIANTS[norm].Net()
    assert sum(p.numel() for p in model.parameters()) == 48_736
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("norm", VARIANTS)
def test_torchsummary_prints_the_seeds_table(norm, capsys):
    summary(VARIANTS[norm].Net(), (3, 32, 32), device="cpu")
    printed = [line.rstrip() for line in capsys.readouterr().out.strip("\n").splitlines()]
    expected = (SEED_TABLES / f"seed_summary_{norm}.txt").read_text().strip("\n").splitlines()
    assert printed == expected


@pytest.mark.parametrize("norm, kind, groups", [("bn", nn.BatchNorm2d, None), ("ln", models.GroupNorm, 1),
                                                ("gn", models.GroupNorm, 2)])
def test_each_variant_holds_its_norm_and_no_other(norm, kind, groups):
    model = VARIANTS[norm].Net()
    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm,
                                                          nn.LayerNorm))]
    assert len(norms) == 7
    assert all(type(m) is kind for m in norms)
    if groups is not None:
        assert [m.num_groups for m in norms] == [groups] * 7
    # every 3x3 conv block is Conv -> ReLU -> Norm -> Dropout
    blocks = [m for m in model.modules() if isinstance(m, nn.Sequential)]
    assert [[type(layer) for layer in b] for b in blocks] == [[nn.Conv2d, nn.ReLU, kind, nn.Dropout]] * 7
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_residual_adds_are_there():
    model = model_bn.Net().eval()
    seen = {}
    for name in ("c1", "c2", "c3", "c4", "c5", "c6"):
        getattr(model, name).register_forward_hook(
            lambda module, inputs, output, name=name: seen.update({name: (inputs[0], output)}))
    model(torch.randn(4, 3, 32, 32))
    seen = dict(seen)  # the calls below run the hooks again
    c1_out, c4_out = seen["c1"][1], seen["c4"][1]
    # The blocks add their input themselves (the fused kernels add it in the norm's pass).
    torch.testing.assert_close(seen["c3"][0], c1_out + model.c2(c1_out))  # x = x + C2(x)
    pooled = nn.functional.max_pool2d(seen["c3"][1], 2)
    torch.testing.assert_close(seen["c4"][0], pooled)
    torch.testing.assert_close(seen["c6"][0], c4_out + model.c5(c4_out))  # x = x + C5(x)


@pytest.mark.parametrize("norm", VARIANTS)
@pytest.mark.parametrize("train", [True, False])
def test_forward_gives_finite_logits(norm, train):
    model = VARIANTS[norm].Net().train(train)
    out = model(torch.randn(8, 3, 32, 32))
    assert out.shape == (8, 10)
    assert torch.isfinite(out).all()


def test_group_count_that_does_not_divide_channels_is_refused():
    with pytest.raises(ValueError, match="groups=3 must .* divides the 32 channels"):
        model_gn.Net(groups=3)
    assert sum(p.numel() for p in model_gn.Net(groups=4).parameters()) == 48_736


def test_unknown_norm_and_bad_dropout_are_refused():
    with pytest.raises(ValueError, match="unknown norm 'in'; choose one of bn, ln, gn"):
        models.CifarNet("in")
    with pytest.raises(ValueError, match="dropout"):
        models.CifarNet("bn", dropout=1.5)


def test_dropout_and_bn_momentum_reach_the_layers():
    model = model_bn.Net(dropout=0.1, bn_momentum=0.2)
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.1}
    assert {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {0.2}


def test_get_correct_pred_count_on_hand_made_tensors():
    logits = torch.tensor([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 3.0, 2.0]])
    assert utils.GetCorrectPredCount(logits, torch.tensor([1, 0, 2, 2])) == 3
    assert utils.GetCorrectPredCount(logits, torch.tensor([0, 1, 0, 0])) == 0
    assert isinstance(utils.GetCorrectPredCount(logits, torch.tensor([1, 0, 2, 1])), int)


def test_group_norm_under_autocast_stays_in_half_precision_and_matches_fp32():
    torch.manual_seed(0)
    norm = models.GroupNorm(2, 32)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(4, 32, 8, 8) * 3 + 1).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16  # nn.GroupNorm under autocast would return fp32
    reference = nn.GroupNorm(2, 32)
    reference.load_state_dict(norm.state_dict())
    torch.testing.assert_close(y.float(), reference(x.detach().float()), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert norm.weight.grad.dtype == torch.float32 and norm.weight.grad.abs().sum() > 0
    # Outside autocast it is nn.GroupNorm exactly.
    z = torch.randn(2, 32, 4, 4)
    assert torch.equal(norm(z), reference(z))
