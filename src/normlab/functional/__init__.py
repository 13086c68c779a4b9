"""normlab's functional core: every norm as explicit math with a hand-derived backward.

Same signatures and semantics as the ``torch.nn.functional`` namesakes; none of them calls torch's
own normalization kernels. The shared primitive and its formulas live in ``_normalize.py``; the
statistics routine in ``moments.py``.
"""

from normlab.functional.batch_norm import batch_norm, updated_running_stats
from normlab.functional.fused import add_layer_norm, add_rms_norm, batch_norm_act, group_norm_act
from normlab.functional.group_norm import group_norm
from normlab.functional.instance_norm import instance_norm
from normlab.functional.layer_norm import layer_norm
from normlab.functional.moments import Moments, merge_moments, moments
from normlab.functional.rms_norm import rms_norm

__all__ = [
    "Moments",
    "add_layer_norm",
    "add_rms_norm",
    "batch_norm",
    "batch_norm_act",
    "group_norm",
    "group_norm_act",
    "instance_norm",
    "layer_norm",
    "merge_moments",
    "moments",
    "rms_norm",
    "updated_running_stats",
]
