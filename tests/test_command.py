"""The ``normstudy`` command (pyproject's console script): ``train`` and ``study`` hand their
arguments to train.py's and the study's command lines unchanged; ``summarize`` rewrites a folder's
summary from its finished runs and trains nothing; anything else is one line and exit 2."""
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from normstudy import cli, command, study
from normstudy import run as run_lib
from normstudy.config import RunConfig
from conftest import call_main, write_fake_record

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def nothing_trains(monkeypatch):
    monkeypatch.setattr(run_lib, "run_one", lambda *args, **kwargs: pytest.fail("trained"))
    yield
    plt.close("all")


def run(argv, capsys):
    return call_main(command.main, argv, capsys)


def write_record(out, config, acc=80.0):
    write_fake_record(out, config, acc)


def test_the_console_script_is_this_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"normstudy": "normstudy.command:main"}


def test_help_lists_the_commands_from_a_real_process():
    done = subprocess.run([sys.executable, "-m", "normstudy", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    for name in ("train", "study", "summarize"):
        assert f"\n  {name} " in done.stdout


@pytest.mark.parametrize("argv, line", [
    ([], "normstudy: error: a COMMAND is required: choose train, study, summarize (see --help)"),
    (["fit"], "normstudy: error: unknown COMMAND 'fit': choose train, study, summarize (see --help)"),
    (["--norm", "gn"], "normstudy: error: unknown COMMAND '--norm': choose train, study, summarize (see --help)"),
])
def test_a_missing_or_unknown_command_is_one_line_and_exit_2(argv, line, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2 and err.strip().splitlines() == [line]


@pytest.mark.parametrize("name, module", [("train", cli), ("study", study)])
def test_train_and_study_are_their_command_lines(name, module, capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(module, "main", lambda argv, prog: seen.append((argv, prog)) or 7)
    assert run([name, "--norm", "gn", "--smoke"], capsys)[0] == 7
    assert seen == [(["--norm", "gn", "--smoke"], f"normstudy {name}")]


@pytest.mark.parametrize("name, argv", [("train", ["--norm", "xn"]), ("study", ["batch", "--norms", "xn"])])
def test_each_command_names_itself_as_invoked(name, argv, tmp_path, capsys):
    # Bug: `normstudy train` answered "train.py: error: ..." and `normstudy study` "python -m
    # normstudy.study: error: ...", in its usage and errors alike.
    code, _, err = run([name, *argv, "--out", str(tmp_path)], capsys)
    assert code == 2 and err.startswith(f"normstudy {name}: error: argument --norm")
    code, out, _ = run([name, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: normstudy {name} ")
    code, _, err = call_main(cli.main, ["--norm", "xn"], capsys)  # train.py itself
    assert code == 2 and err.startswith("train.py: error: argument --norm: invalid choice: 'xn'")


def test_summarize_writes_train_pys_summary_of_a_folder_of_runs(tmp_path, capsys):
    write_record(tmp_path, RunConfig(norm="bn", epochs=3))
    write_record(tmp_path, RunConfig(norm="bn", epochs=3, seed=1), acc=82.0)
    code, out, err = run(["summarize", str(tmp_path)], capsys)
    assert code == 0, err
    assert "| BatchNorm | 512 | 48,736 | 2 |" in out and out.strip() in (tmp_path / "results.md").read_text()
    cell, = json.loads((tmp_path / "summary.json").read_text())["cells"]
    assert cell["cell"] == "bn-b512-e3" and cell["seeds"] == [0, 1]


def test_summarize_writes_the_studys_summary_of_a_grid(tmp_path, capsys):
    for config in (RunConfig(norm="gn", groups=32, epochs=20), RunConfig(norm="bn", epochs=20)):
        write_record(tmp_path, config, acc=10.0 if config.norm == "gn" else 85.0)
    (tmp_path / "summary.json").write_text(json.dumps({"kind": "groups", "cells": []}))  # a grid's, out of date
    code, _, err = run(["summarize", str(tmp_path), "--quiet"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kind"] == "groups" and summary["runs"] == 2
    assert summary["plan"]["planned"] == 63 and summary["plan"]["finished"] == 2  # the study's grid
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# Test error vs number of groups") and "| 512 | 90.00 (collapsed) | 15.00 |" in text
    assert (tmp_path / "accuracy_vs_groups.png").stat().st_size > 0


def test_summarize_refuses_a_folder_without_finished_runs_and_writes_nothing(tmp_path, capsys):
    code, _, err = run(["summarize", str(tmp_path)], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"normstudy summarize: error: no finished runs in {tmp_path} (folders holding a record.json)"]
    assert list(tmp_path.iterdir()) == []
