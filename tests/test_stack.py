"""Many runs, one model (normstudy.stack): a stack of runs computes, trains, checkpoints, resumes
and finishes each run as that run does alone.

The comparisons are in fp64: in fp32 a grouped convolution rounds differently from a plain one
(~1e-7), and a few SGD steps of a BatchNorm network amplify that to visible differences in the
history (seen: 0.03 in a training loss after 10 steps), which would say nothing about the stack.
In fp64 the same histories agree to the rounding of the fp32 sums they are accumulated in (1e-7).
"""
import collections
import functools

import pytest
import torch
from torch import nn

from normstudy import checkpoints
from normstudy import data
from normstudy import models
from normstudy import run as run_lib
from normstudy import stack as stack_lib
from normstudy.config import RunConfig
from normstudy.runners.local import LocalRunner

COMMON = dict(batch_size=10, epochs=2, overrides=(("lr_per_32", 0.032),))
# Different norms, groups, seeds, label smoothing (BN 0, the others 0.1) and weight decay.
CONFIGS = (RunConfig(norm="bn", seed=0, **COMMON),
           RunConfig(norm="ln", seed=1, **COMMON),
           RunConfig(norm="gn", seed=2, groups=4, batch_size=10, epochs=2,
                     overrides=(("lr_per_32", 0.032), ("weight_decay", 1e-3))))
HISTORY = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")


@pytest.fixture(scope="module")
def small():
    """20 training and 10 test images: 2 steps an epoch at batch 10 (a CPU's fp64 grouped
    convolutions are slow: ~0.1 s an image and step on 2 cores)."""
    images, labels = data.synthetic_images(30, seed=5)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    return {"train_images": images[:20], "train_labels": labels[:20], "test_images": images[20:],
            "test_labels": labels[20:], "classes": data.CLASSES}


