"""Issue 16: nothing a user can do (or a machine can do to a run) loses work, mixes runs or ends in a
traceback. One test per item of the issue; each docstring quotes its item.

Quick on 2 CPU cores: tiny synthetic data (64 training images, one epoch), monkeypatched training
where the training itself is not the point, and two real subprocesses (SIGTERM, a busy folder).
"""
import contextlib
import errno
import importlib.util
import json
import os
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path

import pytest
import torch

import train
from normstudy import checkpoints, data, loop, models, report
from normstudy import fit as fit_lib
from normstudy import recipe as recipe_lib
from normstudy import run as run_lib
from normstudy.config import RunConfig
from conftest import call_main, fake_record, write_fake_record

ROOT = Path(__file__).resolve().parent.parent
SMOKE_BN = RunConfig("bn", epochs=1, data="synthetic")  # what `train.py --norm bn --smoke` runs


# --- helpers ------------------------------------------------------------------------------------

def cli_run(argv, capsys):
    """``train.main`` in-process: returns (exit code, stdout, stderr)."""
    return call_main(train.main, argv, capsys)


def one_line(err):
    """The only line of ``err`` (stderr), asserting there is exactly one and no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tiny_fit(dataset, path, *, resume=False, seed=0):
    """One epoch of BatchNorm in batches of 32, checkpointed to ``path``."""
    recipe = recipe_lib.recipe_for("bn", epochs=1, batch_size=32)
    model = models.fresh_model("bn", recipe, train_images=dataset["train_images"], seed=seed)
    return fit_lib.fit(model, dataset, norm="bn", recipe=recipe, seed=seed, checkpoint_path=path, resume=resume,
                       progress=False, log=lambda line: None)


def write_record(out, config, **kwargs):
    write_fake_record(out, config, **kwargs)
    return Path(out) / config.run_id


def damage_tensor_bytes(path, n=64):
    """Invert ``n`` bytes in the middle of the largest tensor stored in a ``torch.save`` file (a zip
    whose tensors are stored uncompressed): the file still unpickles, with other numbers."""
    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(Path(path).read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[entry.header_offset + 26:entry.header_offset + 30])
    start = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2
    raw[start:start + n] = bytes(b ^ 0xFF for b in raw[start:start + n])
    Path(path).write_bytes(raw)


@pytest.fixture(scope="module")
def tiny():
    return data.load_synthetic_cifar10(n_train=64, n_test=32)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny, tmp_path_factory):
    """A real checkpoint after one epoch on ``tiny``; tests copy it before changing it."""
    path = tmp_path_factory.mktemp("checkpoint") / "checkpoint.pt"
    tiny_fit(tiny, path)
    return path


# --- items the refactor handles: verified here --------------------------------------------------

def test_run_ids_keep_smoke_and_real_runs_apart():
    """"run ids per config so smoke (`-synthetic` in the id) and real runs never share a folder"."""
    real, smoke = RunConfig("bn", epochs=1), RunConfig("bn", epochs=1, data="synthetic")
    assert smoke.run_id == "bn-b512-e1-s0-synthetic" and real.run_id == "bn-b512-e1-s0"
    assert RunConfig("bn", epochs=1, holdout=100).run_id == "bn-b512-e1-s0-holdout100"


def test_default_out_is_runs_and_runs_smoke(tmp_path, capsys, monkeypatch):
    """"the default --out is `runs/` (gitignored), `runs/smoke` for --smoke"."""
    monkeypatch.chdir(tmp_path)
    outs = []
    monkeypatch.setattr(run_lib, "load_data", lambda config, **kwargs: None)
    monkeypatch.setattr(run_lib, "run_one", lambda config, out, **kwargs: outs.append(Path(out)))
    assert cli_run(["--norm", "bn", "--quiet"], capsys)[0] == 0
    assert cli_run(["--norm", "bn", "--quiet", "--smoke"], capsys)[0] == 0
    assert outs == [Path("runs"), Path("runs/smoke")]
    assert "/runs/" in (ROOT / ".gitignore").read_text().split()


def test_a_folder_of_another_configuration_is_refused(tmp_path):
    """"config.json claims a folder and a different config is refused"."""
    run_dir = tmp_path / SMOKE_BN.run_id
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(RunConfig("bn", epochs=1, seed=1, data="synthetic").to_dict()))
    with pytest.raises(run_lib.RunFolderError, match=r"holds another configuration \(seed: 1 vs 0\)"):
        run_lib.run_one(SMOKE_BN, tmp_path)


def test_a_finished_run_is_never_retrained(tmp_path, monkeypatch):
    """"a finished run (record.json) is never retrained"."""
    write_record(tmp_path, SMOKE_BN)
    monkeypatch.setattr(run_lib, "_train", lambda *args, **kwargs: pytest.fail("trained again"))
    assert run_lib.run_one(SMOKE_BN, tmp_path) == fake_record(SMOKE_BN)


def test_recipe_values_are_typed_and_lr_is_per_32():
    """"recipe values typed and range-checked (recipe.SETTINGS/check_setting; `lr` is now `lr_per_32`)"."""
    assert recipe_lib.check_setting("epochs", 2.0) == 2 and recipe_lib.check_setting("lr_per_32", 1) == 1.0
    assert "lr" not in recipe_lib.SETTINGS and recipe_lib.peak_lr(recipe_lib.recipe_for("bn")) == pytest.approx(0.2)


def test_cells_never_average_runs_whose_configs_differ():
    """"cells never average runs whose configs differ"."""
    a0, a1 = RunConfig("gn", epochs=1), RunConfig("gn", epochs=1, seed=1)
    other = RunConfig("gn", epochs=1, overrides=(("lr_per_32", 0.02),))
    cells = {c["cell"]: c for c in report.summarize([fake_record(a0, 50.0), fake_record(a1, 60.0),
                                                     fake_record(other, 10.0)])["cells"]}
    assert cells[a0.cell]["seeds"] == [0, 1] and cells[a0.cell]["test_acc_last3_mean"]["values"] == [50.0, 60.0]
    assert cells[other.cell]["seeds"] == [0] and cells[other.cell]["test_acc_last3_mean"]["values"] == [10.0]


def test_batchnorm_running_variance_overflow_is_caught():
    """"fit.check_finite_state catches BN running_var overflow"."""
    model = models.CifarNet("bn")
    name = next(name for name, _ in model.named_buffers() if name.endswith("running_var"))
    model.get_buffer(name).fill_(float("inf"))
    with pytest.raises(loop.NonFiniteStateError, match=f"{name} is NaN or infinite after epoch 4"):
        fit_lib.check_finite_state(model, 4)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """"cli exits 2 with one line for ValueError/OSError etc."."""
    for error, line in [(OSError(errno.EACCES, "Permission denied", "/x/y"), "Permission denied: /x/y"),
                        (ValueError("first line\nsecond line"), "first line"),
                        (data.DatasetError("bad batch"), "bad batch")]:
        def fail(config, out, **kwargs):
            raise error
        monkeypatch.setattr(run_lib, "run_one", fail)
        code, _, err = cli_run(["--norm", "bn", "--smoke", "--quiet", "--out", str(tmp_path)], capsys)
        assert code == 2 and one_line(err) == f"train.py: error: {line}"


def test_sigterm_exits_143_with_one_line_and_keeps_the_checkpoint(tmp_path):
    """"SIGTERM handler in cli (check it really works: exit 143, one line, checkpoint kept)"."""
    config = RunConfig("bn", epochs=50, data="synthetic")
    checkpoint = tmp_path / config.run_id / "checkpoint.pt"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--norm", "bn", "--smoke", "--quiet",
                                "--epochs", "50", "--out", str(tmp_path)], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.exists():  # the first epoch is done and saved
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143
    assert one_line(err).startswith(f"train.py: terminated; every completed epoch is saved under {tmp_path}")
    assert checkpoints.load_torch(checkpoint)["epoch"] >= 1
    assert not list(checkpoint.parent.glob("*.tmp"))


def test_get_correct_pred_count_takes_column_labels():
    """"GetCorrectPredCount accepts (N,1) labels"."""
    logits = torch.eye(10)[:4]
    assert loop.GetCorrectPredCount(logits, torch.tensor([[0], [1], [5], [3]])) == 3


def test_train_on_an_empty_loader_raises_value_error():
    """"train() on an empty loader raises ValueError"."""
    model = models.CifarNet("bn")
    optimizer = recipe_lib.make_optimizer(model, recipe_lib.recipe_for("bn"))  # torch.optim's costs 2 s to import
    with pytest.raises(ValueError, match="the loader gave no batches"):
        loop.train(model, "cpu", [], optimizer, torch.nn.CrossEntropyLoss(), progress=False)


def test_missing_data_message_mentions_data_dir(tmp_path):
    """"notebook missing-data message mentions DATA_DIR"."""
    with pytest.raises(data.DatasetError, match="DATA_DIR"):
        data.load_cifar10(tmp_path / "none")  # what the notebook calls; the download fails here


def test_notebook_checkpoint_name_has_epochs_and_seed():
    """"notebook checkpoint name includes EPOCHS and SEED"."""
    for name in ("BN", "LayerNorm", "GroupNorm"):
        text = (ROOT / f"ERA_Session8_Assignment_{name}_v1.ipynb").read_text()
        assert "-e{EPOCHS}-s{SEED}.pt" in text, name


def test_no_tqdm_widget_without_ipywidgets(monkeypatch):
    """"tqdm warning avoided when ipywidgets missing"."""
    import tqdm
    notebook_bar = object()  # stands for tqdm.auto's widget bar, which warns without ipywidgets
    monkeypatch.setitem(sys.modules, "tqdm.auto", types.SimpleNamespace(tqdm=notebook_bar))

    def fresh_loop():  # loop.py imported anew, without replacing the package's module
        spec = importlib.util.spec_from_file_location("normstudy._loop_probe", ROOT / "normstudy" / "loop.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))  # in a notebook's kernel
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import ipywidgets fails
    assert fresh_loop().tqdm is tqdm.tqdm
    monkeypatch.setitem(sys.modules, "ipywidgets", types.ModuleType("ipywidgets"))
    assert fresh_loop().tqdm is notebook_bar
    # A script (no IPython) takes the plain bar without importing ipywidgets: ~0.1 s of every start.
    monkeypatch.delitem(sys.modules, "IPython")  # ipywidgets still importable, tqdm.auto still the widget
    assert fresh_loop().tqdm is tqdm.tqdm


def test_device_is_checked_before_the_data(tmp_path, capsys):
    """"--device checked before data (runtime.pick_device)"."""
    code, _, err = cli_run(["--norm", "bn", "--device", "cuda:99", "--data-dir", str(tmp_path / "none"),
                            "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "device 'cuda:99'" in one_line(err)


@pytest.mark.parametrize("setting", [
    "epochs=1.5", "batch_size=1.5", "epochs=abc", "bn_momentum=abc", "weight_decay=abc", "lr_per_32=null",
    "lr_per_32=[1,2]", "div_factor=0", "final_div_factor=0", "crop_padding=-1", "label_smoothing=2",
    "gn_groups=true", "flip=maybe", "cutout=-3", "lr_per_32=-1", "pct_start=2", "crop_padding=1000",
    "lr_per_32=abc", "epochs=0", "lr_per_32=NaN", "lr=0.2"])
def test_bad_set_values_are_one_line_naming_the_key(setting, tmp_path, capsys):
    """"`--set` values: check the listed bad values each give one line, exit 2, naming the key"
    (and "`--set epochs=0` refused"; `lr`, the old name, is refused as an unknown key)."""
    code, _, err = cli_run(["--norm", "bn", "--smoke", "--set", setting, "--out", str(tmp_path)], capsys)
    key = setting.split("=")[0]
    assert code == 2 and f"{key}=" in one_line(err) and not list(tmp_path.iterdir())


def test_groups_with_batchnorm_is_refused(tmp_path, capsys):
    """"`--norm bn --groups 4` -> one-line refusal"."""
    code, _, err = cli_run(["--norm", "bn", "--groups", "4", "--smoke", "--out", str(tmp_path)], capsys)
    assert code == 2 and one_line(err) == ("train.py: error: --groups applies to GroupNorm only "
                                           "(--norm gn or all), not to --norm bn")


def test_repeated_seeds_train_once_and_huge_seeds_are_refused(tmp_path, capsys, monkeypatch):
    """"`--seed 0 0` trains once; a 20-digit seed -> one line" ("--seed duplicates dropped and seeds
    range-checked")."""
    trained = []
    monkeypatch.setattr(run_lib, "run_one", lambda config, out, **kwargs: trained.append(config.run_id))
    assert cli_run(["--norm", "bn", "--smoke", "--quiet", "--seed", "0", "0", "--out", str(tmp_path)], capsys)[0] == 0
    assert trained == [SMOKE_BN.run_id]
    code, _, err = cli_run(["--norm", "bn", "--seed", "12345678901234567890", "--out", str(tmp_path)], capsys)
    assert code == 2 and "seed 12345678901234567890 must lie in [0, 2**32)" in one_line(err)


def test_a_second_run_into_a_busy_folder_names_the_holder(tmp_path):
    """"Two concurrent runs into the same folder: the second gets one line naming the process holding
    the lock" (the "per-folder lock (run.folder_lock)")."""
    run_dir = tmp_path / SMOKE_BN.run_id
    run_dir.mkdir()
    with run_lib.folder_lock(run_dir):
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--norm", "bn", "--smoke", "--quiet",
                               "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert one_line(done.stderr) == (f"train.py: error: {run_dir} is in use by process {os.getpid()}; "
                                     "wait for it or use another --out")


