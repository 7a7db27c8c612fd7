"""Training on synthetic CIFAR-10 files: loops, learning, determinism, checkpoints and resume."""
import os

import pytest
import torch
from torch import nn

from normstudy import data
from normstudy import checkpoints
from normstudy import fit as fit_lib
from normstudy import runtime as runtime_lib
from normstudy import models
from normstudy import recipe as recipe_lib
from normstudy.fast import steps
import utils

# Small and quick on 2 CPU cores: 500 training images in batches of 50, a few epochs.
SMALL = dict(epochs=3, batch_size=50, lr_per_32=0.032)  # peak lr 0.05


def small_recipe(norm="bn", **overrides):
    return recipe_lib.recipe_for(norm, **{**SMALL, **overrides})


def fit(dataset, norm="bn", seed=0, **kwargs):
    recipe = kwargs.pop("recipe", None) or small_recipe(norm)
    model = models.fresh_model(norm, recipe, train_images=dataset["train_images"], seed=seed)
    history = fit_lib.fit(model, dataset, norm=norm, recipe=recipe, seed=seed, progress=False,
                         log=lambda line: None, **kwargs)
    return model, history


@pytest.mark.parametrize("norm", ["bn", "ln", "gn"])
def test_training_lowers_the_loss(dataset, norm):
    _, history = fit(dataset, norm)
    assert len(history["train_loss"]) == 3
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert history["test_loss"][-1] < history["test_loss"][0]
    assert history["test_acc"][-1] > 30  # synthetic classes are easy; chance is 10 %


def test_train_and_test_return_epoch_means(dataset):
    torch.manual_seed(0)
    model = models.CifarNet("bn")
    loader = data.DeviceLoader(dataset["train_images"], dataset["train_labels"], batch_size=100)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = nn.CrossEntropyLoss()
    loss, acc = utils.train(model, "cpu", loader, optimizer, criterion, progress=False)
    assert 0 < loss < 10 and 0 <= acc <= 100
    test_loss, test_acc = utils.test(model, "cpu", loader, criterion)
    logits, labels = utils.predict(model, "cpu", loader)
    assert test_loss == pytest.approx(criterion(logits, labels).item(), rel=1e-5)
    assert test_acc == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())


def test_scheduler_is_stepped_once_per_batch(dataset):
    model = models.CifarNet("ln")
    loader = data.DeviceLoader(dataset["train_images"], dataset["train_labels"], batch_size=100)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    utils.train(model, "cpu", loader, optimizer, nn.CrossEntropyLoss(), scheduler, progress=False)
    assert scheduler.last_epoch == len(loader) == 5


def test_one_small_batch_can_be_overfit():
    torch.manual_seed(0)
    images, labels = data.synthetic_images(32, seed=5)
    x, y = data.normalize(torch.from_numpy(images)), torch.from_numpy(labels).long()
    x = x + 0.5 * torch.randn_like(x)  # make the task less trivial than the class tints
    model = models.CifarNet("bn")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = steps.EagerStep(model, optimizer, nn.CrossEntropyLoss())
    model.train()
    for _ in range(60):
        loss, correct = step(x, y)
    assert loss.item() < 0.05 and correct.item() == 32


def test_non_finite_loss_names_the_batch(dataset):
    model = models.CifarNet("gn")
    loader = data.DeviceLoader(dataset["train_images"], dataset["train_labels"], batch_size=100)
    calls = []

    def criterion(output, target):
        calls.append(1)
        loss = nn.functional.cross_entropy(output, target)
        return loss * float("nan") if len(calls) == 3 else loss

    with pytest.raises(utils.NonFiniteLossError, match="at batch 2"):
        utils.train(model, "cpu", loader, torch.optim.SGD(model.parameters(), lr=0.01), criterion,
                    progress=False)


def test_diverging_fit_names_epoch_and_batch_and_keeps_last_good_checkpoint(dataset, tmp_path):
    path = tmp_path / "ckpt.pt"
    fit(dataset, recipe=small_recipe(epochs=1), checkpoint_path=path)
    good = checkpoints.load_torch(path)
    with pytest.raises(utils.NonFiniteLossError, match=r"epoch 1, batch \d+"):
        fit(dataset, recipe=small_recipe(lr_per_32=1e5, epochs=1), checkpoint_path=tmp_path / "other.pt")
    assert not (tmp_path / "other.pt").exists()
    assert checkpoints.load_torch(path)["history"] == good["history"]


