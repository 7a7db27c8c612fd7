"""optimizers.SGD and LambdaSchedule against torch.optim, step by step."""
import pytest
import torch

from normstudy import models
from normstudy.fast import optimizers
from normstudy import recipe as recipe_lib


def _batches(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _train(model, optimizer, batches, scheduler=None):
    for images, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return model


def _param_groups(model, weight_decay=5e-4):
    return [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]


def _twin_models(norm="bn"):
    torch.manual_seed(0)
    ours = models.CifarNet(norm)
    theirs = models.CifarNet(norm)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("momentum, nesterov", [(0.9, True), (0.9, False), (0.0, False)])
def test_sgd_takes_exactly_the_steps_of_torch_optim_sgd(momentum, nesterov):
    ours, theirs = _twin_models()
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    _train(ours, optimizers.SGD(_param_groups(ours), lr=0.05, momentum=momentum, nesterov=nesterov), _batches())
    _train(theirs, torch.optim.SGD(_param_groups(theirs), lr=0.05, momentum=momentum, nesterov=nesterov),
           _batches())
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert sum(float((a.float() - start[k].float()).abs().sum()) for k, a in ours.state_dict().items()) > 1.0


@pytest.fixture
def one_thread():
    """One CPU thread: with two, a convolution's weight gradient on a loaded machine was seen to
    differ between twin models by more than the rounding compared here (the reduction's order
    follows the threads), failing the test without any difference in the optimizers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sgd_with_a_tensor_lr_matches_to_rounding(one_thread):
    # lr * grad is rounded before the add (torch's float path fuses them), so allow an ulp or so;
    # a few steps only, because training amplifies any difference.
    ours, theirs = _twin_models()
    _train(ours, optimizers.SGD(_param_groups(ours), lr=torch.tensor(0.05), momentum=0.9, nesterov=True),
           _batches(2))
    _train(theirs, torch.optim.SGD(_param_groups(theirs), lr=0.05, momentum=0.9, nesterov=True), _batches(2))
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_schedule_matches_lambda_lr_and_fills_a_tensor_lr_in_place():
    ours_model, theirs_model = _twin_models()
    factor = lambda step: 1.0 / (1 + step)  # noqa: E731
    ours_opt = optimizers.SGD(ours_model.parameters(), lr=0.1, momentum=0.9)
    ours = optimizers.LambdaSchedule(ours_opt, factor)
    lr_tensor = torch.tensor(float(ours_opt.param_groups[0]["lr"]))
    ours_opt.param_groups[0]["lr"] = lr_tensor
    theirs_opt = torch.optim.SGD(theirs_model.parameters(), lr=0.1, momentum=0.9)
    theirs = torch.optim.lr_scheduler.LambdaLR(theirs_opt, factor)
    for _ in range(5):
        assert ours.get_last_lr() == pytest.approx(theirs.get_last_lr())
        ours.step(), theirs_opt.step(), theirs.step()
    assert ours_opt.param_groups[0]["lr"] is lr_tensor  # the tensor a CUDA graph reads, updated in place
    assert float(lr_tensor) == pytest.approx(0.1 / 6) == theirs.get_last_lr()[0]


def test_state_dict_round_trip_continues_the_same_trajectory():
    recipe = recipe_lib.recipe_for("gn", epochs=1)
    batches = _batches(8)
    straight, resumed = _twin_models("gn")
    opt = recipe_lib.make_optimizer(straight, recipe)
    sched = recipe_lib.make_scheduler(opt, recipe, steps_per_epoch=8)
    _train(straight, opt, batches, sched)

    opt = recipe_lib.make_optimizer(resumed, recipe)
    sched = recipe_lib.make_scheduler(opt, recipe, steps_per_epoch=8)
    _train(resumed, opt, batches[:3], sched)
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    assert saved_opt["state"] and all(torch.is_tensor(s["momentum_buffer"]) for s in saved_opt["state"].values())
    opt = recipe_lib.make_optimizer(resumed, recipe)  # fresh objects, as after a restart
    sched = recipe_lib.make_scheduler(opt, recipe, steps_per_epoch=8)
    opt.load_state_dict(saved_opt)
    sched.load_state_dict(saved_sched)
    assert sched.last_epoch == 3
    _train(resumed, opt, batches[3:], sched)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sgd_rejects_what_torch_rejects():
    with pytest.raises(ValueError, match="no parameters"):
        optimizers.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        optimizers.SGD(models.CifarNet("bn").parameters(), lr=0.1, nesterov=True)
