"""The one writer of a folder's summary: ``summary.json`` (:mod:`normstudy.report`'s schema),
``results.md`` and the figures, all over every finished run in the folder, whichever command
writes them (train.py, the study, ``normstudy summarize``, ``scripts/redraw_figures.py``).

What a folder holds is its own, not the last command's: a folder that holds a study grid keeps
its kind (the grid's tables and figures) whatever command writes next, and a command that plans
no grid (train.py, summarize, a redraw) keeps the grid's plan, counted afresh. A grid command
replaces the plan with its own; the whole is reported either way.

Every grid kind is written here, issue 20's too: ``ghost`` and ``remedies`` figures add the batch
grid's lines from a reference folder (``reference``, default :data:`REFERENCE`; not kept in the
summary, so a later writer uses the default).
"""
import contextlib
from pathlib import Path

from . import checkpoints
from . import report
from . import study_report

# The figures of each grid kind (the study's: issue 12's batch and groups, issue 20's ghost, order
# and remedies); a folder without a kind gets comparison.png.
FIGURES = {"batch": ("test_error_vs_batch.png", "bn_vs_gn_curves.png"), "groups": ("accuracy_vs_groups.png",),
           "ghost": ("statistics_or_steps.png",), "order": ("order_vs_groups.png",),
           "remedies": ("test_error_vs_batch.png",)}
# The batch grid's folder whose lines the ghost and remedies figures add (relative to the working
# directory, as the study's --out is), when it has a batch grid's summary.
REFERENCE = "results/batch-size"


def write_summary(out, *, kind=None, plan=None, figures=True, reference=None):
    """Summarize every finished run in ``out`` (:func:`report.load_records`) into
    ``out/summary.json``, ``out/results.md`` and, with ``figures``, the figures; return the text of
    ``results.md``, or ``None`` (and write nothing) when ``out`` holds no finished run.

    ``kind``: the grid the writing command runs (one of :data:`FIGURES`); it names the folder's
    kind only when the folder has none yet. ``plan``: the run ids the command planned, or ``None``
    to keep the plan the folder's summary has. ``reference``: the batch grid's folder for the
    ghost and remedies figures (default :data:`REFERENCE`; see :func:`write_figures`). The
    folder's lock is held throughout: of two commands writing at once, the one that writes last
    has read every record the other wrote."""
    out = Path(out)
    if not any(out.glob("*/record.json")):
        return None  # checked before the lock: a folder without runs is left as it is, no .lock in it
    with folder_lock(out):
        previous = report.load_summary(out)
        records, skipped = report.load_records(out)
        if not records:
            return None
        summary = report.summarize(records, kind=folder_kind(previous) or kind,
                                   plan=plan if plan is not None else folder_plan(previous), skipped=skipped,
                                   failed=report.load_failures(out))
        checkpoints.write_json(out / "summary.json", summary)
        text = markdown(summary)
        checkpoints.write_text(out / "results.md", text)
        if figures:
            write_figures(out, summary, reference=reference)
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


def write_figures(out, summary, *, reference=None):
    """The figures of ``summary`` into ``out``. A grid is drawn from its largest setting
    (:func:`study_report.partitions`, so a quicker grid added beside it never redraws it), from the
    cells its layout places (:func:`study_report.placed`: a cell of other network choices never
    takes another's line): for the batch grid the test error against the batch size and BN vs GN
    training curves at the smallest batch that has both; for the groups grid the accuracy against
    the number of groups; for issue 20's grids their figure (:func:`question_figure`). Any other
    folder with several cells: ``comparison.png``, the mean curves of each cell."""
    from . import plots
    out = Path(out)
    if summary["kind"] is None:
        if len(summary["cells"]) > 1:
            checkpoints.save_figure(out / "comparison.png",
                                    plots.plot_comparison(report.comparison_histories(summary)))
        return
    (_, cells), *_ = study_report.partitions(summary["cells"])
    cells, _ = study_report.placed(summary["kind"], cells)
    if not cells:
        return
    if summary["kind"] == "batch":
        checkpoints.save_figure(out / "test_error_vs_batch.png", plots.error_vs_batch(cells))
        norms_at = {}
        for cell in cells:
            norms_at.setdefault(cell["batch_size"], set()).add(cell["norm"])
        if any({"bn", "gn"} <= norms for norms in norms_at.values()):
            checkpoints.save_figure(out / "bn_vs_gn_curves.png", plots.bn_vs_gn_curves(cells))
    elif summary["kind"] == "groups":
        checkpoints.save_figure(out / "accuracy_vs_groups.png", plots.accuracy_vs_groups(cells))
    else:
        (name,) = FIGURES[summary["kind"]]
        checkpoints.save_figure(out / name, question_figure(summary["kind"], cells, reference=reference))


def question_figure(kind, cells, *, reference=None):
    """The figure of one of issue 20's grids (``kind``: ghost, order or remedies) over ``cells``;
    ghost and remedies with the batch grid's lines (plain BN; BN, LN and GN) from the folder
    ``reference`` (:func:`reference_cells`), only those of the same data and epochs as ``cells``
    (a smoke grid's never beside real runs)."""
    from . import plots
    alike = {(c["data"], c["epochs"]) for c in cells}
    others = [c for c in reference_cells(reference) if (c["data"], c["epochs"]) in alike]
    if kind == "ghost":
        return plots.error_vs_norm_batch(others + cells, arrangement=study_report.arrangement)
    if kind == "order":
        return plots.error_vs_groups_by_order(cells)
    batches = {c["batch_size"] for c in cells}
    plain = [c for c in others if not report.cell_choices(c) and c["batch_size"] in batches]
    return plots.error_vs_batch(plain + cells, title="Test error vs batch size, with the remedies (dashed)")


def reference_cells(reference=None):
    """The cells of the batch grid in folder ``reference`` (default :data:`REFERENCE`), whose lines
    the ghost and remedies figures add; ``[]`` when it has no batch grid's summary (or an
    unreadable one: a figure is never refused for it)."""
    try:
        summary = report.load_summary(reference or REFERENCE)
    except ValueError:
        return []
    return summary["cells"] if folder_kind(summary) == "batch" else []


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
