"""Issue 20's grids (ghost, order, remedies): the runs they plan, their refusals, their summaries,
tables and figures from fake records, and one smoke grid through the command."""
import json
import re

import matplotlib.pyplot as plt
import pytest

from normstudy import command
from normstudy import data
from normstudy import plots
from normstudy import run as run_lib
from normstudy import study
from normstudy import study_report
from normstudy import summary as summary_lib
from normstudy.config import RunConfig
from conftest import call_main, fake_record, write_fake_record


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def args(*argv):
    """The grid ``normstudy study ARGV`` would run (a dry run: nothing trains)."""
    return study.configs_from_args(study.parse_args(list(argv)))


# --- the runs each grid plans -------------------------------------------------------------------

def test_ghost_grid_is_statistics_only_at_512_and_wu_and_hes_8_gpus():
    grid = args("ghost")
    assert len(grid) == len({c.run_id for c in grid}) == 30
    assert {c.norm for c in grid} == {"bn"} and {c.epochs for c in grid} == {20}
    assert {(c.norm_batch, c.batch_size, c.seed) for c in grid} == {
        (n, b, s) for n in (2, 4, 8, 16, 32) for b in (512, 8 * n) for s in (0, 1, 2)}
    assert grid[0].run_id == "bn-ghost2-b512-e20-s0"
    assert "bn-ghost32-b256-e20-s2" in {c.run_id for c in grid}
    assert len(args("ghost", "--norm-batches", "4", "--batch-sizes", "256", "512", "--seeds", "0")) == 3
    smoke = args("ghost", "--smoke")
    assert {c.run_id for c in smoke} == {"bn-ghost32-b512-e1-s0-synthetic", "bn-ghost64-b512-e1-s0-synthetic",
                                         "bn-ghost32-b256-e1-s0-synthetic"}  # n = 64 at 512 is also 8n: one run


def test_order_grid_is_both_orders_of_gn_and_bn_at_512_and_16():
    grid = args("order")
    assert len(grid) == len({c.run_id for c in grid}) == (6 + 1) * 2 * 2 * 3
    assert {(c.norm, c.groups, c.order, c.batch_size) for c in grid} == {
        (norm, g, order, b) for norm, g in [("bn", None)] + [("gn", g) for g in (1, 2, 4, 8, 16, 32)]
        for order in ("relu-norm", "norm-relu") for b in (512, 16)}
    # the seed's order is the groups grid's runs: the same ids, so their finished folders count
    seeds_order = {c.run_id for c in grid if c.order == "relu-norm"}
    assert seeds_order == {c.run_id for c in study.groups_grid(batch_sizes=(512, 16))}
    assert [c.run_id for c in grid[:2]] == ["bn-b512-e20-s0", "bn-normrelu-b512-e20-s0"]
    assert len(args("order", "--groups", "1", "32", "--batch-sizes", "4", "--seeds", "0")) == 6


def test_remedies_grid_is_batch_renorm_and_weight_standardization_at_every_batch():
    grid = args("remedies")
    assert len(grid) == len({c.run_id for c in grid}) == 81
    assert {(c.norm, c.groups, tuple(c.choices.items())) for c in grid} == {
        ("bn", None, (("renorm", True),)), ("ln", 1, (("ws", True),)), ("gn", 2, (("ws", True),))}
    assert {c.batch_size for c in grid} == {2, 4, 8, 16, 32, 64, 128, 256, 512}
    assert {c.groups for c in args("remedies", "--groups", "8") if c.norm == "gn"} == {8}


