"""The one summary of a folder of runs, as pure functions over records (plus two readers).

Runs that differ only by their seed form a *cell* (``RunConfig.cell``); a summary gives each
cell's figures per seed with their mean and spread. Runs whose configurations differ in anything
else (recipe, batch, groups, network choices, epochs, data) are never averaged together. Every finished run of a
folder is read here (:func:`load_records`, through :func:`run.read_record`), and every
``summary.json`` has the schema of :func:`summarize`, whichever command wrote it:

    schema    2
    kind      the study grid the folder holds (its tables and figures): "batch", "groups", or one of
              issue 20's "ghost", "order", "remedies"; or null
    metric    the figure the grid tables report ("test_error_last3_mean")
    runs      how many finished runs the folder holds: every one of them is in ``cells``
    cells     one per cell (:func:`summarize_cell`), ordered by norm, groups, choices, batch size
    plan      what the last grid command planned (``run_ids``, ``planned``, ``finished``,
              ``missing``), beside the whole, never instead of it; null when none did
    skipped   ``"path: why"`` for each run folder whose record is broken (not summarized)
    failed    ``{run id: why}`` for each unfinished run whose last attempt failed (its folder's
              ``failure.json``, :func:`run.note_failure`); absent in summaries written before it

A cell whose runs collapsed to chance (``run.collapsed``) is marked in the tables.

A cell of runs with network choices (issue 20, ``RunConfig.choices``: block order, ghost batches,
Batch Renorm, WS) carries them as keys beside ``norm`` and ``groups`` (``"norm_batch": 16``; absent
at their defaults, the seed's network, so summaries written before them read the same), and its
``variant`` and ``label`` say them (``BN + Batch Renorm``): a choice is part of the cell's variant.
"""
import json
import statistics
from pathlib import Path

from .config import CHOICES, NORMS, RunConfig, choice_words
from .run import CHANCE, COLLAPSE_MARGIN, FINAL, RunFolderError, collapsed, is_collapsed, read_failure, read_record

SCHEMA = 2
METRIC = "test_error_last3_mean"  # what the grid tables report (Wu & He report the error)
# Per-epoch curves a cell keeps (mean and spread over seeds): errors for the study's figures,
# losses for the comparison figure (whose accuracies are 100 minus the errors).
CURVES = {"train_error": ("train_acc", True), "test_error": ("test_acc", True),
          "train_loss": ("train_loss", False), "test_loss": ("test_loss", False)}


def load_records(out):
    """Every finished run directly under ``out`` (``out/<run id>/record.json``), in id order, and a
    list of ``"path: why"`` for the ones that are broken (skipped, never fatal)."""
    records, skipped = [], []
    for path in sorted(Path(out).glob("*/record.json")):
        try:
            records.append(read_record(path.parent))
        except RunFolderError as err:
            skipped.append(str(err))
    return records, skipped


def load_failures(out):
    """``{run id: why}`` for each run folder directly under ``out`` whose run has not finished and
    whose last attempt failed (:func:`run.read_failure`), in id order."""
    failures = {}
    for path in sorted(Path(out).glob("*/failure.json")):
        reason = read_failure(path.parent)
        if reason is not None and not (path.parent / "record.json").exists():
            failures[path.parent.name] = reason
    return failures


def load_summary(folder):
    """The ``summary.json`` in ``folder`` (any schema: older ones are read for their kind), or
    ``None`` when there is none; ``ValueError`` (one line) when it cannot be read."""
    path = Path(folder) / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err}); move it away to write a new summary") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: not a summary (a JSON object); move it away to write a new summary")
    return summary


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _stats(values):
    mean, std = mean_std(values)
    return {"values": list(values), "mean": mean, "std": std}


def _curve(lists):
    """Per-epoch mean and spread of several equally long lists."""
    pairs = [mean_std(values) for values in zip(*lists)]
    return {"mean": [m for m, _ in pairs], "std": [s for _, s in pairs]}


def variant_name(norm, groups, choices=None):
    """Short row name: ``BN``, ``LN`` or ``GN (G=4)``; with network choices (``RunConfig.choices``)
    e.g. ``BN + Batch Renorm``, ``GN (G=2) + WS`` or ``BN, statistics over 16 images``."""
    return ({"bn": "BN", "ln": "LN"}.get(norm) or f"GN (G={groups})") + "".join(choice_words(choices or {}))


