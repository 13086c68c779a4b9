"""Drop-in ``torch.nn`` normalization modules over :mod:`normlab.functional`."""

from normlab.nn.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
)
from normlab.nn.normalization import GroupNorm, LayerNorm, RMSNorm
from normlab.nn.utils import nonfinite_buffers

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
    "nonfinite_buffers",
]