@pytest.mark.parametrize("graph_mode", [False, True])
def test_history_records_the_learning_rate_at_the_start_of_each_epoch(dataset, graph_mode):
    # CUDA-graph mode keeps the learning rate in a tensor that the schedule fills in place; on the
    # CPU its epochs run the same steps unrecorded (fast.graph_epoch), so the timing is checked here.
    recipe = small_recipe(epochs=3)
    _, history = fit(dataset, recipe=recipe, runtime={"cuda_graph": graph_mode})
    assert history["lr"][0] == pytest.approx(recipe_lib.peak_lr(recipe) / recipe["div_factor"])
    assert history["lr"][0] < history["lr"][1] and all(isinstance(lr, float) for lr in history["lr"])


@pytest.mark.parametrize("batch_size, chunk", [(50, 3), (64, 64)])
def test_graph_epochs_take_the_same_steps_as_the_plain_loop(dataset, monkeypatch, batch_size, chunk):
    """Whole epochs recorded as chunks of steps (fast.graph_epoch) take the plain loop's steps bit
    for bit: same batches, learning rates and running sums, also with a smaller last batch (500
    images at 64) and chunks that do not divide the epoch. (Both read the lr from a tensor, as
    under CUDA graphs; a Python float lr rounds differently.)"""
    from normstudy.fast import graph_epoch
    monkeypatch.setattr(graph_epoch, "chunk_for", lambda batch_size: chunk)
    recipe = small_recipe(epochs=2, batch_size=batch_size, cutout=4)
    results = []
    for graph_mode in (False, True):
        model = models.fresh_model("bn", recipe, train_images=dataset["train_images"], seed=0)
        training = fit_lib.prepare(model, dataset, recipe=recipe, device="cpu", seed=0,
                                   runtime={"cuda_graph": graph_mode}, norm="bn")
        training._lr_on_device()
        trainer = training.epoch_trainer(progress=False)
        epochs = [(trainer.train_epoch(epoch), float(training.optimizer.param_groups[0]["lr"])) for epoch in (1, 2)]
        results.append((epochs, training.scheduler.last_epoch, model.state_dict()))
    (plain, plain_steps, plain_state), (graphed, graphed_steps, graphed_state) = results
    assert graphed == plain and graphed_steps == plain_steps == 2 * -(-500 // batch_size)
    for name, value in plain_state.items():
        assert torch.equal(graphed_state[name], value), name


def test_same_seed_same_history_on_cpu(dataset):
    recipe = small_recipe(epochs=2, whiten_init=True, cutout=4)
    _, first = fit(dataset, recipe=recipe, seed=7)
    _, second = fit(dataset, recipe=recipe, seed=7)
    _, other = fit(dataset, recipe=recipe, seed=8)
    drop_times = lambda h: {k: v for k, v in h.items() if k != "epoch_seconds"}  # noqa: E731
    assert drop_times(first) == drop_times(second)
    assert drop_times(first) != drop_times(other)


class _Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_history(dataset, tmp_path, monkeypatch):
    """Fault injection: stop a run in the middle of epoch 2, resume it, compare with a clean run."""
    recipe = small_recipe(epochs=3, dropout=0.05)  # dropout: the CPU RNG state must be restored too
    _, clean = fit(dataset, norm="gn", recipe=recipe, seed=3)

    path = tmp_path / "ckpt.pt"
    real_step = steps.EagerStep.__call__
    count = {"steps": 0}

    def dying_step(self, images, labels):
        count["steps"] += 1
        if count["steps"] == 10 + 4:  # epoch 2 (10 batches an epoch), batch 4
            raise _Interrupt
        return real_step(self, images, labels)

    monkeypatch.setattr(steps.EagerStep, "__call__", dying_step)
    with pytest.raises(_Interrupt):
        fit(dataset, norm="gn", recipe=recipe, seed=3, checkpoint_path=path)
    monkeypatch.setattr(steps.EagerStep, "__call__", real_step)
    assert checkpoints.load_torch(path)["epoch"] == 1  # the last complete epoch survived

    model, resumed = fit(dataset, norm="gn", recipe=recipe, seed=3, checkpoint_path=path, resume=True)
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
        assert resumed[key] == clean[key], key
    assert checkpoints.load_torch(path)["epoch"] == 3


def test_checkpoint_holds_everything_needed_to_resume(dataset, tmp_path):
    path = tmp_path / "ckpt.pt"
    model, _ = fit(dataset, recipe=small_recipe(epochs=1), checkpoint_path=path)
    state = checkpoints.load_torch(path)
    assert set(state) == {"format", "run", "epoch", "model", "optimizer", "scheduler", "rng", "history"}
    assert set(state["rng"]) >= {"cpu", "loader"}
    assert state["run"]["norm"] == "bn" and state["epoch"] == 1
    assert state["run"]["data"] == data.fingerprint(dataset)
    fresh = checkpoints.load_weights(models.CifarNet("bn"), path)
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_refuses_another_variant_or_recipe(dataset, tmp_path):
    path = tmp_path / "ckpt.pt"
    fit(dataset, recipe=small_recipe(epochs=1), checkpoint_path=path)
    with pytest.raises(checkpoints.CheckpointError, match="another run .*norm: 'bn' vs 'gn'"):
        fit(dataset, norm="gn", recipe=small_recipe("gn", epochs=1), checkpoint_path=path, resume=True)
    with pytest.raises(checkpoints.CheckpointError, match=r"another run \(it differs in recipe.lr_per_32: 0.032 vs 0.01\)"):
        fit(dataset, recipe=small_recipe(epochs=1, lr_per_32=0.01), checkpoint_path=path, resume=True)


def test_resume_without_checkpoint(dataset, tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="no such checkpoint"):
        fit(dataset, checkpoint_path=tmp_path / "missing.pt", resume=True)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_with_a_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(checkpoints.CheckpointError, match="evil.pt: corrupt, truncated or unsafe file, refused"):
        checkpoints.load_weights(models.CifarNet("bn"), tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_truncated_or_mismatched_weights_are_refused(tmp_path):
    path = tmp_path / "weights.pt"
    checkpoints.save_torch(path, models.CifarNet("bn").state_dict())
    with pytest.raises(checkpoints.CheckpointError, match="do not fit this model"):
        checkpoints.load_weights(models.CifarNet("gn"), path)  # GroupNorm has no running stats
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(checkpoints.CheckpointError, match="corrupt, truncated or unsafe"):
        checkpoints.load_weights(models.CifarNet("bn"), path)


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "results.json"
    checkpoints.write_json(path, {"ok": 1})

    def half_then_die(f):
        f.write(b'{"half":')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoints.atomic_write(path, half_then_die)
    assert path.read_text() == '{\n  "ok": 1\n}\n'
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


def test_schedule_matches_pytorch_one_cycle_on_the_real_run():
    recipe = recipe_lib.recipe_for("bn")
    steps_per_epoch = 98  # 50,000 images at 512
    ours = recipe_lib.make_scheduler(recipe_lib.make_optimizer(models.CifarNet("bn"), recipe),
                                     recipe, steps_per_epoch=steps_per_epoch)
    theirs_optimizer = torch.optim.SGD(models.CifarNet("bn").parameters(), lr=recipe_lib.peak_lr(recipe))
    theirs = torch.optim.lr_scheduler.OneCycleLR(
        theirs_optimizer, max_lr=recipe_lib.peak_lr(recipe), epochs=recipe["epochs"], steps_per_epoch=steps_per_epoch,
        pct_start=recipe["pct_start"], div_factor=recipe["div_factor"],
        final_div_factor=recipe["final_div_factor"], anneal_strategy="linear", cycle_momentum=False)
    for _ in range(recipe["epochs"] * steps_per_epoch - 1):
        assert ours.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], rel=1e-12, abs=1e-15)
        ours.optimizer.step(), ours.step(), theirs_optimizer.step(), theirs.step()
    assert ours.get_last_lr()[0] == pytest.approx(0.2 / 10 / 100)


