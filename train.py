"""Train the study's CNN on CIFAR-10 with BatchNorm, LayerNorm and/or GroupNorm.

    python train.py --norm all --epochs 20 --data-dir ./data --out results --seed 0
    python train.py --norm gn --smoke              # seconds, on small synthetic data

For every variant and seed it writes into ``OUT/<norm>/seed<k>/``: ``history.json`` (per-epoch
metrics and the run's settings), ``curves.png``, ``misclassified.png``, ``weights.pt`` and
``checkpoint.pt`` (the last complete epoch; ``--resume`` continues from it). It then writes
``OUT/summary.json``, ``OUT/results.md`` and, with several variants, ``OUT/comparison.png`` from
every run found under OUT. Bad input ends with one line on stderr and a non-zero exit.
"""
import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import data as data_lib
import engine
import network
import recipe as recipe_lib
import utils

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def _setting(text):
    key, sep, value = text.partition("=")
    if not sep or key not in recipe_lib.RECIPE:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE with KEY one of "
                                         f"{', '.join(recipe_lib.RECIPE)}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_args(argv=None):
    p = _Parser(prog="train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--norm", choices=(*network.NORMS, "all"), default="all", help="variant(s) to train")
    p.add_argument("--epochs", type=_positive_int, help=f"default {recipe_lib.RECIPE['epochs']}")
    p.add_argument("--batch-size", type=_positive_int, help=f"default {recipe_lib.RECIPE['batch_size']}")
    p.add_argument("--groups", type=_positive_int, help="GroupNorm groups for --norm gn (default 2)")
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one run per seed (default 0)")
    p.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set lr=0.1 (see recipe.py)")
    p.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py/")
    p.add_argument("--no-download", action="store_true", help="never download the dataset")
    p.add_argument("--holdout", type=_positive_int, metavar="N",
                   help="evaluate on N held-out training images instead of the test set (recipe search)")
    p.add_argument("--out", default="results", help="output folder")
    p.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cuda, cpu, ...")
    p.add_argument("--resume", action="store_true", help="continue runs from their checkpoints")
    p.add_argument("--smoke", "--dry-run", action="store_true",
                   help="quick run on small synthetic data (1 epoch unless --epochs)")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs, no bf16: plain fp32 steps")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step: faster epochs, 20-35 s of compiling on a cold cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def recipe_from_args(norm, args):
    overrides = dict(args.set)
    for key, value in (("epochs", args.epochs), ("batch_size", args.batch_size), ("gn_groups", args.groups)):
        if value is not None:
            overrides[key] = value
    if args.smoke and args.epochs is None:
        overrides["epochs"] = 1
    return recipe_lib.recipe_for(norm, **overrides)


def runtime_from_args(args):
    if args.eager:
        return {"cuda_graph": False, "amp": None, "channels_last": False, "fused_norm": False}
    return {"compile": True} if args.compile else None


def build_model(norm, recipe):
    return network.CifarNet(norm, **recipe_lib.model_kwargs(recipe))


def _writable_dir(path):
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise OSError(f"cannot write to output folder {path}: {err.strerror or err}") from None
    return path


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def run_one(norm, seed, *, args, dataset, device, out):
    """Train one variant with one seed and write its artifacts; returns the run record."""
    recipe = recipe_from_args(norm, args)
    engine.seed_everything(seed)
    model = build_model(norm, recipe)
    run_dir = _writable_dir(out / norm / f"seed{seed}")
    checkpoint = run_dir / "checkpoint.pt"
    history = engine.fit(model, dataset, norm=norm, recipe=recipe, device=device, seed=seed,
                         checkpoint_path=checkpoint, resume=args.resume and checkpoint.exists(),
                         progress=not args.quiet, runtime=runtime_from_args(args))
    test_loader = data_lib.test_loader(dataset, device=device)
    tta_acc = utils.test(model, device, test_loader, torch.nn.CrossEntropyLoss(), tta_flip=True)[1]
    record = {"norm": norm, "seed": seed, "device": device_name(device), "evaluated_on": (
                  f"{args.holdout} held-out training images" if args.holdout else "test set"),
              "params": sum(p.numel() for p in model.parameters()), "recipe": recipe,
              "test_acc_tta_flip": tta_acc,
              "history": history}
    engine.write_json(run_dir / "history.json", record)
    engine.save_torch(run_dir / "weights.pt", model.state_dict())
    write_run_figures(run_dir, record, model=model, device=device, dataset=dataset)
    return record


def write_run_figures(run_dir, record, *, model, device, dataset):
    """``curves.png`` and ``misclassified.png`` of one run, from its record and trained model."""
    title = f"{record['norm'].upper()} seed {record['seed']}"
    history = record["history"]
    engine.save_figure(run_dir / "curves.png", utils.printTrainTest_LossAcc(
        history["train_loss"], history["train_acc"], history["test_loss"], history["test_acc"], title=title))
    engine.save_figure(run_dir / "misclassified.png", utils.show_misclassified(
        model, device, dataset, title=f"{title}: misclassified"))


