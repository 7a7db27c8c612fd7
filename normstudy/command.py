"""The ``normstudy`` command, one front door to the package (``pip install -e .`` installs it;
``python -m normstudy`` is the same):

    normstudy train --norm gn --groups 4      # train.py's command line (normstudy.cli), same flags
    normstudy study batch --smoke             # python -m normstudy.study's, same flags
    normstudy summarize results/groups        # rewrite a folder's summary from its finished runs

``train`` and ``study`` hand their arguments on unchanged to train.py's and the study's command
lines (the same options, help, errors and exit codes), named as invoked (``normstudy train:
error: ...``). ``summarize`` trains nothing; it calls the one writer those commands end with
(:func:`summary.write_summary`).
"""
import argparse
import sys
from pathlib import Path

PROG = "normstudy"
EXIT_BAD_INPUT = 2  # as train.py's and the study's
SUMMARIZE = f"""\
Rewrite OUT's summary from every finished run in it (OUT/<run id>/record.json), training nothing.
A study grid's folder (its summary.json names the grid: batch, groups, ghost, order or remedies)
keeps the grid's tables, figures and plan (what is missing); any other folder gets train.py's
table and comparison.png.
Broken records are skipped and named. Example: {PROG} summarize results/groups"""


# Each command imports what it needs when it runs: `normstudy --help` answers without torch.

def _train(argv):
    from . import cli
    return cli.main(argv, prog=f"{PROG} train")


def _study(argv):
    from . import study  # imported when asked for: the study's runners are not train's business
    return study.main(argv, prog=f"{PROG} study")


def _summarize(argv):
    from . import cli
    p = cli._Parser(prog=f"{PROG} summarize", description=SUMMARIZE,
                    formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=100))
    p.add_argument("out", metavar="OUT", help="a folder of finished runs: train.py's --out, or a study grid's")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (no table)")
    args = p.parse_args(argv)
    return cli.exit_code(f"{PROG} summarize", lambda: summarize(Path(args.out), quiet=args.quiet),
                         kept="nothing was trained, nothing is lost (run it again)")


COMMANDS = {  # name: (help, what runs it with the remaining arguments)
    "train": ("train runs: train.py's command line, the same options (normstudy train --help)", _train),
    "study": ("train one of the study's grids: python -m normstudy.study's (normstudy study --help)", _study),
    "summarize": ("rewrite a folder's summary and tables from its finished runs, training nothing", _summarize),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message, as cli._Parser
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _parser():
    commands = "\n".join(f"  {name:<10} {text}" for name, (text, _) in COMMANDS.items())
    p = _Parser(prog=PROG, description="BatchNorm vs LayerNorm vs GroupNorm on a small CIFAR-10 CNN.",
                epilog=f"commands:\n{commands}\n\n'{PROG} COMMAND --help' lists a command's options.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", metavar="COMMAND", choices=COMMANDS, help="train, study or summarize (below)")
    p.add_argument("arguments", metavar="...", nargs=argparse.REMAINDER, help="the command's own arguments")
    return p


def main(argv=None):
    """Run ``normstudy COMMAND ...`` and return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]][1](argv[1:])
    parser = _parser()
    if argv[:1] in (["-h"], ["--help"]):
        parser.print_help()
        return 0
    parser.error(("a COMMAND is required" if not argv else f"unknown COMMAND {argv[0]!r}")
                 + f": choose {', '.join(COMMANDS)}")  # one line, exit 2


def summarize(out, *, quiet=False):
    """``normstudy summarize``'s work (see :data:`SUMMARIZE`): rewrite ``out``'s summary with
    :func:`summary.write_summary`, the grid's plan kept (or, for a grid summary written before
    plans were kept, the study's grid that holds every finished run)."""
    from . import report, summary as summary_lib
    if not out.is_dir():
        raise ValueError(f"{out} is not a folder")
    records, skipped = report.load_records(out)
    if not records:
        raise ValueError(f"no finished runs in {out} (folders holding a record.json)"
                         + (f"; {len(skipped)} broken, e.g. {skipped[0]}" if skipped else ""))
    previous = report.load_summary(out)
    kind = summary_lib.folder_kind(previous)
    plan = None
    if kind is not None and summary_lib.folder_plan(previous) is None:
        plan = _inferred_plan(kind, records)
    text = summary_lib.write_summary(out, plan=plan)
    if not quiet:
        print(text)


def _inferred_plan(kind, records):
    """The run ids of the study's default grid of ``kind`` or its ``--smoke`` grid, whichever holds
    every finished run (so that the missing runs are named); failing both, the finished runs."""
    from . import study
    from .config import RunConfig
    finished = {RunConfig.from_dict(record["config"]) for record in records}
    for options in ([], ["--smoke"]):
        grid = study.configs_from_args(study.parse_args([kind, *options]))
        if finished <= set(grid):
            return [config.run_id for config in grid]
    return sorted(config.run_id for config in finished)
