"""Execute notebooks, as Jupyter's "Run all" then "Save" would.

    python scripts/run_notebooks.py ERA_Session8_Assignment_*_v1.ipynb           # the real runs, in place
    python scripts/run_notebooks.py --smoke ERA_Session8_Assignment_*_v1.ipynb   # into runs/notebooks-smoke/

With ``--smoke`` (or the ``CI`` variable set) the notebooks train one epoch on synthetic data, and
the executed copies go to ``--out``: the committed notebooks and their 20-epoch outputs are never
overwritten by a smoke run.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def main(paths, *, smoke=False, out=Path("runs/notebooks-smoke")):
    """Execute each notebook in ``paths`` (in its own folder); return the paths written."""
    written = []
    env_smoke = bool(os.environ.get("CI"))
    if smoke:
        os.environ["CI"] = "true"  # the notebooks' smoke switch
    for path in map(Path, paths):
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+")
    parser.add_argument("--smoke", action="store_true", help="one epoch on synthetic data; write copies to --out")
    parser.add_argument("--out", type=Path, default=Path("runs/notebooks-smoke"))
    args = parser.parse_args()
    main(args.notebooks, smoke=args.smoke, out=args.out)
    sys.exit(0)