@pytest.fixture(scope="module")
def fp64():
    """Models and normalized images in fp64, for single runs and stacks alike."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "channel_tensor", functools.partial(data.channel_tensor, dtype=torch.float64))
        fresh = models.fresh_model
        patch.setattr(models, "fresh_model", lambda *args, **kwargs: fresh(*args, **kwargs).double())
        yield


@pytest.fixture(scope="module")
def alone_and_stacked(small, fp64, tmp_path_factory):
    """The three runs trained alone and as one stack (fp64), and the folder of each."""
    out = tmp_path_factory.mktemp("stack")
    return (train_alone(CONFIGS, out / "alone", small), train_stacked(CONFIGS, out / "stacked", small), out)


def train_alone(configs, out, dataset):
    return {config.run_id: run_lib.run_one(config, out, dataset=dataset, device="cpu", runtime={"cuda_graph": True},
                                           figures=False, progress=False, log=lambda line: None)
            for config in configs}


def train_stacked(configs, out, dataset, **kwargs):
    outcomes = stack_lib.train_stack(configs, out, dataset=dataset, device="cpu", runtime={"cuda_graph": True},
                                     figures=False, log=lambda line: None, **kwargs)
    for config, outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return {config.run_id: outcome for config, outcome in outcomes}


def assert_same_histories(got, expected):
    """Equal up to the rounding of the fp32 sums the history is accumulated in."""
    assert got.keys() == expected.keys()
    for run_id, record in expected.items():
        for key in HISTORY:
            assert got[run_id]["history"][key] == pytest.approx(record["history"][key], rel=1e-6, abs=1e-9), \
                (run_id, key)


def test_a_stack_computes_each_runs_network_forward_and_backward():
    torch.manual_seed(0)
    specs = [models.norm_spec(c.norm, groups=c.groups) for c in CONFIGS]
    singles = [models.CifarNet(c.norm, groups=c.groups or 2).double() for c in CONFIGS]
    for single in singles:  # not the defaults: every parameter and statistic is compared
        with torch.no_grad():
            for value in single.state_dict().values():
                if value.is_floating_point():
                    value.add_(torch.rand_like(value) * 0.1)
    stacked = models.CifarNet(stack=specs).double()
    with torch.no_grad():
        for k, single in enumerate(singles):
            for name, view in models.run_state(stacked, k, single).items():
                view.copy_(single.state_dict()[name])
    images = [torch.randn(6, 3, 32, 32, dtype=torch.float64) for _ in CONFIGS]
    labels = torch.randint(0, 10, (6, len(CONFIGS)))
    for training in (True, False):
        for model in (stacked, *singles):
            model.train(training)
            model.zero_grad()
        out = stacked(torch.cat(images, dim=1))
        loss = stack_lib.StackLoss([0.0, 0.1, 0.1], "cpu")(out, labels)
        loss.sum().backward()
        for k, single in enumerate(singles):
            alone = single(images[k])
            alone_loss = nn.CrossEntropyLoss(label_smoothing=[0.0, 0.1, 0.1][k])(alone, labels[:, k])
            alone_loss.backward()
            assert torch.allclose(out[:, 10 * k:10 * (k + 1)], alone, rtol=1e-10, atol=1e-12)
            assert loss[k].item() == pytest.approx(alone_loss.item(), rel=1e-12)
            grads = dict(single.named_parameters())
            for name, param in stacked.named_parameters():
                size = grads[name].shape[0]
                assert torch.allclose(param.grad.narrow(0, k * size, size), grads[name].grad, rtol=1e-9, atol=1e-12), name
            for name, view in models.run_state(stacked, k, single).items():  # running statistics
                assert torch.allclose(view.double(), single.state_dict()[name].double(), rtol=1e-10), name


def test_a_stack_trains_each_run_as_it_trains_alone(alone_and_stacked):
    alone, stacked, out = alone_and_stacked
    assert_same_histories(stacked, alone)
    for config in CONFIGS:
        assert stacked[config.run_id]["stack"] == {"size": 3, "runs": [c.run_id for c in CONFIGS]}
        assert "stack" not in alone[config.run_id]
        mine = checkpoints.load_torch(out / "stacked" / config.run_id / "weights.pt")
        theirs = checkpoints.load_torch(out / "alone" / config.run_id / "weights.pt")
        for name, value in theirs.items():
            assert torch.allclose(mine[name].double(), value.double(), rtol=1e-7, atol=1e-9), (config.run_id, name)
        # every file of an ordinary run, and a checkpoint that resumes as a single run's
        assert {"config.json", "record.json", "weights.pt", "checkpoint.pt"} <= {
            p.name for p in (out / "stacked" / config.run_id).iterdir()}


class _Interrupt(Exception):
    pass


def test_a_stopped_stack_resumes_each_run_to_the_uninterrupted_history(alone_and_stacked, small, fp64, tmp_path,
                                                                      monkeypatch):
    _, uninterrupted, _ = alone_and_stacked
    real = stack_lib.Stack.train_epoch
    calls = []

    def dying(self):
        calls.append(1)
        if len(calls) == 2:  # in epoch 2: epoch 1's checkpoints are written
            raise _Interrupt
        return real(self)

    monkeypatch.setattr(stack_lib.Stack, "train_epoch", dying)
    with pytest.raises(_Interrupt):
        train_stacked(CONFIGS, tmp_path, small)
    monkeypatch.setattr(stack_lib.Stack, "train_epoch", real)
    for config in CONFIGS:
        assert checkpoints.load_torch(tmp_path / config.run_id / "checkpoint.pt")["epoch"] == 1
        assert not (tmp_path / config.run_id / "record.json").exists()
    resumed = train_stacked(CONFIGS, tmp_path, small)
    assert_same_histories(resumed, uninterrupted)

    # A finished run is never trained again: its record comes back as it is.
    monkeypatch.setattr(stack_lib, "Stack", None)  # building a stack would fail
    again = train_stacked(CONFIGS, tmp_path, small)
    assert again == resumed


def test_runs_stopped_at_different_epochs_resume_in_separate_stacks(alone_and_stacked, small, fp64, tmp_path):
    _, uninterrupted, _ = alone_and_stacked
    # Run 0 has one epoch done (a checkpoint as a single run writes it), run 1 none.
    with pytest.raises(KeyboardInterrupt):
        run_lib.run_one(CONFIGS[0], tmp_path, dataset=small, device="cpu", runtime={"cuda_graph": True},
                        figures=False, progress=False, log=_stop_after_first_epoch)
    assert checkpoints.load_torch(tmp_path / CONFIGS[0].run_id / "checkpoint.pt")["epoch"] == 1
    resumed = train_stacked(CONFIGS[:2], tmp_path, small)
    assert_same_histories(resumed, {c.run_id: uninterrupted[c.run_id] for c in CONFIGS[:2]})
    assert [record["stack"]["size"] for record in resumed.values()] == [1, 1]


def _stop_after_first_epoch(line):
    if "epoch  1/" in line:
        raise KeyboardInterrupt


def test_a_diverged_run_fails_alone_and_the_others_finish(small, tmp_path, monkeypatch):
    real = stack_lib.Stack._copy_in

    def poisoned(self):
        real(self)
        if len(self.trainings) == 3:
            with torch.no_grad():
                self.model.c10.weight[10:20].fill_(float("nan"))  # run 1's classifier
    monkeypatch.setattr(stack_lib.Stack, "_copy_in", poisoned)
    outcomes = dict(stack_lib.train_stack(CONFIGS, tmp_path, dataset=small, device="cpu", figures=False,
                                          log=lambda line: None))
    assert isinstance(outcomes[CONFIGS[1]], FloatingPointError)
    assert "epoch 1" in str(outcomes[CONFIGS[1]])
    for config in (CONFIGS[0], CONFIGS[2]):
        assert outcomes[config]["stack"]["size"] == 3 and len(outcomes[config]["history"]["test_acc"]) == 2


def test_a_stop_while_a_run_finishes_is_no_failure_of_that_run(small, tmp_path, monkeypatch):
    """A runner's stop (runners.units.Stopped, raised from a log line at an epoch boundary) that
    comes while a stacked run finishes, e.g. from the line a collapsed run ends with, goes through
    train_stack: it is not recorded as that run's failure (review: it was, and the grid exited 3)."""
    from normstudy.runners.units import Stopped
    finish = run_lib.finish_run

    def finish_then_stop(*args, **kwargs):
        finish(*args, **kwargs)
        raise Stopped
    monkeypatch.setattr(run_lib, "finish_run", finish_then_stop)
    configs = [RunConfig(norm="bn", seed=seed, batch_size=10, epochs=1) for seed in (0, 1)]
    with pytest.raises(Stopped):
        stack_lib.train_stack(configs, tmp_path, dataset=small, device="cpu", figures=False, log=lambda line: None)
    assert run_lib.read_record(tmp_path / configs[0].run_id) is not None  # finished, and kept as such


