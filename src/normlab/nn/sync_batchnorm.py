r"""Synchronized batch norm: training statistics over every process of a ``torch.distributed`` group.

Each rank :math:`k` summarizes its local batch per channel as :math:`(n_k, \mu_k, M_{2,k})` with
:math:`M_{2,k} = \sum (x - \mu_k)^2`; one all-gather exchanges the summaries and every rank merges
them with Chan's pairwise update (:func:`normlab.distributed.all_gather_moments`) into the global
:math:`(N, \mu, M_2)`. This is exact for any split of the batch, uneven and empty ranks included,
unlike averaging per-rank means and variances. The input is normalized with :math:`\mu` and the
biased :math:`\sigma^2 = M_2/N`; the running variance stores :math:`M_2/(N-1)`.

Backward, with :math:`\hat x = (x-\mu)\,r`, :math:`r = (\sigma^2+\epsilon)^{-1/2}` and sums over
the samples of *all* ranks:

.. math::
    \frac{\partial L}{\partial x} = \gamma\,r\,\Bigl(\frac{\partial L}{\partial y}
        - \tfrac1N \sum \frac{\partial L}{\partial y}
        - \hat x\,\tfrac1N \sum \frac{\partial L}{\partial y}\,\hat x\Bigr)

so one all-reduce of the two per-channel sums :math:`\sum \partial L/\partial y` and
:math:`\sum \partial L/\partial y\cdot\hat x` serves every rank. Both directions run through
normlab's kernels: reduce (local moments; in the backward, the fixed-statistics backward kernel's
parameter sums), exchange, then apply (the fixed-statistics normalize kernel; in the backward, a
per-channel affine correction of that kernel's :math:`\gamma r\,\partial L/\partial y`). The weight and bias gradients are
those same sums taken over the *local* samples only: summed over ranks they give the full-batch
gradient, and ``DistributedDataParallel`` (which averages parameter gradients) sees what it sees
for torch's ``SyncBatchNorm``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import Module

from normlab.distributed import all_gather_moments, all_reduce_sum, is_distributed
from normlab.functional import _ops
from normlab.functional import _validate as v
from normlab.functional.batch_norm import batch_norm_layout, commit_running_stats, count_batch
from normlab.functional.moments import Moments, moments
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        group: Any,
        op: str,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c = x.shape[1]
        layout = batch_norm_layout(x.dim(), c)
        local_count = x.numel() // c
        if local_count > 0:
            # Local statistics in the compute dtype (no float64 copy of the activations); only the
            # per-channel summaries are float64.
            mean, var = moments(x, layout.reduce_dims)
            mean = mean.reshape(c).to(torch.float64)
            local = Moments(
                torch.tensor(float(local_count), dtype=torch.float64, device=x.device),
                mean,
                var.reshape(c).to(torch.float64) * local_count,
            )
        else:
            local = Moments.empty((c,), x.device)
        (total,) = all_gather_moments(op, [local], group)
        count = int(total.count.item())
        if count == 1:
            raise ValueError(
                f"{op}: expected more than 1 value per channel when training, got 1 across the "
                f"{torch.distributed.get_world_size(group)} ranks of the process group (input "
                f"size {list(x.shape)} on this rank); use a larger batch, or GroupNorm/LayerNorm"
            )
        # Apply: the fixed-statistics normalize kernel (one sweep, as eval-mode batch norm).
        stats = (total.mean, total.var())
        out, mean, var, invstd = _ops.kernel_forward(x, weight, bias, layout, eps, stats, None,
                                                      "batch_norm")
        mean, var, invstd = (t.reshape(layout.param_shape) for t in (mean, var, invstd))
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.layout, ctx.count, ctx.group, ctx.op = layout, count, group, op
        ctx.bias_dtype = None if bias is None else bias.dtype
        count_t = torch.tensor(count)
        ctx.mark_non_differentiable(mean, var, count_t)
        return out, mean, var, count_t

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor, *_stat_grads: Any) -> tuple[Any, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        layout = ctx.layout
        cd = mean.dtype
        # Reduce: the fixed-statistics backward kernel gives the local sums sum(dy * x_hat) and
        # sum(dy) as its parameter gradients, and dy * weight * invstd, in one sweep (a stand-in
        # weight of ones where there is none: the sums are needed either way).
        w = weight if weight is not None else torch.ones(x.shape[1], dtype=cd, device=x.device)
        partial, sum_go_xhat, sum_go = _ops.kernel_backward(
            grad_out, x, w, None, mean, invstd, layout, False,
            (ctx.needs_input_grad[0], True, True), None, "batch_norm")
        sum_go_xhat, sum_go = sum_go_xhat.reshape(-1).to(cd), sum_go.reshape(-1).to(cd)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # All-reduce (every rank, empty ones too, must join), then apply the batch-statistics
            # terms: dx = w r (dy - mean(dy) - x_hat mean(dy x_hat)) = partial - (a + b x), with
            # per-channel a = w r (mean(dy) - mu r mean(dy x_hat)) and b = w r^2 mean(dy x_hat).
            sums = all_reduce_sum(ctx.op, torch.cat([sum_go, sum_go_xhat]), ctx.group)
            mean_go, mean_go_xhat = (
                s.view(layout.param_shape) / max(ctx.count, 1) for s in sums.chunk(2)
            )
            scale = invstd * w.to(cd).view(layout.param_shape)
            a = scale * (mean_go - mean * invstd * mean_go_xhat)
            b = scale * invstd * mean_go_xhat
            grad_input = (partial.to(cd) - torch.addcmul(a, b, x.to(cd))).to(x.dtype)
        if ctx.needs_input_grad[1] and weight is not None:
            grad_weight = sum_go_xhat.to(weight.dtype)
        if ctx.needs_input_grad[2] and ctx.bias_dtype is not None:
            grad_bias = sum_go.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None


class SyncBatchNorm(_BatchNorm):
    r"""Batch norm whose training statistics span all ranks of a process group.

    A drop-in for ``torch.nn.SyncBatchNorm`` (same arguments, attributes, ``state_dict`` keys and
    ``extra_repr``) that also runs on CPU with the gloo backend; with nccl the inputs are CUDA
    tensors and every collective stays on the device. Math, backward and numerics: the module
    docstring of :mod:`normlab.nn.sync_batchnorm`.

    In training, when ``torch.distributed`` is initialized and the group has more than one rank,
    the batch statistics are those of the union of every rank's batch (exact for uneven and empty
    local batches); the running statistics, identical on every rank, are updated once per step
    with the global count (running variance :math:`M_2/(N-1)`), and not at all when the global
    batch is empty. In evaluation, or without a multi-rank group, the layer is exactly normlab's
    batch norm (:class:`~normlab.nn.BatchNorm2d` and kin, for inputs of any rank >= 2) and never
    starts a collective.

    Args:
        num_features: C.
        eps: added to the variance for numerical stability (> 0).
        momentum: weight of the new batch in the running statistics; None for a cumulative
            average.
        affine: learnable per-channel weight (gamma) and bias (beta).
        track_running_stats: keep running statistics for evaluation.
        process_group: the group to synchronize over; None means the default (world) group.
        bias: learnable beta when ``affine`` (keyword-only, as in torch).
        on_nonfinite: what a training batch with NaN/inf *global* statistics does to the running
            statistics, as in :class:`~normlab.nn.BatchNorm1d` (keyword-only): "error"
            (default; raised on every rank), "skip" or "commit".

    Shape:
        Input (N, C, *) with any number of trailing dims; output the same. N may differ between
        ranks, and may be 0.

    Note:
        Every rank of the group must call forward of every SyncBatchNorm in training mode the
        same number of times and in the same order, and backward through every output (a rank
        with no samples passes an empty (0, C, *) batch and still runs backward: its gradients
        are empty and zero). A rank that does not arrive makes the others fail with a
        ``RuntimeError`` once the process group's ``timeout`` passes, instead of hanging (gloo;
        with nccl, torch's watchdog reports the timeout and, by default, ends the process). The
        weight and bias gradients are local (see the module docstring): ``DistributedDataParallel``
        averages them as it does for torch's layer.

    Raises:
        ValueError: input of fewer than 2 dims or with the wrong channel count; one value per
            channel in training, counted over *all* ranks.
        FloatingPointError: NaN/inf global statistics with ``on_nonfinite="error"``.
        RuntimeError: a peer did not join a collective within the process group's timeout.
    """

    process_group: Any

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        on_nonfinite: str = "error",
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            on_nonfinite=on_nonfinite,
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        name = type(self).__name__
        v.check_float_input(name, input)
        if input.dim() < 2:
            raise ValueError(
                f"{name}: expected an input of shape (N, C, *) with at least 2 dims (got "
                f"{input.dim()}D input of shape {list(input.shape)})"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{name}: expected {self.num_features} channels in dim 1 (num_features), got "
                f"input of shape {list(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and is_distributed(self.process_group)):
            return super().forward(input)
        self._check_input_dim(input)
        out, mean, var, count = _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.eps, self.process_group, type(self).__name__
        )
        n = int(count)
        # Global statistics are the same on every rank, so every rank takes the same decision.
        if self.track_running_stats and n > 0:
            committed = commit_running_stats(
                type(self).__name__,
                self.running_mean,
                self.running_var,
                mean,
                var,
                n,
                self._next_momentum(),
                self.on_nonfinite,
            )
            count_batch(self.num_batches_tracked, committed)
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module: Module, process_group: Any = None) -> Module:
        """Replace every batch norm layer in ``module`` (recursively) by a :class:`SyncBatchNorm`.

        Converted: torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (and their subclasses),
        and normlab's ``BatchNorm1d/2d/3d`` (exact types: normlab's other variants, e.g. ghost or
        renormalized batch norm, have different statistics and are left alone). The new layer
        takes over the old one's parameter and buffer tensors (shared, not copied), its
        hyperparameters, ``bias=False``, train/eval mode, ``qconfig`` and (from normlab layers)
        ``on_nonfinite``; torch's layers get normlab's default, "error".

        Args:
            module: a model, or a single batch norm layer.
            process_group: the group the new layers synchronize over (None: world).

        Returns:
            ``module`` with its batch norm children replaced; a new :class:`SyncBatchNorm` if
            ``module`` itself is a batch norm layer.
        """
        out = module
        if isinstance(module, _TORCH_BATCHNORMS) or type(module) in _NORMLAB_BATCHNORMS:
            out = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                bias=module.bias is not None,
                on_nonfinite=getattr(module, "on_nonfinite", "error"),
            )
            if module.affine:
                out.weight, out.bias = module.weight, module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out


_TORCH_BATCHNORMS = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
)
_NORMLAB_BATCHNORMS = (BatchNorm1d, BatchNorm2d, BatchNorm3d)


def convert_sync_batchnorm(module: Module, process_group: Any = None) -> Module:
    """Module-level alias of :meth:`SyncBatchNorm.convert_sync_batchnorm`."""
    return SyncBatchNorm.convert_sync_batchnorm(module, process_group)
