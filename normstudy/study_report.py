"""Summaries of the study's grids, as pure functions over records (plus :func:`load_summary`).

A *cell* is one variant (norm, and GroupNorm's group count) at one batch size: its runs differ
only by their seed (``RunConfig.cell``). Per cell the summary gives, over the seeds, the mean
and the standard deviation (n - 1; 0 for one seed) of

    test_acc               the last epoch's test accuracy (%)
    test_acc_last3_mean    the mean test accuracy of the last 3 epochs (%): less noisy
    test_error, test_error_last3_mean   100 minus each of them

and the mean and spread of the training and test error per epoch (for the curves). The tables
report ``test_error_last3_mean`` (:data:`METRIC`), laid out like Wu & He's *Group
Normalization* (2018): Table 2 (rows: norms, columns: batch sizes, plus a "GN − BN" row) for the
batch-size grid and Table 3 (columns: groups, plus BN) for the groups grid. A cell whose runs
collapsed to chance (``run.collapsed``; per seed in the cell's ``"collapsed"``) is marked in them.
"""
import json
import statistics
from pathlib import Path

from .config import CHANNELS, NORMS, RunConfig
from .report import COLLAPSE_NOTE, collapse_mark, mean_std
from .run import collapsed, is_collapsed

METRIC = "test_error_last3_mean"
METRICS = ("test_acc", "test_acc_last3_mean", "test_error", "test_error_last3_mean")


def variant_name(norm, groups):
    """Short row name: ``BN``, ``LN`` or ``GN (G=4)``."""
    return {"bn": "BN", "ln": "LN"}.get(norm) or f"GN (G={groups})"


def _stats(values):
    mean, std = mean_std(values)
    return {"values": list(values), "mean": mean, "std": std}


def _curve(lists):
    """Per-epoch mean and spread of several equally long lists."""
    pairs = [mean_std(values) for values in zip(*lists)]
    return {"mean": [m for m, _ in pairs], "std": [s for _, s in pairs]}


def summarize_cell(records):
    """The summary of one cell's records (same ``RunConfig.cell``, one per seed)."""
    runs = sorted(((RunConfig.from_dict(r["config"]), r) for r in records), key=lambda run: run[0].seed)
    config = runs[0][0]
    if len({c.cell for c, _ in runs}) != 1:
        raise ValueError("summarize_cell: records of different cells")
    finals = {"test_acc": [r["final"]["test_acc"] for _, r in runs],
              "test_acc_last3_mean": [r["final"]["test_acc_last3_mean"] for _, r in runs]}
    finals["test_error"] = [100.0 - a for a in finals["test_acc"]]
    finals["test_error_last3_mean"] = [100.0 - a for a in finals["test_acc_last3_mean"]]
    histories = [r["history"] for _, r in runs]
    return {
        "cell": config.cell, "variant": variant_name(config.norm, config.groups), "label": config.label,
        "norm": config.norm, "groups": config.groups, "batch_size": config.batch_size, "epochs": config.epochs,
        "data": config.data, "seeds": [c.seed for c, _ in runs], "run_ids": [c.run_id for c, _ in runs],
        "devices": sorted({r.get("device", "?") for _, r in runs}),
        "collapsed": [is_collapsed(r) for _, r in runs],  # per seed: at chance (run.collapsed)
        **{key: _stats(values) for key, values in finals.items()},
        "curves": {"train_error": _curve([[100.0 - a for a in h["train_acc"]] for h in histories]),
                   "test_error": _curve([[100.0 - a for a in h["test_acc"]] for h in histories])},
        "seconds_per_epoch": statistics.mean(r["final"]["seconds_per_epoch"] for _, r in runs),
    }


def _cell_order(cell):
    return NORMS.index(cell["norm"]), cell["groups"] or 0, cell["batch_size"], cell["cell"]


