"""Issue 21, "One summary of a folder of runs": one schema and one writer for summary.json, whatever
command writes it, and a folder's summary covers every finished run in it. Before, train.py into a
grid's folder rewrote its summary in train.py's schema (the study notebook's reader broke), a
narrower grid rewrote it as "1 of 1 runs finished", and the other kind's --summary-only as the
other grid's table. Also: the options train and the study share are one definition.

Synthetic records only (conftest.write_fake_record): nothing trains."""
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

import train
from normstudy import cli, command, plots, report, study, summary as summary_lib
from normstudy import run as run_lib
from normstudy.config import RunConfig
from conftest import call_main, write_fake_record

# The batch grid of the folder under test: two norms at two batch sizes, two seeds, 2 epochs.
GRID = study.batch_grid(norms=("bn", "gn"), batch_sizes=(64, 128), seeds=(0, 1), epochs=2)
GRID_ARGS = ["batch", "--norms", "bn", "gn", "--batch-sizes", "64", "128", "--seeds", "0", "1", "--epochs", "2"]


@pytest.fixture(autouse=True)
def fake_training(monkeypatch):
    """run_one writes a finished fake record (accuracy by batch size) instead of training; the
    data are never read."""
    trained = []

    def run_one(config, out, **kwargs):
        trained.append(config.run_id)
        return write_fake_record(out, config, acc=60.0 + config.batch_size / 64)
    monkeypatch.setattr(run_lib, "run_one", run_one)
    monkeypatch.setattr(run_lib, "load_data", lambda config, **kwargs: {})
    yield trained
    plt.close("all")


@pytest.fixture
def drawn(monkeypatch):
    """The cells each study figure was drawn from, by figure function."""
    cells = {}
    for name in ("error_vs_batch", "bn_vs_gn_curves", "accuracy_vs_groups", "plot_comparison"):
        real = getattr(plots, name)

        def draw(data, *args, _name=name, _real=real, **kwargs):
            cells[_name] = data
            return _real(data, *args, **kwargs)
        monkeypatch.setattr(plots, name, draw)
    return cells


