"""Drop-in ``torch.nn`` normalization modules over :mod:`normlab.functional`."""

from normlab.nn.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
)
from normlab.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from normlab.nn.fused import BatchNormAct2d, FusedAddLayerNorm, FusedAddRMSNorm, GroupNormAct
from normlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from normlab.nn.normalization import GroupNorm, LayerNorm, RMSNorm
from normlab.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from normlab.nn.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from normlab.nn.utils import nonfinite_buffers
from normlab.nn.ws_conv import WSConv2d

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct2d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FusedAddLayerNorm",
    "FusedAddRMSNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GroupNorm",
    "GroupNormAct",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
    "SyncBatchNorm",
    "WSConv2d",
    "convert_sync_batchnorm",
    "nonfinite_buffers",
]
