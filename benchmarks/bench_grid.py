"""The study's throughput: runs per hour at each batch size, K runs at once against one after another.

    python benchmarks/bench_grid.py --data-dir /root/data --batch-sizes 4 32 512 --epochs 2 --concurrency 9

For each batch size, the grid's cell (3 norms x 3 seeds) is trained twice through the study's own
code (``study.run_grid`` with a ``LocalRunner``), into fresh folders: once one run after another,
once ``--concurrency`` at a time (a CUDA stream each). Each pass is timed as a whole, start-up
included. Prints one row per batch size and writes ``grid_results.json`` (or ``--out``).
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

from normstudy import study
from normstudy.runners.local import LocalRunner

HERE = Path(__file__).resolve().parent


def timed_pass(configs, *, concurrency, data_dir):
    """Seconds to train ``configs`` into a fresh folder with ``concurrency`` runs at once."""
    with tempfile.TemporaryDirectory(prefix="bench-grid-") as out:
        start = time.perf_counter()
        study.run_grid(configs, out, runner=LocalRunner(concurrency, figures=False), data_dir=data_dir,
                       download=False, progress=False)
        return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 32, 512])
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (the grid's are 20)")
    p.add_argument("--concurrency", type=int, default=9)
    p.add_argument("--out", default=str(HERE / "grid_results.json"))
    args = p.parse_args()
    rows = []
    for batch in args.batch_sizes:
        configs = study.batch_grid(batch_sizes=(batch,), epochs=args.epochs)
        alone = timed_pass(configs, concurrency=1, data_dir=args.data_dir)
        together = timed_pass(configs, concurrency=args.concurrency, data_dir=args.data_dir)
        row = {"batch_size": batch, "runs": len(configs), "epochs": args.epochs,
               "one_after_another_s": round(alone, 1), "at_once_s": round(together, 1),
               "runs_per_hour_one_after_another": round(3600 * len(configs) / alone, 1),
               "runs_per_hour_at_once": round(3600 * len(configs) / together, 1),
               "speed_up": round(alone / together, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"concurrency": args.concurrency, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