@pytest.fixture
def grid_folder(tmp_path, capsys):
    """A folder holding GRID, finished, with the study's summary (written by --summary-only)."""
    for config in GRID:
        write_fake_record(tmp_path, config, acc=70.0 + config.batch_size / 64)
    code, _, err = call_main(study.main, GRID_ARGS + ["--summary-only", "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    return tmp_path


def grid_cells():
    return sorted({config.cell for config in GRID})


def assert_every_cell_kept(folder, drawn, *, cells, kind="batch"):
    """``folder``'s summary.json has ``kind`` and exactly ``cells``; results.md has a row or a
    value for each; the figure was drawn from the grid's cells (those of ``GRID``)."""
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["schema"] == 2 and summary["kind"] == kind
    assert sorted(c["cell"] for c in summary["cells"]) == sorted(cells)
    assert summary["runs"] == sum(len(c["seeds"]) for c in summary["cells"])
    text = (folder / "results.md").read_text()
    for cell in summary["cells"]:
        value = f"{cell['test_error_last3_mean']['mean']:.2f} ± {cell['test_error_last3_mean']['std']:.2f}"
        assert value in text or f"{cell['test_error_last3_mean']['mean']:.2f} |" in text, cell["cell"]
    assert {c["cell"] for c in drawn["error_vs_batch"]} >= set(grid_cells())
    assert (folder / "test_error_vs_batch.png").stat().st_size > 0
    return summary, text


def test_the_grid_folder_starts_with_every_cell(grid_folder, drawn):
    summary = json.loads((grid_folder / "summary.json").read_text())
    assert sorted(c["cell"] for c in summary["cells"]) == grid_cells()
    assert summary["plan"]["planned"] == summary["plan"]["finished"] == 8 and summary["plan"]["missing"] == []
    assert "8 of 8 runs finished" in (grid_folder / "results.md").read_text()


def test_train_into_a_grid_folder_keeps_the_grid(grid_folder, drawn, capsys, fake_training):
    # Bug: `train.py --out results/batch-size` wrote {cell: {...}} over the grid's summary: the
    # study notebook's reader broke and the grid's tables were gone.
    code, out, err = call_main(train.main, ["--norm", "ln", "--batch-size", "64", "--epochs", "2", "--quiet",
                                            "--out", str(grid_folder)], capsys)
    assert code == 0, err
    assert fake_training == ["ln-b64-e2-s0"]
    summary, text = assert_every_cell_kept(grid_folder, drawn, cells=grid_cells() + ["ln-b64-e2"])
    assert summary["plan"]["planned"] == 8 and summary["plan"]["finished"] == 8  # the grid's plan, kept
    assert "8 of 8 runs finished (the last grid's plan; 1 more finished run in this folder)" in text
    assert "| LN | 39.00 | — |" in text and text in out  # train prints the folder's tables


def test_a_narrower_grid_into_a_grid_folder_keeps_every_cell(grid_folder, drawn, capsys, fake_training):
    # Bug: `study batch --smoke --norms bn --batch-sizes 512 --out results/batch-size` rewrote the
    # summary as "1 of 1 runs finished", every other cell gone from it, its tables and figures.
    code, _, err = call_main(study.main, ["batch", "--smoke", "--norms", "bn", "--batch-sizes", "512", "--quiet",
                                          "--out", str(grid_folder)], capsys)
    assert code == 0, err
    assert fake_training == ["bn-b512-e1-s0-synthetic"]
    summary, text = assert_every_cell_kept(grid_folder, drawn, cells=grid_cells() + ["bn-b512-e1-synthetic"])
    assert summary["plan"] == {"run_ids": ["bn-b512-e1-s0-synthetic"], "planned": 1, "finished": 1, "missing": []}
    assert summary["runs"] == 9 and "1 of 1 runs finished (the last grid's plan; 8 more finished runs" in text
    # A table per setting: the smoke run has its own, it never takes the place of the grid's BN cell.
    assert "## 2 epochs, cifar10" in text and "## 1 epochs, synthetic" in text
    assert text.index("## 2 epochs, cifar10") < text.index("## 1 epochs, synthetic")  # the grid first
    assert "bn-b512-e1-synthetic" not in {c["cell"] for c in drawn["error_vs_batch"]}  # the grid's figure


def test_the_other_kinds_summary_only_keeps_the_grids_summary(grid_folder, drawn, capsys):
    # Bug: `groups --summary-only` on a batch grid's folder rewrote it as a groups table (of the
    # two runs the grids share), the batch grid's cells and figures gone.
    code, out, err = call_main(study.main, ["groups", "--batch-sizes", "64", "--groups", "2", "4", "--seeds", "0",
                                            "--epochs", "2", "--summary-only", "--out", str(grid_folder)], capsys)
    assert code == 0, err
    assert out.startswith(f"{grid_folder} holds the batch grid: its summary keeps that grid's tables")
    summary, text = assert_every_cell_kept(grid_folder, drawn, cells=grid_cells())
    assert summary["plan"]["planned"] == 3 and summary["plan"]["missing"] == ["gn-g4-b64-e2-s0"]
    assert text.startswith("# Test error vs batch size") and "| GN − BN |" in text
    assert not (grid_folder / "accuracy_vs_groups.png").exists()


def test_summarize_and_a_redraw_keep_the_grids_kind_and_plan(grid_folder, drawn, capsys):
    """``normstudy summarize`` (and scripts/redraw_figures.py, through the same writer) plan
    nothing: the grid's plan stays, counted afresh, with every finished run."""
    write_fake_record(grid_folder, RunConfig(norm="ln", batch_size=128, epochs=2))
    (grid_folder / GRID[0].run_id / "record.json").unlink()  # as if moved away
    code, _, err = call_main(command.main, ["summarize", str(grid_folder), "--quiet"], capsys)
    assert code == 0, err
    summary = json.loads((grid_folder / "summary.json").read_text())
    assert summary["kind"] == "batch" and summary["runs"] == 8
    assert summary["plan"]["planned"] == 8 and summary["plan"]["missing"] == [GRID[0].run_id]


def test_train_into_a_folder_of_runs_writes_the_same_schema(tmp_path, drawn, capsys):
    code, _, err = call_main(train.main, ["--norm", "all", "--epochs", "2", "--seed", "0", "1", "--quiet",
                                          "--out", str(tmp_path)], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kind"] is None and summary["plan"] is None and summary["runs"] == 6
    assert [c["variant"] for c in summary["cells"]] == ["BN", "LN", "GN (G=2)"]
    assert summary["cells"][0]["test_acc"] == {"values": [68.0, 68.0], "mean": 68.0, "std": 0.0}
    assert sorted(drawn["plot_comparison"]) == ["BatchNorm", "GroupNorm (2 groups)", "LayerNorm (GN, 1 group)"]
    assert (tmp_path / "comparison.png").stat().st_size > 0


def test_an_unreadable_summary_is_refused_before_anything_trains(tmp_path, capsys, fake_training):
    (tmp_path / "summary.json").write_text("{")
    code, _, err = call_main(train.main, ["--norm", "bn", "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 2 and fake_training == []
    assert err.strip().splitlines() == [f"train.py: error: {tmp_path / 'summary.json'}: unreadable (Expecting "
                                        "property name enclosed in double quotes: line 1 column 2 (char 1)); "
                                        "move it away to write a new summary"]


def test_records_are_read_in_one_place(tmp_path):
    """report.load_records reads through run.read_record: a broken record is named with the same
    line the commands refuse it with."""
    write_fake_record(tmp_path, RunConfig(norm="bn", epochs=2))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "record.json").write_text("[]")
    records, skipped = report.load_records(tmp_path)
    assert [r["id"] for r in records] == ["bn-b512-e2-s0"]
    with pytest.raises(run_lib.RunFolderError) as refused:
        run_lib.read_record(tmp_path / "broken")
    assert skipped == [str(refused.value)]


def test_a_folder_without_runs_gets_no_summary(tmp_path):
    assert summary_lib.write_summary(tmp_path) is None and list(tmp_path.iterdir()) == []


# --- one parent parser --------------------------------------------------------------------------

def options(parser):
    """``{option: (dest, default, help, choices, nargs)}`` of a parser's options."""
    return {string: (action.dest, action.default, action.help, action.choices, action.nargs)
            for action in parser._actions for string in action.option_strings}


def parsers(monkeypatch):
    """The parsers of train.py and the study, as their parse_args builds them."""
    import argparse
    built = []
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, argv=None: built.append(self))
    cli.parse_args([])
    study.parse_args([])
    return built


SHARED = ("--norms", "--norm", "--seeds", "--seed", "--epochs", "--smoke", "--dry-run", "--out", "--data-dir",
          "--no-download", "--device", "--runtime", "--restart", "--quiet")


def test_train_and_study_share_one_definition_of_their_common_options(monkeypatch):
    # Bug: the eight options both commands have were defined twice and had drifted: --runtime
    # defaulted to None in one and "fast" in the other, --seed/--seeds, --norm/--norms, --dry-run in one.
    train_parser, study_parser = parsers(monkeypatch)
    mine, theirs = options(train_parser), options(study_parser)
    for option in SHARED:
        assert mine[option] == theirs[option], option
    assert mine["--runtime"][1] is None and mine["--norm"][0] == mine["--norms"][0] == "norms"


@pytest.mark.parametrize("argv", [["--norm", "gn", "--seed", "1", "2"], ["--norms", "gn", "--seeds", "1", "2"]])
def test_both_spellings_mean_the_same_in_both_commands(argv):
    configs = cli.configs_from_args(cli.parse_args(argv + ["--epochs", "2"]))
    assert [c.run_id for c in configs] == ["gn-g2-b512-e2-s1", "gn-g2-b512-e2-s2"]
    grid = study.configs_from_args(study.parse_args(["batch", *argv, "--batch-sizes", "8", "--dry-run"]))
    assert [c.run_id for c in grid] == ["gn-g2-b8-e1-s1-synthetic", "gn-g2-b8-e1-s2-synthetic"]
    assert cli.configs_from_args(cli.parse_args(["--norms", "bn", "gn"]))[1].norm == "gn"  # several, in train too


def test_study_runtime_defaults_as_train_s(tmp_path, capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr(study, "run_grid", lambda configs, out, **kwargs: seen.update(kwargs))
    code, _, err = call_main(study.main, GRID_ARGS + ["--quiet", "--out", str(tmp_path)], capsys)
    assert code == 0 and seen["runtime"] is None  # None: the fast preset, as train.py's


def test_summary_module_is_the_only_writer():
    """Nothing else in the package writes summary.json or results.md."""
    root = Path(summary_lib.__file__).parent
    writers = sorted(str(path.relative_to(root)) for path in root.rglob("*.py")
                     if '"summary.json"' in path.read_text() and "write_json" in path.read_text())
    assert writers == ["summary.py"]


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in (Path(__file__).resolve().parent.parent
                                                                   / "results").glob("*/summary.json")))
def test_each_committed_summary_is_what_the_summary_writer_writes_today(folder, tmp_path):
    """`normstudy summarize results/X` (a README command) must leave a fresh clone's `git status`
    clean: a committed summary.json from an older schema (one without "failed") failed that."""
    source = Path(__file__).resolve().parent.parent / "results" / folder
    for path in (source / "summary.json", *source.glob("*/record.json"), *source.glob("*/failure.json")):
        target = tmp_path / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    summary_lib.write_summary(tmp_path, figures=False)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads((source / "summary.json").read_text())
