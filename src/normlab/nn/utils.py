"""Small checks over whole models."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["nonfinite_buffers"]


def nonfinite_buffers(model: nn.Module) -> list[str]:
    """Names of floating-point buffers (running statistics and the like) holding NaN or inf.

    A model that trained through a bad batch with torch's norms (or normlab's with
    ``on_nonfinite="commit"``) keeps the poisoned estimates forever; this finds them, e.g.
    ``['layer1.0.bn1.running_var']``, so they can be recalibrated (``precise_bn``) or reset.
    """
    return [
        name
        for name, buf in model.named_buffers()
        if buf.is_floating_point() and not bool(torch.isfinite(buf).all())
    ]