def cell_choices(cell):
    """A summary cell's network choices (``RunConfig.choices``: only those that differ from the
    seed's network; ``{}`` for the seed's, and for every cell of a summary written before them)."""
    return {name: cell[name] for name in CHOICES if name in cell and cell[name] != CHOICES[name]}


def summarize_cell(records):
    """The summary of one cell's records (same ``RunConfig.cell``, one per seed): the config's
    fields (the network choices only where they differ from the seed's), per seed the run ids,
    devices and whether it collapsed, ``{"values", "mean", "std"}``
    for every final figure (:data:`run.FINAL`) and the test error (100 minus the accuracy), and
    the per-epoch :data:`CURVES`."""
    runs = sorted(((RunConfig.from_dict(r["config"]), r) for r in records), key=lambda run: run[0].seed)
    config, first = runs[0]
    if len({c.cell for c, _ in runs}) != 1:
        raise ValueError("summarize_cell: records of different cells")
    figures = {key: [r["final"][key] for _, r in runs] for key in FINAL}
    figures["test_error"] = [100.0 - a for a in figures["test_acc"]]
    figures["test_error_last3_mean"] = [100.0 - a for a in figures["test_acc_last3_mean"]]
    histories = [r["history"] for _, r in runs]
    return {
        "cell": config.cell, "variant": variant_name(config.norm, config.groups, config.choices),
        "label": config.label, "norm": config.norm, "groups": config.groups,
        **config.choices,  # the network choices: only those that differ from the seed's network
        "batch_size": config.batch_size, "epochs": config.epochs,
        "data": config.data, "overrides": dict(config.overrides), "holdout": config.holdout,
        "seeds": [c.seed for c, _ in runs], "run_ids": [c.run_id for c, _ in runs],
        "devices": sorted({r["device"] for _, r in runs}), "params": first["params"], "recipe": first["recipe"],
        "collapsed": [is_collapsed(r) for _, r in runs],  # per seed: at chance (run.collapsed)
        **{key: _stats(values) for key, values in figures.items()},
        "curves": {name: _curve([[100.0 - v if error else v for v in h[key]] for h in histories])
                   for name, (key, error) in CURVES.items()},
    }


def _cell_order(cell):
    """Table order: norm, groups, the seed's network before one with choices, batch size."""
    return NORMS.index(cell["norm"]), cell["groups"] or 0, cell_choices(cell) != {}, cell["batch_size"], cell["cell"]


def summarize(records, *, kind=None, plan=None, skipped=(), failed=None):
    """The summary of a folder's ``records`` (the schema in the module docstring).

    ``kind``: the study grid the folder holds, or ``None``. ``plan``: the run ids the last grid
    command planned (``None``: no plan); its ``finished`` and ``missing`` are counted against
    ``records``. ``skipped``: the broken run folders, named. ``failed``: ``{run id: why}`` of the
    unfinished runs whose last attempt failed (:func:`load_failures`)."""
    by_cell = {}
    for record in records:
        by_cell.setdefault(RunConfig.from_dict(record["config"]).cell, []).append(record)
    finished = {RunConfig.from_dict(r["config"]).run_id for r in records}
    return {"schema": SCHEMA, "kind": kind, "metric": METRIC, "runs": len(finished),
            "cells": sorted((summarize_cell(group) for group in by_cell.values()), key=_cell_order),
            "plan": None if plan is None else _plan(plan, finished), "skipped": list(skipped),
            "failed": dict(failed or {})}


def _plan(run_ids, finished):
    run_ids = list(dict.fromkeys(run_ids))
    missing = [run_id for run_id in run_ids if run_id not in finished]
    return {"run_ids": run_ids, "planned": len(run_ids), "finished": len(run_ids) - len(missing), "missing": missing}