# --- summary over every run under OUT -----------------------------------------------------------

def _mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records):
    """Per variant: the issue's summary fields, one value per seed."""
    summary = {}
    for norm in network.NORMS:
        runs = sorted((r for r in records if r["norm"] == norm), key=lambda r: r["seed"])
        if not runs:
            continue
        hists = [r["history"] for r in runs]
        summary[norm] = {
            "params": runs[0]["params"], "epochs": len(hists[0]["test_acc"]),
            "batch_size": runs[0]["recipe"]["batch_size"], "seeds": [r["seed"] for r in runs],
            "test_acc_last3_mean": [statistics.mean(h["test_acc"][-3:]) for h in hists],
            "test_acc_last3_min": [min(h["test_acc"][-3:]) for h in hists],
            "test_acc_best": [max(h["test_acc"]) for h in hists],
            "train_acc_last": [h["train_acc"][-1] for h in hists],
            "test_acc_tta_flip": [r["test_acc_tta_flip"] for r in runs],
            # The first epoch carries one-off warm-up (cuDNN autotuning); the median is steady state.
            "seconds_per_epoch": [statistics.median(h["epoch_seconds"]) for h in hists],
            "device": runs[0]["device"], "recipe": runs[0]["recipe"],
        }
    return summary


def results_table(summary):
    lines = ["| variant | params | seeds | train acc (last epoch) | test acc (mean of last 3 epochs) "
             "| worst of last 3 | best test acc | test acc, flip TTA | s/epoch |",
             "|---|---|---|---|---|---|---|---|---|"]
    names = {"bn": "BatchNorm", "ln": "LayerNorm (GN, 1 group)", "gn": "GroupNorm (2 groups)"}
    for norm, s in summary.items():
        cells = [_mean_std(s[k]) for k in ("train_acc_last", "test_acc_last3_mean")]
        lines.append(f"| {names[norm]} | {s['params']:,} | {len(s['seeds'])} | "
                     + " | ".join(f"{m:.2f} ± {sd:.2f} %" for m, sd in cells)
                     + f" | {min(s['test_acc_last3_min']):.2f} % | {max(s['test_acc_best']):.2f} % | "
                     f"{statistics.mean(s['test_acc_tta_flip']):.2f} % | "
                     f"{statistics.mean(s['seconds_per_epoch']):.2f} |")
    device = next(iter(summary.values()))["device"] if summary else "?"
    return "\n".join(lines) + f"\n\nMean ± standard deviation over seeds; device: {device}.\n"


def mean_history(records, norm):
    """Per-epoch mean over the seeds of one variant, for the comparison figure."""
    hists = [r["history"] for r in records if r["norm"] == norm]
    return {key: [statistics.mean(v) for v in zip(*(h[key] for h in hists))] for key in hists[0]}


def write_summary(out):
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/seed*/history.json"))]
    summary = summarize(records)
    engine.write_json(out / "summary.json", summary)
    table = results_table(summary)
    engine.write_text(out / "results.md", table)
    if len(summary) > 1:
        engine.save_figure(out / "comparison.png", utils.plot_comparison(
            {norm.upper(): mean_history(records, norm) for norm in summary}))
    return table


def load_dataset(args):
    if args.smoke:
        dataset = data_lib.load_synthetic_cifar10()
    else:
        dataset = data_lib.load_cifar10(args.data_dir, download=not args.no_download)
    return data_lib.holdout_split(dataset, args.holdout) if args.holdout else dataset


def main(argv=None):
    args = parse_args(argv)
    norms = network.NORMS if args.norm == "all" else (args.norm,)
    out = Path(args.out)
    try:
        if args.eager and args.compile:
            raise ValueError("--eager and --compile exclude each other")
        for norm in norms:  # reject bad settings (e.g. groups) before any data is read
            build_model(norm, recipe_from_args(norm, args))
        _writable_dir(out)
        if args.resume and not any((out / n / f"seed{s}" / "checkpoint.pt").exists()
                                   for n in norms for s in args.seed):
            raise engine.CheckpointError(f"--resume: no checkpoint under {out} for "
                                         f"{', '.join(norms)}, seed(s) {args.seed}")
        dataset = load_dataset(args)
        device = engine.pick_device(args.device)
        print(f"device: {device_name(device)}", flush=True)
        for norm in norms:
            for seed in args.seed:
                run_one(norm, seed, args=args, dataset=dataset, device=device, out=out)
        print(write_summary(out))
    except utils.NonFiniteLossError as err:
        print(f"train.py: diverged: {err}; the last good epoch is in its checkpoint.pt", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print(f"train.py: interrupted; every completed epoch is saved under {out} "
              "(run again with --resume to continue)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (data_lib.DatasetError, engine.CheckpointError, ValueError, OSError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
