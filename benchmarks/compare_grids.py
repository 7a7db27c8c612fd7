"""Compare a re-run grid with the committed one, cell by cell: did a faster way of training it
(stacks, many runs at once, another GPU) leave the accuracy as it was?

    python benchmarks/compare_grids.py benchmarks/grid_timing_results.json
    python benchmarks/compare_grids.py /tmp/timing/batch-size/summary.json
    python benchmarks/compare_grids.py NEW_SUMMARY --against results/batch-size/summary.json --within 0.5

Both files are a grid's ``summary.json`` (``normstudy study ...`` writes it), or a file with its
``cells`` as those have them (``grid_timing_results.json``: the timed grid of 2026-12-03). For each cell of the
new grid that the other one has, prints the seed mean of the test error (each run's over its last 3
epochs) in both, and the difference; then how many cells lie within ``--within`` points (the
issue "Many runs, one model" asked for 0.5). Exits 0 when every compared cell does, 1 when one does
not, 2 (one line) on unreadable input. Reads JSON only: no torch, so it runs anywhere.
"""
import argparse
import json
import sys

# The grid tables' figure (normstudy.report.METRIC, named here: importing the package means torch):
# each run's test error over its last 3 epochs, then the cell's mean over seeds.
METRIC = "test_error_last3_mean"


def cell_errors(summary):
    """``{cell id: (batch size, variant, test error %, number of seeds)}`` of one summary."""
    return {cell["cell"]: (cell["batch_size"], cell["variant"], cell[METRIC]["mean"], len(cell["seeds"]))
            for cell in summary["cells"]}


def compare(new, committed):
    """Rows ``(batch size, variant, new error, committed error, difference, seeds)`` for the cells
    both grids have (:func:`cell_errors` of each), sorted by batch size and variant."""
    rows = [(batch, variant, error, committed[cell][2], error - committed[cell][2], seeds)
            for cell, (batch, variant, error, seeds) in new.items() if cell in committed]
    return sorted(rows)


def _cell_errors_of(path):
    """:func:`cell_errors` of the file at ``path``; ``ValueError`` (one line) where it cannot be read as a grid."""
    try:
        with open(path) as f:
            return cell_errors(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"compare_grids: cannot read {path} as a grid's summary.json ({err!r})") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("new", help="the re-run grid's summary.json")
    p.add_argument("--against", default="results/batch-size/summary.json", help="the committed grid's summary.json")
    p.add_argument("--within", type=float, default=0.5, help="points of test error a cell may move (default 0.5)")
    args = p.parse_args(argv)
    try:
        rows = compare(_cell_errors_of(args.new), _cell_errors_of(args.against))
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    if not rows:
        print(f"compare_grids: {args.new} and {args.against} share no cell", file=sys.stderr)
        return 2
    for batch, variant, new, old, diff, seeds in rows:
        print(f"batch {batch:<4} {variant:10} new {new:6.2f}  committed {old:6.2f}  difference {diff:+.2f}  ({seeds} seeds)")
    moved = [abs(row[4]) for row in rows]
    within = sum(points <= args.within for points in moved)
    print(f"{within} of {len(rows)} cells within {args.within} points; largest difference {max(moved):.2f}, "
          f"mean {sum(moved) / len(moved):.2f}")
    return 0 if within == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
