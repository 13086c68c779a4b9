"""float64 NumPy oracles: the textbook formulas, written independently of normlab and torch."""

from __future__ import annotations

import numpy as np


def normalize_np(x, axes, eps, center=True):
    x = np.asarray(x, dtype=np.float64)
    axes = tuple(axes)
    if center:
        mean = x.mean(axis=axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
        return (x - mean) / np.sqrt(var + eps)
    ms = (x**2).mean(axis=axes, keepdims=True)
    return x / np.sqrt(ms + eps)


def batch_norm_np(x, weight, bias, eps):
    c = x.shape[1]
    axes = (0, *range(2, x.ndim))
    shape = (1, c) + (1,) * (x.ndim - 2)
    y = normalize_np(x, axes, eps)
    if weight is not None:
        y = y * np.asarray(weight, np.float64).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(shape)
    return y


def layer_norm_np(x, k, weight, bias, eps):
    y = normalize_np(x, range(x.ndim - k, x.ndim), eps)
    if weight is not None:
        y = y * np.asarray(weight, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def group_norm_np(x, groups, weight, bias, eps):
    n, c = x.shape[:2]
    g = np.asarray(x, np.float64).reshape(n, groups, -1)
    y = normalize_np(g, (2,), eps).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * np.asarray(weight, np.float64).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(shape)
    return y


def instance_norm_np(x, weight, bias, eps):
    c = x.shape[1]
    y = normalize_np(x, range(2, x.ndim), eps)
    shape = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * np.asarray(weight, np.float64).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(shape)
    return y


def rms_norm_np(x, k, weight, eps):
    y = normalize_np(x, range(x.ndim - k, x.ndim), eps, center=False)
    if weight is not None:
        y = y * np.asarray(weight, np.float64)
    return y
