"""The command line: a smoke run writes every artifact; every bad input is one line and an exit code."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from normstudy import data
import train
from normstudy import fit as fit_lib
from normstudy.config import RunConfig
from conftest import call_main

ROOT = Path(__file__).resolve().parent.parent


def run(argv, capsys):
    """``train.main`` in-process: returns (exit code, stdout, stderr)."""
    return call_main(train.main, argv, capsys)


def smoke_dir(out, norm, **fields):
    """The folder of a one-epoch smoke run of ``norm`` under ``out``."""
    return out / RunConfig(norm=norm, epochs=fields.pop("epochs", 1), data="synthetic", **fields).run_id


def assert_one_line_error(code, err, expected_code, pattern):
    assert code == expected_code
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert __import__("re").search(pattern, lines[0]), lines[0]


def test_smoke_run_writes_every_artifact(tmp_path, capsys):
    code, out, _ = run(["--norm", "all", "--smoke", "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 0
    for norm in ("bn", "ln", "gn"):
        run_dir = smoke_dir(tmp_path, norm)
        for name in ("config.json", "record.json", "curves.png", "misclassified.png", "weights.pt", "checkpoint.pt"):
            assert (run_dir / name).stat().st_size > 0, run_dir / name
        record = json.loads((run_dir / "record.json").read_text())
        assert record["params"] == 48_736 and len(record["history"]["test_acc"]) == 1
        assert RunConfig.from_dict(record["config"]) == RunConfig(norm=norm, epochs=1, data="synthetic")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "bn-b512-e1-s0-synthetic", "gn-g2-b512-e1-s0-synthetic", "ln-b512-e1-s0-synthetic"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["schema"] == 2 and summary["kind"] is None and summary["runs"] == 3 and summary["plan"] is None
    assert [c["cell"] for c in summary["cells"]] == ["bn-b512-e1-synthetic", "ln-b512-e1-synthetic",
                                                     "gn-g2-b512-e1-synthetic"]
    assert {"params", "epochs", "batch_size", "seeds", "test_acc_last3_mean", "test_acc_best",
            "train_acc", "seconds_per_epoch", "devices", "recipe"} <= set(summary["cells"][2])
    assert set(summary["cells"][2]["test_acc_last3_mean"]) == {"values", "mean", "std"}
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert "| GroupNorm (2 groups) | 512 | 48,736 | 1 |" in (tmp_path / "results.md").read_text()
    assert "| BatchNorm" in out


def test_holdout_run_is_scored_on_training_images(tmp_path, capsys):
    code, _, _ = run(["--norm", "ln", "--smoke", "--quiet", "--holdout", "200", "--out", str(tmp_path)], capsys)
    assert code == 0
    record = json.loads((smoke_dir(tmp_path, "ln", holdout=200) / "record.json").read_text())
    assert record["evaluated_on"] == "200 held-out training images"


def test_resume_continues_an_interrupted_smoke_run(tmp_path, capsys):
    # 2 epochs of 2 batches: a schedule short enough to break PyTorch's OneCycleLR
    assert run(["--norm", "ln", "--smoke", "--quiet", "--epochs", "2", "--out", str(tmp_path)], capsys)[0] == 0
    (smoke_dir(tmp_path, "ln", epochs=2) / "record.json").unlink()  # as if killed before the end
    code, out, _ = run(["--norm", "ln", "--smoke", "--quiet", "--epochs", "2", "--out", str(tmp_path),
                        "--resume"], capsys)
    assert code == 0 and "resumed from" in out


def test_a_finished_run_is_not_trained_again(tmp_path, capsys):
    assert run(["--norm", "bn", "--smoke", "--quiet", "--out", str(tmp_path)], capsys)[0] == 0
    before = (smoke_dir(tmp_path, "bn") / "record.json").read_text()
    code, out, _ = run(["--norm", "bn", "--smoke", "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 0 and "finished already" in out and "--runtime" not in out
    assert (smoke_dir(tmp_path, "bn") / "record.json").read_text() == before


def test_another_runtime_into_a_finished_run_says_it_trains_nothing_and_what_to_do(tmp_path, capsys):
    # Bug: the README's `--runtime eager` example, run after `make run`, printed only "finished
    # already" (the runtime is not part of the run id): the user could believe eager had run.
    assert run(["--norm", "bn", "--smoke", "--quiet", "--out", str(tmp_path)], capsys)[0] == 0
    code, out, _ = run(["--norm", "bn", "--smoke", "--quiet", "--runtime", "eager", "--out", str(tmp_path)], capsys)
    assert code == 0
    assert "finished already" in out and "for a run with --runtime eager, give another --out" in out


def test_real_process_prints_one_line_not_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--norm", "gn", "--groups", "3",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "train.py: error: GroupNorm groups=3 must divide the 32 channels of each normalized layer: "
        "1, 2, 4, 8, 16 or 32"]


@pytest.mark.parametrize("argv, pattern", [
    (["--norm", "xn"], r"argument --norm: invalid choice: 'xn'"),
    (["--epochs", "0"], r"argument --epochs: 0 must be positive"),
    (["--batch-size", "-4"], r"argument --batch-size: -4 must be positive"),
    (["--epochs", "two"], r"'two' is not an integer"),
    (["--set", "learning_rate=1"], r"expected KEY=VALUE with KEY one of"),
    (["--resume", "--restart", "--smoke"], r"--resume and --restart exclude each other"),
    (["--runtime", "turbo"], r"argument --runtime: invalid choice: 'turbo'"),
    (["--order", "relu-relu"], r"argument --order: invalid choice: 'relu-relu'"),
    (["--norm", "gn", "--renorm"], r"--renorm applies to BatchNorm only \(--norm bn\), not to --norm gn"),
    (["--norm-batch", "16"], r"--norm-batch applies to BatchNorm only \(--norm bn\), not to --norm bn ln gn"),
    (["--norm", "bn", "--norm-batch", "3"], r"norm_batch=3 must divide the batch size 512"),
    (["--norm", "bn", "--norm-batch", "16", "--renorm"], r"norm_batch and renorm do not combine"),
])
def test_bad_arguments(argv, pattern, tmp_path, capsys):
    code, _, err = run(argv + ["--out", str(tmp_path)], capsys)
    assert_one_line_error(code, err, 2, pattern)


def test_the_network_choices_reach_the_runs(tmp_path, capsys):
    """Issue 20's choices as train.py flags: the runs (and their folders) are the configs the study
    plans for them (RunConfig's ids)."""
    from normstudy import cli
    args = cli.parse_args(["--norm", "bn", "ln", "--ws", "--order", "norm-relu", "--smoke"])
    assert [c.run_id for c in cli.configs_from_args(args)] == [
        "bn-normrelu-ws-b512-e1-s0-synthetic", "ln-normrelu-ws-b512-e1-s0-synthetic"]
    args = cli.parse_args(["--norm", "bn", "--norm-batch", "16", "--seed", "1"])
    assert [c.run_id for c in cli.configs_from_args(args)] == ["bn-ghost16-b512-e20-s1"]
    args = cli.parse_args(["--norm", "bn", "--renorm"])
    assert cli.configs_from_args(args) == [RunConfig(norm="bn", renorm=True)]


def test_group_count_not_dividing_channels(tmp_path, capsys):
    code, _, err = run(["--norm", "gn", "--groups", "5", "--out", str(tmp_path)], capsys)
    assert_one_line_error(code, err, 2, r"groups=5 must divide the 32 channels")


def test_missing_data_directory_offline(tmp_path, capsys):
    code, _, err = run(["--norm", "bn", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, 2, r"cifar-10-batches-py not found and the download failed.*copy the")


def _corrupt(folder, how):
    batch = folder / "cifar-10-batches-py" / "data_batch_1"
    if how == "truncated":
        batch.write_bytes(batch.read_bytes()[:999])
    elif how == "shape":
        batch.write_bytes(pickle.dumps({"data": np.zeros((4, 1024), np.uint8), "labels": [0] * 4}))
    elif how == "labels":
        batch.write_bytes(pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 42]}))


