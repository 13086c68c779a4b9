r"""Weight-standardized convolution (Qiao, Wang, Liu, Shen & Yuille, 2019).

Each output channel's filter is standardized over its fan-in, (C_in/groups, kH, kW), before the
convolution:

.. math::
    \hat W_o = \frac{W_o - \mu_o}{\sqrt{\sigma_o^2 + \epsilon}}, \qquad
    \mu_o = \mathrm{mean}(W_o), \quad \sigma_o^2 = \mathrm{mean}\bigl((W_o - \mu_o)^2\bigr)

so the layer's output no longer depends on the scale and offset of each filter, which smooths the
loss landscape. The paper pairs it with GroupNorm to train at 1-2 images per GPU (ResNet-50 with
GN+WS: 23.72% ImageNet top-1 error). The statistics come from
:func:`normlab.functional.moments` (float32 accumulation for low-precision weights, biased
variance); the gradient flows through the standardization by autograd.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from normlab.functional import _validate as v
from normlab.functional.moments import moments

__all__ = ["WSConv2d"]


class WSConv2d(nn.Conv2d):
    """A :class:`torch.nn.Conv2d` that convolves with its standardized weight.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as :class:`torch.nn.Conv2d`.
        eps: added to each filter's variance (> 0, keyword-only). The paper's code adds 1e-5 to
            the standard deviation instead; with default initialization a filter's variance is
            about 1/(3 * fan_in), so keep eps well below that for large fan-ins.

    The stored ``weight`` is the raw parameter (``state_dict`` keys are Conv2d's); use
    :meth:`standardized_weight` for the filters actually applied.

    Shape:
        As :class:`torch.nn.Conv2d`.
    """

    def __init__(self, *args: Any, eps: float = 1e-5, **kwargs: Any) -> None:
        v.check_eps("WSConv2d", eps)
        super().__init__(*args, **kwargs)
        self.eps = eps

    def standardized_weight(self) -> Tensor:
        """The filters the convolution applies: zero mean and unit variance per output channel."""
        mean, var = moments(self.weight, (1, 2, 3))
        w_hat = (self.weight.to(mean.dtype) - mean) * (var + self.eps).rsqrt()
        return w_hat.to(self.weight.dtype)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"