@pytest.mark.parametrize("epochs, steps_per_epoch", [(1, 1), (1, 2), (2, 2), (3, 2), (4, 1)])
def test_schedule_survives_runs_of_a_few_steps(epochs, steps_per_epoch):
    recipe = recipe_lib.recipe_for("bn", epochs=epochs)
    optimizer = recipe_lib.make_optimizer(models.CifarNet("bn"), recipe)
    scheduler = recipe_lib.make_scheduler(optimizer, recipe, steps_per_epoch=steps_per_epoch)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(epochs * steps_per_epoch):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert all(0 < lr <= recipe_lib.peak_lr(recipe) for lr in lrs)


def test_recipe_rejects_unknown_keys_and_norms():
    with pytest.raises(ValueError, match="unknown recipe key 'learning_rate'"):
        recipe_lib.recipe_for("bn", learning_rate=0.1)
    with pytest.raises(ValueError, match="unknown norm"):
        recipe_lib.recipe_for("xn")


def test_whitening_filters_whiten_patches(dataset):
    filters = recipe_lib.whitening_filters(dataset["train_images"])
    assert filters.shape == (32, 3, 3, 3)
    torch.testing.assert_close(filters[16:], -filters[:16])
    out = nn.functional.conv2d(data.normalize(dataset["train_images"]), filters[:16])
    variance = out.var(dim=(0, 2, 3))
    assert ((variance > 0.5) & (variance < 1.5)).all()


