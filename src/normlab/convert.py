r"""Model surgery: swap every batch norm for another norm, or fold it into the layer before it.

:func:`replace_norms` rewrites a model in place so each batch norm becomes group, layer, instance,
RMS, frozen, sync, renorm, ghost or (back to) normlab batch norm, carrying over the tensors that
mean the same thing in both. :func:`fold_batchnorm` returns an inference copy in which every
evaluation-mode batch norm right after a convolution or linear layer is merged into that layer's
weight and bias (the paper's Alg. 2 remark: at inference batch norm is one affine map per
channel):

.. math::
    s = \gamma / \sqrt{\mathrm{running\_var} + \epsilon}, \qquad
    W' = W \cdot s, \qquad b' = (b - \mathrm{running\_mean}) \cdot s + \beta
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from normlab.nn import batchnorm as _nbn
from normlab.nn.frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    _FrozenBatchNorm,
)
from normlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from normlab.nn.normalization import GroupNorm, RMSNorm
from normlab.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from normlab.nn.ws_conv import WSConv2d

__all__ = ["KINDS", "fold_batchnorm", "replace_norms"]

KINDS = ("group", "layer", "instance", "rms", "frozen", "sync", "renorm", "ghost", "batch")

_RENORM_OPTIONS = {
    "r_max", "d_max", "warmup_steps", "r_max_ramp_steps", "d_max_ramp_steps", "schedule"
}
_OPTIONS: dict[str, set[str]] = {
    "group": {"num_groups"},
    "layer": set(),
    "instance": {"track_running_stats"},
    "rms": set(),
    "frozen": set(),
    "sync": {"process_group"},
    "renorm": _RENORM_OPTIONS,
    "ghost": {"virtual_batch_size"},
    "batch": set(),
}
# Every kind accepts `dim`: the input rank (1, 2 or 3 spatial-or-length dims) for sources such as
# SyncBatchNorm that accept any rank, when the target class is rank-specific.
_COMMON_OPTIONS = {"dim"}

_BY_RANK: dict[str, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    "instance": (_nbn.InstanceNorm1d, _nbn.InstanceNorm2d, _nbn.InstanceNorm3d),
    "frozen": (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d),
    "renorm": (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d),
    "ghost": (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d),
    "batch": (_nbn.BatchNorm1d, _nbn.BatchNorm2d, _nbn.BatchNorm3d),
}
_TORCH_RANK: tuple[tuple[tuple[type[nn.Module], ...], int], ...] = (
    ((nn.BatchNorm1d, nn.LazyBatchNorm1d), 1),
    ((nn.BatchNorm2d, nn.LazyBatchNorm2d), 2),
    ((nn.BatchNorm3d, nn.LazyBatchNorm3d), 3),
)


def _sync_batchnorm_class() -> type[nn.Module] | None:
    # Imported lazily: optional for every kind except "sync", and it may pull in torch.distributed.
    try:
        from normlab.nn.sync_batchnorm import SyncBatchNorm
    except ImportError:
        return None
    return SyncBatchNorm


def _batch_norm_types() -> tuple[type[nn.Module], ...]:
    """Every module class replace_norms and fold_batchnorm treat as a batch norm."""
    types: list[type[nn.Module]] = [_TorchBatchNorm, _nbn._BatchNorm, _FrozenBatchNorm]
    sync = _sync_batchnorm_class()
    if sync is not None:
        types.append(sync)
    return tuple(types)


class _Source:
    """What a batch norm module holds, read uniformly from torch's, normlab's and frozen ones."""

    def __init__(self, bn: nn.Module, path: str) -> None:
        self.module, self.path = bn, path
        self.num_features: int = bn.num_features
        self.eps: float = bn.eps
        self.momentum: float | None = getattr(bn, "momentum", 0.1)
        self.weight: Tensor | None = getattr(bn, "weight", None)
        self.bias: Tensor | None = getattr(bn, "bias", None)
        self.running_mean: Tensor | None = getattr(bn, "running_mean", None)
        self.running_var: Tensor | None = getattr(bn, "running_var", None)
        self.num_batches_tracked: Tensor | None = getattr(bn, "num_batches_tracked", None)
        self.frozen = isinstance(bn, _FrozenBatchNorm)
        self.affine = self.weight is not None
        self.has_bias = self.bias is not None
        self.track = self.running_mean is not None
        self.training = bn.training
        floats = [t for t in (self.weight, self.running_mean, self.bias) if t is not None]
        self.factory: dict[str, Any] = (
            {"device": floats[0].device, "dtype": floats[0].dtype} if floats else {}
        )
        self.rank: int | None = None
        expected: tuple[int, ...] = getattr(bn, "_expected_dims", ())
        if isinstance(bn, (_nbn._BatchNorm, _FrozenBatchNorm)):
            # normlab's rank-specific classes list the input ranks they accept; SyncBatchNorm none.
            self.rank = max(expected) - 2 if expected else None
        else:
            for classes, rank in _TORCH_RANK:
                if isinstance(bn, classes):
                    self.rank = rank


def _fail(src: _Source, kind: str, reason: str) -> ValueError:
    return ValueError(
        f"replace_norms: cannot convert '{src.path}' ({type(src.module).__name__}) to "
        f"kind={kind!r}: {reason}"
    )


def _default_num_groups(num_channels: int) -> int:
    """The largest divisor of C that is at most 32 (Wu & He's G = 32 where C allows it)."""
    return max(g for g in range(1, min(32, num_channels) + 1) if num_channels % g == 0)


def _rank(src: _Source, kind: str, options: dict[str, Any]) -> int:
    dim = options.get("dim")
    if dim is not None and dim not in (1, 2, 3):
        raise ValueError(f"replace_norms: dim={dim!r} must be 1, 2 or 3")
    if src.rank is not None:
        if dim is not None and dim != src.rank:
            raise _fail(src, kind, f"dim={dim} contradicts the module, which is {src.rank}d")
        return src.rank
    if dim is None:
        raise _fail(
            src, kind,
            "the module accepts inputs of any rank, but the target class is rank-specific; "
            "pass dim=1 for (N, C[, L]), 2 for (N, C, H, W) or 3 for (N, C, D, H, W)",
        )
    return int(dim)


def _need_running_stats(src: _Source, kind: str) -> None:
    if not src.track:
        raise _fail(
            src, kind,
            "it keeps no running statistics (track_running_stats=False), which this kind needs",
        )


def _build(src: _Source, kind: str, options: dict[str, Any]) -> nn.Module | None:
    """The replacement for one batch norm, or None when it already is of the target kind."""
    c, f = src.num_features, src.factory
    momentum = src.momentum
    if kind in ("group", "layer"):
        if kind == "group":
            groups = options.get("num_groups") or _default_num_groups(c)
            if c % groups:
                raise _fail(src, kind, f"num_channels={c} is not divisible by num_groups={groups}")
        else:
            groups = 1
        return GroupNorm(groups, c, src.eps, affine=src.affine, bias=src.has_bias, **f)
    if kind == "rms":
        rank = _rank(src, kind, options)
        if rank != 1:
            raise _fail(
                src, kind,
                f"RMS norm over channels is RMSNorm(C) on an (N, C) input, but a {rank}d batch "
                "norm sees (N, C, *spatial) inputs, whose channel dim RMSNorm (trailing dims) "
                "cannot normalize; use kind='layer' or kind='group'",
            )
        if src.has_bias and bool((src.bias != 0).any()):
            raise _fail(
                src, kind, "RMS norm has no bias and this module's bias is non-zero; "
                "use kind='layer' to keep it",
            )
        return RMSNorm(c, src.eps, elementwise_affine=src.affine, **f)
    if kind == "sync":
        cls = _sync_batchnorm_class()
        assert cls is not None  # checked by replace_norms before planning
        if isinstance(src.module, cls):
            return None
        no_bias: dict[str, Any] = {} if src.has_bias or not src.affine else {"bias": False}
        return cls(
            c, eps=src.eps, momentum=momentum, affine=src.affine,
            track_running_stats=src.track, process_group=options.get("process_group"),
            **no_bias, **f,
        )

    cls = _BY_RANK[kind][_rank(src, kind, options) - 1]
    if type(src.module) is cls:
        return None
    if kind == "frozen":
        _need_running_stats(src, kind)
        return cls(c, src.eps, **f)
    if kind == "instance":
        return cls(
            c, src.eps, 0.1 if momentum is None else momentum, src.affine,
            bool(options.get("track_running_stats", False)), bias=src.has_bias, **f,
        )
    common: dict[str, Any] = {"bias": src.has_bias, **f}
    if kind == "renorm":
        _need_running_stats(src, kind)
        renorm = {k: options[k] for k in _RENORM_OPTIONS if k in options}
        return cls(c, src.eps, momentum, src.affine, True, **common, **renorm)
    if kind == "ghost":
        vbs = options.get("virtual_batch_size")
        if vbs is None:
            raise ValueError("replace_norms: kind='ghost' needs the option virtual_batch_size=")
        return cls(c, vbs, src.eps, momentum, src.affine, src.track, **common)
    return cls(c, src.eps, momentum, src.affine, src.track, **common)  # kind == "batch"


@torch.no_grad()
def _carry(src: _Source, new: nn.Module) -> None:
    """Copy the tensors that mean the same thing in both modules; keep the train/eval mode."""
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        old_t: Tensor | None = getattr(src, name)
        new_t = getattr(new, name, None)
        if old_t is None or new_t is None or new_t.shape != old_t.shape:
            continue
        new_t.copy_(old_t)
        if isinstance(new_t, nn.Parameter) and isinstance(old_t, nn.Parameter):
            new_t.requires_grad_(old_t.requires_grad)
    policy = getattr(src.module, "on_nonfinite", None)
    if policy is not None and hasattr(new, "on_nonfinite"):
        new.on_nonfinite = policy
    new.train(src.training)


def replace_norms(model: nn.Module, kind: str, **options: Any) -> nn.Module:
    """Replace every batch norm in `model` by the norm `kind`, in place; returns `model`.

    Batch norms are torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, and normlab's
    ``BatchNorm*d``, ``BatchRenorm*d``, ``GhostBatchNorm*d``, ``FrozenBatchNorm*d`` and
    ``SyncBatchNorm``, at any depth (``Sequential``, ``ModuleList``, ``ModuleDict``, attributes).
    A module shared by several parents stays shared. Weight and bias are carried over for every
    affine kind (a frozen layer's buffers become trainable parameters; a parameter's
    ``requires_grad`` is kept); running statistics and ``num_batches_tracked`` are carried where
    the target keeps them (frozen, sync, renorm, ghost, batch, and instance with
    ``track_running_stats=True``). eps, momentum, device, dtype, the train/eval mode and normlab's
    ``on_nonfinite`` policy are kept.
    Every module is checked before any is replaced, so a failed call leaves `model` unchanged.
    If `model` itself is a batch norm, its replacement is returned.

    Kinds and options:
        ``"group"``: :class:`normlab.nn.GroupNorm`; ``num_groups`` defaults to the largest divisor
            of C that is at most 32 (C=48 gives 24, a prime C > 32 gives 1).
        ``"layer"``: ``GroupNorm(1, C)``, the layer norm of Ba et al. over (C, *spatial).
            ``nn.LayerNorm(C)`` would be wrong on an (N, C, H, W) input: it normalizes the
            trailing dim, W.
        ``"instance"``: ``InstanceNorm*d``; ``track_running_stats`` (default False). A
            ``BatchNorm1d`` maps to ``InstanceNorm1d``, which needs (N, C, L) inputs.
        ``"rms"``: ``RMSNorm(C)``: per-sample root mean square over the C features of an (N, C)
            input. Only ``BatchNorm1d`` used on (N, C) inputs converts; 2d/3d batch norms raise
            (RMSNorm normalizes trailing dims, not the channel dim of an image), and so does a
            non-zero bias (RMS norm has none; a zero bias is dropped).
        ``"frozen"``: ``FrozenBatchNorm*d`` (needs running statistics).
        ``"sync"``: ``normlab.nn.sync_batchnorm.SyncBatchNorm``; ``process_group``.
        ``"renorm"``: ``BatchRenorm*d`` (needs running statistics); ``r_max``, ``d_max``,
            ``warmup_steps``, ``r_max_ramp_steps``, ``d_max_ramp_steps``, ``schedule``. The
            carried ``num_batches_tracked`` is the schedule's step, so a converted pre-trained
            layer starts at the ramped limits.
        ``"ghost"``: ``GhostBatchNorm*d``; ``virtual_batch_size`` (required).
        ``"batch"``: normlab ``BatchNorm*d`` (e.g. unfreeze a frozen layer, or replace torch's).
        ``dim`` (any kind): 1, 2 or 3, the rank for sources that accept any input rank
            (``SyncBatchNorm``) when the target class is rank-specific.

    Modules already of the target class are left as they are.

    Raises:
        ValueError: unknown `kind`; a module that cannot be converted (the message names its path
            and the reason); an invalid option value.
        TypeError: an option the kind does not take.
        ImportError: kind ``"sync"`` when ``normlab.nn.sync_batchnorm`` cannot be imported.
    """
    if kind not in KINDS:
        raise ValueError(f"replace_norms: unknown kind={kind!r}; expected one of {list(KINDS)}")
    unknown = sorted(set(options) - _OPTIONS[kind] - _COMMON_OPTIONS)
    if unknown:
        allowed = sorted(_OPTIONS[kind] | _COMMON_OPTIONS)
        raise TypeError(
            f"replace_norms: kind={kind!r} takes no option(s) {unknown}; allowed: {allowed}"
        )
    if kind == "sync" and _sync_batchnorm_class() is None:
        raise ImportError(
            "replace_norms: kind='sync' needs normlab.nn.sync_batchnorm.SyncBatchNorm, which "
            "could not be imported"
        )
    num_groups = options.get("num_groups")
    if num_groups is not None and (
        isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0
    ):
        raise ValueError(f"replace_norms: num_groups={num_groups!r} must be a positive integer")
    bn_types = _batch_norm_types()

    def convert(bn: nn.Module, path: str) -> nn.Module | None:
        if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
            raise ValueError(
                f"replace_norms: cannot convert '{path}' ({type(bn).__name__}): it is a lazy "
                "module whose size is not known yet; run one forward pass first"
            )
        src = _Source(bn, path)
        new = _build(src, kind, options)
        if new is not None:
            _carry(src, new)
        return new

    if isinstance(model, bn_types):
        new_root = convert(model, "<model>")
        return model if new_root is None else new_root

    done: dict[int, nn.Module | None] = {}
    plan: list[tuple[nn.Module, str, nn.Module]] = []
    for parent_path, parent in model.named_modules():
        # _modules, not named_children(): a module listed twice in one parent is replaced twice.
        for name, child in parent._modules.items():
            if not isinstance(child, bn_types):
                continue
            if id(child) not in done:
                path = f"{parent_path}.{name}" if parent_path else name
                done[id(child)] = convert(child, path)
            new = done[id(child)]
            if new is not None:
                plan.append((parent, name, new))
    for parent, name, new in plan:
        setattr(parent, name, new)
    return model


_LINEAR_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, WSConv2d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)


