"""The command line of ``train.py``: arguments to run configurations, then :func:`run.run_one`
for each, then the summary of every finished run under ``--out`` (:func:`summary.write_summary`).
The options it shares with the study are defined once, in :func:`shared_parser`.

Bad input ends with one line on stderr and exit 2; a diverged run with exit 3; Ctrl-C or SIGTERM
with exit 130 or 143, every completed epoch kept in the run's checkpoint.
"""
import argparse
import json
import signal
import sys
from pathlib import Path

from . import checkpoints
from . import stopping
from . import data as data_lib
from . import recipe as recipe_lib
from . import report
from . import run as run_lib
from . import runtime as runtime_lib
from . import summary as summary_lib
from .config import NORMS, ORDERS, RunConfig

EXIT_BAD_INPUT, EXIT_DIVERGED = 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = stopping.EXIT_INTERRUPTED, stopping.EXIT_TERMINATED
DESCRIPTION = "Train the study's CNN on CIFAR-10 with BatchNorm, LayerNorm and/or GroupNorm."
EPILOG = f"""\
Each run writes OUT/<run id>/ (config.json, checkpoint.pt, record.json, weights.pt, curves.png,
misclassified.png), e.g. OUT/gn-g2-b512-e20-s0/; then OUT/summary.json, OUT/results.md and
OUT/comparison.png over every finished run in OUT. A finished run is never trained again.
The peak learning rate follows the batch: lr_per_32 * batch_size / 32 (lr_per_32 =
{recipe_lib.RECIPE['lr_per_32']}, so {recipe_lib.RECIPE['lr_per_32'] * 16:g} at batch 512).
Recipe keys for --set: {', '.join(recipe_lib.SETTINGS)} (types and ranges: normstudy/recipe.py).

Runtimes (--runtime; how a run executes, never what it computes; off CUDA each one is eager):
""" + "\n".join(f"  {name:<6} {what}" for name, what in runtime_lib.PRESETS.items())


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


def _seed(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"seed {value} must lie in [0, 2**32)")
    return value


