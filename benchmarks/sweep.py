"""Recipe search: run train.py for several recipe variants in parallel on one GPU, then tabulate.

    python benchmarks/sweep.py --data-dir /root/data --out /tmp/sweep --jobs 2 \
        --norms bn gn ln --seeds 0 --config base= --config lr01=lr=0.1 --config cut8=cutout=8

Each ``--config NAME=KEY=VALUE[,KEY=VALUE...]`` is one recipe variant (``NAME=`` alone: the default
recipe). Runs are scored on 5,000 held-out training images unless ``--holdout 0``, so the test
set stays out of the search. Two runs share the GPU (more slowed each other down). Prints one
row per (config, norm): the mean over seeds of the last-3-epoch accuracy, and each seed's value.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_config(text):
    name, _, settings = text.partition("=")
    return name, [s for s in settings.split(",") if s]


def run(job):
    name, settings, norm, seed, args = job
    out = Path(args.out) / name
    cmd = [sys.executable, str(ROOT / "train.py"), "--norm", norm, "--seed", str(seed), "--quiet",
           "--data-dir", args.data_dir, "--no-download", "--out", str(out)]
    for setting in settings:
        cmd += ["--set", setting]
    if args.holdout:
        cmd += ["--holdout", str(args.holdout)]
    # Several runs share the machine: a few CPU threads each instead of all cores each.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return name, norm, seed, None, ["timed out"]
    if done.returncode:
        return name, norm, seed, None, done.stderr.strip().splitlines()[-1:]
    history = json.loads((out / norm / f"seed{seed}" / "history.json").read_text())["history"]
    return name, norm, seed, history, []


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300, help="seconds per run")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    p.add_argument("--holdout", type=int, default=5000,
                   help="score on this many held-out training images, not the test set (0: test set)")
    p.add_argument("--norms", nargs="+", default=["bn", "ln", "gn"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--config", action="append", type=parse_config, required=True)
    args = p.parse_args()
    jobs = [(name, settings, norm, seed, args) for name, settings in args.config
            for norm in args.norms for seed in args.seeds]
    results = {}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for future in as_completed([pool.submit(run, job) for job in jobs]):
            name, norm, seed, history, err = future.result()
            results.setdefault((name, norm), []).append((seed, history, err))
            acc = statistics.mean(history["test_acc"][-3:]) if history else float("nan")
            print(f"done {norm} {name} seed {seed}: last3 {acc:.2f} {err or ''}", flush=True)
            write_table(results, args.out)
    print((Path(args.out) / "sweep.txt").read_text())


def write_table(results, out):
    rows = []
    for (name, norm), runs in results.items():
        last3 = [statistics.mean(h["test_acc"][-3:]) for _, h, _ in runs if h]
        errors = [e for _, h, e in runs if not h]
        rows.append({"config": name, "norm": norm, "last3_mean": statistics.mean(last3) if last3 else None,
                     "per_seed": last3, "train_acc_last": [h["train_acc"][-1] for _, h, _ in runs if h],
                     "errors": errors})
    (Path(out) / "sweep.json").write_text(json.dumps(rows, indent=2))
    lines = []
    for r in sorted(rows, key=lambda r: (r["norm"], -(r["last3_mean"] or 0))):
        per_seed = " ".join(f"{v:.2f}" for v in r["per_seed"])
        train = " ".join(f"{v:.1f}" for v in r["train_acc_last"])
        lines.append(f"{r['norm']} {r['config']:<24} last3 {r['last3_mean'] or float('nan'):6.2f}  "
                     f"[{per_seed}]  train {train} {r['errors'] or ''}")
    (Path(out) / "sweep.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