def infer_kind(cells):
    """``"groups"`` when the GroupNorm cells come in more than one group count, else ``"batch"``."""
    return "groups" if len({c["groups"] for c in cells if c["norm"] == "gn"}) > 1 else "batch"


def summarize_grid(records, configs=None, *, kind=None):
    """The summary of a grid: ``{"kind", "metric", "cells", "planned", "finished", "missing"}``.

    ``cells``: one :func:`summarize_cell` per cell, ordered by norm, groups and batch size.
    ``configs`` (the grid's planned runs, configs or their dicts) gives ``planned`` and
    ``missing`` (the run ids without a record). ``kind``: ``"batch"`` or ``"groups"`` (the table's
    layout; inferred from the cells when ``None``)."""
    by_cell = {}
    for record in records:
        by_cell.setdefault(RunConfig.from_dict(record["config"]).cell, []).append(record)
    cells = sorted((summarize_cell(group) for group in by_cell.values()), key=_cell_order)
    finished = {RunConfig.from_dict(r["config"]).run_id for r in records}
    planned = None if configs is None else [
        (c if isinstance(c, RunConfig) else RunConfig.from_dict(c)).run_id for c in configs]
    return {"kind": kind or infer_kind(cells), "metric": METRIC, "cells": cells,
            "planned": len(planned) if planned is not None else len(finished), "finished": len(finished),
            "missing": [run_id for run_id in planned if run_id not in finished] if planned is not None else []}


# --- tables -------------------------------------------------------------------------------------

def _value(cell, metric):
    if cell is None:
        return "—"
    stats = cell[metric]
    return (f"{stats['mean']:.2f}" + (f" ± {stats['std']:.2f}" if len(stats["values"]) > 1 else "")
            + collapse_mark(collapsed_runs(cell)))


def collapsed_runs(cell):
    """Per seed, whether the cell's run collapsed to chance; a summary written before the
    ``"collapsed"`` field existed is judged by its figures."""
    if "collapsed" in cell:
        return cell["collapsed"]
    return [collapsed({"test_acc_last3_mean": acc}) for acc in cell["test_acc_last3_mean"]["values"]]


def _variants(cells):
    """(norm, groups) of the cells, in table order."""
    return sorted({(c["norm"], c["groups"]) for c in cells}, key=lambda v: (NORMS.index(v[0]), v[1] or 0))


def batch_table(summary, metric=METRIC):
    """Table 2's layout: a row per variant, a column per batch size (ascending), values
    ``mean ± std`` over seeds in %; then a "GN − BN" row per GroupNorm variant (difference of the
    means; positive: GroupNorm's value is higher)."""
    cells = summary["cells"]
    batches = sorted({c["batch_size"] for c in cells})
    at = {(c["norm"], c["groups"], c["batch_size"]): c for c in cells}
    lines = ["| norm | " + " | ".join(str(b) for b in batches) + " |",
             "|---|" + "---:|" * len(batches)]
    variants = _variants(cells)
    for norm, groups in variants:
        lines.append(f"| {variant_name(norm, groups)} | "
                     + " | ".join(_value(at.get((norm, groups, b)), metric) for b in batches) + " |")
    gn_variants = [v for v in variants if v[0] == "gn"]
    if any(v[0] == "bn" for v in variants):
        for norm, groups in gn_variants:
            name = "GN − BN" if len(gn_variants) == 1 else f"GN (G={groups}) − BN"
            diffs = []
            for b in batches:
                gn, bn = at.get((norm, groups, b)), at.get(("bn", None, b))
                diffs.append("—" if gn is None or bn is None else f"{gn[metric]['mean'] - bn[metric]['mean']:+.2f}")
            lines.append(f"| {name} | " + " | ".join(diffs) + " |")
    return "\n".join(lines) + "\n"


