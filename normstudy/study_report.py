"""The study's tables of a folder's summary (:mod:`normstudy.report`'s schema), as pure functions.

A *cell* is one variant (norm, and GroupNorm's group count) at one batch size: its runs differ
only by their seed (``RunConfig.cell``). The tables report ``test_error_last3_mean``
(:data:`METRIC`, 100 minus the mean test accuracy of the last 3 epochs, mean ± standard deviation
over seeds), laid out like Wu & He's *Group Normalization* (2018): Table 2 (rows: norms,
columns: batch sizes, plus a "GN − BN" row) for the batch-size grid and Table 3 (columns: groups,
plus BN) for the groups grid. A cell whose runs collapsed to chance (``run.collapsed``; per seed
in the cell's ``"collapsed"``) is marked in them.

Issue 20's grids: a cell of runs with network choices (``RunConfig.choices``: block order, ghost
batches, Batch Renorm, WS) carries them as keys (``"norm_batch": 16``; absent for the seed's
network, so earlier summaries read the same) and its variant says them (``BN + Batch Renorm``).
Tables: :func:`ghost_table` (a column per normalization batch n), :func:`order_table` (Table 3 in
each block order) and, for the remedies, :func:`batch_table` with a row per remedy.

:func:`results_markdown` shows every cell of the summary: a table per setting (epochs, data,
recipe overrides) so that runs of a narrower or quicker grid never hide the grid's, and the cells
the layout has no place for (LayerNorm in the groups layout; a cell whose network choices the
layout does not show, e.g. GroupNorm + WS in the groups layout) in the per-cell table: a choice is
part of the cell's variant, so two cells of different choices never take one place in a table.
"""
from .config import CHANNELS, CHOICES, RunConfig
from .report import (COLLAPSE_NOTE, METRIC, _cell_order, cell_choices, collapse_mark, collapsed_runs,  # noqa: F401
                     load_summary, results_table, skipped_lines, status_line, summarize, summarize_cell,
                     variant_name)

METRICS = ("test_acc", "test_acc_last3_mean", "test_error", "test_error_last3_mean")


def infer_kind(cells):
    """The grid kind of ``cells`` (summary cells, or dicts of ``norm``, ``groups`` and any network
    choices): issue 20's ``"ghost"``, ``"order"`` or ``"remedies"`` by the choices their cells
    have; else ``"groups"`` when the GroupNorm cells come in more than one group count, else
    ``"batch"``."""
    choices = {name for cell in cells for name in cell_choices(cell)}
    if "norm_batch" in choices:
        return "ghost"
    if "order" in choices:
        return "order"
    if choices & {"renorm", "ws"}:
        return "remedies"
    return "groups" if len({c["groups"] for c in cells if c["norm"] == "gn"}) > 1 else "batch"


def summarize_grid(records, configs=None, *, kind=None):
    """The summary (:func:`report.summarize`) of a grid's ``records``: ``configs`` (the grid's
    planned runs, configs or their dicts) is its plan; ``kind``: the grid (:data:`TABLES`: the
    table's layout; inferred from the cells when ``None``, :func:`infer_kind`)."""
    plan = None if configs is None else [
        (c if isinstance(c, RunConfig) else RunConfig.from_dict(c)).run_id for c in configs]
    summary = summarize(records, kind=kind, plan=plan)
    summary["kind"] = kind or infer_kind(summary["cells"])
    return summary


# --- tables -------------------------------------------------------------------------------------

def _value(cell, metric):
    if cell is None:
        return "—"
    stats = cell[metric]
    return (f"{stats['mean']:.2f}" + (f" ± {stats['std']:.2f}" if len(stats["values"]) > 1 else "")
            + collapse_mark(collapsed_runs(cell)))


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


