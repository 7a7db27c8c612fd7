"""The study of issue 12: how each norm's test error depends on the batch size, and GroupNorm's on
its number of groups (after Wu & He, *Group Normalization*, 2018, Tables 2 and 3).

    python -m normstudy.study batch                 # BN, LN, GN x batch 2..512 x seeds 0 1 2: 81 runs
    python -m normstudy.study groups                # GN with G = 1..32 and BN, at batch 512, 16 and 4: 63 runs
    python -m normstudy.study batch --smoke         # a minute on a CPU: synthetic data, 1 epoch, seed 0, batch 256 and 512
    python -m normstudy.study ghost                 # BN, statistics over n = 2..32: at batch 512, and at 8n: 30 runs
    python -m normstudy.study order                 # both block orders, GN G = 1..32 and BN, batch 512 and 16: 84 runs
    python -m normstudy.study remedies              # BN + Batch Renorm, LN + WS, GN + WS, batch 2..512: 81 runs
    python -m normstudy.study batch --out results/batch-size --concurrency 4

Issue 20's questions are grids too: :func:`ghost_grid` (statistics or steps?), :func:`order_grid`
(block order) and :func:`remedies_grid` (Batch Renorm, Weight Standardization). The figures of
``ghost`` and ``remedies`` add the batch grid's own lines from its folder (``--reference``,
default ``results/batch-size``) when it has a summary.

A grid is a list of :class:`RunConfig` (:func:`batch_grid`, :func:`groups_grid`);
:func:`run_grid` runs the unfinished ones through a runner (:mod:`normstudy.runners`) into
``OUT/<run id>/`` and keeps ``OUT/summary.json``, ``OUT/results.md`` and the figures
(:func:`summary.write_summary`, over every finished run in OUT) up to date. Running the same command again continues the grid: finished
runs are skipped, interrupted ones resume from their checkpoints.

Bad input ends with one line on stderr and exit 2; failed (e.g. diverged) runs with exit 3 once
the others are done; Ctrl-C or SIGTERM with exit 130 or 143, finished runs and checkpoints kept.
"""
import contextlib
import dataclasses
import sys
from pathlib import Path

if __name__ == "__main__":  # first: importing torch (below) takes seconds, and a Ctrl-C meanwhile is one line too
    from normstudy import stopping
    stopping.install("python -m normstudy.study")

from . import checkpoints
from . import cli
from . import run as run_lib
from . import report
from . import study_report
from . import summary as summary_lib
from .config import NORMS, ORDERS, RunConfig
from .runners import RUNNERS, RunsFailed, make_runner

BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128, 256, 512)
GROUP_COUNTS = (1, 2, 4, 8, 16, 32)
SEEDS = (0, 1, 2)
EPOCHS = 20
GROUPS_BATCH_SIZES = (512, 16, 4)  # the groups grid: the recipe's batch and two small ones
NORM_BATCHES = (2, 4, 8, 16, 32)  # the ghost grid: images per BatchNorm statistic
GHOST_BATCH_SIZES = (512,)  # the ghost grid's optimizer batch for "statistics only"
GPUS = 8  # the ghost grid's other arrangement: optimizer batch GPUS * n (Wu & He's 8 GPUs of n images)
# The order grid: the recipe's batch and one small one, 16, the groups grid's: the seed's order's runs at
# both are already in results/groups (copy their folders into the order grid's to skip them).
ORDER_BATCH_SIZES = (512, 16)
REFERENCE = summary_lib.REFERENCE  # the batch grid whose lines the ghost and remedies figures add
SMOKE = {"batch_sizes": (256, 512), "groups_batch_sizes": (512, 256), "seeds": (0,), "epochs": 1,
         "norm_batches": (32, 64)}
PROG = "python -m normstudy.study"
DESCRIPTION = ("Train one of the study's grids: every norm at every batch size (Wu & He, Group Normalization, "
               "2018, Table 2) or GroupNorm at each number of groups, with BatchNorm (Table 3).")
