"""Execute notebooks, as Jupyter's "Run all" then "Save" would.

    python scripts/run_notebooks.py ERA_Session8_Assignment_*_v1.ipynb           # the real runs, in place
    python scripts/run_notebooks.py --smoke ERA_Session8_Assignment_*_v1.ipynb   # into runs/notebooks-smoke/

With ``--smoke`` (or the ``CI`` variable set) the notebooks train one epoch on synthetic data, and
the executed copies go to ``--out``: the committed notebooks and their 20-epoch outputs are never
overwritten by a smoke run. A path that is not a readable notebook is refused in one line (exit 2)
before any notebook runs.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

PROG = "run_notebooks.py"


class NotebookError(ValueError):
    """A path that is not a notebook this script can run (one line)."""


def read_notebooks(paths):
    """``[(path, notebook)]`` for ``paths``; :class:`NotebookError` for the first that is missing
    or not a notebook."""
    notebooks = []
    for path in map(Path, paths):
        try:
            notebooks.append((path, nbformat.read(path, as_version=4)))
        except OSError as err:
            raise NotebookError(f"{path}: {err.strerror or err}") from None
        except Exception as err:  # noqa: BLE001 - nbformat's reader raises many kinds for a file that is no notebook
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise NotebookError(f"{path}: not a notebook ({text})") from None
    return notebooks


def main(paths, *, smoke=False, out=Path("runs/notebooks-smoke")):
    """Execute each notebook in ``paths`` (in its own folder); return the paths written.
    :class:`NotebookError` before any runs if one of them is not a notebook."""
    written = []
    notebooks = read_notebooks(paths)
    env_smoke = bool(os.environ.get("CI"))
    if smoke:
        os.environ["CI"] = "true"  # the notebooks' smoke switch
    for path, nb in notebooks:
        start = time.perf_counter()
        NotebookClient(nb, timeout=1800, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        target = path
        if smoke or env_smoke:
            Path(out).mkdir(parents=True, exist_ok=True)
            target = Path(out) / path.name
        nbformat.write(nb, target)
        written.append(target)
        print(f"executed {path} in {time.perf_counter() - start:.1f} s -> {target}", flush=True)
    return written


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def command(argv=None):
    """The command line: the exit code (2 and one line for a path that is not a notebook)."""
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+")
    parser.add_argument("--smoke", action="store_true", help="one epoch on synthetic data; write copies to --out")
    parser.add_argument("--out", type=Path, default=Path("runs/notebooks-smoke"))
    args = parser.parse_args(argv)
    try:
        main(args.notebooks, smoke=args.smoke, out=args.out)
    except NotebookError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(command())