@pytest.mark.parametrize("argv, pattern", [
    (["ghost", "--norm-batches", "3"], r"norm_batch=3 must divide the batch size 512"),
    (["ghost", "--groups", "4"], r"--groups applies to GroupNorm only: the ghost grid is BatchNorm"),
    (["ghost", "--norms", "bn"], r"--norms applies to the batch grid only \(the ghost grid has its own norms\)"),
    (["batch", "--norm-batches", "4"], r"--norm-batches applies to the ghost grid only"),
    (["order", "--reference", "results/batch-size"], r"--reference applies to the ghost and remedies grids only"),
    (["remedies", "--groups", "1", "2"], r"--groups: the remedies grid takes one group count"),
    (["order", "--groups", "3"], r"groups=3 must divide the 32 channels"),
])
def test_bad_input_to_the_new_grids_is_one_line_and_exit_2(argv, pattern, tmp_path, capsys):
    code, _, err = call_main(study.main, argv + ["--quiet", "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


def test_summary_only_of_an_unrun_grid_says_so(tmp_path, capsys):
    for grid, planned in (("ghost", 30), ("order", 84), ("remedies", 81)):
        code, out, err = call_main(study.main, [grid, "--summary-only", "--out", str(tmp_path / grid)], capsys)
        assert code == 0, err
        assert f"(0 of {planned}): nothing to summarize" in out


# --- summaries, tables and figures from fake records ---------------------------------------------

def record(acc, epochs=3, **fields):
    return fake_record(RunConfig(epochs=epochs, **fields), acc)


def write_folder(out, records, grid, *, kind, **kwargs):
    """``records`` as finished runs in ``out``, then its summary by the one writer with ``grid``
    as the plan."""
    for r in records:
        write_fake_record(out, RunConfig.from_dict(r["config"]), acc=r["final"]["test_acc"])
    return summary_lib.write_summary(out, kind=kind, plan=[c.run_id for c in grid], **kwargs)


def reference_folder(tmp_path):
    """A batch grid's folder (its summary) with plain BN, LN and GN at batches 2, 16 and 512."""
    records = [record(acc, norm=norm, batch_size=b, seed=s) for norm, acc in (("bn", 80.0), ("ln", 78.0), ("gn", 79.0))
               for b in (2, 16, 512) for s in (0, 1)]
    write_folder(tmp_path / "batch-size", records, study.batch_grid(batch_sizes=(2, 16, 512), seeds=(0, 1), epochs=3),
                 kind="batch", figures=False)
    return tmp_path / "batch-size"


def test_ghost_summary_table_and_figure_with_the_batch_grids_line(tmp_path, monkeypatch):
    records = [record(70.0 + n, norm="bn", norm_batch=n, batch_size=b, seed=s)
               for n in (2, 16) for b in (512, 8 * n) for s in (0, 1)]
    summary = study_report.summarize_grid(records, kind="ghost")
    cell = summary["cells"][0]
    assert cell["norm_batch"] == 2 and cell["variant"] == "BN, statistics over 2 images"
    assert study_report.ghost_table(summary).splitlines() == [
        "| BatchNorm | n=2 | n=16 |", "|---|---:|---:|",
        "| statistics over n, batch 512 | 28.00 ± 0.00 | 14.00 ± 0.00 |",
        "| statistics over n, batch 8n (8 GPUs) | 28.00 ± 0.00 | 14.00 ± 0.00 |"]
    text = study_report.results_markdown(summary)
    assert text.startswith("# BatchNorm: statistics or steps?") and "n: images per BatchNorm statistic" in text
    reference = reference_folder(tmp_path)
    out = tmp_path / "ghost"
    write_folder(out, records, study.ghost_grid(norm_batches=(2, 16), seeds=(0, 1), epochs=3), kind="ghost",
                 reference=reference)
    assert (out / "statistics_or_steps.png").stat().st_size > 0 and "8 of 8 runs finished" in (out / "results.md").read_text()
    ax, = plots.error_vs_norm_batch(summary_lib.reference_cells(reference) + summary["cells"],
                                    arrangement=study_report.arrangement).axes
    assert [line.get_label() for line in ax.lines] == [
        "batch n: statistics and steps (the batch-size grid)",
        "statistics over n, optimizer batch 512 (statistics only)",
        "statistics over n, optimizer batch 8n (Wu & He's 8 GPUs)"]
    assert list(ax.lines[0].get_xdata()) == [2, 16, 512] and list(ax.lines[2].get_xdata()) == [2, 16]
    assert ax.get_xscale() == "log"
    assert summary_lib.reference_cells(tmp_path / "nowhere") == []  # no batch grid: two lines, no error
    figures = []
    monkeypatch.setattr(plots, "error_vs_norm_batch", lambda cells, **kwargs: figures.append(cells) or plt.figure())
    other_epochs = [record(70.0, epochs=2, norm="bn", norm_batch=2, batch_size=512)]
    summary_lib.write_figures(out, study_report.summarize_grid(other_epochs, kind="ghost"), reference=reference)
    assert [c["cell"] for c in figures[0]] == ["bn-ghost2-b512-e2"]  # the batch grid's 3-epoch runs left out


def test_order_table_and_figure_show_both_orders(tmp_path):
    records = [record(80.0 + (order == "norm-relu"), norm="gn", groups=g, order=order, batch_size=b)
               for g in (1, 32) for order in ("relu-norm", "norm-relu") for b in (16, 512)]
    records += [record(82.0, norm="bn", order=order, batch_size=b) for order in ("relu-norm", "norm-relu")
                for b in (16, 512)]
    summary = study_report.summarize_grid(records, kind="order")
    lines = study_report.order_table(summary).splitlines()
    assert lines[:3] == ["| batch | order | G=1 (LN) | G=32 (IN) | BN |", "|---|---|---:|---:|---:|",
                         "| 512 | Conv→ReLU→Norm | 20.00 | 20.00 | 18.00 |"]
    assert lines[3] == "| 512 | Conv→Norm→ReLU | 19.00 | 19.00 | 18.00 |"
    assert lines[4] == "| 512 | Norm→ReLU − ReLU→Norm | -1.00 | -1.00 | +0.00 |"
    assert len(lines) == 8 and study_report.results_markdown(summary).startswith("# Block order")
    fig = plots.error_vs_groups_by_order(summary["cells"])
    assert [ax.get_title() for ax in fig.axes] == ["batch 512", "batch 16"]
    assert [line.get_label() for line in fig.axes[0].lines] == [
        "GN, Conv→ReLU→Norm", "BN, Conv→ReLU→Norm", "GN, Conv→Norm→ReLU", "BN, Conv→Norm→ReLU"]
    summary_lib.write_figures(tmp_path, summary)
    assert (tmp_path / "order_vs_groups.png").is_file()


def test_remedies_table_keeps_each_remedy_apart_and_the_figure_adds_the_plain_norms(tmp_path):
    records = [record(75.0, norm="bn", renorm=True, batch_size=b) for b in (2, 512)]
    records += [record(77.0, norm=norm, ws=True, batch_size=b) for norm in ("ln", "gn") for b in (2, 512)]
    summary = study_report.summarize_grid(records, kind="remedies")
    assert study_report.batch_table(summary).splitlines() == [
        "| norm | 2 | 512 |", "|---|---:|---:|", "| BN + Batch Renorm | 25.00 | 25.00 |",
        "| LN + WS | 23.00 | 23.00 |", "| GN (G=2) + WS | 23.00 | 23.00 |"]  # no "GN − BN" between remedies
    reference = reference_folder(tmp_path)
    (tmp_path / "remedies").mkdir()
    summary_lib.write_figures(tmp_path / "remedies", summary, reference=reference)
    assert (tmp_path / "remedies" / "test_error_vs_batch.png").is_file()
    plain = [c for c in summary_lib.reference_cells(reference) if c["batch_size"] in (2, 512)]
    ax, = plots.error_vs_batch(plain + summary["cells"]).axes
    assert [(line.get_label(), line.get_linestyle()) for line in ax.lines] == [
        ("BN", "-"), ("BN + Batch Renorm", "--"), ("LN", "-"), ("LN + WS", "--"), ("GN (G=2)", "-"),
        ("GN (G=2) + WS", "--")]
    # with plain BN in the same table, the GN − BN row compares the plain norms only
    both = study_report.summarize_grid(records + [record(80.0, norm="bn", batch_size=2), record(79.0, norm="gn",
                                                                                               batch_size=2)])
    assert study_report.batch_table(both).splitlines()[-1] == "| GN − BN | +1.00 | — |"


def test_summarize_redraws_a_question_grids_folder(tmp_path, capsys):
    out = tmp_path / "order"
    grid = study.order_grid(groups=(2,), batch_sizes=(512,), seeds=(0,), epochs=3)
    for config in grid:
        write_fake_record(out, config)
    summary_lib.write_summary(out, kind="order", plan=[c.run_id for c in grid], figures=False)
    code, _, err = call_main(command.main, ["summarize", str(out)], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["kind"] == "order"
    assert (out / "order_vs_groups.png").is_file()


# --- one smoke grid through the command ---------------------------------------------------------

def test_the_ghost_grid_trains_through_the_command(tmp_path, capsys, monkeypatch):
    tiny = data.load_synthetic_cifar10(n_train=128, n_test=64)
    monkeypatch.setattr(run_lib, "load_data", lambda config, **kwargs: tiny)
    out = tmp_path / "ghost"
    code, text, err = call_main(study.main, ["ghost", "--smoke", "--norm-batches", "16", "--batch-sizes", "64",
                                             "--reference", str(tmp_path / "none"), "--out", str(out)], capsys)
    assert code == 0, err
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"bn-ghost16-b64-e1-s0-synthetic",
                                                             "bn-ghost16-b128-e1-s0-synthetic"}
    assert (out / "statistics_or_steps.png").is_file() and "| statistics over n, batch 64 |" in text


# --- one schema, one writer: choices in a folder of another kind ---------------------------------

def test_a_choice_never_takes_a_plain_cells_place_in_a_grids_tables_and_figures(tmp_path, capsys, monkeypatch):
    # A GN + WS run (and a Conv -> Norm -> ReLU one) trained into the groups grid's folder: same
    # setting, same norm, groups and batch as a grid cell; each keeps its own place.
    out = tmp_path / "groups"
    grid = study.groups_grid(groups=(2, 4), batch_sizes=(512,), seeds=(0,), epochs=3)
    write_folder(out, [record(80.0, norm=c.norm, groups=c.groups, batch_size=512) for c in grid], grid,
                 kind="groups", figures=False)
    for config in (RunConfig(norm="gn", groups=2, ws=True, batch_size=512, epochs=3),
                   RunConfig(norm="gn", groups=2, order="norm-relu", batch_size=512, epochs=3)):
        write_fake_record(out, config, acc=60.0)
    drawn = []
    real = plots.accuracy_vs_groups
    monkeypatch.setattr(plots, "accuracy_vs_groups", lambda cells, **kwargs: drawn.append(cells) or real(cells, **kwargs))
    code, _, err = call_main(command.main, ["summarize", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "groups" and summary["runs"] == 5
    by_cell = {c["cell"]: c for c in summary["cells"]}
    assert by_cell["gn-g2-ws-b512-e3"]["ws"] is True and by_cell["gn-g2-ws-b512-e3"]["variant"] == "GN (G=2) + WS"
    assert by_cell["gn-g2-normrelu-b512-e3"]["order"] == "norm-relu"
    assert not {"order", "norm_batch", "renorm", "ws"} & set(by_cell["gn-g2-b512-e3"])  # absent at the defaults
    text = (out / "results.md").read_text()
    table, rest = text.split("Runs this layout has no place for:")
    assert "| 512 | 20.00 | 20.00 | 20.00 |" in table and "40.00" not in table  # the grid's cells, in their places
    assert "GroupNorm (2 groups) + WS" in rest and "GroupNorm (2 groups), Conv→Norm→ReLU" in rest
    assert {c["cell"] for c in drawn[-1]} == {c.cell for c in grid}  # the figure: the grid's cells only


def test_the_study_summary_of_a_ghost_folder_is_the_one_schema(tmp_path, capsys):
    out = tmp_path / "ghost"
    grid = study.ghost_grid(norm_batches=(2,), batch_sizes=(512,), seeds=(0,), epochs=3)
    for config in grid:
        write_fake_record(out, config, acc=70.0)
    code, _, err = call_main(study.main, ["ghost", "--norm-batches", "2", "--seeds", "0", "--epochs", "3",
                                          "--summary-only", "--quiet", "--reference", str(tmp_path / "none"),
                                          "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schema"] == 2 and summary["kind"] == "ghost" and summary["plan"]["planned"] == 2
    assert [c["norm_batch"] for c in summary["cells"]] == [2, 2]
    assert (out / "statistics_or_steps.png").is_file()
    # train.py into it keeps the ghost grid's kind, tables and figure (the one writer)
    code, _, err = call_main(study.main, ["batch", "--norms", "bn", "--batch-sizes", "512", "--seeds", "0",
                                          "--epochs", "3", "--summary-only", "--quiet", "--out", str(out)], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["kind"] == "ghost"