EPILOG = """\
Each run writes OUT/<run id>/ as train.py's do. OUT/summary.json and OUT/results.md cover every
finished run in OUT (the grid's plan and what it misses beside them) and are rewritten as each run
finishes; the figures (batch: test_error_vs_batch.png, bn_vs_gn_curves.png; groups:
accuracy_vs_groups.png; ghost: statistics_or_steps.png; order: order_vs_groups.png; remedies:
test_error_vs_batch.png) when the grid ends or stops. Run the same command again to continue a
stopped grid: finished runs are skipped, interrupted ones resume from their checkpoints."""
GRIDS = tuple(summary_lib.FIGURES)  # batch, groups; issue 20's ghost, order, remedies


def _distinct(values):
    return tuple(dict.fromkeys(values))


def _order(configs):
    """Seed by seed, largest batch first: a stopped grid has whole rows for its first seeds, and the
    quick large-batch runs come before the slow small-batch ones."""
    norms = {norm: k for k, norm in enumerate(NORMS)}
    return sorted(configs, key=lambda c: (c.seed, -c.batch_size, norms[c.norm], c.groups or 0, ORDERS.index(c.order),
                                          c.norm_batch or 0, c.renorm, c.ws))


def longest_first(configs):
    """``configs`` with the most optimizer steps first (epochs over the batch size: the smallest
    batches), in their own order among equals. For many runs at once (``--concurrency``): the
    longest runs start first instead of last, where they would run on alone after the rest (the
    grid ends sooner); a grid stopped early then has its longest runs half done, not whole seeds."""
    return sorted(configs, key=lambda config: -config.epochs / config.batch_size)


def batch_grid(norms=NORMS, batch_sizes=BATCH_SIZES, seeds=SEEDS, epochs=EPOCHS, *, gn_groups=None,
               data="cifar10"):
    """Every norm at every batch size and seed (Table 2): 3 x 9 x 3 = 81 runs by default.

    GroupNorm has ``gn_groups`` groups (default: the recipe's, 2); the learning rate follows the
    batch (``recipe.peak_lr``). ``data="synthetic"`` for smoke runs. Returns the configs in the
    order they run (see :func:`_order`); duplicates are dropped."""
    return _order([RunConfig(norm=norm, seed=seed, batch_size=batch, epochs=epochs, data=data,
                             groups=gn_groups if norm == "gn" else None)
                   for norm in _distinct(norms) for batch in _distinct(batch_sizes) for seed in _distinct(seeds)])


def groups_grid(groups=GROUP_COUNTS, batch_sizes=GROUPS_BATCH_SIZES, seeds=SEEDS, epochs=EPOCHS, *,
                data="cifar10", bn=True):
    """GroupNorm with each number of groups G, plus BatchNorm for reference (``bn``), at each batch
    size and seed (Table 3): (6 + 1) x 3 x 3 = 63 runs by default.

    Every normalized layer of the network has 32 channels, so the rule is: groups must divide 32;
    channels per group = 32/G. G=1 is LayerNorm (it runs as ``norm="gn", groups=1``, so the curve is one
    model family throughout) and G=32 is InstanceNorm (one channel per group)."""
    configs = [RunConfig(norm="gn", groups=g, seed=seed, batch_size=batch, epochs=epochs, data=data)
               for g in _distinct(groups) for batch in _distinct(batch_sizes) for seed in _distinct(seeds)]
    if bn:
        configs += [RunConfig(norm="bn", seed=seed, batch_size=batch, epochs=epochs, data=data)
                    for batch in _distinct(batch_sizes) for seed in _distinct(seeds)]
    return _order(configs)