def test_a_run_finished_while_its_lock_was_taken_is_not_trained_again(tmp_path, monkeypatch):
    """Two processes, one folder: a run that the other process finished between run_one's first look
    for its record and its taking the folder's lock is returned as it is, not trained again (with
    --restart: not started over, its finished folder kept)."""
    real_lock = run_lib.folder_lock

    @contextlib.contextmanager
    def lock_once_the_other_finished(run_dir):
        write_record(run_dir.parent, SMOKE_BN)  # the other process wrote the record and let go of the lock
        with real_lock(run_dir):
            yield
    monkeypatch.setattr(run_lib, "folder_lock", lock_once_the_other_finished)
    monkeypatch.setattr(run_lib, "_train", lambda *args, **kwargs: pytest.fail("trained again"))
    for kwargs in ({}, {"resume": True}, {"restart": True}):
        shutil.rmtree(tmp_path / SMOKE_BN.run_id, ignore_errors=True)
        assert run_lib.run_one(SMOKE_BN, tmp_path, **kwargs) == fake_record(SMOKE_BN)


def test_resume_on_other_data_is_refused(tiny, tiny_checkpoint, tmp_path):
    """"`--resume` with different data (another --data-dir, or --smoke vs real, or another --holdout) is
    refused with a message naming what differs" ("checkpoints store a data fingerprint")."""
    other = data.load_synthetic_cifar10(n_train=64, n_test=32, seed=1)
    held_out = data.holdout_split(tiny, 16)
    for dataset in (other, held_out):
        path = tmp_path / "checkpoint.pt"
        shutil.copy(tiny_checkpoint, path)
        with pytest.raises(checkpoints.CheckpointError, match=r"checkpoint is from another run \(it differs in data: "):
            tiny_fit(dataset, path, resume=True)
    assert RunConfig("bn").run_id != RunConfig("bn", data="synthetic").run_id != RunConfig("bn", holdout=16).run_id


