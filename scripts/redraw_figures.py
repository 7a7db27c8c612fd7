"""Redraw every run's figures under a results folder from its saved history and weights, on the CPU.

    python scripts/redraw_figures.py --results results/main --data-dir ./data

For when the plotting code changes after a GPU run: no retraining needed. (The gallery's
predictions come from an fp32 CPU forward pass; the run itself evaluated in bf16 on the GPU, so a
borderline image can differ.)

The misclassified images are drawn from the data each run trained on, so every run is checked
before anything is drawn: its record, its weights, and that the data given are its data (the
fingerprint its record or checkpoint keeps; for older runs with neither, CIFAR-10's 50,000
training and 10,000 test images). Anything else is refused in one line, exit 2, nothing written.
"""
import sys
from pathlib import Path

from normstudy import checkpoints, cli, data, models, recipe as recipe_lib, report, run, summary
from normstudy.config import RunConfig

PROG = "redraw_figures.py"
CIFAR10_SIZES = {"train": 50_000, "test": 10_000}


def parse_args(argv=None):
    p = cli._Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="results/main", help="the folder of run folders (default: results/main)")
    p.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py/ (default: ./data)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return cli.exit_code(PROG, lambda: redraw(Path(args.results), args.data_dir),
                         kept="each figure written is whole; run again to redraw them all")


def redraw(results, data_dir):
    """Check every run under ``results`` (:func:`check_runs`), then redraw their figures and the
    folder's summary and figures (the one writer: every finished run, a grid's kind and plan kept)."""
    runs = check_runs(results, data_dir)  # every run, before any figure is drawn
    report.load_summary(results)  # an unreadable summary: one line, before any figure is drawn
    for run_dir, record, model, dataset in runs:
        run.write_run_figures(run_dir, record, model=model, device="cpu", dataset=dataset)
        print("redrew", run_dir)
    print(summary.write_summary(results))


def check_runs(results, data_dir):
    """``[(run folder, record, model with its weights, dataset)]`` for every finished run under
    ``results``; ``ValueError`` (or another of ``cli.BAD_INPUT``) in one line for the first that
    cannot be redrawn as it was trained."""
    if not results.is_dir():
        raise ValueError(f"no such results folder: {results}")
    run_dirs = sorted(path.parent for path in results.glob("*/record.json"))
    if not run_dirs:
        raise ValueError(f"{results} holds no finished run (no */record.json)")
    datasets, runs = {}, []
    for run_dir in run_dirs:
        record = run.read_record(run_dir)  # a broken one: one line naming it
        config = RunConfig.from_dict(record["config"])
        key = (config.data, config.holdout)
        if key not in datasets:
            datasets[key] = run.load_data(config, data_dir=data_dir, download=False)
        check_data(run_dir, record, datasets[key], data_dir)
        model = models.CifarNet(config.norm, **recipe_lib.model_kwargs(record["recipe"]))
        # Weights saved before checksums existed are refused, naming the file: rerun that run.
        checkpoints.load_weights(model, run_dir / "weights.pt")
        runs.append((run_dir, record, model, datasets[key]))
    return runs


def check_data(run_dir, record, dataset, data_dir):
    """Refuse (``ValueError``) ``dataset`` unless it is the data the run in ``run_dir`` trained on:
    the fingerprint its record keeps (runs since it does), or its checkpoint's; for a CIFAR-10 run
    with neither, CIFAR-10's sizes (less a holdout)."""
    given = data.fingerprint(dataset)
    expected = record.get("data_fingerprint") or _checkpoint_fingerprint(run_dir / "checkpoint.pt")
    config = RunConfig.from_dict(record["config"])
    if expected is None:
        if config.data != "cifar10":
            return  # synthetic data are made, not read: the same every time
        expected = {"train": CIFAR10_SIZES["train"] - config.holdout, "test": config.holdout or CIFAR10_SIZES["test"]}
        given = {key: given[key] for key in expected}
    if given != expected:
        raise ValueError(f"{run_dir.name} was trained on other data than {data_dir} holds "
                         f"({_describe(expected)}, against {_describe(given)} there); "
                         "give the --data-dir it was trained on")


def _checkpoint_fingerprint(path):
    """The data fingerprint of the run that wrote the checkpoint at ``path``, or ``None``."""
    if not path.is_file():
        return None
    state = checkpoints.load_torch(path)  # a damaged one: one line naming it
    return state.get("run", {}).get("data") if isinstance(state, dict) else None


def _describe(fingerprint):
    text = f"{fingerprint['train']:,} training and {fingerprint['test']:,} test images"
    return text + (f", sha1 {fingerprint['sha1'][:12]}" if "sha1" in fingerprint else "")


if __name__ == "__main__":
    sys.exit(main())
