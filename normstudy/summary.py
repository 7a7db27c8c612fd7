"""The one writer of a folder's summary: ``summary.json`` (:mod:`normstudy.report`'s schema),
``results.md`` and the figures, all over every finished run in the folder, whichever command
writes them (train.py, the study, ``normstudy summarize``, ``scripts/redraw_figures.py``).

What a folder holds is its own, not the last command's: a folder that holds a study grid keeps
its kind (the grid's tables and figures) whatever command writes next, and a command that plans
no grid (train.py, summarize, a redraw) keeps the grid's plan, counted afresh. A grid command
replaces the plan with its own; the whole is reported either way.
"""
import contextlib
from pathlib import Path

from . import checkpoints
from . import report
from . import study_report

# The figures of each grid kind (the study's); a folder without a kind gets comparison.png.
FIGURES = {"batch": ("test_error_vs_batch.png", "bn_vs_gn_curves.png"), "groups": ("accuracy_vs_groups.png",)}


def write_summary(out, *, kind=None, plan=None, figures=True):
    """Summarize every finished run in ``out`` (:func:`report.load_records`) into
    ``out/summary.json``, ``out/results.md`` and, with ``figures``, the figures; return the text of
    ``results.md``, or ``None`` (and write nothing) when ``out`` holds no finished run.

    ``kind``: the grid the writing command runs (``"batch"`` or ``"groups"``); it names the folder's
    kind only when the folder has none yet. ``plan``: the run ids the command planned, or ``None``
    to keep the plan the folder's summary has. The folder's lock is held throughout: of two
    commands writing at once, the one that writes last has read every record the other wrote."""
    out = Path(out)
    if not any(out.glob("*/record.json")):
        return None  # checked before the lock: a folder without runs is left as it is, no .lock in it
    with folder_lock(out):
        previous = report.load_summary(out)
        records, skipped = report.load_records(out)
        if not records:
            return None
        summary = report.summarize(records, kind=folder_kind(previous) or kind,
                                   plan=plan if plan is not None else folder_plan(previous), skipped=skipped)
        checkpoints.write_json(out / "summary.json", summary)
        text = markdown(summary)
        checkpoints.write_text(out / "results.md", text)
        if figures:
            write_figures(out, summary)
    return text


def folder_kind(summary):
    """The grid kind a folder's summary (any schema, or ``None``) names, else ``None``."""
    if not isinstance(summary, dict) or "cells" not in summary:
        return None  # none, or train.py's summary from before the one schema ({cell: {...}})
    return summary.get("kind") if summary.get("kind") in FIGURES else None


def folder_plan(summary):
    """The run ids a folder's summary says the last grid command planned, else ``None`` (also for
    a summary from before the one schema, which kept only the counts)."""
    plan = summary.get("plan") if isinstance(summary, dict) and summary.get("schema") == report.SCHEMA else None
    return plan["run_ids"] if isinstance(plan, dict) and isinstance(plan.get("run_ids"), list) else None


def markdown(summary):
    """``results.md``: a grid folder's tables (:func:`study_report.results_markdown`), or for any
    other folder the per-cell table (:func:`report.results_table`); broken runs named either way."""
    if summary["kind"] is not None:
        return study_report.results_markdown(summary)
    return report.results_table(summary["cells"]) + report.skipped_lines(summary)


def write_figures(out, summary):
    """The figures of ``summary`` into ``out``. A grid (drawn from its largest setting,
    :func:`study_report.partitions`, so a quicker grid added beside it never redraws it): for the
    batch grid the test error against the batch size and BN vs GN training curves at the smallest
    batch that has both; for the groups grid the accuracy against the number of groups. Any other
    folder with several cells: ``comparison.png``, the mean curves of each cell."""
    from . import plots
    out = Path(out)
    if summary["kind"] is None:
        if len(summary["cells"]) > 1:
            checkpoints.save_figure(out / "comparison.png",
                                    plots.plot_comparison(report.comparison_histories(summary)))
        return
    (_, cells), *_ = study_report.partitions(summary["cells"])
    if summary["kind"] == "batch":
        checkpoints.save_figure(out / "test_error_vs_batch.png", plots.error_vs_batch(cells))
        norms_at = {}
        for cell in cells:
            norms_at.setdefault(cell["batch_size"], set()).add(cell["norm"])
        if any({"bn", "gn"} <= norms for norms in norms_at.values()):
            checkpoints.save_figure(out / "bn_vs_gn_curves.png", plots.bn_vs_gn_curves(cells))
    else:
        checkpoints.save_figure(out / "accuracy_vs_groups.png", plots.accuracy_vs_groups(cells))


@contextlib.contextmanager
def folder_lock(out):
    """Hold ``out/.lock`` while a summary is read and written (nothing where ``fcntl`` is missing,
    i.e. on Windows). Not re-entrant: take it once."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
