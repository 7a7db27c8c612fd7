"""Issue 22, items 8 and 9: the scripts refuse bad input in one line (exit 2) and redraw nothing over
results from other data. In-process, on a tiny CIFAR-10-format folder. And benchmarks/compare_grids.py,
the check that a re-run grid kept each cell's accuracy."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from normstudy import data
from normstudy import run as run_lib
from normstudy.config import RunConfig
from conftest import call_main

ROOT = Path(__file__).resolve().parent.parent


def script(name, *, folder="scripts"):
    """The module of ``folder/name.py`` (scripts and benchmarks are files, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder):
    """Every file under ``folder`` with its bytes and modification time: what "touching nothing" keeps."""
    return {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(Path(folder).rglob("*"))
            if path.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CIFAR-10 run (as the committed ones are) trained one epoch on a tiny CIFAR-10-format folder:
    (its results folder, its data folder)."""
    data_dir = tmp_path_factory.mktemp("data")
    data.write_synthetic_cifar10(data_dir, n_train=128, n_test=64)
    results = tmp_path_factory.mktemp("results")
    run_lib.run_one(RunConfig(norm="bn", batch_size=64, epochs=1), results,  # its figures come with the redraw
                    dataset=data.load_cifar10(data_dir, download=False), device="cpu", figures=False, progress=False,
                    log=lambda line: None)
    return results, data_dir


def test_redraw_refuses_another_datasets_images_touching_nothing(trained, tmp_path, capsys):
    """Item 8: `--results results/main --data-dir <a synthetic folder>` rewrote every committed
    misclassified.png with another dataset's images. The runs' data are checked first."""
    redraw = script("redraw_figures")
    results, data_dir = trained
    other = data.write_synthetic_cifar10(tmp_path / "other", n_train=128, n_test=64, seed=1).parent
    run_id = RunConfig(norm="bn", batch_size=64, epochs=1).run_id

    before = snapshot(results)
    code, _, err = call_main(redraw.main, ["--results", str(results), "--data-dir", str(other)], capsys)
    assert code == 2 and one_line(err).startswith(
        f"redraw_figures.py: error: {run_id} was trained on other data than {other} holds (128 training and 64 test "
        "images, sha1 ")
    assert snapshot(results) == before

    # A run from before records kept the fingerprint: its checkpoint's is used.
    record = json.loads((results / run_id / "record.json").read_text())
    del record["data_fingerprint"]
    (results / run_id / "record.json").write_text(json.dumps(record))
    before = snapshot(results)
    code, _, err = call_main(redraw.main, ["--results", str(results), "--data-dir", str(other)], capsys)
    assert code == 2 and "was trained on other data" in one_line(err) and snapshot(results) == before

    code, out, err = call_main(redraw.main, ["--results", str(results), "--data-dir", str(data_dir)], capsys)
    assert code == 0 and err == "" and f"redrew {results / run_id}" in out
    assert (results / run_id / "misclassified.png").stat().st_size > 0


def test_redraw_refuses_a_synthetic_folder_for_the_committed_results(tmp_path, cifar_dir, capsys):
    """Item 8, the committed runs themselves (records without a fingerprint, no checkpoint): CIFAR-10's
    sizes are checked."""
    results = tmp_path / "main"
    shutil.copytree(ROOT / "results" / "main", results)
    before = snapshot(results)
    code, _, err = call_main(script("redraw_figures").main, ["--results", str(results), "--data-dir", str(cifar_dir)],
                             capsys)
    assert code == 2 and one_line(err) == (
        f"redraw_figures.py: error: bn-b512-e20-s0 was trained on other data than {cifar_dir} holds (50,000 "
        "training and 10,000 test images, against 500 training and 200 test images there); give the --data-dir "
        "it was trained on")
    assert snapshot(results) == before


def test_redraw_bad_input_is_one_line(tmp_path, cifar_dir, capsys):
    """Item 9: a broken record (JSONDecodeError) or a missing --results folder (FileNotFoundError)
    ended in a traceback."""
    redraw = script("redraw_figures")
    code, _, err = call_main(redraw.main, ["--results", str(tmp_path / "none"), "--data-dir", str(cifar_dir)], capsys)
    assert code == 2 and one_line(err) == f"redraw_figures.py: error: no such results folder: {tmp_path / 'none'}"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "record.json").write_text("{")
    code, _, err = call_main(redraw.main, ["--results", str(tmp_path), "--data-dir", str(cifar_dir)], capsys)
    assert code == 2 and one_line(err).startswith(
        f"redraw_figures.py: error: {tmp_path / 'run' / 'record.json'}: unreadable record (")
    code, _, err = call_main(redraw.main, ["--results", str(tmp_path), "--bogus"], capsys)
    assert code == 2 and "unrecognized arguments: --bogus" in one_line(err)


def test_run_notebooks_bad_input_is_one_line(tmp_path, capsys):
    """Item 9: `run_notebooks.py nope.ipynb` ended in a FileNotFoundError traceback. Every path is
    read before any notebook runs."""
    command = script("run_notebooks").command
    notebook = tmp_path / "fine.ipynb"
    notebook.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    code, _, err = call_main(command, [str(notebook), "nope.ipynb"], capsys)
    assert code == 2 and one_line(err) == "run_notebooks.py: error: nope.ipynb: No such file or directory"
    (tmp_path / "text.ipynb").write_text("not a notebook")
    code, _, err = call_main(command, [str(tmp_path / "text.ipynb")], capsys)
    assert code == 2 and one_line(err).startswith(f"run_notebooks.py: error: {tmp_path / 'text.ipynb'}: not a notebook")
    code, _, err = call_main(command, [], capsys)
    assert code == 2 and "the following arguments are required: notebooks" in one_line(err)


def grid_summary(cells):
    """A summary.json's cells as compare_grids reads them: ``{cell id: (batch, test error %)}``."""
    return {"cells": [{"cell": cell, "batch_size": batch, "variant": cell.split("-")[0].upper(), "seeds": [0, 1, 2],
                       "test_error_last3_mean": {"mean": error}} for cell, (batch, error) in cells.items()]}


def test_compare_grids_counts_the_cells_within_the_tolerance(tmp_path, capsys):
    """benchmarks/compare_grids.py: the check that a faster grid left each cell's accuracy within
    0.5 points. A cell outside fails it (exit 1); a cell only one grid has is not compared."""
    compare = script("compare_grids", folder="benchmarks").main
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    new.write_text(json.dumps(grid_summary({"bn-b2-e20": (2, 20.3), "ln-b2-e20": (2, 15.0), "gn-b4-e20": (4, 16.0)})))
    old.write_text(json.dumps(grid_summary({"bn-b2-e20": (2, 20.0), "ln-b2-e20": (2, 15.7)})))
    code, out, _ = call_main(compare, [str(new), "--against", str(old)], capsys)
    assert code == 1 and out.splitlines()[-1] == "1 of 2 cells within 0.5 points; largest difference 0.70, mean 0.50"
    assert "batch 2    BN         new  20.30  committed  20.00  difference +0.30  (3 seeds)" in out
    code, out, _ = call_main(compare, [str(new), "--against", str(old), "--within", "1"], capsys)
    assert code == 0 and out.splitlines()[-1].startswith("2 of 2 cells within 1.0 points")
    (tmp_path / "broken.json").write_text('{"cells": [{"cell": "x"}]}')
    code, _, err = call_main(compare, [str(tmp_path / "broken.json"), "--against", str(old)], capsys)
    assert code == 2 and one_line(err).startswith(f"compare_grids: cannot read {tmp_path / 'broken.json'} as a grid's")


def test_the_timed_grid_is_within_half_a_point_of_the_committed_one(capsys):
    """The evidence for "accuracy unchanged" (issue 19): the grid timed with stacks on the H200,
    benchmarks/grid_timing_results.json, against results/batch-size/summary.json."""
    code, out, _ = call_main(script("compare_grids", folder="benchmarks").main,
                             [str(ROOT / "benchmarks" / "grid_timing_results.json"), "--against",
                              str(ROOT / "results" / "batch-size" / "summary.json")], capsys)
    assert code == 0 and out.splitlines()[-1].startswith("27 of 27 cells within 0.5 points")
