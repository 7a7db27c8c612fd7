"""GroupNorm variant: each image's channels split into ``groups`` groups (2 by default), each
normalized over its channels and pixels.

Sits between LayerNorm (1 group) and InstanceNorm (one group per channel); like LayerNorm, it never
mixes images, so it behaves the same at any batch size.
"""
from normstudy.models import CifarNet


def Net(groups=2, **kwargs):
    """The study's CNN with ``nn.GroupNorm(groups, C)`` after every 3x3 conv."""
    return CifarNet(norm="gn", groups=groups, **kwargs)