def test_plan_stacks_groups_runs_that_can_step_together():
    runs = [RunConfig(norm=norm, seed=seed, batch_size=batch, epochs=2)
            for batch in (8, 4) for norm in ("gn", "bn", "ln") for seed in (0, 1, 2)]
    stacks = stack_lib.plan_stacks(runs, 4)
    assert [len(s) for s in stacks] == [3, 3, 3, 3, 3, 3]  # 9 runs a batch size: 3 even stacks of at most 4
    assert all(len({c.batch_size for c in s}) == 1 for s in stacks)
    assert sorted(c.run_id for s in stacks for c in s) == sorted(c.run_id for c in runs)
    whole = stack_lib.plan_stacks(runs, 9)  # one norm a stack: faster than mixed ones
    assert [[c.norm for c in s] for s in whole] == [["gn"] * 3, ["bn"] * 3, ["ln"] * 3] * 2
    mixed = stack_lib.plan_stacks(runs, 9, mix_norms=True)
    assert [[c.norm for c in s] for s in mixed] == [["bn"] * 3 + ["ln"] * 3 + ["gn"] * 3] * 2  # one segment a norm (LN is GN of 1 group)
    alone = stack_lib.plan_stacks(runs, 9, min_size=4)  # groups of 3 runs of one norm: single runs
    assert [[c.run_id for c in s] for s in alone] == [[c.run_id] for c in runs]
    other_lr = RunConfig(norm="bn", batch_size=8, epochs=2, overrides=(("lr_per_32", 0.02),))
    assert len(stack_lib.plan_stacks(runs[:9] + [other_lr], 32, mix_norms=True)) == 2
    assert stack_lib.auto_size(runs[0], device="cpu", train_images=torch.zeros(10, 3, 32, 32)) == 1
    with pytest.raises(ValueError, match="share"):
        stack_lib.train_stack([runs[0], other_lr], "unused", dataset=None, device="cpu")