@pytest.mark.parametrize("how, pattern", [("truncated", "corrupt or truncated"),
                                          ("shape", r"shape \(N, 3072\)"),
                                          ("labels", r"labels must lie in 0\.\.9, found 0\.\.42")])
def test_broken_dataset_files(cifar_dir, tmp_path, capsys, how, pattern):
    _corrupt(cifar_dir, how)
    code, _, err = run(["--norm", "bn", "--data-dir", str(cifar_dir), "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, 2, "data_batch_1: .*" + pattern)


def test_output_folder_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run(["--norm", "bn", "--smoke", "--out", str(blocker / "out")], capsys)
    assert_one_line_error(code, err, 2, r"cannot write to output folder .*file/out")


def test_resume_with_no_checkpoint(tmp_path, capsys):
    code, _, err = run(["--norm", "bn", "--smoke", "--resume", "--out", str(tmp_path)], capsys)
    assert_one_line_error(code, err, 2, r"--resume: no checkpoint under")


def test_resume_from_another_variants_checkpoint(tmp_path, capsys):
    assert run(["--norm", "bn", "--smoke", "--quiet", "--out", str(tmp_path)], capsys)[0] == 0
    smoke_dir(tmp_path, "gn").mkdir(parents=True)
    (smoke_dir(tmp_path, "bn") / "checkpoint.pt").rename(smoke_dir(tmp_path, "gn") / "checkpoint.pt")
    code, _, err = run(["--norm", "gn", "--smoke", "--quiet", "--resume", "--out", str(tmp_path)], capsys)
    assert_one_line_error(code, err, 2, r"checkpoint is from another run \(it differs in .*norm: 'bn' vs 'gn'")


def test_corrupt_checkpoint_on_resume(tmp_path, capsys):
    assert run(["--norm", "bn", "--smoke", "--quiet", "--out", str(tmp_path)], capsys)[0] == 0
    path = smoke_dir(tmp_path, "bn") / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:2000])
    (smoke_dir(tmp_path, "bn") / "record.json").unlink()
    code, _, err = run(["--norm", "bn", "--smoke", "--quiet", "--resume", "--out", str(tmp_path)], capsys)
    assert_one_line_error(code, err, 2, r"checkpoint.pt: corrupt, truncated or unsafe file, refused")


