"""LayerNorm variant: each image normalized over all its channels and pixels (C, H, W).

Implemented as ``nn.GroupNorm(1, C)``, which keeps a per-channel scale and shift; the statistics
never mix images, so training and evaluation compute the same function.
"""
from normstudy.models import CifarNet


def Net(**kwargs):
    """The study's CNN with ``nn.GroupNorm(1, C)`` after every 3x3 conv (keywords go to CifarNet)."""
    return CifarNet(norm="ln", **kwargs)
