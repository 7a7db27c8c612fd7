"""Train the study's CNN on CIFAR-10 with BatchNorm, LayerNorm and/or GroupNorm.

    python train.py --norm all --seed 0 1 2      # the three variants, three seeds, into runs/
    python train.py --norm gn --groups 4 --batch-size 32
    python train.py --norm all --smoke           # seconds, on small synthetic data, into runs/smoke/

``python train.py --help`` lists every option; the machinery is in :mod:`normstudy.cli`.
"""
import sys

if __name__ == "__main__":  # first: importing torch (below) takes seconds, and a Ctrl-C meanwhile is one line too
    from normstudy import stopping
    stopping.install("train.py")

from normstudy.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
