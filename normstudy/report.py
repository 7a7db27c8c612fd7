"""Summaries of finished runs, as pure functions over records (plus one that reads a folder).

Runs that differ only by their seed form a *cell* (``RunConfig.cell``); a summary gives each
cell's values per seed and their mean and spread. Runs whose configurations differ in anything
else (recipe, batch, groups, data) are never averaged together. A cell whose runs collapsed to
chance (``run.collapsed``) is marked in the table, next to its test accuracy.
"""
import json
import statistics
from pathlib import Path

from . import checkpoints
from .config import NORMS, RunConfig
from .run import CHANCE, COLLAPSE_MARGIN, check_record, is_collapsed


def load_records(out):
    """Every finished run directly under ``out`` (``out/<run id>/record.json``), in id order, and a
    list of ``"path: why"`` for the ones that are broken (skipped, never fatal)."""
    records, skipped = [], []
    for path in sorted(Path(out).glob("*/record.json")):
        try:
            record = json.loads(path.read_text())
            check_record(record)
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as err:
            skipped.append(f"{path}: {err}")
            continue
        records.append(record)
    return records, skipped


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records):
    """``{cell: {...}}`` in a stable order (norm, groups, batch): the cell's config fields, the
    seeds, and per seed the final figures of ``run.summary_figures`` plus flip-TTA accuracy."""
    cells = {}
    for record in records:
        config = RunConfig.from_dict(record["config"])
        cells.setdefault(config.cell, []).append((config, record))
    summary = {}
    for cell, runs in sorted(cells.items(), key=lambda item: (NORMS.index(item[1][0][0].norm), item[1][0][0].groups or 0,
                                                               item[1][0][0].batch_size, item[0])):
        runs.sort(key=lambda run: run[0].seed)
        config, first = runs[0]
        summary[cell] = {
            "label": config.label, "norm": config.norm, "groups": config.groups, "batch_size": config.batch_size,
            "epochs": config.epochs, "params": first["params"], "seeds": [c.seed for c, _ in runs],
            **{key: [r["final"][key] for _, r in runs] for key in first["final"]},
            "collapsed": [is_collapsed(r) for _, r in runs],
            "device": first["device"], "recipe": first["recipe"],
        }
    return summary


def mean_history(records, cell):
    """Per-epoch mean over the seeds of one cell, for comparison figures."""
    hists = [r["history"] for r in records if RunConfig.from_dict(r["config"]).cell == cell]
    return {key: [statistics.mean(v) for v in zip(*(h[key] for h in hists))] for key in hists[0]}


COLLAPSE_NOTE = (f"Collapsed: a run's test accuracy (mean of the last 3 epochs) within {COLLAPSE_MARGIN:g} point of "
                 f"chance ({CHANCE:g} %): the network learned nothing.")


def collapse_mark(flags):
    """The mark of a cell whose runs (``flags``: collapsed or not, per seed) collapsed to chance:
    "collapsed" when all did, "k of n collapsed" when some did, nothing otherwise."""
    count = sum(flags)
    if not count:
        return ""
    return " (collapsed)" if count == len(flags) else f" ({count} of {len(flags)} collapsed)"


def results_table(summary):
    """The summary as a markdown table, one row per cell, mean ± standard deviation over seeds (the
    mean alone for one seed: it has no spread to show)."""
    lines = ["| variant | batch | params | seeds | train acc (last epoch) | test acc (mean of last 3 epochs) "
             "| worst of last 3 | best test acc | test acc, flip TTA | s/epoch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary.values():
        cells = [mean_std(s[k]) for k in ("train_acc", "test_acc_last3_mean")]
        lines.append(f"| {s['label']} | {s['batch_size']} | {s['params']:,} | {len(s['seeds'])} | "
                     + " | ".join(f"{m:.2f} ± {sd:.2f} %" if len(s["seeds"]) > 1 else f"{m:.2f} %"
                                  for m, sd in cells)
                     + f"{collapse_mark(s['collapsed'])} | {min(s['test_acc_last3_min']):.2f} % | "
                     f"{max(s['test_acc_best']):.2f} % | "
                     f"{statistics.mean(s['test_acc_tta_flip']):.2f} % | "
                     f"{statistics.mean(s['seconds_per_epoch']):.2f} |")
    if any(any(s["collapsed"]) for s in summary.values()):
        lines += ["", COLLAPSE_NOTE]
    devices = sorted({s["device"] for s in summary.values()})
    return "\n".join(lines) + f"\n\nMean ± standard deviation over seeds; device: {', '.join(devices) or '?'}.\n"


def write_summary(out):
    """``summary.json``, ``results.md`` and (with several cells) ``comparison.png`` over every
    finished run under ``out``; returns the table's text (with a line per skipped run)."""
    out = Path(out)
    records, skipped = load_records(out)
    summary = summarize(records)
    checkpoints.write_json(out / "summary.json", summary)
    table = results_table(summary)
    if skipped:
        table += "\nSkipped (broken) runs:\n" + "".join(f"- {line}\n" for line in skipped)
    checkpoints.write_text(out / "results.md", table)
    if len(summary) > 1:
        from . import plots
        checkpoints.save_figure(out / "comparison.png", plots.plot_comparison(
            {s["label"] + (f", batch {s['batch_size']}" if len({t["batch_size"] for t in summary.values()}) > 1 else ""):
             mean_history(records, cell) for cell, s in summary.items()}))
    return table