def test_divergence_exits_non_zero_naming_what_diverged(tmp_path, capsys):
    # The loss stays finite here while BatchNorm's running variance overflows: caught all the same.
    code, _, err = run(["--norm", "bn", "--smoke", "--quiet", "--set", "lr_per_32=1e6", "--out", str(tmp_path)], capsys)
    assert_one_line_error(code, err, 3, r"diverged: \S+running_var is NaN or infinite after epoch 1.*"
                          r"no checkpoint was written for bn-b512-e1-s0-lr_per_32_1e_06-synthetic")


def test_ctrl_c_exits_with_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(fit_lib, "fit", interrupted)
    code, _, err = run(["--norm", "bn", "--smoke", "--out", str(tmp_path)], capsys)
    assert_one_line_error(code, err, 130, r"interrupted; every completed epoch is saved .*--resume")


def test_synthetic_data_is_the_real_format(tmp_path):
    """Python 2's pickles, as the original release: str keys under encoding="latin1" (torchvision),
    bytes under encoding="bytes" (the dataset page's snippet), the images as a Python 2 str (a
    Python 3 pickle's bytes take another, 4x slower path: benchmarks on synthetic data timed it)."""
    folder = data.write_synthetic_cifar10(tmp_path, n_train=50, n_test=10)
    with open(folder / "data_batch_1", "rb") as f:
        record = pickle.load(f, encoding="latin1")
    assert record["data"].dtype == np.uint8 and record["data"].shape == (10, 3072)
    raw = (folder / "data_batch_1").read_bytes()
    with open(folder / "data_batch_1", "rb") as f:
        assert np.array_equal(pickle.load(f, encoding="bytes")[b"data"], record["data"])
    assert pickle.BINSTRING + (10 * 3072).to_bytes(4, "little") in raw  # the images, as Python 2 did
    assert b"_codecs" not in raw  # Python 3 writes bytes under protocol 2 as _codecs.encode(str)
    assert sorted(p.name for p in folder.iterdir()) == [
        "batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
        "test_batch"]
