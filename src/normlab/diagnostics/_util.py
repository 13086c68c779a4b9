"""Shared plumbing of the diagnostics: records, layer kinds, copies, temporary hooks, batching."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypedDict, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.utils.hooks import RemovableHandle

from normlab.nn.batchnorm import _BatchNorm as _NormlabBatchNorm

__all__ = [
    "RELU_FAMILY",
    "SATURATING",
    "CallKeys",
    "Record",
    "batches",
    "copy_model",
    "eval_pass",
    "first_tensor",
    "forward_order",
    "has_running_stats",
    "is_batch_norm",
    "layer_key",
    "mark_probe_hook",
    "output_tensor",
    "restore_modes",
    "temporary_forward_hooks",
    "to_records",
]

#: Activation modules whose units can output exactly 0 (the "ReLU family" of dead-unit counting).
RELU_FAMILY: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
#: Saturating activations and their output range (lower bound, upper bound).
SATURATING: dict[type[nn.Module], tuple[float, float]] = {
    nn.Sigmoid: (0.0, 1.0),
    nn.Tanh: (-1.0, 1.0),
}

_PROBE_MARK = "_normlab_probe_hook"
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_KEYED_BY_HOOK_ID = (
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)
_BATCH_NORM_NAME = re.compile(r"Batch\w*[Nn]orm")

F = TypeVar("F", bound=Callable[..., Any])


class Record(TypedDict):
    """One tidy measurement: a row ready for a table or an SQLite ``INSERT``."""

    layer: str
    step: int
    metric: str
    value: float


def layer_key(name: str, call: int = 0) -> str:
    """The record key of the `call`-th call (0-based) of module `name` within one forward pass.

    The root module is called ``"model"``; a module called more than once per forward pass (weight
    sharing, a recurrent cell applied per step) gets ``name#1``, ``name#2``, ... for its later calls.
    """
    name = name or "model"
    return name if call == 0 else f"{name}#{call}"


class CallKeys:
    """Record keys of module calls within one forward pass (:func:`layer_key`): ``name`` for the
    first call of a module, ``name#1``, ``name#2``, ... for the next; :meth:`clear` between passes."""

    def __init__(self) -> None:
        self._calls: dict[str, int] = {}

    def next(self, name: str) -> str:
        """The key of a new call of `name` (counts it)."""
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        return layer_key(name, call)

    def peek(self, name: str) -> str:
        """The key the next call of `name` will get (a forward pre-hook's view of its call)."""
        return layer_key(name, self._calls.get(name, 0))

    def clear(self) -> None:
        self._calls.clear()


@torch.no_grad()
def eval_pass(model: nn.Module, x: Tensor, batch_size: int, keys: CallKeys) -> None:
    """Run `x` through `model` in eval mode without gradients, batch by batch, the keys cleared
    before each batch; modes restored afterwards (eval mode changes no buffer)."""
    with restore_modes(model):
        model.eval()
        for rows in batches(x, batch_size):
            keys.clear()
            model(x[rows])


def first_tensor(obj: Any) -> Tensor | None:
    """The first floating-point tensor in `obj`, depth first (None if there is none).

    ``nn.LSTM``/``nn.GRU`` return ``(output, state)``: this picks ``output`` (``output.data`` for a
    ``PackedSequence``, whose integer ``batch_sizes`` are skipped).
    """
    if isinstance(obj, Tensor):
        return obj if obj.is_floating_point() or obj.is_complex() else None
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def output_tensor(out: Any, who: str) -> Tensor:
    """The model output a measure works on: :func:`first_tensor` of `out`, which must exist."""
    found = first_tensor(out)
    if found is None:
        raise TypeError(f"{who}: the model returned no floating-point tensor ({type(out).__name__})")
    return found


def is_batch_norm(module: nn.Module) -> bool:
    """True for layers that normalize with batch statistics in training (torch's, normlab's, and
    look-alikes named ``*Batch*Norm*`` with running statistics); frozen batch norm is excluded."""
    if isinstance(module, (_TorchBatchNorm, _NormlabBatchNorm)):
        return True
    name = type(module).__name__
    return (
        bool(_BATCH_NORM_NAME.search(name))
        and "Frozen" not in name
        and hasattr(module, "running_mean")
    )