def status_line(summary):
    """How many runs finished: "42 of 63 runs finished" against the last grid's plan (with the
    folder's runs outside it counted beside), else "9 runs finished"."""
    plan, runs = summary["plan"], summary["runs"]
    if plan is None:
        return f"{runs} run{'s' if runs != 1 else ''} finished"
    line = f"{plan['finished']} of {plan['planned']} runs finished"
    others = runs - plan["finished"]
    if others:
        line += f" (the last grid's plan; {others} more finished run{'s' if others != 1 else ''} in this folder)"
    return line


COLLAPSE_NOTE = (f"Collapsed: a run's test accuracy (mean of the last 3 epochs) within {COLLAPSE_MARGIN:g} point of "
                 f"chance ({CHANCE:g} %): the network learned nothing.")


def collapse_mark(flags):
    """The mark of a cell whose runs (``flags``: collapsed or not, per seed) collapsed to chance:
    "collapsed" when all did, "k of n collapsed" when some did, nothing otherwise."""
    count = sum(flags)
    if not count:
        return ""
    return " (collapsed)" if count == len(flags) else f" ({count} of {len(flags)} collapsed)"


def collapsed_runs(cell):
    """Per seed, whether the cell's run collapsed to chance; a summary written before the
    ``"collapsed"`` field existed is judged by its figures."""
    if "collapsed" in cell:
        return cell["collapsed"]
    return [collapsed({"test_acc_last3_mean": acc}) for acc in cell["test_acc_last3_mean"]["values"]]


def results_table(cells):
    """``cells`` (a summary's) as a markdown table, one row per cell, mean ± standard deviation
    over seeds (the mean alone for one seed: it has no spread to show)."""
    lines = ["| variant | batch | params | seeds | train acc (last epoch) | test acc (mean of last 3 epochs) "
             "| worst of last 3 | best test acc | test acc, flip TTA | s/epoch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        spread = len(c["seeds"]) > 1
        lines.append(f"| {c['label']} | {c['batch_size']} | {c['params']:,} | {len(c['seeds'])} | "
                     + " | ".join(f"{c[k]['mean']:.2f} ± {c[k]['std']:.2f} %" if spread else f"{c[k]['mean']:.2f} %"
                                  for k in ("train_acc", "test_acc_last3_mean"))
                     + f"{collapse_mark(collapsed_runs(c))} | {min(c['test_acc_last3_min']['values']):.2f} % | "
                     f"{max(c['test_acc_best']['values']):.2f} % | {c['test_acc_tta_flip']['mean']:.2f} % | "
                     f"{c['seconds_per_epoch']['mean']:.2f} |")
    if any(any(collapsed_runs(c)) for c in cells):
        lines += ["", COLLAPSE_NOTE]
    devices = sorted({d for c in cells for d in c["devices"]})
    return "\n".join(lines) + f"\n\nMean ± standard deviation over seeds; device: {', '.join(devices) or '?'}.\n"


def skipped_lines(summary):
    """The broken run folders a summary skipped and the unfinished runs whose last attempt
    failed, with why, as markdown lists (nothing when none)."""
    text = ""
    if summary["skipped"]:
        text += "\nSkipped (broken) runs:\n" + "".join(f"- {line}\n" for line in summary["skipped"])
    failed = summary.get("failed") or {}
    if failed:
        text += (f"\nFailed ({len(failed)} unfinished runs; why their last attempt ended):\n"
                 + "".join(f"- {run_id}: {why}\n" for run_id, why in failed.items()))
    return text


def comparison_histories(summary):
    """``{label: mean history}`` of a summary's cells, for ``plots.plot_comparison`` (the batch in
    the label when the cells differ in it)."""
    cells = summary["cells"]
    several_batches = len({c["batch_size"] for c in cells}) > 1

    def history(curves):
        return {"train_loss": curves["train_loss"]["mean"], "test_loss": curves["test_loss"]["mean"],
                "train_acc": [100.0 - e for e in curves["train_error"]["mean"]],
                "test_acc": [100.0 - e for e in curves["test_error"]["mean"]]}
    labels = [c["label"] + (f", batch {c['batch_size']}" if several_batches else "") for c in cells]
    if len(set(labels)) < len(labels):  # cells that differ beyond norm and batch: their ids tell them apart
        labels = [c["cell"] for c in cells]
    return {label: history(c["curves"]) for label, c in zip(labels, cells)}
