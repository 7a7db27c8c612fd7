"""Runs of many batch sizes at once in one process, as a grid runs them: the pass's wall, each
run's epochs, and where the runs' threads spend their time.

    python benchmarks/bench_together.py --batch-sizes 2 4 8 512 --concurrency 27 --epochs 2 --train-images 8192
    python benchmarks/bench_together.py --batch-sizes 2 4 8 512 --concurrency 12 --stack 3   # a norm's 3 seeds a stack
    python benchmarks/bench_together.py --smoke          # a check of this script (CPU, tiny data)

Why: on the H200 the whole batch grid at 27 runs at once (`study batch --concurrency 27`, batch 2,
4 and 8 started first) finished no run in 920 s, where the probes of single runs on streams
promised ~13 minutes for all 81 (benchmarks/NOTES.md). This pass shows where that time goes.

The runs are the batch grid's (3 norms x 3 seeds) at each ``--batch-sizes``, trained through
the study's own code (``study.run_grid``, a ``LocalRunner`` of ``--concurrency`` threads) into a
fresh folder, on synthetic data in CIFAR-10's format (``--train-images`` training images, 10,000
test images). ``--order grid`` starts them in the study's order (seed by seed, large batches
first), ``longest`` the most steps first. ``--stack K`` trains each norm's runs of a batch size as
stacks of up to K (the grid has 3 a norm: its seeds); ``--concurrency`` then counts stacks.

- Every epoch's line goes to ``--log`` as it comes, with the seconds since the start: a pass
  cut short still says how far each run got.
- Every ``--sample`` seconds a thread takes the Python stack of every run thread
  (``sys._current_frames``) and counts its innermost frame in the package, with the function the
  thread is in (e.g. ``runtime.py:190 work / wait``: waiting for the device lock;
  ``graph_epoch.py:... train_epoch / item``: waiting for its epoch's GPU work). The table's
  shares say where the threads were.

Writes ``together_results.json`` beside this file (or ``--out``): the wall, each run's epoch
seconds and the stack table.
"""
import argparse
import collections
import contextlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from normstudy import data
from normstudy import study
from normstudy.runners.local import LocalRunner

HERE = Path(__file__).resolve().parent
PACKAGE = str(Path(data.__file__).resolve().parent)


def grid(batch_sizes, *, epochs, order):
    """The batch grid's runs at ``batch_sizes`` in the order a pool of threads takes them."""
    configs = study.batch_grid(batch_sizes=tuple(batch_sizes), epochs=epochs)
    if order == "longest":
        configs.sort(key=lambda config: config.batch_size)  # the most steps first (stable: seeds in turn)
    return configs


def where(frame):
    """``file:line function / innermost function`` of a thread's stack: the innermost frame in the
    package, and the function the thread is in now (a lock's wait, a tensor's item, ...)."""
    innermost = frame.f_code.co_name
    while frame is not None and not frame.f_code.co_filename.startswith(PACKAGE):
        frame = frame.f_back
    if frame is None:
        return f"(outside the package) / {innermost}"
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name} / {innermost}"


class StackSampler:
    """Counts :func:`where` of every run thread (``normstudy-run-*``) every ``seconds``."""

    def __init__(self, seconds):
        self.seconds, self.counts, self.samples = seconds, collections.Counter(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(self.seconds):
            names = {thread.ident: thread.name for thread in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if names.get(ident, "").startswith("normstudy-run-"):
                    self.counts[where(frame)] += 1
                    self.samples += 1

    def table(self, top=15):
        """``[(share of samples, place)]``, the most held first."""
        return [(round(count / max(1, self.samples), 3), place) for place, count in self.counts.most_common(top)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8, 512])
    p.add_argument("--concurrency", type=int, default=27)
    p.add_argument("--stack", type=int, default=1, help="runs a stack (LocalRunner's stack; 1: single runs)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-images", type=int, default=8192)
    p.add_argument("--order", choices=("grid", "longest"), default="longest")
    p.add_argument("--sample", type=float, default=1.0, help="seconds between two samples of the threads' stacks")
    p.add_argument("--device", default="auto")
    p.add_argument("--log", help="each epoch's line as it comes (default: none)")
    p.add_argument("--smoke", action="store_true", help="a check of this script: CPU, 64 and 128, 256 images, 1 epoch")
    p.add_argument("--out", default=str(HERE / "together_results.json"))
    args = p.parse_args()
    if args.smoke:
        args.batch_sizes, args.concurrency, args.epochs, args.train_images = [64, 128], 3, 1, 256
        args.sample, args.device = 0.05, "cpu"
    configs = grid(args.batch_sizes, epochs=args.epochs, order=args.order)
    with contextlib.ExitStack() as resources:
        log_file = resources.enter_context(open(args.log, "a")) if args.log else None
        root = resources.enter_context(tempfile.TemporaryDirectory(prefix="bench-together-"))
        data.write_synthetic_cifar10(root, n_train=args.train_images, n_test=256 if args.smoke else 10_000)
        start = time.perf_counter()

        def log(line):
            if log_file is not None:
                print(f"[{time.perf_counter() - start:8.1f} s] {line}", file=log_file, flush=True)
        with StackSampler(args.sample) as sampler:
            records = study.run_grid(configs, Path(root) / "out", runner=LocalRunner(args.concurrency, log=log,
                                                                                     figures=False, stack=args.stack),
                                     data_dir=root, download=False, device=args.device, progress=False)
        wall = time.perf_counter() - start
    result = {"batch_sizes": args.batch_sizes, "concurrency": args.concurrency, "stack": args.stack,
              "epochs": args.epochs,
              "train_images": args.train_images, "order": args.order, "wall_s": round(wall, 1),
              "runs": {record["id"]: [round(s, 2) for s in record["history"]["epoch_seconds"]] for record in records},
              "stacks": sampler.table(), "samples": sampler.samples}
    units = f"stacks of {args.stack}" if args.stack > 1 else "runs"
    print(f"{len(records)} runs, {args.concurrency} {units} at once, {args.epochs} epochs of {args.train_images} images: "
          f"{wall:.1f} s")
    for share, place in result["stacks"]:
        print(f"{share:6.1%}  {place}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