def groups_table(summary, metric=METRIC):
    """Table 3's layout: a row per batch size (largest first), a column per group count G
    (ascending; channels per group = 32 / G: G=1 is LayerNorm, G=32 InstanceNorm) and BN; under
    each row a "Δ vs best" row: each value minus the row's best (lowest error, highest accuracy)."""
    cells = summary["cells"]
    groups = sorted({c["groups"] for c in cells if c["norm"] == "gn"})
    batches = sorted({c["batch_size"] for c in cells}, reverse=True)
    has_bn = any(c["norm"] == "bn" for c in cells)
    at = {(c["norm"], c["groups"], c["batch_size"]): c for c in cells}

    def head(g):
        return f"G={g}" + {1: " (LN)", CHANNELS: " (IN)"}.get(g, "")
    columns = [("gn", g) for g in groups] + ([("bn", None)] if has_bn else [])
    lines = ["| batch | " + " | ".join([head(g) for g in groups] + (["BN"] if has_bn else [])) + " |",
             "|---|" + "---:|" * len(columns),
             "| channels per group | " + " | ".join([str(CHANNELS // g) for g in groups] + (["—"] if has_bn else []))
             + " |"]
    best = min if metric.startswith("test_error") else max
    for b in batches:
        row = [at.get((norm, g, b)) for norm, g in columns]
        lines.append(f"| {b} | " + " | ".join(_value(c, metric) for c in row) + " |")
        present = [c[metric]["mean"] for c in row if c is not None]
        if present:
            top = best(present)
            lines.append(f"| {b}: Δ vs best | "
                         + " | ".join("—" if c is None else f"{c[metric]['mean'] - top:+.2f}" for c in row) + " |")
    return "\n".join(lines) + "\n"


_METRIC_WORDS = {
    "test_error_last3_mean": "test error (%) = 100 − the mean test accuracy of the last 3 epochs",
    "test_error": "test error (%) after the last epoch",
    "test_acc_last3_mean": "test accuracy (%), mean of the last 3 epochs",
    "test_acc": "test accuracy (%) after the last epoch",
}


def results_markdown(summary, *, title=None):
    """``results.md``: the grid's table (:func:`batch_table` or :func:`groups_table`) of
    :data:`METRIC`, the same for the last epoch alone, and which runs are missing."""
    kind = summary["kind"]
    table = batch_table if kind == "batch" else groups_table
    cells = summary["cells"]
    seeds = sorted({len(c["seeds"]) for c in cells})
    epochs = sorted({c["epochs"] for c in cells})
    devices = sorted({d for c in cells for d in c["devices"]})
    data = sorted({c["data"] for c in cells})
    title = title or ("Test error vs batch size" if kind == "batch" else "Test error vs number of groups")
    if not cells:  # no table to show, not an empty one
        return f"# {title}\n\nNo finished runs yet (0 of {summary['planned']}).\n"
    text = [f"# {title}", "",
            f"{summary['finished']} of {summary['planned']} runs finished; "
            f"epochs: {'/'.join(map(str, epochs)) or '?'}; seeds per cell: {'/'.join(map(str, seeds)) or '?'}; "
            f"data: {', '.join(data) or '?'}; device: {', '.join(devices) or '?'}.", "",
            f"Values: {_METRIC_WORDS[summary['metric']]}, mean ± standard deviation over seeds.", "",
            table(summary, summary["metric"]).rstrip(), "",
            f"The same, {_METRIC_WORDS['test_error']}:", "", table(summary, "test_error").rstrip()]
    if kind == "groups":
        text += ["", "G groups of 32/G channels each: G=1 is LayerNorm, G=32 InstanceNorm."]
    if any(any(collapsed_runs(cell)) for cell in cells):
        text += ["", COLLAPSE_NOTE]
    if summary["missing"]:
        text += ["", f"Missing ({len(summary['missing'])} runs not finished): "
                 + ", ".join(summary["missing"]) + "."]
    return "\n".join(text).rstrip() + "\n"


def load_summary(folder):
    """The ``summary.json`` a grid wrote into ``folder``, or ``None`` when there is none."""
    path = Path(folder) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None