def has_running_stats(module: nn.Module) -> bool:
    """True for norm layers that keep running statistics and use them in eval mode."""
    return (
        bool(getattr(module, "track_running_stats", False))
        and isinstance(getattr(module, "running_mean", None), Tensor)
        and isinstance(getattr(module, "running_var", None), Tensor)
    )


def mark_probe_hook(fn: F) -> F:
    """Tag a hook as a diagnostics hook, so that copies made by :func:`copy_model` drop it."""
    setattr(fn, _PROBE_MARK, True)
    return fn


def copy_model(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Any:
    """A deep copy of `model` (and of `optimizer`, bound to the copy's parameters) without the
    diagnostics hooks, so that probing the copy never touches, nor records into, the original.

    Returns:
        The model copy, or ``(model_copy, optimizer_copy)`` when `optimizer` is given.
    """
    # One deepcopy call shares its memo: the optimizer copy refers to the copied parameters.
    copied = copy.deepcopy((model, optimizer))
    for module in copied[0].modules():
        for dict_name in _HOOK_DICTS:
            hooks = getattr(module, dict_name, None)
            if not hooks:
                continue
            for hook_id in [k for k, fn in hooks.items() if getattr(fn, _PROBE_MARK, False)]:
                del hooks[hook_id]
                for keyed in _KEYED_BY_HOOK_ID:
                    getattr(module, keyed, {}).pop(hook_id, None)
    return copied if optimizer is not None else copied[0]


@contextmanager
def restore_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every submodule's ``training`` flag on exit, also when the body raises."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


@contextmanager
def temporary_forward_hooks(
    modules: Mapping[str, nn.Module],
    on_output: Callable[[str, nn.Module, Any, Any], None] | None = None,
    on_input: Callable[[str, nn.Module, Any], None] | None = None,
) -> Iterator[None]:
    """Install forward (pre-)hooks calling ``on_output(name, module, args, output)`` and
    ``on_input(name, module, args)`` on `modules`; removed on exit, also when the body raises."""
    handles: list[RemovableHandle] = []
    try:
        for name, module in modules.items():
            if on_output is not None:
                handles.append(module.register_forward_hook(_bind_output(on_output, name)))
            if on_input is not None:
                handles.append(module.register_forward_pre_hook(_bind_input(on_input, name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _bind_output(fn: Callable[[str, nn.Module, Any, Any], None], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        fn(name, module, args, output)

    return mark_probe_hook(hook)


def _bind_input(fn: Callable[[str, nn.Module, Any], None], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any) -> None:
        fn(name, module, args)

    return mark_probe_hook(hook)


def batches(x: Tensor, batch_size: int, drop_last: bool = False) -> Iterator[slice]:
    """Slices of consecutive rows of `x`; `drop_last` skips a final incomplete batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    n = x.shape[0]
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield slice(start, min(start + batch_size, stop))


def to_records(results: Any, step: int = 0, prefix: str = "", layer: str = "model") -> list[Record]:
    """Flatten diagnostics results into tidy records.

    Args:
        results: a dataclass or mapping of metric -> number (one layer, called `layer`), or a
            mapping of layer -> such a dataclass/mapping.
        step: the step the records belong to.
        prefix: prepended to every metric name.
        layer: the layer name used when `results` describes a single layer.

    Returns:
        ``[{"layer", "step", "metric", "value"}, ...]``; non-numeric fields are skipped.
    """
    if dataclasses.is_dataclass(results) or _is_flat(results):
        results = {layer: results}
    out: list[Record] = []
    for name, values in results.items():
        fields = dataclasses.asdict(values) if dataclasses.is_dataclass(values) else values
        for metric, value in fields.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append(Record(layer=name, step=step, metric=prefix + metric, value=float(value)))
    return out


def _is_flat(results: Any) -> bool:
    return isinstance(results, Mapping) and all(
        isinstance(v, (int, float)) for v in results.values()
    )


def forward_order(model: nn.Module, run: Callable[[], Any], names: Sequence[str]) -> list[str]:
    """The modules in `names` in the order of their first call during `run()`."""
    modules = dict(model.named_modules())
    order: list[str] = []

    def seen(name: str, module: nn.Module, args: Any, output: Any) -> None:
        if name not in order:
            order.append(name)

    with temporary_forward_hooks({n: modules[n] for n in names}, on_output=seen):
        run()
    return order