def ghost_grid(norm_batches=NORM_BATCHES, batch_sizes=GHOST_BATCH_SIZES, seeds=SEEDS, epochs=EPOCHS, *,
               data="cifar10", gpus=True):
    """Statistics or steps? (issue 20, part 1): BatchNorm with statistics over n images (ghost
    batches, ``RunConfig.norm_batch``) at each optimizer batch of ``batch_sizes`` (statistics only;
    the steps stay those of batch 512), and with ``gpus`` at batch 8n (Wu & He's arrangement: n
    images on each of 8 GPUs): (5 + 5) x 3 = 30 runs by default. The grid's third curve, plain BN
    at batch n (statistics and steps both), is the batch grid's. n must divide each batch; n equal
    to the batch is plain BN (that run is the batch grid's)."""
    configs = [RunConfig(norm="bn", norm_batch=n, seed=seed, batch_size=batch, epochs=epochs, data=data)
               for n in _distinct(norm_batches) for batch in _distinct(batch_sizes) for seed in _distinct(seeds)]
    if gpus:
        configs += [RunConfig(norm="bn", norm_batch=n, seed=seed, batch_size=GPUS * n, epochs=epochs, data=data)
                    for n in _distinct(norm_batches) for seed in _distinct(seeds)]
    return _order(dict.fromkeys(configs))


def order_grid(groups=GROUP_COUNTS, batch_sizes=ORDER_BATCH_SIZES, seeds=SEEDS, epochs=EPOCHS, *, data="cifar10",
               bn=True):
    """Block order (issue 20, part 2): GroupNorm with each number of groups (G=1 is LayerNorm, G=32
    InstanceNorm) and BatchNorm, in each block order, Conv -> ReLU -> Norm (the seed's) and
    Conv -> Norm -> ReLU (Wu & He's), at each batch size and seed: (6 + 1) x 2 x 2 x 3 = 84 runs by
    default, half of them (the seed's order) the groups grid's runs at batch 512 and 16."""
    plain = groups_grid(groups=groups, batch_sizes=batch_sizes, seeds=seeds, epochs=epochs, data=data, bn=bn)
    return _order(plain + [dataclasses.replace(config, order="norm-relu") for config in plain])


def remedies_grid(batch_sizes=BATCH_SIZES, seeds=SEEDS, epochs=EPOCHS, *, gn_groups=None, data="cifar10"):
    """The remedies Wu & He compare against (issue 20, part 3), each at every batch size and seed:
    BatchNorm with Batch Renormalization (schedule: ``models.RENORM``), and LayerNorm and
    GroupNorm with Weight Standardization: 3 x 9 x 3 = 81 runs by default. The plain norms' lines
    are the batch grid's."""
    configs = [RunConfig(norm="bn", renorm=True, seed=seed, batch_size=batch, epochs=epochs, data=data)
               for batch in _distinct(batch_sizes) for seed in _distinct(seeds)]
    configs += [RunConfig(norm=norm, ws=True, seed=seed, batch_size=batch, epochs=epochs, data=data,
                          groups=gn_groups if norm == "gn" else None)
                for norm in ("ln", "gn") for batch in _distinct(batch_sizes) for seed in _distinct(seeds)]
    return _order(configs)


def run_grid(configs, out, *, runner=None, data_dir="./data", download=True, device="auto", runtime=None,
             progress=True, kind=None, restart=False, reference=None):
    """Run every unfinished config of ``configs`` into ``out`` and return all their records (in
    the order of ``configs``; unfinished ones missing).

    Finished runs (``OUT/<run id>/record.json``) are skipped; the rest go through ``runner``
    (default ``LocalRunner()``), interrupted ones resuming from their checkpoints, or with
    ``restart`` starting over (their checkpoints deleted). The folder's summary
    (:func:`summary.write_summary`: ``summary.json`` and ``results.md`` after every finished run,
    the figures too at the end) covers every finished run in ``out``, the grid's and any other
    command's, with the grid (``kind``: one of :data:`GRIDS`, inferred from ``configs`` when
    ``None``) as its plan: of two commands, the one that writes last writes the whole truth.
    ``progress``: a bar over the whole grid (runs done of all, ETA) and a line per finished run;
    nothing with ``False``. An interruption (Ctrl-C) or :class:`runners.RunsFailed` goes on to the
    caller once the summary is written. ``reference``: the batch grid's folder for the ghost and
    remedies figures (:func:`summary.write_figures`).
    """
    configs = list(dict.fromkeys(configs))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report.load_summary(out)  # an unreadable summary is refused now, not after the training
    kind = kind or study_report.infer_kind([{"norm": c.norm, "groups": c.groups, **c.choices} for c in configs])
    plan = [config.run_id for config in configs]
    runner = runner if runner is not None else make_runner("local")
    records = {}
    for config in configs:
        record = run_lib.finished_record(out / config.run_id, config)
        if record is not None:
            records[config.run_id] = record
    todo = [config for config in configs if config.run_id not in records]
    if restart:
        _discard_checkpoints(out, todo)
    bar = _progress_bar(total=len(configs), done=len(records), enabled=progress)

    def on_record(record):
        records[record["id"]] = record
        summary_lib.write_summary(out, kind=kind, plan=plan, figures=False, reference=reference)
        if progress:
            final = record["final"]
            bar.write(f"{record['id']}: test acc {final['test_acc']:.2f} % (last 3 epochs "
                      f"{final['test_acc_last3_mean']:.2f} %), {record['seconds']:.0f} s"
                      + (", collapsed to chance" if run_lib.is_collapsed(record) else ""))
        bar.update(1)

    try:
        if todo:
            runner.run(todo, out=out, data_dir=data_dir, download=download, device=device, runtime=runtime,
                       on_record=on_record)
    finally:
        bar.close()
        summary_lib.write_summary(out, kind=kind, plan=plan, figures=True, reference=reference)
    return [records[c.run_id] for c in configs if c.run_id in records]


