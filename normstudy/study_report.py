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

Issue 20's grids: a cell of runs with network choices (``RunConfig.choices``: block order, ghost
batches, Batch Renorm, WS) carries them as keys (``"norm_batch": 16``; absent for the seed's
network, so earlier summaries read the same) and its variant says them (``BN + Batch Renorm``).
Tables: :func:`ghost_table` (a column per normalization batch n), :func:`order_table` (Table 3 in
each block order) and, for the remedies, :func:`batch_table` with a row per remedy.
"""
import json
import statistics
from pathlib import Path

from .config import CHANNELS, CHOICES, NORMS, RunConfig, choice_words
from .report import COLLAPSE_NOTE, collapse_mark, mean_std
from .run import collapsed, is_collapsed

METRIC = "test_error_last3_mean"
METRICS = ("test_acc", "test_acc_last3_mean", "test_error", "test_error_last3_mean")


def variant_name(norm, groups, choices=None):
    """Short row name: ``BN``, ``LN`` or ``GN (G=4)``; with network choices (``RunConfig.choices``)
    e.g. ``BN + Batch Renorm``, ``GN (G=2) + WS`` or ``BN, statistics over 16 images``."""
    return ({"bn": "BN", "ln": "LN"}.get(norm) or f"GN (G={groups})") + "".join(choice_words(choices or {}))


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
        "cell": config.cell, "variant": variant_name(config.norm, config.groups, config.choices),
        "label": config.label, "norm": config.norm, "groups": config.groups, **config.choices,  # choices: only if any
        "batch_size": config.batch_size, "epochs": config.epochs,
        "data": config.data, "seeds": [c.seed for c, _ in runs], "run_ids": [c.run_id for c, _ in runs],
        "devices": sorted({r.get("device", "?") for _, r in runs}),
        "collapsed": [is_collapsed(r) for _, r in runs],  # per seed: at chance (run.collapsed)
        **{key: _stats(values) for key, values in finals.items()},
        "curves": {"train_error": _curve([[100.0 - a for a in h["train_acc"]] for h in histories]),
                   "test_error": _curve([[100.0 - a for a in h["test_acc"]] for h in histories])},
        "seconds_per_epoch": statistics.mean(r["final"]["seconds_per_epoch"] for _, r in runs),
    }


def _cell_order(cell):
    return NORMS.index(cell["norm"]), cell["groups"] or 0, cell_choices(cell) != {}, cell["batch_size"], cell["cell"]


def cell_choices(cell):
    """A summary cell's network choices (``RunConfig.choices``: only those that differ from the seed's)."""
    return {name: cell[name] for name in CHOICES if name in cell and cell[name] != CHOICES[name]}


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


def batch_table(summary, metric=METRIC):
    """Table 2's layout: a row per variant, a column per batch size (ascending), values
    ``mean ± std`` over seeds in %; then a "GN − BN" row per GroupNorm variant (difference of the
    means; positive: GroupNorm's value is higher)."""
    cells = summary["cells"]
    batches = sorted({c["batch_size"] for c in cells})
    at = {(c["variant"], c["batch_size"]): c for c in cells}  # a variant with choices is a row of its own
    lines = ["| norm | " + " | ".join(str(b) for b in batches) + " |",
             "|---|" + "---:|" * len(batches)]
    variants = sorted({c["variant"]: _cell_order(c)[:3] for c in cells}.items(), key=lambda item: item[1])
    for variant, _ in variants:
        lines.append(f"| {variant} | " + " | ".join(_value(at.get((variant, b)), metric) for b in batches) + " |")
    gn_variants = [(variant, cell["groups"]) for variant, cell in {c["variant"]: c for c in cells}.items()
                   if cell["norm"] == "gn" and not cell_choices(cell)]
    if any(variant == "BN" for variant, _ in variants):
        for variant, groups in gn_variants:
            name = "GN − BN" if len(gn_variants) == 1 else f"GN (G={groups}) − BN"
            diffs = []
            for b in batches:
                gn, bn = at.get((variant, b)), at.get(("BN", b))
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


def arrangement(cell):
    """Which curve of the ghost-batch question (issue 20, part 1) a cell belongs to: ``"grid"``
    (plain BatchNorm at batch b: statistics over b images and steps of b), ``"gpus"`` (statistics
    over n images, steps of 8n: Wu & He's 8 GPUs), ``"statistics"`` (statistics over n, steps of
    any other batch: statistics only) or ``None`` (not BatchNorm, or other choices)."""
    if cell["norm"] != "bn" or cell_choices(cell).keys() - {"norm_batch"}:
        return None
    n = cell.get("norm_batch")
    if n is None:
        return "grid"
    return "gpus" if cell["batch_size"] == 8 * n else "statistics"


def ghost_table(summary, metric=METRIC):
    """The ghost-batch question's table: a column per normalization batch n (images per BatchNorm
    statistic), a row per arrangement: statistics over n with the optimizer at each fixed batch
    size ("statistics only"), and with the optimizer at 8n (Wu & He's 8 GPUs)."""
    cells = [c for c in summary["cells"] if c.get("norm_batch") is not None]
    ns = sorted({c["norm_batch"] for c in cells})
    rows = {}
    for cell in cells:
        name = ("statistics over n, batch 8n (8 GPUs)" if arrangement(cell) == "gpus"
                else f"statistics over n, batch {cell['batch_size']}")
        rows.setdefault(name, {})[cell["norm_batch"]] = cell
    lines = ["| BatchNorm | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns)]
    for name in sorted(rows, key=lambda name: ("8 GPUs" in name, name)):
        lines.append(f"| {name} | " + " | ".join(_value(rows[name].get(n), metric) for n in ns) + " |")
    return "\n".join(lines) + "\n"


def order_table(summary, metric=METRIC):
    """The block-order question's table: :func:`groups_table`'s layout (a column per group count,
    and BN), a row per batch size and order (Conv -> ReLU -> Norm, the seed's; Conv -> Norm ->
    ReLU, Wu & He's), and under each batch size the difference of the two orders."""
    cells = summary["cells"]
    groups = sorted({c["groups"] for c in cells if c["norm"] == "gn"})
    columns = [("gn", g) for g in groups] + ([("bn", None)] if any(c["norm"] == "bn" for c in cells) else [])
    at = {(c["norm"], c["groups"], c["batch_size"], c.get("order", CHOICES["order"])): c for c in cells}
    names = {"relu-norm": "Conv→ReLU→Norm", "norm-relu": "Conv→Norm→ReLU"}

    def head(g):
        return f"G={g}" + {1: " (LN)", CHANNELS: " (IN)"}.get(g, "")
    lines = ["| batch | order | " + " | ".join(head(g) if norm == "gn" else "BN" for norm, g in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for b in sorted({c["batch_size"] for c in cells}, reverse=True):
        for order in names:
            row = [at.get((norm, g, b, order)) for norm, g in columns]
            if any(row):
                lines.append(f"| {b} | {names[order]} | " + " | ".join(_value(c, metric) for c in row) + " |")
        pairs = [(at.get((norm, g, b, "norm-relu")), at.get((norm, g, b, "relu-norm"))) for norm, g in columns]
        if any(after and before for after, before in pairs):
            lines.append(f"| {b} | Norm→ReLU − ReLU→Norm | " + " | ".join(
                "—" if not (after and before) else f"{after[metric]['mean'] - before[metric]['mean']:+.2f}"
                for after, before in pairs) + " |")
    return "\n".join(lines) + "\n"


TABLES = {"batch": batch_table, "groups": groups_table, "ghost": ghost_table, "order": order_table,
          "remedies": batch_table}
TITLES = {"batch": "Test error vs batch size", "groups": "Test error vs number of groups",
          "ghost": "BatchNorm: statistics or steps? (ghost batches)", "order": "Block order: Conv→ReLU→Norm vs Conv→Norm→ReLU",
          "remedies": "Remedies for small batches: Batch Renorm and Weight Standardization"}
NOTES = {
    "groups": "G groups of 32/G channels each: G=1 is LayerNorm, G=32 InstanceNorm.",
    "ghost": ("n: images per BatchNorm statistic (ghost batches); the optimizer steps on the whole batch; "
              "evaluation uses the running statistics. 8 GPUs: Wu & He's arrangement, n images a GPU."),
    "order": "G groups of 32/G channels each: G=1 is LayerNorm, G=32 InstanceNorm.",
    "remedies": ("Batch Renorm: r_max and d_max relaxed from 1 and 0 after epoch 1 to 1.5 and 0.5 at epoch 5, "
                 "at every batch size (models.RENORM). WS: Weight Standardization of every 3x3 convolution."),
}


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
    table = TABLES[kind]
    cells = summary["cells"]
    seeds = sorted({len(c["seeds"]) for c in cells})
    epochs = sorted({c["epochs"] for c in cells})
    devices = sorted({d for c in cells for d in c["devices"]})
    data = sorted({c["data"] for c in cells})
    title = title or TITLES[kind]
    if not cells:  # no table to show, not an empty one
        return f"# {title}\n\nNo finished runs yet (0 of {summary['planned']}).\n"
    text = [f"# {title}", "",
            f"{summary['finished']} of {summary['planned']} runs finished; "
            f"epochs: {'/'.join(map(str, epochs)) or '?'}; seeds per cell: {'/'.join(map(str, seeds)) or '?'}; "
            f"data: {', '.join(data) or '?'}; device: {', '.join(devices) or '?'}.", "",
            f"Values: {_METRIC_WORDS[summary['metric']]}, mean ± standard deviation over seeds.", "",
            table(summary, summary["metric"]).rstrip(), "",
            f"The same, {_METRIC_WORDS['test_error']}:", "", table(summary, "test_error").rstrip()]
    if kind in NOTES:
        text += ["", NOTES[kind]]
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
