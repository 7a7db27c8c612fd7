"""The study: grids, run_grid (skipping, resuming, stopping), the local runner's concurrency, the
summary tables and figures, the command line. Runs use tiny synthetic data (128 training images,
batches of 64: two steps an epoch) and draw no per-run figures."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from normstudy import data
from normstudy import plots
from normstudy import run as run_lib
from normstudy import runners
from normstudy import study
from normstudy import study_report
from normstudy.config import RunConfig
from normstudy.runners.local import LocalRunner
from conftest import call_main, fake_record as full_record

ROOT = Path(__file__).resolve().parent.parent
TIMING = {"seconds"}, {"epoch_seconds"}, {"seconds_per_epoch"}  # record, history, final


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def tiny_data(monkeypatch):
    """Synthetic runs read 128 training and 64 test images instead of 1,024 and 256."""
    tiny = data.load_synthetic_cifar10(n_train=128, n_test=64)
    real = run_lib.load_data

    def load_data(config, **kwargs):
        return tiny if config.data == "synthetic" else real(config, **kwargs)
    monkeypatch.setattr(run_lib, "load_data", load_data)
    return tiny


@pytest.fixture
def trainings(monkeypatch):
    """Every call of run_one that trains (not one that returns a finished record), by run id."""
    calls = []
    real = run_lib.run_one

    def run_one(config, out, **kwargs):
        if run_lib.read_record(Path(out) / config.run_id) is None:
            calls.append(config.run_id)
        return real(config, out, **kwargs)
    monkeypatch.setattr(run_lib, "run_one", run_one)
    return calls


def small_grid(norms=("bn", "gn"), seeds=(0,), epochs=1):
    return study.batch_grid(norms=norms, batch_sizes=(64,), seeds=seeds, epochs=epochs, data="synthetic")


def without_timings(record):
    record = {key: value for key, value in record.items() if key not in TIMING[0]}
    record["history"] = {key: value for key, value in record["history"].items() if key not in TIMING[1]}
    record["final"] = {key: value for key, value in record["final"].items() if key not in TIMING[2]}
    return record


# --- grids --------------------------------------------------------------------------------------

def test_batch_grid_is_every_norm_at_every_batch_and_seed():
    grid = study.batch_grid()
    assert len(grid) == len({c.run_id for c in grid}) == 81
    assert {(c.norm, c.batch_size, c.seed, c.epochs) for c in grid} == {
        (n, b, s, 20) for n in ("bn", "ln", "gn") for b in (2, 4, 8, 16, 32, 64, 128, 256, 512) for s in (0, 1, 2)}
    assert {c.groups for c in grid if c.norm == "gn"} == {2}
    # seed by seed, largest batch first
    assert [c.run_id for c in grid[:4]] == ["bn-b512-e20-s0", "ln-b512-e20-s0", "gn-g2-b512-e20-s0", "bn-b256-e20-s0"]
    assert [c.seed for c in grid] == sorted(c.seed for c in grid)
    assert len(study.batch_grid(norms=("gn", "gn"), batch_sizes=(8, 8), seeds=(1,), gn_groups=32)) == 1


def test_groups_grid_is_gn_with_each_group_count_and_bn():
    grid = study.groups_grid()
    assert len(grid) == len({c.run_id for c in grid}) == (6 + 1) * 3 * 3
    gn = [c for c in grid if c.norm == "gn"]
    assert sorted({c.groups for c in gn}) == [1, 2, 4, 8, 16, 32]  # G=1 is GN with one group: LN
    assert {c.batch_size for c in grid} == {512, 16, 4}
    assert {(c.batch_size, c.seed) for c in grid if c.norm == "bn"} == {(b, s) for b in (512, 16, 4) for s in (0, 1, 2)}
    assert "groups must divide 32; channels per group = 32/G" in " ".join(study.groups_grid.__doc__.split())
    assert len(study.groups_grid(batch_sizes=(512,), seeds=(0,), bn=False)) == 6
    with pytest.raises(ValueError, match="groups=3 must divide the 32 channels"):
        study.groups_grid(groups=(3,))


# --- run_grid -----------------------------------------------------------------------------------

def test_run_grid_runs_everything_then_skips_finished_runs(tmp_path, tiny_data, trainings):
    grid = small_grid(seeds=(0, 1))
    records = study.run_grid(grid, tmp_path, runner=LocalRunner(figures=False), progress=False)
    assert sorted(trainings) == sorted(c.run_id for c in grid)
    assert [r["id"] for r in records] == [c.run_id for c in grid]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [c["cell"] for c in summary["cells"]] == ["bn-b64-e1-synthetic", "gn-g2-b64-e1-synthetic"]
    assert summary["kind"] == "batch" and summary["runs"] == 4
    assert summary["plan"]["finished"] == summary["plan"]["planned"] == 4 and not summary["plan"]["missing"]
    assert summary["cells"][0]["seeds"] == [0, 1]
    assert "| GN − BN |" in (tmp_path / "results.md").read_text()
    for name in ("test_error_vs_batch.png", "bn_vs_gn_curves.png"):
        assert (tmp_path / name).stat().st_size > 0

    trainings.clear()
    again = study.run_grid(grid, tmp_path, runner=LocalRunner(figures=False), progress=False)
    assert trainings == [] and again == records


def test_an_interrupted_grid_keeps_its_summary_and_resumes(tmp_path, tiny_data, monkeypatch):
    grid = small_grid(norms=("bn", "ln", "gn"), epochs=2)
    real, trained, interrupt = run_lib.run_one, [], [True]

    def run_one(config, out, **kwargs):
        if run_lib.read_record(Path(out) / config.run_id) is None:
            trained.append(config.run_id)
        if interrupt[0] and len(trained) == 2:  # the second run: Ctrl-C once its first epoch is saved
            def log(line):
                if "epoch  1/2" in line:
                    raise KeyboardInterrupt
            kwargs["log"] = log
        return real(config, out, **kwargs)

    monkeypatch.setattr(run_lib, "run_one", run_one)
    with pytest.raises(KeyboardInterrupt):
        study.run_grid(grid, tmp_path, runner=LocalRunner(figures=False), progress=False)
    first, second, third = (tmp_path / c.run_id for c in grid)
    assert (first / "record.json").exists()
    assert (second / "checkpoint.pt").exists() and not (second / "record.json").exists()
    assert not third.exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["plan"]["finished"] == 1 and summary["plan"]["missing"] == [grid[1].run_id, grid[2].run_id]

    interrupt[0], lines = False, []
    trained.clear()
    records = study.run_grid(grid, tmp_path, runner=LocalRunner(figures=False, log=lines.append), progress=False)
    assert trained == [grid[1].run_id, grid[2].run_id]  # the finished run is not trained again
    assert any(line.startswith(f"{grid[1].run_id}: ") and "resumed from" in line for line in lines)
    assert [len(r["history"]["test_acc"]) for r in records] == [2, 2, 2]
    assert json.loads((tmp_path / "summary.json").read_text())["plan"]["finished"] == 3


def test_concurrent_runs_give_the_same_records_and_failures(tmp_path, tiny_data, monkeypatch):
    diverging = RunConfig(norm="bn", seed=0, batch_size=64, epochs=1, data="synthetic",
                          overrides=(("lr_per_32", 1e6),))
    grid = small_grid(norms=("bn", "gn"), seeds=(0, 1)) + [diverging]
    threads, delivered_in = set(), set()
    real = run_lib.run_one

    def run_one(config, out, **kwargs):
        threads.add(threading.current_thread().name)
        return real(config, out, **kwargs)
    monkeypatch.setattr(run_lib, "run_one", run_one)

    results = {}
    for concurrency in (1, 2):
        out = tmp_path / f"c{concurrency}"
        got = []

        def on_record(record):
            delivered_in.add(threading.current_thread() is threading.main_thread())
            got.append(record)
        with pytest.raises(runners.RunsFailed) as failed:
            LocalRunner(concurrency, figures=False).run(grid, out=out, data_dir=tmp_path, download=False,
                                                        device="cpu", runtime=None, on_record=on_record)
        assert list(failed.value.failures) == [diverging.run_id]
        assert failed.value.failures[diverging.run_id].startswith("diverged: ")
        results[concurrency] = {r["id"]: without_timings(r) for r in got}
        assert not (out / diverging.run_id / "record.json").exists()
    assert len([name for name in threads if name.startswith("normstudy-run-")]) == 2  # two at a time
    assert delivered_in == {True}  # on_record in the calling thread
    assert results[1] == results[2] and len(results[1]) == 4


def test_a_failed_run_says_why_in_its_folder_and_in_the_summary(tmp_path, tiny_data):
    """A grid killed before its end never reports its failures: each failed run's folder says
    why (failure.json), the summary lists it, and a later attempt that finishes removes it."""
    diverging = RunConfig(norm="bn", seed=0, batch_size=64, epochs=1, data="synthetic",
                          overrides=(("lr_per_32", 1e6),))
    grid = small_grid(norms=("gn",)) + [diverging]
    with pytest.raises(runners.RunsFailed):
        study.run_grid(grid, tmp_path, runner=LocalRunner(figures=False), progress=False)
    note = json.loads((tmp_path / diverging.run_id / "failure.json").read_text())
    assert note["reason"].startswith("diverged: ") and "Traceback" in note["details"] and note["when"]
    assert json.loads((tmp_path / "summary.json").read_text())["failed"] == {diverging.run_id: note["reason"]}
    assert f"- {diverging.run_id}: diverged: " in (tmp_path / "results.md").read_text()

    later = small_grid(norms=("bn",))[0]  # failed once (say, out of memory), then finished
    (tmp_path / later.run_id).mkdir()
    run_lib.note_failure(tmp_path / later.run_id, reason="OutOfMemoryError: CUDA out of memory")
    study.run_grid([later], tmp_path, runner=LocalRunner(figures=False), progress=False)
    assert not (tmp_path / later.run_id / "failure.json").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["failed"] == {diverging.run_id: note["reason"]}


def test_stopping_threaded_runs_keeps_their_checkpoints(tmp_path, tiny_data):
    grid = small_grid(norms=("bn", "ln", "gn"), epochs=2)

    delivered = []

    def stop(record):  # Ctrl-C as the first run finishes
        delivered.append(record["id"])
        if len(delivered) == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        LocalRunner(2, figures=False).run(grid, out=tmp_path, device="cpu", on_record=stop)
    assert not [t for t in threading.enumerate() if t.name.startswith("normstudy-run-")]  # all ended
    finished = [c.run_id for c in grid if (tmp_path / c.run_id / "record.json").exists()]
    assert sorted(finished) == sorted(delivered)  # runs that finished while stopping are delivered too
    assert len(finished) < len(grid)
    for config in grid:
        folder = tmp_path / config.run_id
        assert not folder.exists() or (folder / "record.json").exists() or (folder / "checkpoint.pt").exists()
        assert not (folder / ".lock").exists() or (folder / ".lock").read_text() == ""  # released


# --- runners ------------------------------------------------------------------------------------

def test_make_runner_names_and_refusals(monkeypatch):
    assert isinstance(runners.make_runner("local", concurrency=3), LocalRunner)
    assert runners.make_runner("local").concurrency == 1
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ValueError, match=r"needs Ray, which is not installed: pip install -r requirements-ray.txt$"):
        runners.make_runner("ray", address="auto")
    with pytest.raises(ValueError, match="--address applies to --runner ray only"):
        runners.make_runner("local", address="auto")
    with pytest.raises(ValueError, match="concurrency=0 must be"):
        LocalRunner(0)


def test_run_folders_travel_whole_and_finish_last(tmp_path, monkeypatch):
    source = tmp_path / "a" / "bn-b512-e1-s0"
    source.mkdir(parents=True)
    for name, text in {"config.json": "{}", "record.json": '{"id": "bn-b512-e1-s0"}', "checkpoint.pt": "c",
                       "weights.pt": "w", ".lock": "", ".weights.pt.x.tmp": "half"}.items():
        (source / name).write_text(text)
    files = runners.pack_run_folder(source)
    assert sorted(files) == ["checkpoint.pt", "config.json", "record.json", "weights.pt"]
    assert "checkpoint.pt" not in runners.pack_run_folder(source, checkpoint=False)
    written = []
    from normstudy import checkpoints
    real = checkpoints.atomic_write
    monkeypatch.setattr(checkpoints, "atomic_write", lambda path, write: written.append(path.name) or real(path, write))
    record = runners.unpack_run_folder(files, tmp_path / "b" / source.name)
    assert record == {"id": "bn-b512-e1-s0"} and written[-1] == "record.json" and len(written) == 4
    assert (tmp_path / "b" / source.name / "weights.pt").read_text() == "w"
    with pytest.raises(ValueError, match="not a plain file name"):
        runners.unpack_run_folder({"../evil": b""}, tmp_path / "c")


# --- summaries and tables -----------------------------------------------------------------------

def fake_record(norm, batch, seed, test_acc, *, groups=None, epochs=3):
    """A record as run_one writes it, with ``test_acc`` the per-epoch test accuracies."""
    config = RunConfig(norm=norm, groups=groups, batch_size=batch, seed=seed, epochs=epochs)
    record = full_record(config)
    history = {**record["history"], "train_acc": [a + 5 for a in test_acc], "test_acc": list(test_acc)}
    return {**record, "history": history, "final": {**run_lib.summary_figures(history), "test_acc_tta_flip": 0.0}}


def test_summary_means_and_spreads_over_seeds():
    records = [fake_record("bn", 32, 0, [50, 60, 70, 80], epochs=4), fake_record("bn", 32, 1, [50, 60, 74, 84], epochs=4),
               fake_record("bn", 32, 2, [50, 60, 72, 82], epochs=4)]
    grid = study.batch_grid(norms=("bn",), batch_sizes=(32,), seeds=(0, 1, 2, 3), epochs=4)
    summary = study_report.summarize_grid(records, grid)
    cell, = summary["cells"]
    assert cell["seeds"] == [0, 1, 2] and cell["variant"] == "BN"
    assert cell["test_acc"]["mean"] == pytest.approx(82) and cell["test_acc"]["std"] == pytest.approx(2)
    assert cell["test_error"]["mean"] == pytest.approx(18)
    assert cell["test_acc_last3_mean"]["values"] == pytest.approx([70, 72.6666667, 71.3333333])
    assert cell["test_error_last3_mean"]["mean"] == pytest.approx(100 - 214 / 3)
    assert cell["curves"]["test_error"]["mean"] == pytest.approx([50, 40, 28, 18])
    assert cell["curves"]["train_error"]["std"][-1] == pytest.approx(2)
    assert summary["plan"] == {"run_ids": [c.run_id for c in grid], "planned": 4, "finished": 3,
                               "missing": ["bn-b32-e4-s3"]}


def batch_records():
    """BN better at batch 32, worse at batch 2; one seed of LN; GN at batch 2 only."""
    return [fake_record("bn", 32, 0, [80, 80, 80]), fake_record("bn", 32, 1, [82, 82, 82]),
            fake_record("bn", 2, 0, [60, 60, 60]), fake_record("bn", 2, 1, [64, 64, 64]),
            fake_record("ln", 32, 0, [75, 75, 75]),
            fake_record("gn", 2, 0, [70, 70, 70], groups=4), fake_record("gn", 2, 1, [71, 71, 71], groups=4)]


def test_batch_table_is_table_2_with_a_gn_minus_bn_row():
    table = study_report.batch_table(study_report.summarize_grid(batch_records()))
    assert table.splitlines() == [
        "| norm | 2 | 32 |",
        "|---|---:|---:|",
        "| BN | 38.00 ± 2.83 | 19.00 ± 1.41 |",
        "| LN | — | 25.00 |",
        "| GN (G=4) | 29.50 ± 0.71 | — |",
        "| GN − BN | -8.50 | — |"]


def test_groups_table_is_table_3_with_bn_and_distance_to_the_best():
    records = [fake_record("gn", 16, 0, [70, 70, 70], groups=1), fake_record("gn", 16, 0, [72, 72, 72], groups=8),
               fake_record("gn", 16, 0, [66, 66, 66], groups=32), fake_record("bn", 16, 0, [71, 71, 71]),
               fake_record("gn", 512, 0, [80, 80, 80], groups=8)]
    summary = study_report.summarize_grid(records)
    assert summary["kind"] == "groups"
    assert study_report.groups_table(summary).splitlines() == [
        "| batch | G=1 (LN) | G=8 | G=32 (IN) | BN |",
        "|---|---:|---:|---:|---:|",
        "| channels per group | 32 | 4 | 1 | — |",
        "| 512 | — | 20.00 | — | — |",
        "| 512: Δ vs best | — | +0.00 | — | — |",
        "| 16 | 30.00 | 28.00 | 34.00 | 29.00 |",
        "| 16: Δ vs best | +2.00 | +0.00 | +6.00 | +1.00 |"]
    text = study_report.results_markdown(summary)
    assert text.startswith("# Test error vs number of groups") and "G=32 InstanceNorm" in text


def test_results_markdown_names_missing_runs():
    grid = study.batch_grid(norms=("bn",), batch_sizes=(2, 32), seeds=(0, 1, 2), epochs=3)
    records = [r for r in batch_records() if r["config"]["norm"] == "bn"]
    text = study_report.results_markdown(study_report.summarize_grid(records, grid))
    assert "4 of 6 runs finished" in text and "Missing (2 runs not finished): bn-b32-e3-s2, bn-b2-e3-s2." in text


# --- figures ------------------------------------------------------------------------------------

def test_figures_have_a_line_per_variant_on_log2_axes():
    cells = study_report.summarize_grid(batch_records())["cells"]
    ax, = plots.error_vs_batch(cells).axes
    assert [line.get_label() for line in ax.lines] == ["BN", "LN", "GN (G=4)"]
    assert ax.get_xscale() == "log" and list(ax.lines[0].get_xdata()) == [2, 32]
    assert len(ax.collections) == 3  # the shaded spreads

    panels = plots.bn_vs_gn_curves(cells).axes  # batch 2: the only one with both
    assert [[line.get_label() for line in ax.lines] for ax in panels] == [["BN", "GN (G=4)"]] * 2
    assert list(panels[1].lines[0].get_ydata()) == pytest.approx([38, 38, 38])

    records = [fake_record("gn", b, 0, [70 + g] * 3, groups=g) for b in (16, 512) for g in (1, 2, 32)]
    records += [fake_record("bn", b, 0, [75] * 3) for b in (16, 512)]
    ax, = plots.accuracy_vs_groups(study_report.summarize_grid(records)["cells"]).axes
    assert [line.get_label() for line in ax.lines] == ["GN, batch 512", "BN, batch 512", "GN, batch 16", "BN, batch 16"]
    assert list(ax.lines[0].get_xdata()) == [1, 2, 32] and ax.get_xscale() == "log"
    assert list(ax.lines[1].get_ydata()) == [75, 75]  # BN: a horizontal line


# --- the command line ---------------------------------------------------------------------------

def run_main(argv, capsys):
    """``study.main`` in-process: returns (exit code, stdout, stderr)."""
    return call_main(study.main, argv, capsys)


def test_command_runs_a_smoke_grid(tmp_path, tiny_data, capsys):
    code, out, err = run_main(["batch", "--smoke", "--norms", "gn", "--batch-sizes", "64", "--groups", "4",
                               "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert (tmp_path / "gn-g4-b64-e1-s0-synthetic" / "record.json").exists()
    assert "| GN (G=4) |" in out and "gn-g4-b64-e1-s0-synthetic: test acc" in out


def test_longest_first_starts_the_smallest_batches_and_keeps_the_grid_order_among_equals(tmp_path, monkeypatch, capsys):
    # The whole grid at 27 runs at once on the H200: in the grid's order (seed by seed, largest
    # batch first) the last seed's batch-2 runs start last and run on alone at the end.
    grid = study.batch_grid(batch_sizes=(512, 8, 2), seeds=(0, 1))
    ordered = study.longest_first(grid)
    assert [c.batch_size for c in ordered] == [2] * 6 + [8] * 6 + [512] * 6
    assert [c.run_id for c in ordered if c.batch_size == 2] == [c.run_id for c in grid if c.batch_size == 2]
    started = []
    monkeypatch.setattr(study, "run_grid", lambda configs, out, **kw: started.extend(configs))
    code, _, err = run_main(["batch", "--smoke", "--batch-sizes", "512", "64", "--seeds", "0", "1", "--longest-first",
                             "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert [c.batch_size for c in started] == [64] * 6 + [512] * 6 and started[0].seed == 0 and started[3].seed == 1


@pytest.mark.parametrize("argv, pattern", [
    (["groups", "--groups", "3"], r"groups=3 must divide the 32 channels"),
    (["batch", "--groups", "1", "2"], r"--groups: the batch grid takes one group count"),
    (["batch", "--norms", "bn", "--groups", "4"], r"--groups applies to GroupNorm only"),
    (["groups", "--norms", "bn"], r"--norms applies to the batch grid only"),
    (["batch", "--address", "auto"], r"--address applies to --runner ray only"),
    (["batch", "--batch-sizes", "0"], r"argument --batch-sizes: 0 must be positive"),
    (["batch", "--norms", "xn"], r"argument --norms: invalid choice: 'xn'"),
    (["table"], r"argument grid: invalid choice: 'table'"),
    (["batch", "--smoke", "--device", "cuda:7"], r"device 'cuda:7' is not"),
])
def test_bad_input_is_one_line_and_exit_2(argv, pattern, tmp_path, capsys):
    code, _, err = run_main(argv + ["--quiet", "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert __import__("re").search(pattern, lines[0]), lines[0]


def test_module_entry_point_says_in_one_line_how_to_install_ray(tmp_path):
    # A real process without Ray (hidden from it): exit 2 and the one line that says what to install.
    script = ("import sys, runpy; sys.modules['ray'] = None; "
              f"sys.argv = ['x', 'batch', '--runner', 'ray', '--out', {str(tmp_path)!r}]; "
              "runpy.run_module('normstudy.study', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "python -m normstudy.study: error: the ray runner needs Ray, which is not installed: "
        "pip install -r requirements-ray.txt"]


def test_summary_only_rewrites_the_summary_and_trains_nothing(tmp_path, capsys, monkeypatch):
    """``--summary-only``: the tables and figures of the finished runs, no training (how the
    committed results' summaries are rebuilt after a grid ran in several parts)."""
    argv = ["batch", "--smoke", "--norms", "bn", "--batch-sizes", "512", "--quiet", "--out", str(tmp_path)]
    assert run_main(argv, capsys)[0] == 0
    (tmp_path / "summary.json").unlink()
    monkeypatch.setattr(run_lib, "run_one", lambda *a, **k: pytest.fail("trained"))
    code, _, err = run_main(argv[:-3] + ["--batch-sizes", "256", "512", "--summary-only", "--quiet",
                                         "--out", str(tmp_path)], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "1 of 2 runs finished" in (tmp_path / "results.md").read_text()
    assert summary["kind"] == "batch"


@pytest.mark.parametrize("summary_only", [False, True])
def test_a_broken_record_in_the_grid_is_one_line_naming_it(tmp_path, capsys, monkeypatch, summary_only):
    # Bug: a record.json that is JSON but lacks what a record has (here: its figures and history)
    # ended the study command, and --summary-only, with a KeyError traceback.
    folder = tmp_path / "bn-b512-e1-s0-synthetic"
    folder.mkdir()
    (folder / "record.json").write_text(json.dumps({"config": RunConfig(
        norm="bn", data="synthetic", epochs=1, seed=0).to_dict()}))
    monkeypatch.setattr(run_lib, "run_one", lambda *a, **k: pytest.fail("trained"))
    code, _, err = run_main(["batch", "--smoke", "--norms", "bn", "--batch-sizes", "512", "--quiet",
                             "--out", str(tmp_path)] + (["--summary-only"] if summary_only else []), capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"python -m normstudy.study: error: {folder / 'record.json'}: unreadable record (missing recipe, device, "
        "params, final, history); move the folder away to rerun"]


# --- issue 22 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_run_another_command_trains_is_waited_for_not_failed(tmp_path, tiny_data, monkeypatch, concurrency):
    """Item 6: two commands into one folder each trained their share, then both exited 3 with "runs
    failed: ... in use by process N". A run held by another process is waited for (after the
    others), then delivered as finished; nothing fails, the summary counts every run."""
    grid = small_grid(norms=("bn", "ln", "gn"))
    held = grid[1]
    run_dir = tmp_path / held.run_id
    run_dir.mkdir()
    locked, finish = threading.Event(), threading.Event()

    def other_command():  # holds the run's folder until told, then finishes the run and lets go
        with run_lib.folder_lock(run_dir):
            locked.set()
            finish.wait(60)
            (run_dir / "config.json").write_text(json.dumps(held.to_dict()))
            (run_dir / "record.json").write_text(json.dumps(full_record(held)))
    other = threading.Thread(target=other_command)
    other.start()
    locked.wait(10)
    lines, trained = [], []
    real_train = run_lib._train
    monkeypatch.setattr(run_lib, "_train", lambda config, *a, **k: trained.append(config.run_id) or real_train(
        config, *a, **k))

    def log(line):
        lines.append(line)
        if "waiting for it" in line:
            finish.set()
    try:
        records = study.run_grid(grid, tmp_path, runner=LocalRunner(concurrency, log=log, figures=False),
                                 progress=False)
    finally:
        finish.set()
        other.join()
    assert sorted(trained) == sorted(c.run_id for c in grid if c != held)  # each run trained once
    assert [r["id"] for r in records] == [c.run_id for c in grid]
    assert f"{held.run_id}: in use by process {os.getpid()}, another command that trains it; waiting for it to " \
           "finish, after the other runs" in lines
    assert "3 of 3 runs finished" in (tmp_path / "results.md").read_text()


def test_the_summary_counts_runs_another_command_finished(tmp_path):
    """Item 6: results.md said "3 of 6 runs finished" when all 6 had (the other command's runs
    were missing from it): the summary written last reads every finished run of the grid."""
    grid = study.batch_grid(norms=("bn", "gn"), batch_sizes=(64,), seeds=(0,), epochs=1, data="synthetic")

    class OtherCommandFinishesOne:  # a runner during whose work another process finished grid[0]
        def run(self, configs, *, out, on_record, **kwargs):
            write_record(out, configs[0])
            record = write_record(out, configs[1])
            on_record(record)
    study.run_grid(grid, tmp_path, runner=OtherCommandFinishesOne(), progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["plan"]["finished"] == 2 and "2 of 2 runs finished" in (tmp_path / "results.md").read_text()


def write_record(out, config):
    (Path(out) / config.run_id).mkdir(parents=True, exist_ok=True)
    record = full_record(config)
    (Path(out) / config.run_id / "record.json").write_text(json.dumps(record))
    return record


def test_failures_say_truly_what_finished_and_a_refused_checkpoint_names_restart(tmp_path, tiny_data, capsys):
    """Item 7: with no run finished the failure line pointed to a results.md never written, and a
    refused checkpoint gave no way forward: the study command takes --restart, and says so."""
    damaged = RunConfig(norm="bn", batch_size=64, epochs=1, data="synthetic")
    argv = ["batch", "--smoke", "--norms", "bn", "--batch-sizes", "64", "--quiet", "--out", str(tmp_path)]
    (tmp_path / damaged.run_id).mkdir()
    (tmp_path / damaged.run_id / "checkpoint.pt").write_bytes(b"half a checkpoint")
    code, _, err = run_main(argv, capsys)
    assert code == 3 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"python -m normstudy.study: 1 run failed: {damaged.run_id}: CheckpointError: ")
    assert err.strip().endswith("; no run of the grid has finished; run again with --restart to start the "
                                "interrupted runs over, discarding their checkpoints")
    assert not (tmp_path / "results.md").exists()

    write_record(tmp_path, RunConfig(norm="bn", batch_size=32, epochs=1, data="synthetic"))  # a run finished before
    code, _, err = run_main(argv[:-4] + ["32", "64", "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 3 and f"; 1 of 2 runs have finished (see {tmp_path / 'results.md'}); run again with " \
                         "--restart" in err
    assert "1 of 2 runs finished" in (tmp_path / "results.md").read_text()

    code, _, err = run_main(argv + ["--restart"], capsys)
    assert code == 0, err
    assert run_lib.read_record(tmp_path / damaged.run_id)["history"]["test_acc"]


def test_summary_only_with_no_finished_run_says_so_and_writes_nothing(tmp_path, capsys):
    """Item 10: --summary-only on an empty folder printed an empty table ("| norm |  |")."""
    code, out, err = run_main(["batch", "--smoke", "--summary-only", "--out", str(tmp_path)], capsys)
    assert code == 0 and err == ""
    assert out.strip() == f"no finished runs of this grid in {tmp_path} (0 of 6): nothing to summarize"
    assert list(tmp_path.iterdir()) == []
    summary = study_report.summarize_grid([], small_grid())
    assert study_report.results_markdown(summary) == "# Test error vs batch size\n\nNo finished runs yet (0 of 2).\n"


def test_one_seed_has_no_spread_to_show():
    """Item 10: a one-seed table showed "85.02 ± 0.00 %" (results/fp16-check/results.md)."""
    from normstudy import report
    one, two = RunConfig("bn", epochs=1), RunConfig("bn", epochs=1, seed=1)
    row = report.results_table(report.summarize([full_record(one)])["cells"]).splitlines()[2]
    assert row.startswith("| BatchNorm | 512 | 48,736 | 1 | 50.00 % | 50.00 % | 50.00 % |") and "±" not in row
    row = report.results_table(report.summarize([full_record(one), full_record(two, acc=60.0)])["cells"]
                               ).splitlines()[2]
    assert row.startswith("| BatchNorm | 512 | 48,736 | 2 | 55.00 ± 7.07 % | 55.00 ± 7.07 % | 50.00 % |")


def test_data_goes_to_the_device_only_while_no_run_works_there(monkeypatch):
    """Found on the H200: a grid started in a process whose other grid was recording a run's CUDA
    graph copied its data to the GPU and synchronized the device mid-capture; the copy and the
    recording run both failed. The copy now waits until no run of the process works on the device."""
    from normstudy.runners import units
    from normstudy.runtime import DEVICE_LOCK
    tiny = data.load_synthetic_cifar10(n_train=8, n_test=4)
    monkeypatch.setattr(run_lib, "load_data", lambda config, **kw: tiny)
    datasets, moved = units.Datasets(device="cpu"), threading.Event()
    with DEVICE_LOCK.work():  # a run at work (e.g. recording its graph)
        thread = threading.Thread(target=lambda: (datasets.of(RunConfig(norm="bn", data="synthetic")), moved.set()))
        thread.start()
        assert not moved.wait(0.5), "the data went to the device while a run worked there"
    assert moved.wait(10)
    thread.join()
