"""Execute notebooks in place, keeping their outputs (as Jupyter's "Run all" then "Save" would).

    python scripts/run_notebooks.py ERA_Session8_Assignment_*_v1.ipynb
"""
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def main(paths):
    for path in map(Path, paths):
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=1800, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        nbformat.write(nb, path)
        print(f"executed {path} in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