def _discard_checkpoints(out, configs):
    """``--restart``: the interrupted runs among ``configs`` start over: each one's checkpoint is
    deleted, holding its folder's lock. A folder that another process trains in is left to it."""
    for config in configs:
        run_dir = out / config.run_id
        if not (run_dir / "checkpoint.pt").exists():
            continue
        with contextlib.suppress(run_lib.RunFolderBusy), run_lib.folder_lock(run_dir):
            if run_lib.read_record(run_dir) is None:  # not finished meanwhile
                (run_dir / "checkpoint.pt").unlink(missing_ok=True)


def _progress_bar(*, total, done, enabled):
    from .loop import tqdm  # tqdm.auto where ipywidgets is installed (a widget in notebooks)
    return tqdm(total=total, initial=done, unit="run", desc="grid", disable=not enabled, dynamic_ncols=True,
                smoothing=0)


# --- the command line ---------------------------------------------------------------------------

def parse_args(argv=None, *, prog=PROG):
    p = cli._Parser(prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=cli._width_100,
                    parents=[cli.shared_parser()])
    p.add_argument("grid", choices=GRIDS,
                   help="batch: every norm at every batch size; groups: GroupNorm's number of groups, and BN; "
                        "ghost: BN's statistics over n images (ghost batches) at batch 512 and at 8n; order: both "
                        "block orders for GN (G = 1..32) and BN; remedies: BN + Batch Renorm, LN and GN + WS "
                        "at every batch size")
    p.add_argument("--batch-sizes", nargs="+", type=cli._positive_int, metavar="B",
                   help=f"default: {' '.join(map(str, BATCH_SIZES))} (batch), "
                        f"{' '.join(map(str, GROUPS_BATCH_SIZES))} (groups)")
    p.add_argument("--groups", nargs="+", type=cli._positive_int, metavar="G",
                   help=f"groups grid: the group counts, divisors of 32 (default: {' '.join(map(str, GROUP_COUNTS))}); "
                        "batch grid: GroupNorm's one group count (default: the recipe's, 2)")
    p.add_argument("--norm-batches", nargs="+", type=cli._positive_int, metavar="N",
                   help=f"ghost grid: images per BatchNorm statistic (default: {' '.join(map(str, NORM_BATCHES))}); "
                        f"--batch-sizes is then its statistics-only optimizer batch (default: 512)")
    p.add_argument("--reference", metavar="DIR",
                   help=f"ghost and remedies grids: the batch grid's folder, whose lines their figure adds "
                        f"(default: {REFERENCE}, if it has a summary)")
    p.add_argument("--runner", choices=RUNNERS, default="local", help="local (this process; default) or ray")
    p.add_argument("--concurrency", type=cli._positive_int,
                   help="runs at once (with --stack, stacks at once): with the local runner, threads of this "
                        "process, a CUDA stream each (default 1); with Ray, per worker (default 2 on a GPU, 1 on CPUs)")
    p.add_argument("--stack", type=_stack_size, default=1, metavar="K",
                   help="train up to K runs of one norm that share a batch size as one stacked model (grouped "
                        "convolutions; each run still its own folder, checkpoints and record); auto: on CUDA, stacks "
                        "of up to 32 runs and 4096 images a step where at least 27 runs share a norm, stacks of 3 at "
                        "batches up to 4, else single runs. Default 1: on the H200 stacks of 3 side by side beat "
                        "single runs on streams at batches 2 and 4 only (benchmarks/NOTES.md)")
    p.add_argument("--longest-first", action="store_true",
                   help="start the runs with the most steps (the smallest batches) first, not seed by seed from the "
                        "largest batch: with many runs at once the grid ends sooner")
    p.add_argument("--address", help="--runner ray: the Ray cluster's address (default: start a local one)")
    p.add_argument("--summary-only", action="store_true",
                   help="train nothing: rewrite the folder's summary.json, results.md and figures from its finished "
                        "runs, with this grid as the plan")
    return p.parse_args(argv)


