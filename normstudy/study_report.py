"""The study's tables of a folder's summary (:mod:`normstudy.report`'s schema), as pure functions.

A *cell* is one variant (norm, and GroupNorm's group count) at one batch size: its runs differ
only by their seed (``RunConfig.cell``). The tables report ``test_error_last3_mean``
(:data:`METRIC`, 100 minus the mean test accuracy of the last 3 epochs, mean ± standard deviation
over seeds), laid out like Wu & He's *Group Normalization* (2018): Table 2 (rows: norms,
columns: batch sizes, plus a "GN − BN" row) for the batch-size grid and Table 3 (columns: groups,
plus BN) for the groups grid. A cell whose runs collapsed to chance (``run.collapsed``; per seed
in the cell's ``"collapsed"``) is marked in them.

:func:`results_markdown` shows every cell of the summary: a table per setting (epochs, data,
recipe overrides) so that runs of a narrower or quicker grid never hide the grid's, and the cells
the layout has no place for (LayerNorm in the groups layout) in the per-cell table.
"""
from .config import CHANNELS, NORMS, RunConfig
from .report import (COLLAPSE_NOTE, METRIC, collapse_mark, collapsed_runs, load_summary, results_table,  # noqa: F401
                     skipped_lines, status_line, summarize, summarize_cell, variant_name)

METRICS = ("test_acc", "test_acc_last3_mean", "test_error", "test_error_last3_mean")


def infer_kind(cells):
    """``"groups"`` when the GroupNorm cells come in more than one group count, else ``"batch"``."""
    return "groups" if len({c["groups"] for c in cells if c["norm"] == "gn"}) > 1 else "batch"


def summarize_grid(records, configs=None, *, kind=None):
    """The summary (:func:`report.summarize`) of a grid's ``records``: ``configs`` (the grid's
    planned runs, configs or their dicts) is its plan; ``kind``: ``"batch"`` or ``"groups"`` (the
    table's layout; inferred from the cells when ``None``)."""
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


def _placed(kind, cells):
    """The cells that ``kind``'s layout shows, and those it has no place for."""
    if kind == "groups":  # columns: GroupNorm's group counts, and BN
        return [c for c in cells if c["norm"] != "ln"], [c for c in cells if c["norm"] == "ln"]
    return cells, []


def results_markdown(summary, *, title=None):
    """``results.md`` of a grid folder: its status (:func:`report.status_line`), the grid's table
    (:func:`batch_table` or :func:`groups_table`) of :data:`METRIC` and the same for the last
    epoch alone, per setting (:func:`partitions`), every cell the layout cannot show, which
    runs of the plan are missing and which run folders were skipped as broken."""
    kind = summary["kind"]
    table = batch_table if kind == "batch" else groups_table
    cells = summary["cells"]
    title = title or ("Test error vs batch size" if kind == "batch" else "Test error vs number of groups")
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
        shown, left = _placed(kind, part)
        unplaced += left
        if not shown:
            continue
        part_summary = {**summary, "cells": shown}
        text += [""] + ([f"## {words}", ""] if several else [])
        text += [table(part_summary, summary["metric"]).rstrip(), "",
                 f"The same, {_METRIC_WORDS['test_error']}:", "", table(part_summary, "test_error").rstrip()]
    if kind == "groups":
        text += ["", "G groups of 32/G channels each: G=1 is LayerNorm, G=32 InstanceNorm."]
    if unplaced:
        text += ["", "Runs this layout has no place for:", "", results_table(unplaced).rstrip()]
    if any(any(collapsed_runs(cell)) for cell in cells):
        text += ["", COLLAPSE_NOTE]
    missing = summary["plan"]["missing"] if summary["plan"] else []
    if missing:
        text += ["", f"Missing ({len(missing)} runs not finished): " + ", ".join(missing) + "."]
    return "\n".join(text).rstrip() + "\n" + skipped_lines(summary)
