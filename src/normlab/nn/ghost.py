r"""Ghost batch norm (Hoffer, Hubara & Soudry, 2017): batch statistics per virtual batch.

Large-batch training gives batch norm nearly noise-free statistics, which removes part of its
regularizing effect. Ghost batch norm splits the batch along dim 0 into consecutive *virtual
batches* of ``virtual_batch_size`` samples and normalizes each with its own statistics:

.. math::
    y_i = \gamma\,\frac{x_i - \mu_{B_k}}{\sqrt{\sigma^2_{B_k} + \epsilon}} + \beta
    \quad\text{for } x_i \text{ in virtual batch } B_k

while the loss, and so the gradient step, still covers the whole batch (each chunk's backward is
batch norm's backward with that chunk's statistics). Evaluation is batch norm's: the running
statistics, one affine map per channel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab.functional import _validate as v
from normlab.functional._normalize import Layout
from normlab.functional._ops import normalize
from normlab.functional.batch_norm import batch_norm_layout, commit_running_stats, count_batch
from normlab.nn.batchnorm import _BatchNorm

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]

# Not "batch_norm": the chunked layout reduces over dims a batch norm kernel would not expect.
_OP = "ghost_batch_norm"


class _GhostBatchNorm(_BatchNorm):
    """Ghost batch norm over normlab's batch norm module; see the module docstring."""

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        on_nonfinite: str = "error",
    ) -> None:
        v.check_positive_int(type(self).__name__, "virtual_batch_size", virtual_batch_size)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
            on_nonfinite=on_nonfinite,
        )
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or input.numel() == 0:
            return super().forward(input)
        self._check_input_dim(input)
        name = type(self).__name__
        for pname in ("weight", "bias", "running_mean", "running_var"):
            v.check_param(name, pname, getattr(self, pname), input, (self.num_features,))
        n, c = input.shape[0], input.shape[1]
        per_sample = input.numel() // (n * c)
        vbs = self.virtual_batch_size
        # // and %, not divmod(): a traced batch size (torch.export's dynamic dims) has no divmod
        full, rest = (n // vbs, n % vbs) if n > vbs else (0, n)
        smallest = rest if rest else vbs
        if smallest * per_sample == 1:
            raise ValueError(
                f"{name}: the {'last ' if full else ''}virtual batch holds 1 sample of input shape "
                f"{list(input.shape)} (virtual_batch_size={vbs}), so 1 value per channel; "
                "choose a batch size whose remainder by virtual_batch_size is not 1, or drop "
                "the incomplete batch"
            )
        update = self.track_running_stats
        momentum = self._next_momentum() if update else 0.0

        outs: list[Tensor] = []
        stats: list[tuple[Tensor, Tensor, int]] = []  # (mean, var, values per channel) per chunk
        if full:
            # (k*vbs, C, *) -> (k, vbs, C, *) is a view for every stride pattern.
            chunks = input[: full * vbs].unflatten(0, (full, vbs))
            spatial = tuple(range(3, chunks.dim()))
            layout = Layout(
                reduce_dims=(1, *spatial), param_shape=(1, c, *(1,) * len(spatial))
            )
            out, mean, var = normalize(chunks, self.weight, self.bias, _OP, layout, self.eps)
            outs.append(out.flatten(0, 1))
            stats.extend((mean[k], var[k], vbs * per_sample) for k in range(full))
        if rest:
            layout = batch_norm_layout(input.dim(), c)
            out, mean, var = normalize(
                input[full * vbs:], self.weight, self.bias, _OP, layout, self.eps
            )
            outs.append(out)
            stats.append((mean, var, rest * per_sample))
        # The counter moves only once the statistics are in: a rejected call changes no state.
        if update:
            count_batch(self.num_batches_tracked, self._commit_running_stats(stats, momentum))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @torch.no_grad()
    def _commit_running_stats(self, stats: list[tuple[Tensor, Tensor, int]], momentum: float
                              ) -> bool | Tensor:
        """Average of the per-chunk batch norm updates; returns whether the buffers changed.

        The update is linear in the batch statistics, so the average of the chunks' updates is
        one update with the count-weighted mean and Bessel-corrected variance of the chunks,
        committed once through batch norm's own commit (and its non-finite policy, which a
        non-finite chunk trips through the average).
        """
        total = sum(count for _, _, count in stats)
        mean = sum(m.reshape(-1) * (count / total) for m, _, count in stats)
        unbiased = sum(
            var.reshape(-1) * (count / max(count - 1, 1)) * (count / total)
            for _, var, count in stats
        )
        return commit_running_stats(
            type(self).__name__, self.running_mean, self.running_var, mean, unbiased, 1,
            momentum, self.on_nonfinite,
        )

    def extra_repr(self) -> str:
        head, _, tail = super().extra_repr().partition(", ")
        return f"{head}, virtual_batch_size={self.virtual_batch_size}, {tail}"


_ARGS_DOC = """
    Args:
        num_features: C.
        virtual_batch_size: samples per virtual batch (chunk of dim 0). The chunks are
            consecutive; when N is not a multiple, the last chunk holds the N mod
            virtual_batch_size remaining samples and is normalized with its own (noisier)
            statistics. virtual_batch_size >= N is batch norm.
        eps: added to the variance (> 0).
        momentum: weight of the new batch in the running statistics; None for a cumulative
            average over forward calls.
        affine: learnable per-channel weight (gamma) and bias (beta).
        track_running_stats: keep running statistics for evaluation; if False, evaluation
            normalizes with the statistics of the whole evaluation batch, as BatchNorm does.
        bias: learnable beta when ``affine`` (keyword-only, as in torch).
        on_nonfinite: a training batch with NaN/inf statistics in any chunk raises ("error",
            default; no state changes), is left out of the running statistics with a warning
            ("skip"), or is committed as torch does ("commit"); as BatchNorm's.

    Note:
        Running statistics are updated once per forward call with the chunk statistics averaged,
        each chunk weighted by its number of values (equal weights when N is a multiple of
        virtual_batch_size): the mean of the chunk means and of the chunk's Bessel-corrected
        variances. This equals averaging the updates that a batch norm would make on each chunk
        from the same starting state; ``num_batches_tracked`` counts forward calls. A chunk
        with one value per channel (a lone sample of an (N, C) input) raises ValueError.
"""


class GhostBatchNorm1d(_GhostBatchNorm):
    __doc__ = (
        "Ghost batch norm (Hoffer et al. 2017) over a (N, C) or (N, C, L) input; see "
        ":mod:`normlab.nn.ghost`.\n" + _ARGS_DOC + "\n    Shape:\n        Input (N, C) or "
        "(N, C, L); output the same.\n"
    )
    _expected_dims = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm):
    __doc__ = (
        "Ghost batch norm (Hoffer et al. 2017) over a (N, C, H, W) input; see "
        ":mod:`normlab.nn.ghost`.\n" + _ARGS_DOC + "\n    Shape:\n        Input (N, C, H, W); "
        "output the same.\n"
    )
    _expected_dims = (4,)


class GhostBatchNorm3d(_GhostBatchNorm):
    __doc__ = (
        "Ghost batch norm (Hoffer et al. 2017) over a (N, C, D, H, W) input; see "
        ":mod:`normlab.nn.ghost`.\n" + _ARGS_DOC + "\n    Shape:\n        Input (N, C, D, H, W); "
        "output the same.\n"
    )
    _expected_dims = (5,)
