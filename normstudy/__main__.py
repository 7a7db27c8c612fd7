"""``python -m normstudy COMMAND ...``: the ``normstudy`` command without installing it (see
:mod:`normstudy.command`)."""
import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main())