def _out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _has_hooks(m: nn.Module) -> bool:
    # A pre-hook may rewrite the weight (old-style weight_norm); a hook may read the conv output.
    return bool(m._forward_pre_hooks or m._forward_hooks)


def _foldable(layer: nn.Module, bn: nn.Module, uses: Counter[int], bn_types: tuple[type, ...]
              ) -> bool:
    return (
        type(layer) in _LINEAR_TYPES  # subclasses may transform their weight in forward
        and isinstance(bn, bn_types)
        and getattr(bn, "running_mean", None) is not None
        and bn.num_features == _out_features(layer)
        and uses[id(layer)] == 1  # a shared layer is also used without this batch norm
        and not (_has_hooks(layer) or _has_hooks(bn))
    )


def _plain_conv(ws: WSConv2d) -> nn.Conv2d:
    """A Conv2d that applies `ws`'s standardized filters (folding rescales the weight, which
    weight standardization would undo)."""
    conv = nn.Conv2d(
        ws.in_channels, ws.out_channels, ws.kernel_size, ws.stride, ws.padding, ws.dilation,
        ws.groups, ws.bias is not None, ws.padding_mode,
        device=ws.weight.device, dtype=ws.weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(ws.standardized_weight())
        if ws.bias is not None:
            conv.bias.copy_(ws.bias)
    conv.weight.requires_grad_(ws.weight.requires_grad)
    return conv.train(ws.training)


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Merge `bn`'s evaluation map into `layer`'s weight and bias, computed in float64."""
    f64 = torch.float64
    mean, var = bn.running_mean.to(f64), bn.running_var.to(f64)
    gamma = bn.weight.to(f64) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.to(f64) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma * (var + bn.eps).rsqrt()
    weight: Tensor = layer.weight
    w = weight.to(f64)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        # weight is (C_in, C_out / groups, *k); output channel o = group * (C_out/groups) + j.
        g, k = layer.groups, w.dim() - 2
        grouped = w.unflatten(0, (g, -1)) * scale.view(g, 1, -1, *(1,) * k)
        w = grouped.flatten(0, 1)
    else:
        w = w * scale.view(-1, *(1,) * (w.dim() - 1))
    weight.copy_(w.to(weight.dtype))
    b = layer.bias.to(f64) if layer.bias is not None else torch.zeros_like(mean)
    new_bias = ((b - mean) * scale + beta).to(device=weight.device, dtype=weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
    else:
        layer.bias.copy_(new_bias)


def fold_batchnorm(model: nn.Module, *, consecutive_children: bool = True) -> nn.Module:
    """An inference copy of `model` with each batch norm folded into the layer before it.

    Folds every batch norm with running statistics (torch's or normlab's ``BatchNorm*d`` and
    subclasses, ``SyncBatchNorm``, ``FrozenBatchNorm*d``) that directly follows a ``Linear``,
    ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or :class:`~normlab.nn.ws_conv.WSConv2d` with as
    many output channels: ``W' = W * s`` and ``b' = (b - mean) * s + beta`` with
    ``s = gamma / sqrt(var + eps)``, computed in float64 and stored in the layer's dtype; a layer
    without bias gains one; grouped convolutions fold per output channel; a ``WSConv2d`` becomes
    a plain ``Conv2d`` holding its standardized weight. The batch norm becomes ``nn.Identity``.
    `model` itself is not modified (the copy is a ``copy.deepcopy``).

    "Directly follows" means consecutive children of a ``Sequential``, or, with
    `consecutive_children` (default), consecutive children of any module in registration order,
    as in torchvision's ResNet blocks (``conv1, bn1``). Only set it when that order is the
    forward order and the layer's output feeds nothing but the batch norm; pass False to fold
    inside ``Sequential`` containers only. Left in place: batch norms after anything else, layer
    subclasses (they may transform their weight in forward), layers or norms with forward hooks,
    layers used at several places, and batch norms without running statistics.

    Raises:
        ValueError: `model` or any of its batch norms is in training mode (folding bakes in the
            running statistics that only evaluation uses; call ``model.eval()`` first).
    """
    if model.training:
        raise ValueError(
            "fold_batchnorm: the model is in training mode, where batch norm uses batch "
            "statistics; folding bakes in the running statistics, so call model.eval() first"
        )
    bn_types = _batch_norm_types()
    for path, m in model.named_modules():
        if isinstance(m, bn_types) and m.training:
            raise ValueError(
                f"fold_batchnorm: '{path}' ({type(m).__name__}) is in training mode although the "
                "model is not; call model.eval() so every batch norm uses its running statistics"
            )
    folded = copy.deepcopy(model)
    uses = Counter(id(m) for _, m in folded.named_modules(remove_duplicate=False))
    for parent in list(folded.modules()):
        if not (consecutive_children or isinstance(parent, nn.Sequential)):
            continue
        children = [(n, m) for n, m in parent._modules.items() if m is not None]
        for (name_a, layer), (name_b, bn) in itertools.pairwise(children):
            if not _foldable(layer, bn, uses, bn_types):
                continue
            if type(layer) is WSConv2d:
                layer = _plain_conv(layer)
                setattr(parent, name_a, layer)
            _fold_into(layer, bn)
            setattr(parent, name_b, nn.Identity())
    return folded

