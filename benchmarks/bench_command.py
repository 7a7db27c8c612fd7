"""The README's command as a user types it, timed as a whole process, with cold and warm kernel caches.

    python benchmarks/bench_command.py --data-dir /root/data --norm bn --runs 3
    python benchmarks/bench_command.py --smoke --runs 2        # a check of this script: synthetic data

Each run is ``python train.py --norm NORM --data-dir D --no-download --quiet --out FRESH`` (a fresh
output folder, so nothing is skipped as finished), timed from just before the process starts to
its exit: imports, data, kernels, 20 epochs, figures and summary, all of it.

- cold: empty Triton and Inductor cache folders for every run (a new machine, or the first run
  after an update: every kernel is compiled in the run);
- warm: one shared cache folder, filled by one untimed run first (any later run on a machine).

Python's own bytecode cache is left as the machine has it; the result says whether
PYTHONDONTWRITEBYTECODE is set (the device image sets it, and then every process compiles torch's
Python source: 1.5-4.5 s more, benchmarks/NOTES.md). Prints min / median / max seconds per mode
and writes ``command_results.json`` beside this file (or ``--out``).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN = HERE.parent / "train.py"


def command(args, out):
    """The command a user types, into the output folder ``out``."""
    cmd = [sys.executable, str(TRAIN), "--norm", args.norm, "--quiet", "--out", str(out)]
    return cmd + (["--smoke"] if args.smoke else ["--data-dir", args.data_dir, "--no-download"])


def timed_run(args, cache):
    """Seconds of one process of the command, with its kernel caches in ``cache``."""
    env = {**os.environ, "TRITON_CACHE_DIR": f"{cache}/triton", "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor"}
    with tempfile.TemporaryDirectory(prefix="bench-command-out-") as out:
        start = time.perf_counter()
        done = subprocess.run(command(args, out), env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"train.py exited {done.returncode}:\n{done.stderr[-3000:]}")
    return wall


def walls(args, mode):
    """``args.runs`` timed runs in ``mode`` ("cold" or "warm")."""
    with tempfile.TemporaryDirectory(prefix="bench-command-cache-") as root:
        if mode == "warm":
            timed_run(args, f"{root}/shared")  # fills the caches; not counted
        return [timed_run(args, f"{root}/shared" if mode == "warm" else f"{root}/run{k}") for k in range(args.runs)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (or --smoke)")
    p.add_argument("--norm", default="bn", choices=["bn", "ln", "gn", "all"])
    p.add_argument("--runs", type=int, default=3, help="timed runs per mode (default 3)")
    p.add_argument("--smoke", action="store_true", help="train.py --smoke: synthetic data, to check this script")
    p.add_argument("--out", default=str(HERE / "command_results.json"))
    args = p.parse_args()
    if not args.smoke and not args.data_dir:
        p.error("--data-dir is required (or --smoke)")
    results = {"command": " ".join(["python", TRAIN.name, *command(args, "FRESH")[2:]]), "runs_per_mode": args.runs,
               "PYTHONDONTWRITEBYTECODE": bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))}
    for mode in ("cold", "warm"):
        seconds = walls(args, mode)
        results[mode] = {"min_s": round(min(seconds), 2), "median_s": round(statistics.median(seconds), 2),
                         "max_s": round(max(seconds), 2), "runs_s": [round(s, 2) for s in seconds]}
        print(mode, results[mode], flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
