"""Many runs, one model: model-epochs per second of stacks of K runs against one run and against
today's streams (K runs at once, each its own model on its own CUDA stream).

    python benchmarks/bench_stack.py --batch-sizes 2 8 32 512 --stacks 1 9 27 --streams 9 --out stack.json

Every pass goes through the study's own code (``study.run_grid`` with a ``LocalRunner``) into a
fresh folder: data on the device, evaluation on the 10,000 test images after every epoch,
checkpoints and records (figures off). Runs are mixed norms (BN, LN, GN in turn, seeds 0, 1, ...)
or those of ``--norms``; a stack holds runs of one norm, so ``stack K`` of mixed runs is one stack
per norm, side by side on CUDA streams. The training set is ``--train-images`` synthetic images (default 8,192: a whole CIFAR-10 epoch at
batch 2 is 25,000 steps); the steady epoch (the last; the first carries compilation and graph
recording) is scaled to 50,000 images, evaluation included, so the projection is conservative.

Rows: ``mode`` (stack K, or streams K), batch size, runs, steady epoch seconds, projected
model-epochs per second on full CIFAR-10, and the whole pass's wall seconds (start-up included).
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

from normstudy import data
from normstudy import study
from normstudy.config import RunConfig
from normstudy.runners.local import LocalRunner

HERE = Path(__file__).resolve().parent

NORMS = ("bn", "ln", "gn")
CIFAR_TRAIN = 50_000
MAX_IMAGES_PER_STEP = 8192


def mixed_runs(count, *, batch_size, epochs, norms=NORMS):
    """``count`` runs of ``norms`` in turn (bn, ln, gn, bn, ...) with seeds 0, 0, 0, 1, 1, 1, ..."""
    return [RunConfig(norm=norms[k % len(norms)], seed=k // len(norms), batch_size=batch_size, epochs=epochs)
            for k in range(count)]


def timed_pass(configs, *, runner, data_dir, train_images):
    """Wall seconds of the pass, and the steady epoch's model-epochs per second on full CIFAR-10."""
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as out:
        start = time.perf_counter()
        records = study.run_grid(configs, out, runner=runner, data_dir=data_dir, download=False, progress=False)
        wall = time.perf_counter() - start
    if len(records) != len(configs):
        raise RuntimeError(f"only {len(records)} of {len(configs)} runs finished")
    # Runs of one stack share their epochs; runs on streams overlap: the slowest sets the pace.
    steady = max(record["history"]["epoch_seconds"][-1] for record in records)
    projected = steady * CIFAR_TRAIN / train_images
    return wall, steady, len(configs) / projected


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8, 32, 512])
    p.add_argument("--stacks", type=int, nargs="+", default=[1, 9, 27], help="stack sizes K to time")
    p.add_argument("--streams", type=int, default=9, help="today's way: this many single runs at once (0: skip)")
    p.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS,
                   help="the runs' norms, in turn (default: all three); a stack holds one norm, so K mixed runs "
                        "train as one stack per norm, side by side on streams")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-images", type=int, default=8192)
    p.add_argument("--out", default=str(HERE / "stack_results.json"))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-stack-data-") as data_dir:
        data.write_synthetic_cifar10(data_dir, n_train=args.train_images, n_test=10_000)
        for batch in args.batch_sizes:
            # A stack of K at batch B steps on K*B images: past MAX_IMAGES_PER_STEP its activations
            # outgrow the GPU (27 x 512: ~75 GB) and it is compute-bound anyway: skipped.
            side_by_side = len(args.norms)  # plan_stacks: one stack per norm
            modes = [("stack", k, LocalRunner(side_by_side if k > 1 else 1, stack=k, figures=False))
                     for k in args.stacks if k == 1 or k * batch <= MAX_IMAGES_PER_STEP]
            if args.streams:
                modes.append(("streams", args.streams, LocalRunner(args.streams, stack=1, figures=False)))
            for mode, k, runner in modes:
                configs = mixed_runs(k, batch_size=batch, epochs=args.epochs, norms=tuple(args.norms))
                wall, steady, rate = timed_pass(configs, runner=runner, data_dir=data_dir,
                                                train_images=args.train_images)
                row = {"mode": mode, "runs": k, "norms": args.norms, "batch_size": batch, "steady_epoch_s": round(steady, 3),
                       "model_epochs_per_s": round(rate, 3), "pass_wall_s": round(wall, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"train_images": args.train_images, "epochs": args.epochs, "rows": rows},
                                         indent=2) + "\n")
    print(f"\n{'mode':>8} {'K':>3} {'batch':>5} {'epoch s':>8} {'model-epochs/s':>15}")
    for row in rows:
        print(f"{row['mode']:>8} {row['runs']:>3} {row['batch_size']:>5} {row['steady_epoch_s']:>8} "
              f"{row['model_epochs_per_s']:>15}")


if __name__ == "__main__":
    main()