def test_a_run_imports_neither_dynamo_nor_matplotlib():
    # Start-up is part of a run's time: on the H100 machine importing torch._dynamo took 4.4-4.9 s
    # (torch.optim builds import it) and matplotlib ~0.5 s. Checked in a fresh interpreter.
    import subprocess
    import sys
    from pathlib import Path
    script = (
        "import sys\n"
        "from normstudy import data, fit, models, recipe\n"
        "ds = data.load_synthetic_cifar10(n_train=128, n_test=32)\n"
        "rc = recipe.recipe_for('bn', epochs=1, batch_size=64)\n"
        "fit.fit(models.CifarNet('bn'), ds, norm='bn', recipe=rc, progress=False, log=print)\n"
        "print(sorted(m for m in ('torch._dynamo', 'matplotlib') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "epoch  1/1" in done.stdout and done.stdout.strip().splitlines()[-1] == "[]"


def test_compiled_step_compiles_once_and_only_for_the_first_batch_size(monkeypatch):
    # torch.compile itself is replaced by a recorder: compiling on CI's CPU would take ~35 s.
    compiled_calls = []

    def fake_compile(model, **options):
        assert options == {"dynamic": False, "fullgraph": True}
        return lambda images: compiled_calls.append(len(images)) or model(images)

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = models.CifarNet("gn")
    optimizer = recipe_lib.make_optimizer(model, recipe_lib.recipe_for("gn"))
    step = steps.EagerStep(model, optimizer, nn.CrossEntropyLoss(), compile=True)
    images, labels = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    for n in (4, 4, 2, 4):
        loss, _ = step(images[:n], labels[:n])
        assert torch.isfinite(loss)
    assert compiled_calls == [4, 4, 4]  # the batch of 2 ran the plain model


@pytest.mark.parametrize("capability, amp", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16")])
def test_bf16_only_on_gpus_whose_cudnn_has_bf16_convolutions_fp16_before(monkeypatch, capability, amp):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    runtime = runtime_lib.runtime_for(torch.device("cuda"), norm="gn")
    assert runtime["amp"] == amp and runtime["cuda_graph"] and not runtime["compile"]
    assert runtime_lib.runtime_for("cpu", norm="bn") == {
        "amp": None, "cuda_graph": False, "channels_last": False, "cudnn_benchmark": False, "compile": False,
        "triton_kernels": False}


def test_compile_by_mode_name_turns_channels_last_on(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    runtime = fit_lib.resolve_runtime(torch.device("cuda"), "gn", {"compile": "max-autotune-no-cudagraphs"})
    assert runtime["channels_last"] is True and runtime["compile"] == "max-autotune-no-cudagraphs"


def test_recording_waits_for_running_work_and_new_work_waits_for_recording():
    """runtime.RecordingLock: a CUDA graph is recorded only while no other run's CUDA
    work is under way, and work that starts meanwhile waits (concurrent runs in one process)."""
    import threading
    import time
    from normstudy.runtime import RecordingLock
    lock, events = RecordingLock(), []
    working = threading.Event()

    def work(name, hold):
        with lock.work():
            events.append(f"{name} start")
            working.set()
            time.sleep(hold)
            events.append(f"{name} end")

    def record():
        working.wait()
        with lock.recording():
            events.append("record")
            time.sleep(0.05)
            events.append("recorded")

    first = threading.Thread(target=work, args=("a", 0.2))
    recorder = threading.Thread(target=record)
    first.start()
    recorder.start()
    time.sleep(0.1)  # the recorder is waiting for "a" now; "b" must wait behind the recorder
    second = threading.Thread(target=work, args=("b", 0.0))
    second.start()
    for thread in (first, recorder, second):
        thread.join(timeout=5)
    assert events == ["a start", "a end", "record", "recorded", "b start", "b end"]


def test_a_waiting_recording_goes_between_the_replays_of_an_epoch_under_way():
    """runtime.RecordingLock.let_waiting_go: found on the H200 (bench_together.py, 27 runs at once),
    a run's start waited for every other run's whole epoch (tens of seconds at small batches) and
    held up every epoch meanwhile. An epoch now steps aside between two replays: the recording
    waits for one replay, after the epoch's own work is finished (``finish``), and the epoch goes
    on after it."""
    import threading
    import time
    from normstudy.runtime import RecordingLock
    lock, events, working = RecordingLock(), [], threading.Event()

    def epoch():
        with lock.work():
            working.set()
            for replay in range(20):
                time.sleep(0.02)
                lock.let_waiting_go(finish=lambda r=replay: events.append(f"finish after {r}"))
            events.append("epoch end")

    def record():
        working.wait()
        with lock.recording():
            events.append("record")

    threads = [threading.Thread(target=epoch), threading.Thread(target=record)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    assert events[-1] == "epoch end" and "record" in events, events
    at = events.index("record")
    assert at > 0 and events[at - 1].startswith("finish after") and int(events[at - 1].split()[-1]) < 19, events


def test_work_held_twice_never_steps_aside():
    """A thread that holds the lock shared twice must not step aside: the waiting one would wait
    for its other hold, and it for the waiting one (a deadlock)."""
    import threading
    from normstudy.runtime import RecordingLock
    lock, started = RecordingLock(), threading.Event()
    with lock.work(), lock.work():
        recorder = threading.Thread(target=lambda: (started.set(), lock.recording().__enter__()), daemon=True)
        recorder.start()
        started.wait()
        for _ in range(100):  # until the recorder waits
            if lock._waiting:
                break
            threading.Event().wait(0.01)
        assert lock._waiting == 1
        assert lock.let_waiting_go(finish=lambda: pytest.fail("stepped aside while held twice")) is False
    assert lock.let_waiting_go() is False  # not held: nothing to give


def test_graph_warm_up_stays_inside_a_small_epoch(dataset):
    """The warm-up before recording a graph (fast.graph_epoch) takes several steps of one batch
    size: each must read images inside the epoch even where they do not fit one after another (a
    batch of 300 in the 500 images here; on the GPU `--smoke` at batch 512 of 1,024 images read
    past the end: a device-side assert that failed every smoke run of train.py and the study)."""
    recipe = small_recipe(epochs=1, batch_size=300)
    model = models.fresh_model("bn", recipe, train_images=dataset["train_images"], seed=0)
    training = fit_lib.prepare(model, dataset, recipe=recipe, device="cpu", seed=0,
                               runtime={"cuda_graph": True}, norm="bn")
    training._lr_on_device()
    trainer = training.epoch_trainer(progress=False)
    assert trainer.warmup_steps * 300 > len(trainer.images)
    trainer.images.copy_(training.train_loader.epoch_tensors()[0])
    trainer._warm_up(300)  # IndexError (CPU) before the fix
    assert int(trainer.position) == 300