def test_the_local_runner_trains_stacks_and_delivers_every_record(small, tmp_path):
    datasets = {("cifar10", 0): small}
    lines = []
    runner = LocalRunner(stack=2, figures=False, log=lines.append)
    runner._load_datasets = lambda configs, **kwargs: datasets
    records = []
    configs = CONFIGS[:2] + (RunConfig(norm="bn", seed=3, **COMMON),)
    runner.run(configs, out=tmp_path, device="cpu", on_record=records.append)
    assert sorted(r["id"] for r in records) == sorted(c.run_id for c in configs)
    assert lines[0] == "3 runs as 1 stack of 2 and 1 single run; 1 unit at once (up to 2 runs)"
    # stacks of one norm: the two BatchNorm runs together, LayerNorm alone (an ordinary run)
    assert {r["id"]: r.get("stack", {}).get("size") for r in records} == {
        configs[0].run_id: 2, configs[2].run_id: 2, configs[1].run_id: None}
    with pytest.raises(ValueError, match="stack"):
        LocalRunner(stack=0)


def test_the_study_command_trains_a_grid_as_stacks(tmp_path, capsys, monkeypatch):
    """The command's --stack reaches the runner, which hands each stack to train_stack (here
    training its runs one by one: the stacked training itself is tested above)."""
    from conftest import call_main
    from normstudy import study
    stacks = []

    def one_by_one(configs, out, *, dataset, device, runtime=None, figures=True, log=print, **kwargs):
        stacks.append([config.run_id for config in configs])
        return [(config, run_lib.run_one(config, out, dataset=dataset, device=device, runtime=runtime,
                                         figures=False, progress=False, log=log)) for config in configs]
    monkeypatch.setattr(stack_lib, "train_stack", one_by_one)
    out = tmp_path / "grid"
    code, _, err = call_main(study.main, ["batch", "--smoke", "--norms", "bn", "--seeds", "0", "1", "--batch-sizes",
                                          "512", "--stack", "2", "--quiet", "--out", str(out)], capsys)
    assert code == 0, err
    assert stacks == [["bn-b512-e1-s0-synthetic", "bn-b512-e1-s1-synthetic"]]
    assert "2 of 2 runs finished" in (out / "results.md").read_text()  # --runner ray: tests/test_ray_runner.py


def test_a_plan_says_that_concurrency_counts_stacks():
    """``--stack 3 --concurrency 27`` trains 81 runs at once, not 27 (a device session asked for
    the one meaning the other): the grid's first line says which."""
    from normstudy.runners.units import describe
    assert describe([["run"] * 3] * 27, at_once=27) == "81 runs as 27 stacks of 3; 27 stacks at once (up to 81 runs)"
    assert describe([["run"] * 3] * 27, at_once=9) == "81 runs as 27 stacks of 3; 9 stacks at once (up to 27 runs)"
    assert describe([["run"] * 3, ["run"] * 2, ["run"]], at_once=2) == (
        "6 runs as 2 stacks of 2-3 and 1 single run; 2 units at once (up to 5 runs)")


def test_auto_stacks_small_batches_by_threes_and_large_groups_whole():
    """``--stack auto``: a batch size's 3 runs of a norm stack at batches up to 4 (stacks of 3 side
    by side beat single runs at batch 2 on the H200, not at 8); 27 or more runs of a norm stack at
    any batch; everything else trains alone."""
    grid = [RunConfig(norm=norm, seed=seed, batch_size=batch, epochs=2)
            for batch in (512, 8, 4, 2) for norm in ("bn", "ln", "gn") for seed in (0, 1, 2)]
    many = [RunConfig(norm="bn", seed=seed, batch_size=16, epochs=2) for seed in range(28)]
    four = [RunConfig(norm="gn", seed=seed, batch_size=2, epochs=3) for seed in range(4)]
    units = stack_lib.plan_auto(grid + many + four, largest=lambda config: 32)
    shape = collections.Counter((unit[0].batch_size, unit[0].epochs, len(unit)) for unit in units)
    assert shape == {(512, 2, 1): 9, (8, 2, 1): 9, (4, 2, 3): 3, (2, 2, 3): 3, (16, 2, 28): 1,
                     (2, 3, 3): 1, (2, 3, 1): 1}
    assert all(len({config.norm for config in unit}) == 1 for unit in units)
    assert [unit[0].run_id for unit in units][:9] == [config.run_id for config in grid[:9]]  # the grid's order
    assert sorted(c.run_id for unit in units for c in unit) == sorted(c.run_id for c in grid + many + four)
    from normstudy.runners.units import plan_units
    assert plan_units(grid, "auto", device="cpu", datasets=None) == [[config] for config in grid]  # a CPU: alone