def _setting(text):
    key, sep, value = text.partition("=")
    if not sep or key not in recipe_lib.SETTINGS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE with KEY one of "
                                         f"{', '.join(recipe_lib.SETTINGS)}")
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass  # checked below: names the key
    try:
        return key, recipe_lib.check_setting(key, value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _width_100(prog):
    return argparse.RawDescriptionHelpFormatter(prog, width=100)


def shared_parser():
    """The options train.py and the study share (``parents=[shared_parser()]``): one name, one
    default, one help and one check each. The singular ``--norm`` and ``--seed`` (and
    ``--dry-run`` for ``--smoke``) stay as hidden aliases. What a default means per command
    (one run or a grid) is resolved by :func:`norms_from` and each command's configs."""
    p = argparse.ArgumentParser(add_help=False)
    norms = p.add_argument_group("what to train (shared by train and study)")
    norms.add_argument("--norms", nargs="+", choices=(*NORMS, "all"), metavar="NORM",
                       help="bn, ln, gn or all (default: all; --norm works too)")
    norms.add_argument("--norm", nargs="+", choices=(*NORMS, "all"), dest="norms", help=argparse.SUPPRESS)
    norms.add_argument("--seeds", nargs="+", type=_seed, metavar="S",
                       help="one run per seed (default: 0 for train, 0 1 2 for a study grid; --smoke: 0; "
                            "--seed works too)")
    norms.add_argument("--seed", nargs="+", type=_seed, dest="seeds", help=argparse.SUPPRESS)
    norms.add_argument("--epochs", type=_positive_int,
                       help=f"passes over the training set (default: {recipe_lib.RECIPE['epochs']}; --smoke: 1)")
    norms.add_argument("--smoke", "--dry-run", action="store_true",
                       help="small synthetic data, one epoch: checks the machinery in about a minute, even on a CPU "
                            "(its accuracy says nothing about CIFAR-10)")
    where = p.add_argument_group("where and how (shared by train and study)")
    where.add_argument("--out", help="the folder of run folders and their summary (default: train: runs, "
                                     "runs/smoke with --smoke; study: runs/study-GRID, runs/study-GRID-smoke)")
    where.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py/ (default: ./data)")
    where.add_argument("--no-download", action="store_true", help="never download the dataset")
    where.add_argument("--device", default="auto",
                       help="auto (CUDA, else MPS, else CPU; the default), cuda, cuda:1, mps or cpu")
    where.add_argument("--runtime", choices=runtime_lib.PRESETS,  # None: fast, and not asked for
                       help="how a run executes, never what it computes (default: fast; train's --help "
                            "describes each)")
    where.add_argument("--restart", action="store_true",
                       help="start interrupted runs over, discarding their checkpoints (e.g. a damaged one)")
    where.add_argument("--quiet", action="store_true",
                       help="no progress bars (the study prints nothing but errors, no table either)")
    return p


def norms_from(args):
    """The norms ``--norms`` asks for, in table order (``all`` or none given: every norm)."""
    asked = args.norms or ["all"]
    return NORMS if "all" in asked else tuple(norm for norm in NORMS if norm in asked)


def parse_args(argv=None, *, prog="train.py"):
    p = _Parser(prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=_width_100,
                parents=[shared_parser()])
    p.add_argument("--batch-size", type=_positive_int,
                   help=f"images per step (default: {recipe_lib.RECIPE['batch_size']}); the lr follows it")
    p.add_argument("--groups", type=_positive_int,
                   help=f"GroupNorm's groups, a divisor of 32 (default: {recipe_lib.RECIPE['gn_groups']}); "
                        "GroupNorm runs only")
    p.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set cutout=8 (keys below)")
    p.add_argument("--holdout", type=_positive_int, metavar="N",
                   help="evaluate on N held-out training images instead of the test set (recipe search)")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs from their checkpoints")
    network = p.add_argument_group("the network's choices (issue 20; README: The study, part two)")
    network.add_argument("--order", choices=ORDERS, default=ORDERS[0],
                         help="each block's order: relu-norm (the seed's Conv -> ReLU -> Norm; default) or "
                              "norm-relu (Conv -> Norm -> ReLU, as in Wu & He's ResNet)")
    network.add_argument("--norm-batch", type=_positive_int, metavar="N",
                         help="BatchNorm only: statistics over groups of N images of each batch (ghost batches); "
                              "N divides --batch-size")
    network.add_argument("--renorm", action="store_true", help="BatchNorm only: Batch Renormalization (Ioffe 2017)")
    network.add_argument("--ws", action="store_true",
                         help="Weight Standardization of the convolutions a norm follows (Qiao et al. 2019)")
    return p.parse_args(argv)


def configs_from_args(args):
    """One :class:`RunConfig` per variant and seed (seeds in order, duplicates dropped)."""
    norms = norms_from(args)
    if args.groups is not None and "gn" not in norms:
        raise ValueError(f"--groups applies to GroupNorm only (--norm gn or all), not to --norm {' '.join(norms)}")
    for flag, asked in (("--norm-batch", args.norm_batch is not None), ("--renorm", args.renorm)):
        if asked and norms != ("bn",):
            raise ValueError(f"{flag} applies to BatchNorm only (--norm bn), not to --norm {' '.join(norms)}")
    epochs = args.epochs if args.epochs is not None else (1 if args.smoke else None)
    seeds = list(dict.fromkeys(args.seeds or [0]))
    return [RunConfig(norm=norm, seed=seed, batch_size=args.batch_size, epochs=epochs,
                      groups=args.groups if norm == "gn" else None, overrides=tuple(args.set),
                      data="synthetic" if args.smoke else "cifar10", holdout=args.holdout or 0,
                      order=args.order, norm_batch=args.norm_batch, renorm=args.renorm, ws=args.ws)
            for norm in norms for seed in seeds]


def _finished_already(config, out, record, *, runtime=None):
    """The line for a run that is not trained again. The runtime is not part of a run's id (it
    changes the speed, not the experiment), so ``--runtime`` into a folder that holds the run
    trains nothing: say how the run was trained, and how to get one with the asked runtime."""
    line = f"{config.run_id}: finished already in {out / config.run_id}, not trained again"
    if runtime is not None:
        used = ", ".join(key if value is True else f"{key}={value}"
                         for key, value in (record.get("runtime") or {}).items() if value) or "PyTorch's modules, fp32"
        line += f" (it was trained with: {used}; for a run with --runtime {runtime}, give another --out)"
    return line


# What a command refuses as bad input: one line on stderr, exit 2.
BAD_INPUT = (data_lib.DatasetError, checkpoints.CheckpointError, run_lib.RunFolderError, ValueError, OSError)


def exit_code(prog, body, *, kept):
    """Run a command's ``body()`` and return its exit code (``body``'s own, else 0), saying in one
    line on stderr how it ended otherwise: bad input (:data:`BAD_INPUT`, exit 2), Ctrl-C (130) or
    SIGTERM (143, re-raised), the last two with ``kept``: what is saved and how to go on. Signals,
    however many, are handled as :mod:`normstudy.stopping` says."""
    with stopping.handled(prog, kept):
        try:
            try:
                return body() or 0
            finally:
                stopping.work_done()
        except KeyboardInterrupt:
            stopping.say(signal.SIGINT)
            return EXIT_INTERRUPTED
        except SystemExit as stop:
            if stop.code == EXIT_TERMINATED:
                stopping.say(signal.SIGTERM)
            raise
        except BAD_INPUT as err:
            print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
            return EXIT_BAD_INPUT


def main(argv=None, *, prog="train.py"):
    """train.py's command line (``prog``: how it was invoked, for its messages; ``normstudy
    train`` passes its own); returns the exit code."""
    args = parse_args(argv, prog=prog)
    out = Path(args.out or ("runs/smoke" if args.smoke else "runs"))
    return exit_code(prog, lambda: _train_all(args, out, prog=prog),
                     kept=f"every completed epoch is saved under {out} (run again with --resume to continue)")


def _train_all(args, out, *, prog="train.py"):
    """train.py's work: each configuration's run (unless finished), then the summary of ``out``.
    A diverged run ends it with exit 3 and one line saying where its last good epoch is."""
    if args.resume and args.restart:
        raise ValueError("--resume and --restart exclude each other")
    configs = configs_from_args(args)  # bad settings are refused before any data is read
    device = runtime_lib.pick_device(args.device)
    _writable_dir(out)
    report.load_summary(out)  # an unreadable summary is refused now, not after the training
    if args.resume and not any((out / c.run_id / "checkpoint.pt").exists() for c in configs):
        raise checkpoints.CheckpointError(f"--resume: no checkpoint under {out} for "
                                          + ", ".join(c.run_id for c in configs))
    print(f"device: {runtime_lib.device_name(device)}", flush=True)
    dataset, warming = None, None
    try:
        for config in configs:
            record = run_lib.read_record(out / config.run_id)
            if record is not None:
                print(_finished_already(config, out, record, runtime=args.runtime), flush=True)
                continue
            if dataset is None:  # the CUDA context, cuDNN and the run's kernels load while the files are read
                warming = run_lib.warm_up_in_background(config, device=device, runtime=args.runtime)
                dataset = run_lib.load_data(config, data_dir=args.data_dir, download=not args.no_download)
            try:
                run_lib.run_one(config, out, dataset=dataset, device=device, runtime=args.runtime,
                                resume=args.resume, restart=args.restart, progress=not args.quiet)
            except FloatingPointError as err:
                print(f"{prog}: diverged: {err}; {_last_good_epoch(out / config.run_id)}", file=sys.stderr)
                return EXIT_DIVERGED
    finally:
        if warming is not None:  # never exit under a thread in CUDA's calls (an abort, exit 134)
            warming.join()
    print(summary_lib.write_summary(out))


def _last_good_epoch(run_dir):
    """Where a diverged run's last good epoch is: its checkpoint, only if one was written (a run
    diverging in its first epoch, or with --restart in the first epoch it retrains, has none)."""
    checkpoint = run_dir / "checkpoint.pt"
    if checkpoint.is_file():
        return f"its last good epoch is in {checkpoint}"
    return f"no checkpoint was written for {run_dir.name} (it diverged in its first epoch)"


def _one_line(err):
    text = str(err).strip()
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.strerror}" + (f": {err.filename}" if err.filename else "")
    return text.splitlines()[0] if text else type(err).__name__


def _writable_dir(path):
    import tempfile
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise OSError(f"cannot write to output folder {path}: {err.strerror or err}") from None
    return path