def settings(cell):
    """What a cell's runs share beyond norm and batch, in words: runs of different settings are
    never put in one table (they would take one place)."""
    words = [f"{cell['epochs']} epochs", cell["data"]]
    words += [f"{key}={value}" for key, value in cell.get("overrides", {}).items()]
    if cell.get("holdout"):
        words.append(f"{cell['holdout']} held-out images")
    return ", ".join(words)


def partitions(cells):
    """``[(settings, cells)]``: the cells grouped by :func:`settings`, the group with the most
    runs first (the grid's own, whatever a quicker command added beside it)."""
    groups = {}
    for cell in cells:
        groups.setdefault(settings(cell), []).append(cell)
    return sorted(groups.items(), key=lambda item: -sum(len(c["seeds"]) for c in item[1]))


def placed(kind, cells):
    """The cells that ``kind``'s layout shows, and those it has no place for. A choice is part of
    a cell's variant: a layout shows only the network choices it has a place for (batch and
    remedies: any, a row per variant; groups: none; order: the block order; ghost: BatchNorm's
    normalization batch alone), so that cells of different choices never take one place."""
    def shows(cell):
        choices = set(cell_choices(cell))
        if kind in ("groups", "order"):  # columns: GroupNorm's group counts, and BN
            return cell["norm"] != "ln" and choices <= ({"order"} if kind == "order" else set())
        if kind == "ghost":  # columns: the normalization batch n
            return cell["norm"] == "bn" and choices == {"norm_batch"}
        return True  # batch, remedies: a row per variant, choices included
    return [c for c in cells if shows(c)], [c for c in cells if not shows(c)]


def results_markdown(summary, *, title=None):
    """``results.md`` of a grid folder: its status (:func:`report.status_line`), the grid's table
    (:func:`batch_table` or :func:`groups_table`) of :data:`METRIC` and the same for the last
    epoch alone, per setting (:func:`partitions`), every cell the layout cannot show, which
    runs of the plan are missing and which run folders were skipped as broken."""
    kind = summary["kind"]
    table = TABLES[kind]
    cells = summary["cells"]
    title = title or TITLES[kind]
    if not cells:  # no table to show, not an empty one
        planned = summary["plan"]["planned"] if summary["plan"] else 0
        return f"# {title}\n\nNo finished runs yet (0 of {planned}).\n" + skipped_lines(summary)
    seeds = sorted({len(c["seeds"]) for c in cells})
    epochs = sorted({c["epochs"] for c in cells})
    devices = sorted({d for c in cells for d in c["devices"]})
    data = sorted({c["data"] for c in cells})
    text = [f"# {title}", "",
            f"{status_line(summary)}; epochs: {'/'.join(map(str, epochs))}; seeds per cell: "
            f"{'/'.join(map(str, seeds))}; data: {', '.join(data)}; device: {', '.join(devices)}.", "",
            f"Values: {_METRIC_WORDS[summary['metric']]}, mean ± standard deviation over seeds."]
    several = len(partitions(cells)) > 1
    unplaced = []
    for words, part in partitions(cells):
        shown, left = placed(kind, part)
        unplaced += left
        if not shown:
            continue
        part_summary = {**summary, "cells": shown}
        text += [""] + ([f"## {words}", ""] if several else [])
        text += [table(part_summary, summary["metric"]).rstrip(), "",
                 f"The same, {_METRIC_WORDS['test_error']}:", "", table(part_summary, "test_error").rstrip()]
    if kind in NOTES:
        text += ["", NOTES[kind]]
    if unplaced:
        text += ["", "Runs this layout has no place for:", "", results_table(unplaced).rstrip()]
    if any(any(collapsed_runs(cell)) for cell in cells):
        text += ["", COLLAPSE_NOTE]
    missing = summary["plan"]["missing"] if summary["plan"] else []
    if missing:
        text += ["", f"Missing ({len(missing)} runs not finished): " + ", ".join(missing) + "."]
    return "\n".join(text).rstrip() + "\n" + skipped_lines(summary)