def test_forgetting_resume_keeps_the_checkpoint_and_says_what_to_pass(tmp_path, capsys):
    """"Forgetting --resume: an interrupted run's checkpoint is kept and the message says to pass
    --resume or --restart" ("an interrupted run needs --resume or --restart")."""
    run_dir = tmp_path / SMOKE_BN.run_id
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"epoch 1 of an interrupted run")
    code, _, err = cli_run(["--norm", "bn", "--smoke", "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 2 and one_line(err) == (f"train.py: error: {run_dir} holds an interrupted run (checkpoint.pt); "
                                           "pass --resume to continue it or --restart to start it over")
    assert (run_dir / "checkpoint.pt").read_bytes() == b"epoch 1 of an interrupted run"


# --- items implemented for issue 16 -------------------------------------------------------------

def test_damaged_tensor_data_is_refused(tiny_checkpoint, tmp_path):
    """"item 6: a checkpoint (and weights.pt) stores a checksum of its tensor data and it is verified
    on load/resume: a checkpoint with 64 bytes of tensor data overwritten must be refused with one line"."""
    checkpoint = tmp_path / "checkpoint.pt"
    shutil.copy(tiny_checkpoint, checkpoint)
    damage_tensor_bytes(checkpoint)
    with pytest.raises(checkpoints.CheckpointError) as refused:
        checkpoints.load_torch(checkpoint)
    assert str(refused.value) == f"{checkpoint}: checksum mismatch: its data are damaged, refused"

    weights = tmp_path / "weights.pt"
    checkpoints.save_torch(weights, models.CifarNet("bn").state_dict())
    checkpoints.load_weights(models.CifarNet("bn"), weights)
    damage_tensor_bytes(weights)
    with pytest.raises(checkpoints.CheckpointError, match="checksum mismatch"):
        checkpoints.load_weights(models.CifarNet("bn"), weights)

    torch.save(models.CifarNet("bn").state_dict(), weights)  # as written before checksums
    with pytest.raises(checkpoints.CheckpointError) as refused:
        checkpoints.load_weights(models.CifarNet("bn"), weights)
    assert "\n" not in str(refused.value) and "no checksum" in str(refused.value)


def test_disk_full_while_saving_is_one_line_and_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    """"Disk full inside torch.save (checkpoint or weights) -> one line "could not write PATH: No space
    left on device" style OSError, exit 2, old file kept, no stray tmp file"."""
    path = tmp_path / "checkpoint.pt"
    checkpoints.save_torch(path, {"epoch": 1})
    before = path.read_bytes()

    # A real write error from the kernel: files may not grow past 64 kB.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal's default, exit
    resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, hard))
    try:
        with pytest.raises(OSError) as failed:
            checkpoints.save_torch(path, {"epoch": 2, "model": torch.zeros(100_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert failed.value.errno == errno.EFBIG and failed.value.strerror == f"could not write {path}: File too large"
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pt"]

    # A full disk reported at fsync (as delayed allocation does), through the command line.
    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", disk_full)
    monkeypatch.setattr(run_lib, "run_one", lambda config, out, **kwargs: checkpoints.save_torch(path, {"epoch": 3}))
    code, _, err = cli_run(["--norm", "bn", "--smoke", "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 2 and one_line(err) == f"train.py: error: could not write {path}: No space left on device"
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


def test_a_write_syncs_the_file_then_its_folder(tmp_path, monkeypatch):
    # Bug: the rename was never synced (only the file's contents were), so a power loss right after
    # a checkpoint could bring back the previous one.
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    checkpoints.write_json(tmp_path / "summary.json", {"a": 1})
    assert synced == ["file", "folder"]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 1}


def test_stale_temporary_files_are_removed_when_a_run_starts(tmp_path, monkeypatch):
    """"SIGKILL leaves `.checkpoint.pt.*.tmp` files: clean stale `.*.tmp` files in a run folder when the
    run (holding the folder lock) starts"."""
    run_dir = tmp_path / SMOKE_BN.run_id
    run_dir.mkdir()
    stale = [run_dir / ".checkpoint.pt.k2j3h4g5.tmp", run_dir / ".weights.pt.a1b2c3d4.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    with run_lib.folder_lock(run_dir), pytest.raises(run_lib.RunFolderError, match="in use"):
        run_lib.run_one(SMOKE_BN, tmp_path)  # not the lock holder: touches nothing
    assert all(path.exists() for path in stale)

    seen = []
    monkeypatch.setattr(run_lib, "_train", lambda config, run_dir, **kwargs: seen.append(sorted(
        p.name for p in run_dir.iterdir())))
    run_lib.run_one(SMOKE_BN, tmp_path)
    assert seen == [[".lock", "config.json"]]


def test_written_files_follow_the_umask(tmp_path):
    """"Output files are mode 0600 whatever the umask (tempfile.mkstemp): give written files the mode
    the umask allows (0o666 & ~umask)"."""
    for umask in (0o022, 0o077, 0o002):
        previous = os.umask(umask)
        try:
            checkpoints.write_json(tmp_path / "record.json", {})
            checkpoints.save_torch(tmp_path / "weights.pt", {"w": torch.zeros(2)})
        finally:
            os.umask(previous)
        for name in ("record.json", "weights.pt"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, (name, oct(umask))


def test_synthetic_data_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """"Every smoke run leaves a 6 MB `/tmp/cifar10-synthetic-*` folder: data.load_synthetic_cifar10 must
    remove its temporary folder after reading (TemporaryDirectory)"."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dataset = data.load_synthetic_cifar10(n_train=20, n_test=10)
    assert len(dataset["train_labels"]) == 20 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, reason", [
    (lambda state: state.pop("run"), "not a checkpoint of this package"),
    (lambda state: state["model"].update({"c1.0.weight": torch.zeros(3, 3)}), r"size mismatch for c1\.0\.weight"),
    (lambda state: state["rng"].update(cpu=torch.zeros(7, dtype=torch.uint8)), "damaged checkpoint, refused"),
])
def test_checkpoint_of_the_wrong_structure_is_refused(damage, reason, tiny, tiny_checkpoint, tmp_path):
    """"Checkpoints of the right format but wrong structure (no `run`, wrong tensor shape, bad RNG
    state) -> one line"."""
    state = checkpoints.load_torch(tiny_checkpoint)
    damage(state)
    path = tmp_path / "checkpoint.pt"
    checkpoints.save_torch(path, state)
    with pytest.raises(checkpoints.CheckpointError, match=reason) as refused:
        tiny_fit(tiny, path, resume=True)
    assert "\n" not in str(refused.value)


def test_summary_skips_and_names_broken_run_folders(tmp_path, capsys):
    """"the summary skips (and names) a broken run folder (record.json missing keys / not JSON) and does
    not die" (also "report.load_records skips and names broken records")."""
    write_record(tmp_path, SMOKE_BN)
    broken = {"not-json": "{", "no-history": json.dumps({"config": SMOKE_BN.to_dict()}),
              "no-figures": json.dumps({**fake_record(SMOKE_BN), "final": {}}),
              "short-history": json.dumps({**fake_record(SMOKE_BN), "history": {"test_acc": [1.0]}})}
    for name, text in broken.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "record.json").write_text(text)
    code, out, _ = cli_run(["--norm", "bn", "--smoke", "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 0 and "| BatchNorm | 512 | 48,736 | 1 |" in out
    for name in broken:
        assert f"- {tmp_path / name / 'record.json'}: " in out, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [c["cell"] for c in summary["cells"]] == [SMOKE_BN.cell] and len(summary["skipped"]) == len(broken)


def test_divergence_message_says_whether_a_checkpoint_exists(tmp_path, capsys, monkeypatch):
    """"The divergence guard message never points at a checkpoint that doesn't exist ... make it exact:
    say whether a checkpoint exists for that run"."""
    def diverge(config, run_dir, **kwargs):  # the training of run._train, in short
        if run_dir.parent.name == "later":  # an earlier epoch was saved
            checkpoints.save_torch(run_dir / "checkpoint.pt", {"epoch": 1})
            raise loop.NonFiniteLossError(3, 2)
        raise loop.NonFiniteStateError("c1.1.running_var", 1)
    monkeypatch.setattr(run_lib, "_train", diverge)

    code, _, err = cli_run(["--norm", "bn", "--smoke", "--quiet", "--out", str(tmp_path / "first")], capsys)
    assert code == 3 and one_line(err) == (
        "train.py: diverged: c1.1.running_var is NaN or infinite after epoch 1; lower the learning rate; "
        f"no checkpoint was written for {SMOKE_BN.run_id} (it diverged in its first epoch)")
    code, _, err = cli_run(["--norm", "bn", "--smoke", "--quiet", "--out", str(tmp_path / "later")], capsys)
    assert code == 3 and one_line(err) == (
        "train.py: diverged: loss is NaN or infinite at epoch 2, batch 3; lower the learning rate; its last good "
        f"epoch is in {tmp_path / 'later' / SMOKE_BN.run_id / 'checkpoint.pt'}")


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_notebooks_smoke_runs_the_notebooks_smoke_mode():
    """"`make` target for the notebooks' smoke mode: add `notebooks-smoke` to the Makefile running
    `scripts/run_notebooks.py --smoke ERA_*.ipynb` (writes copies under runs/)"."""
    done = subprocess.run(["make", "-n", "notebooks-smoke"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert any("scripts/run_notebooks.py --smoke ERA_" in line for line in done.stdout.splitlines())
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main.__kwdefaults__["out"] == Path("runs/notebooks-smoke")
