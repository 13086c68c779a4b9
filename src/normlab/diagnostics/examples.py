"""Small models with known pathologies, and their healthy twins: factories for ``normlab doctor``.

Each takes only keyword arguments with defaults, so ``normlab doctor
normlab.diagnostics.examples:saturated_sigmoid_mlp --input-shape 64`` works as is (64 features and
10 classes by default: the shape of scikit-learn's digits).

==========================  =============================================  ============================
factory                     what is wrong                                  doctor finds
==========================  =============================================  ============================
saturated_sigmoid_mlp       6 sigmoid layers; biases std 6 and weights std ``saturation``,
                            2/sqrt(fan_in) push most units to 0 or 1       ``vanishing_gradients``
normalized_sigmoid_mlp      the same init, batch norm before each sigmoid  nothing after ~60 steps
dead_relu_mlp               ReLU layers with biases of -5                  ``dead_units``
relu_mlp                    the same with zero biases (He init)            nothing
bn_mlp                      batch norm MLP: fine at batch 64, not at 2     at batch 2: ``batch_noise``,
                                                                           ``train_eval_gap``
ln_mlp                      the same with layer norm                       nothing, at any batch size
==========================  =============================================  ============================

Note:
    A large *weight* std alone saturates sigmoids too, but it does not make gradients vanish: the
    large weights multiply the backpropagated gradient by more than the saturated slopes divide
    it (measured ratio of first- to last-layer gradient norm 0.2-150 for std 1-10 at width 32-100).
    Saturation by the biases with moderate weights does both.
"""

from __future__ import annotations

from torch import nn

from normlab.nn import BatchNorm1d, LayerNorm

__all__ = [
    "bn_mlp",
    "dead_relu_mlp",
    "ln_mlp",
    "normalized_sigmoid_mlp",
    "relu_mlp",
    "saturated_sigmoid_mlp",
]


def saturated_sigmoid_mlp(
    in_features: int = 64, classes: int = 10, width: int = 32, depth: int = 6
) -> nn.Sequential:
    """`depth` Linear + Sigmoid layers with biases ~ N(0, 6^2), weights ~ N(0, 4/fan_in)."""
    layers: list[nn.Module] = []
    d = in_features
    for _ in range(depth):
        linear = nn.Linear(d, width)
        nn.init.normal_(linear.weight, 0.0, 2.0 / d**0.5)
        nn.init.normal_(linear.bias, 0.0, 6.0)
        layers += [linear, nn.Sigmoid()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, classes))


def normalized_sigmoid_mlp(
    in_features: int = 64, classes: int = 10, width: int = 32, depth: int = 6
) -> nn.Sequential:
    """:func:`saturated_sigmoid_mlp` with the same initialization and a BatchNorm1d before each
    sigmoid."""
    base = list(saturated_sigmoid_mlp(in_features, classes, width, depth))
    layers: list[nn.Module] = []
    for module, following in zip(base, [*base[1:], None]):
        layers.append(module)
        if isinstance(following, nn.Sigmoid):
            layers.append(BatchNorm1d(width))
    return nn.Sequential(*layers)


def dead_relu_mlp(
    in_features: int = 64, classes: int = 10, width: int = 64, bias: float = -5.0
) -> nn.Sequential:
    """Two He-initialized Linear + ReLU layers whose biases are `bias` (most units never fire)."""
    model = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width),
                          nn.ReLU(), nn.Linear(width, classes))
    for linear in (model[0], model[2]):
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.constant_(linear.bias, bias)
    return model


def relu_mlp(in_features: int = 64, classes: int = 10, width: int = 64) -> nn.Sequential:
    """:func:`dead_relu_mlp` with zero biases."""
    return dead_relu_mlp(in_features, classes, width, bias=0.0)


def bn_mlp(in_features: int = 64, classes: int = 10, width: int = 64) -> nn.Sequential:
    """Linear + BatchNorm + ReLU twice (normlab's batch norm, then torch's)."""
    return nn.Sequential(nn.Linear(in_features, width), BatchNorm1d(width), nn.ReLU(),
                         nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(),
                         nn.Linear(width, classes))


def ln_mlp(in_features: int = 64, classes: int = 10, width: int = 64) -> nn.Sequential:
    """:func:`bn_mlp` with layer norm (normlab's, then torch's)."""
    return nn.Sequential(nn.Linear(in_features, width), LayerNorm(width), nn.ReLU(),
                         nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU(),
                         nn.Linear(width, classes))