def _stack_size(text):
    return "auto" if text == "auto" else cli._positive_int(text)


def configs_from_args(args):
    """The grid the arguments ask for; ``ValueError`` (one line) for a bad combination."""
    seeds = args.seeds or (SMOKE["seeds"] if args.smoke else SEEDS)
    epochs = args.epochs or (SMOKE["epochs"] if args.smoke else EPOCHS)
    data = "synthetic" if args.smoke else "cifar10"
    if args.norm_batches is not None and args.grid != "ghost":
        raise ValueError("--norm-batches applies to the ghost grid only")
    if args.reference is not None and args.grid not in ("ghost", "remedies"):
        raise ValueError("--reference applies to the ghost and remedies grids only")
    if args.grid in ("ghost", "order", "remedies"):
        return _question_configs(args, seeds=seeds, epochs=epochs, data=data)
    if args.grid == "batch":
        if args.groups is not None and len(args.groups) != 1:
            raise ValueError("--groups: the batch grid takes one group count (GroupNorm's), "
                             f"got {len(args.groups)}")
        if args.groups is not None and "gn" not in cli.norms_from(args):
            raise ValueError("--groups applies to GroupNorm only (--norms ... gn)")
        return batch_grid(norms=cli.norms_from(args),
                          batch_sizes=args.batch_sizes or (SMOKE["batch_sizes"] if args.smoke else BATCH_SIZES),
                          seeds=seeds, epochs=epochs, gn_groups=args.groups[0] if args.groups else None, data=data)
    if args.norms is not None:
        raise ValueError("--norms applies to the batch grid only (the groups grid is GroupNorm and BN)")
    return groups_grid(groups=args.groups or GROUP_COUNTS,
                       batch_sizes=args.batch_sizes or (SMOKE["groups_batch_sizes"] if args.smoke else GROUPS_BATCH_SIZES),
                       seeds=seeds, epochs=epochs, data=data)


def _question_configs(args, *, seeds, epochs, data):
    """The grid of one of issue 20's questions (ghost, order, remedies) that the arguments ask for."""
    if args.norms is not None:
        raise ValueError(f"--norms applies to the batch grid only (the {args.grid} grid has its own norms)")
    if args.grid == "ghost":
        if args.groups is not None:
            raise ValueError("--groups applies to GroupNorm only: the ghost grid is BatchNorm")
        return ghost_grid(norm_batches=args.norm_batches or (SMOKE["norm_batches"] if args.smoke else NORM_BATCHES),
                          batch_sizes=args.batch_sizes or GHOST_BATCH_SIZES, seeds=seeds, epochs=epochs, data=data)
    if args.grid == "order":
        return order_grid(groups=args.groups or GROUP_COUNTS,
                          batch_sizes=args.batch_sizes or (SMOKE["groups_batch_sizes"] if args.smoke else ORDER_BATCH_SIZES),
                          seeds=seeds, epochs=epochs, data=data)
    if args.groups is not None and len(args.groups) != 1:
        raise ValueError(f"--groups: the remedies grid takes one group count (GroupNorm's), got {len(args.groups)}")
    return remedies_grid(batch_sizes=args.batch_sizes or (SMOKE["batch_sizes"] if args.smoke else BATCH_SIZES),
                         seeds=seeds, epochs=epochs, gn_groups=args.groups[0] if args.groups else None, data=data)


