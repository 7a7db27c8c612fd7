"""BatchNorm variant: each channel normalized over the batch and the image (N, H, W).

Its statistics depend on the other images of the batch; at evaluation it uses running averages.
"""
from normstudy.models import CifarNet


def Net(**kwargs):
    """The study's CNN with ``nn.BatchNorm2d`` after every 3x3 conv (keywords go to CifarNet)."""
    return CifarNet(norm="bn", **kwargs)
