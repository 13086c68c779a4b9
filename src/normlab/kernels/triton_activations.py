"""The activations fused after a normalization, as Triton device functions shared by the row and
column kernels. ``ACT``: 0 none, 1 ReLU, 2 SiLU, 3 GELU (exact erf); codes as
``normlab.kernels.cpu.ACTIVATIONS``. ``act_grad`` is the derivative at the pre-activation ``z``.
"""

import triton
import triton.language as tl

__all__ = ["act_fwd", "act_grad"]


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.where(z < 0.0, 0.0, z)  # NaN stays NaN, as torch.relu (max may drop it)
    elif ACT == 2:
        z = z * tl.sigmoid(z)
    elif ACT == 3:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return z


@triton.jit
def act_grad(z, ACT: tl.constexpr):
    if ACT == 1:
        g = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        s = tl.sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        g = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    return g