def main(argv=None, *, prog=PROG):
    """The study's command line (``prog``: how it was invoked, for its messages; ``normstudy
    study`` passes its own); returns the exit code."""
    args = parse_args(argv, prog=prog)
    out = Path(args.out or f"runs/study-{args.grid}" + ("-smoke" if args.smoke else ""))
    return cli.exit_code(prog, lambda: _study(args, out, prog=prog),
                         kept=f"finished runs are kept in {out} and interrupted ones in their checkpoints "
                              "(run the same command again to continue)")


def _study(args, out, *, prog=PROG):
    """The study command's work: the grid (or only its summary), then its table. Failed runs end it
    with exit 3 once the others are done."""
    configs = configs_from_args(args)  # bad settings are refused before any data is read
    if args.longest_first:
        configs = longest_first(configs)
    held = summary_lib.folder_kind(report.load_summary(out)) if out.is_dir() else None
    if held not in (None, args.grid) and not args.quiet:
        print(f"{out} holds the {held} grid: its summary keeps that grid's tables and figures, over every finished "
              f"run, with this {args.grid} grid as the plan", flush=True)
    if args.summary_only:
        return _summary_only(args, configs, out)
    stack = args.stack
    runner = make_runner(args.runner, concurrency=args.concurrency, address=args.address,
                         log=None if args.quiet else _write_line, stack=stack)
    cli._writable_dir(out)
    if not args.quiet:
        print(f"{args.grid} grid: {len(configs)} runs into {out}", flush=True)
    try:
        run_grid(configs, out, runner=runner, data_dir=args.data_dir, download=not args.no_download,
                 device=args.device, runtime=args.runtime, progress=not args.quiet, kind=args.grid,
                 restart=args.restart, reference=args.reference)
    except RunsFailed as err:
        print(f"{prog}: {err}; {_after_failures(err, configs, out)}", file=sys.stderr)
        return cli.EXIT_DIVERGED
    if not args.quiet:
        print((out / "results.md").read_text())


def _summary_only(args, configs, out):
    """``--summary-only``: the folder's summary with the grid as its plan, training nothing (so
    with no runner: ``--runner ray`` needs no Ray). A broken record of the grid is refused in one
    line; with no finished run in ``out`` it says so and writes nothing."""
    if args.restart:
        raise ValueError("--restart trains; it does not go with --summary-only")
    if args.runner == "local":
        make_runner("local", address=args.address)  # refuses what the local runner does not take
    for config in configs:  # a broken record, or another configuration's, in the grid's place
        run_lib.finished_record(out / config.run_id, config)
    text = (summary_lib.write_summary(out, kind=args.grid, plan=[c.run_id for c in configs], reference=args.reference)
            if out.is_dir() else None)
    if text is None:
        if not args.quiet:
            print(f"no finished runs of this grid in {out} (0 of {len(configs)}): nothing to summarize")
        return
    if not args.quiet:
        print(text)


def _after_failures(failed, configs, out):
    """What the line about failed runs ends with: how many of the grid finished, and where their
    table is (only if one was written); for a refused checkpoint, how to start its run over."""
    finished = sum((out / config.run_id / "record.json").is_file() for config in configs)
    text = (f"{finished} of {len(configs)} runs have finished (see {out / 'results.md'})" if finished
            else "no run of the grid has finished")
    if any(why.startswith(f"{checkpoints.CheckpointError.__name__}: ") for why in failed.failures.values()):
        text += "; run again with --restart to start the interrupted runs over, discarding their checkpoints"
    return text


def _write_line(line):
    from .loop import tqdm
    tqdm.write(line)


if __name__ == "__main__":
    sys.exit(main())
