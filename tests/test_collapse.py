"""A run that collapsed to chance is never silent: one line at its end, ``"collapsed"`` in its
record, a mark in train.py's results.md and in the study's tables and summary.json. GroupNorm
with 32 groups (one channel a group) is the real case: the last norm is followed by global
pooling, so every image gets the same logits."""
import json

import matplotlib.pyplot as plt
import pytest
import torch

import train
from normstudy import data
from normstudy import run as run_lib
from normstudy import study_report
from normstudy.config import RunConfig
from conftest import call_main


@pytest.fixture
def balanced_tiny_data(monkeypatch):
    """Smoke runs read 128 training images and 100 test images, 10 of each class (a model that
    answers one class whatever the image scores exactly chance, 10 %), and draw no run figures."""
    tiny = data.load_synthetic_cifar10(n_train=128, n_test=100)
    tiny["test_labels"] = torch.arange(100, dtype=tiny["test_labels"].dtype) % 10
    monkeypatch.setattr(run_lib, "load_data", lambda config, **kwargs: tiny)
    monkeypatch.setattr(run_lib, "write_run_figures", lambda *args, **kwargs: None)  # seconds, and not the point
    yield tiny
    plt.close("all")


def test_groupnorm_with_32_groups_says_it_collapsed_in_its_line_record_and_table(tmp_path, capsys,
                                                                                 balanced_tiny_data):
    code, out, _ = call_main(train.main, ["--norm", "gn", "--groups", "32", "--smoke", "--batch-size", "64",
                                          "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 0  # a collapsed run is a result, not an error
    run_id = "gn-g32-b64-e1-s0-synthetic"
    lines = [line for line in out.splitlines() if "collapsed" in line]
    assert lines[0].startswith(f"{run_id}: collapsed: test accuracy 10.00 % (mean of the last 3 epochs) is "
                               "within 1 point of chance (10 %)")
    record = json.loads((tmp_path / run_id / "record.json").read_text())
    assert record["collapsed"] is True and record["final"]["test_acc_last3_mean"] == 10.0
    row, = [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| GroupNorm")]
    assert "| 10.00 % (collapsed) |" in row  # one seed: no spread shown
    assert "Collapsed: a run's test accuracy" in (tmp_path / "results.md").read_text()
    cell, = json.loads((tmp_path / "summary.json").read_text())["cells"]
    assert cell["cell"] == "gn-g32-b64-e1-synthetic" and cell["collapsed"] == [True]


def fake_record(norm, seed, acc, *, groups=None, **fields):
    """A finished 3-epoch run at batch 512 with test accuracy ``acc`` every epoch, as the
    records written before the ``"collapsed"`` field existed (``fields`` adds keys)."""
    config = RunConfig(norm=norm, groups=groups, seed=seed, epochs=3)
    history = {"train_loss": [1.0] * 3, "train_acc": [acc] * 3, "test_loss": [1.0] * 3, "test_acc": [acc] * 3,
               "lr": [0.1] * 3, "epoch_seconds": [1.0] * 3}
    return {"id": config.run_id, "config": config.to_dict(), "recipe": config.recipe, "device": "cpu",
            "params": 48_736, "final": {**run_lib.summary_figures(history), "test_acc_tta_flip": acc},
            "history": history, **fields}


@pytest.mark.parametrize("acc, expected", [(10.0, True), (9.0, True), (10.99, True), (11.5, False), (8.5, False)])
def test_collapsed_means_within_one_point_of_chance(acc, expected):
    assert run_lib.collapsed(fake_record("bn", 0, acc)["final"]) is expected


def test_a_records_field_wins_and_old_records_are_judged_by_their_figures():
    assert run_lib.is_collapsed(fake_record("bn", 0, 10.0)) is True  # no field: its figures
    assert run_lib.is_collapsed(fake_record("bn", 0, 80.0)) is False
    assert run_lib.is_collapsed(fake_record("bn", 0, 10.0, collapsed=False)) is False


def test_the_studys_tables_and_summary_mark_collapsed_cells():
    records = [fake_record("gn", seed, 9.9, groups=32) for seed in (0, 1)]  # every seed at chance
    records += [fake_record("gn", 0, 10.5, groups=16), fake_record("gn", 1, 70.0, groups=16)]  # one of two
    records += [fake_record("bn", seed, 80.0) for seed in (0, 1)]
    summary = study_report.summarize_grid(records)
    collapsed = {cell["variant"]: cell["collapsed"] for cell in summary["cells"]}
    assert collapsed == {"BN": [False, False], "GN (G=16)": [True, False], "GN (G=32)": [True, True]}
    row = study_report.groups_table(summary).splitlines()[3]
    assert row == "| 512 | 59.75 ± 42.07 (1 of 2 collapsed) | 90.10 ± 0.00 (collapsed) | 20.00 ± 0.00 |"
    text = study_report.results_markdown(summary)
    assert "Collapsed: a run's test accuracy (mean of the last 3 epochs) within 1 point of chance" in text

    for cell in summary["cells"]:  # a summary.json written before the field existed
        del cell["collapsed"]
    assert study_report.groups_table(summary).splitlines()[3] == row
