"""The ``normstudy`` command, one front door to the package (``pip install -e .`` installs it;
``python -m normstudy`` is the same):

    normstudy train --norm gn --groups 4      # train.py's command line (normstudy.cli), same flags
    normstudy study batch --smoke             # python -m normstudy.study's, same flags
    normstudy summarize results/groups        # rewrite a folder's summary from its finished runs

``train`` and ``study`` hand their arguments on unchanged, so they answer as ``train.py`` and
``python -m normstudy.study`` do (the same help, errors and exit codes). ``summarize`` trains
nothing; it reuses the writers those commands end with.
"""
import argparse
import json
import sys
from pathlib import Path

PROG = "normstudy"
EXIT_BAD_INPUT = 2  # as train.py's and the study's
SUMMARIZE = f"""\
Rewrite OUT's summary from the finished runs in it (OUT/<run id>/record.json), training nothing.
A study grid's folder (its summary.json names the grid, batch or groups) gets the study's tables
and figures, as `python -m normstudy.study GRID --out OUT --summary-only` writes them; any other
folder gets train.py's: summary.json, results.md and comparison.png. Broken records are skipped
and named. Example: {PROG} summarize results/groups"""


# Each command imports what it needs when it runs: `normstudy --help` answers without torch.

def _train(argv):
    from . import cli
    return cli.main(argv)


def _study(argv):
    from . import study  # imported when asked for: the study's runners are not train's business
    return study.main(argv)


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
    """``normstudy summarize``'s work (see :data:`SUMMARIZE`): rewrite ``out``'s summary with the
    study's writer when ``out`` holds a grid, else with :func:`report.write_summary`."""
    from . import report
    if not out.is_dir():
        raise ValueError(f"{out} is not a folder")
    records, skipped = report.load_records(out)
    if not records:
        raise ValueError(f"no finished runs in {out} (folders holding a record.json)"
                         + (f"; {len(skipped)} broken, e.g. {skipped[0]}" if skipped else ""))
    grid = _grid_kind(out)
    if grid is None:
        text = report.write_summary(out)  # lists the skipped runs itself
    else:
        for line in skipped:
            print(f"{PROG} summarize: skipped (broken): {line}", file=sys.stderr)
        text = _write_grid_summary(out, grid, records)
    if not quiet:
        print(text)


def _grid_kind(out):
    """``"batch"`` or ``"groups"`` when ``out/summary.json`` is a study grid's summary, else ``None``."""
    from .study import FIGURES
    path = out / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err}); move it away to write a new summary") from None
    kind = summary.get("kind") if isinstance(summary, dict) else None
    return kind if kind in FIGURES and "cells" in summary else None


def _write_grid_summary(out, kind, records):
    """The study's summary of ``records`` (through :func:`study.write_summary`), planned as the
    study's default grid of ``kind`` or its ``--smoke`` grid, whichever holds every finished run
    (so that the missing runs are named); failing both, the finished runs alone."""
    from . import study
    from .config import RunConfig
    finished = {RunConfig.from_dict(record["config"]) for record in records}
    planned = sorted(finished, key=lambda config: config.run_id)
    for options in ([], ["--smoke"]):
        grid = study.configs_from_args(study.parse_args([kind, *options]))
        if finished <= set(grid):
            planned = grid
            break
    study.write_summary(out, planned, records, kind=kind)
    return (out / "results.md").read_text()
