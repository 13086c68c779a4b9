"""normlab.convert: replace_norms (swap every batch norm) and fold_batchnorm (merge into conv)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlab.nn as nnn
from normlab.convert import _default_num_groups, fold_batchnorm, replace_norms
from normlab.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d
from normlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d
from normlab.nn.renorm import BatchRenorm1d, BatchRenorm2d
from normlab.nn.ws_conv import WSConv2d

F32 = {"atol": 1e-5, "rtol": 1e-5}
F64 = {"atol": 1e-10, "rtol": 1e-10}
BN_TYPES = (nn.modules.batchnorm._BatchNorm, nnn.BatchNorm1d, nnn.BatchNorm2d, FrozenBatchNorm2d)


class Block(nn.Module):
    """Children registered in forward order, as in torchvision's ResNet blocks."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nnn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(c, eps=1e-3, momentum=None)

    def forward(self, x):
        return x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class Net(nn.Module):
    """Batch norms at every depth: Sequential, ModuleList, ModuleDict, attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleList([Block(8)])
        self.heads = nn.ModuleDict({
            "cls": nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nnn.BatchNorm1d(6)
            ),
        })

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.heads["cls"](x)


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random affine parameters and running statistics in every batch norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BN_TYPES):
                c = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g))
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g))
                    m.running_var.copy_(torch.rand(c, generator=g) + 0.2)
                    if getattr(m, "num_batches_tracked", None) is not None:
                        m.num_batches_tracked.fill_(7)
    return model


def _net(seed: int = 0, dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(seed)
    return _randomized(Net(), seed).to(dtype)


def _norms(model: nn.Module) -> dict[str, nn.Module]:
    names = ("stem.1", "blocks.0.bn1", "blocks.0.bn2", "heads.cls.3")
    modules = dict(model.named_modules())
    return {n: modules[n] for n in names}


def _x(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1)).to(dtype)


# ---------------------------------------------------------------------------------------------
# replace_norms: types, carried tensors, modes


@pytest.mark.parametrize("kind, types", [
    ("group", (nnn.GroupNorm,) * 4),
    ("layer", (nnn.GroupNorm,) * 4),
    ("instance", (nnn.InstanceNorm2d, nnn.InstanceNorm2d, nnn.InstanceNorm2d, nnn.InstanceNorm1d)),
    ("frozen", (FrozenBatchNorm2d, FrozenBatchNorm2d, FrozenBatchNorm2d, FrozenBatchNorm1d)),
    ("renorm", (BatchRenorm2d, BatchRenorm2d, BatchRenorm2d, BatchRenorm1d)),
    ("batch", (nnn.BatchNorm2d, nnn.BatchNorm2d, nnn.BatchNorm2d, nnn.BatchNorm1d)),
])
def test_replace_types_and_carried_tensors(kind, types):
    model = _net(dtype=torch.float64).eval()
    before = {n: copy.deepcopy(m) for n, m in _norms(model).items()}
    assert replace_norms(model, kind) is model
    for (name, new), cls in zip(_norms(model).items(), types):
        old = before[name]
        assert type(new) is cls, name
        assert not new.training
        assert new.eps == old.eps
        torch.testing.assert_close(new.weight, old.weight)
        torch.testing.assert_close(new.bias, old.bias)
        assert new.weight.dtype == torch.float64
        if kind in ("frozen", "renorm", "batch"):
            torch.testing.assert_close(new.running_mean, old.running_mean)
            torch.testing.assert_close(new.running_var, old.running_var)
        if kind in ("renorm", "batch"):
            assert int(new.num_batches_tracked) == 7 and new.momentum == old.momentum
        if kind == "instance":
            assert new.affine and not new.track_running_stats
    if kind != "instance":  # InstanceNorm1d needs (N, C, L); the head's BatchNorm1d sees (N, C)
        assert model(_x(torch.float64)).shape == (4, 6)


def test_replace_group_layer_instance_match_torch_oracles():
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for kind, options, oracle in [
        ("group", {"num_groups": 2}, lambda m: nn.GroupNorm(2, m.num_features, m.eps)),
        ("layer", {}, lambda m: nn.GroupNorm(1, m.num_features, m.eps)),
        ("instance", {}, lambda m: nn.InstanceNorm2d(m.num_features, m.eps, affine=True)),
    ]:
        bn = _randomized(nn.BatchNorm2d(4, eps=1e-3)).double()
        ref = oracle(bn).double()
        ref.load_state_dict({"weight": bn.weight, "bias": bn.bias})
        new = replace_norms(nn.Sequential(bn), kind, **options)[0]
        torch.testing.assert_close(new(x), ref(x), **F64)


def test_replace_instance_with_running_statistics():
    bn = _randomized(nn.BatchNorm2d(3)).eval()
    new = replace_norms(nn.Sequential(bn), "instance", track_running_stats=True)[0]
    assert new.track_running_stats
    torch.testing.assert_close(new.running_mean, bn.running_mean)
    torch.testing.assert_close(new.running_var, bn.running_var)
    torch.testing.assert_close(new(_x()), bn(_x()), **F32)  # eval with the same statistics


def test_replace_rms_on_features():
    torch.manual_seed(2)
    bn = nn.BatchNorm1d(5, affine=True)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(5) + 0.5)
    model = nn.Sequential(nn.Linear(4, 5), bn)
    replace_norms(model, "rms")
    ref = nn.RMSNorm(5, eps=bn.eps)
    ref.load_state_dict({"weight": bn.weight})
    x = torch.randn(3, 4)
    assert type(model[1]) is nnn.RMSNorm and model[1].eps == bn.eps
    torch.testing.assert_close(model(x), ref(model[0](x)), **F32)


def test_frozen_and_back_to_batch_keep_eval_output():
    model = _net().eval()
    x = _x()
    expected = model(x)
    replace_norms(model, "frozen")
    torch.testing.assert_close(model(x), expected, **F32)
    model.train()  # frozen layers ignore the mode
    torch.testing.assert_close(model(x), expected, **F32)
    replace_norms(model, "batch")
    assert all(type(m) in (nnn.BatchNorm1d, nnn.BatchNorm2d) for m in _norms(model).values())
    assert all(m.weight.requires_grad for m in _norms(model).values())
    model.eval()
    torch.testing.assert_close(model(x), expected, **F32)


@pytest.mark.parametrize("kind, options", [
    ("batch", {}),
    ("renorm", {"r_max": 1.0, "d_max": 0.0}),
    ("ghost", {"virtual_batch_size": 4}),
])
def test_kinds_that_equal_batch_norm(kind, options):
    """Train-mode outputs and buffers, then eval outputs, equal the original's."""
    ref, model = _net(), _net()
    replace_norms(model, kind, **options)
    ref.train()
    model.train()
    x = _x()
    for _ in range(2):
        torch.testing.assert_close(model(x), ref(x), **F32)
    for (name, m), r in zip(_norms(model).items(), _norms(ref).values()):
        torch.testing.assert_close(m.running_mean, r.running_mean, **F32)
        torch.testing.assert_close(m.running_var, r.running_var, **F32)
        assert int(m.num_batches_tracked) == int(r.num_batches_tracked) == 9, name
    ref.eval()
    model.eval()
    torch.testing.assert_close(model(x), ref(x), **F32)


def test_replace_ghost_and_renorm_options():
    model = replace_norms(_net(), "ghost", virtual_batch_size=2)
    assert [m.virtual_batch_size for m in _norms(model).values()] == [2] * 4
    assert isinstance(_norms(model)["heads.cls.3"], GhostBatchNorm1d)
    assert isinstance(_norms(model)["stem.1"], GhostBatchNorm2d)
    model = replace_norms(
        _net(), "renorm", r_max=2.0, warmup_steps=0, r_max_ramp_steps=10, d_max_ramp_steps=0
    )
    bn = _norms(model)["stem.1"]
    assert (bn.r_max, bn.d_max, bn.warmup_steps, bn.r_max_ramp_steps) == (2.0, 5.0, 0, 10)
    assert bn.limits() == (pytest.approx(1.7), 5.0)  # the carried counter (7) is the step


def test_replace_group_default_groups():
    assert [_default_num_groups(c) for c in (1, 8, 48, 64, 96, 37, 3)] == [1, 8, 24, 32, 32, 1, 3]
    model = replace_norms(nn.Sequential(nn.BatchNorm2d(48), nn.BatchNorm2d(64)), "group")
    assert (model[0].num_groups, model[1].num_groups) == (24, 32)


def test_replace_keeps_modes_sharing_requires_grad_and_non_affine():
    shared = _randomized(nn.BatchNorm2d(4))
    shared.weight.requires_grad_(False)
    plain = nn.BatchNorm2d(4, affine=False).eval()
    nobias = nnn.BatchNorm2d(4, bias=False, on_nonfinite="skip")
    model = nn.Sequential(shared, nn.Sequential(shared, plain), nobias)
    replace_norms(model, "group", num_groups=2)
    assert model[0] is model[1][0]
    assert not model[0].weight.requires_grad and model[0].training
    assert model[1][1].weight is None and not model[1][1].training
    assert model[2].weight is not None and model[2].bias is None
    assert replace_norms(nn.Sequential(nobias), "renorm")[0].on_nonfinite == "skip"


def test_replace_root_batch_norm_returns_replacement():
    bn = _randomized(nn.BatchNorm1d(3))
    new = replace_norms(bn, "frozen")
    assert type(new) is FrozenBatchNorm1d and type(bn) is nn.BatchNorm1d
    torch.testing.assert_close(new.running_var, bn.running_var)


def test_replace_torch_sync_batchnorm_needs_dim():
    model = nn.Sequential(nn.SyncBatchNorm(3))
    with pytest.raises(ValueError, match=r"'0' \(SyncBatchNorm\) to kind='frozen'.*pass dim=1"):
        replace_norms(model, "frozen")
    replace_norms(model, "frozen", dim=2)
    assert type(model[0]) is FrozenBatchNorm2d
    with pytest.raises(ValueError, match="dim=3 contradicts the module, which is 2d"):
        replace_norms(nn.Sequential(nn.BatchNorm2d(3)), "batch", dim=3)
    with pytest.raises(ValueError, match="dim=4 must be 1, 2 or 3"):
        replace_norms(nn.Sequential(nn.BatchNorm2d(3)), "batch", dim=4)


def test_replace_sync_single_process_equals_batch_norm():
    from normlab.nn.sync_batchnorm import SyncBatchNorm

    ref, model = _net(), _net()
    replace_norms(model, "sync")
    assert all(type(m) is SyncBatchNorm for m in _norms(model).values())
    x = _x()
    torch.testing.assert_close(model(x), ref(x), **F32)
    for m, r in zip(_norms(model).values(), _norms(ref).values()):
        torch.testing.assert_close(m.running_var, r.running_var, **F32)
        assert int(m.num_batches_tracked) == int(r.num_batches_tracked)
    model.eval()
    ref.eval()
    torch.testing.assert_close(model(x), ref(x), **F32)
    back = replace_norms(nn.Sequential(_norms(model)["stem.1"]), "frozen", dim=2)[0]
    torch.testing.assert_close(back.running_mean, _norms(ref)["stem.1"].running_mean, **F32)


# ---------------------------------------------------------------------------------------------
# replace_norms: errors


def test_replace_errors_name_module_and_reason():
    with pytest.raises(ValueError, match=r"unknown kind='spectral'; expected one of"):
        replace_norms(_net(), "spectral")
    with pytest.raises(TypeError, match=r"kind='group' takes no option\(s\) \['groups'\]"):
        replace_norms(_net(), "group", groups=4)
    with pytest.raises(ValueError, match="num_groups=0 must be a positive integer"):
        replace_norms(_net(), "group", num_groups=0)
    with pytest.raises(ValueError, match=r"'stem.1' \(BatchNorm2d\) to kind='group': "
                                         r"num_channels=8 is not divisible by num_groups=3"):
        replace_norms(_net(), "group", num_groups=3)
    with pytest.raises(ValueError, match=r"'stem.1' \(BatchNorm2d\) to kind='rms': RMS norm over "
                                         r"channels is RMSNorm\(C\) on an \(N, C\) input"):
        replace_norms(_net(), "rms")
    with pytest.raises(ValueError, match=r"'0' \(BatchNorm1d\) to kind='rms': RMS norm has no "
                                         "bias and this module's bias is non-zero"):
        replace_norms(nn.Sequential(_randomized(nn.BatchNorm1d(3))), "rms")
    with pytest.raises(ValueError, match="kind='ghost' needs the option virtual_batch_size="):
        replace_norms(_net(), "ghost")
    untracked = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))
    for kind in ("frozen", "renorm"):
        with pytest.raises(ValueError, match=rf"'1' \(BatchNorm2d\) to kind='{kind}': it keeps no "
                                             "running statistics"):
            replace_norms(untracked, kind)
    with pytest.raises(ValueError, match=r"'0' \(LazyBatchNorm2d\): it is a lazy module"):
        replace_norms(nn.Sequential(nn.LazyBatchNorm2d()), "group")


def test_replace_failure_changes_nothing():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm2d\) to kind='rms'"):
        replace_norms(model, "rms")
    assert type(model[0]) is nn.BatchNorm1d and type(model[1]) is nn.BatchNorm2d


# ---------------------------------------------------------------------------------------------
# fold_batchnorm


class SmallCNN(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=4), nnn.BatchNorm2d(8, eps=1e-3), nn.ReLU(),
            WSConv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), FrozenBatchNorm2d(6),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(6, 5), nnn.BatchNorm1d(5, affine=False),
        )


@pytest.mark.parametrize("dtype, tol", [(torch.float64, F64), (torch.float32, F32)])
def test_fold_small_cnn_equal_outputs(dtype, tol):
    torch.manual_seed(3)
    model = _randomized(SmallCNN(), 3).to(dtype).eval()
    state = copy.deepcopy(model.state_dict())
    x = _x(dtype)
    folded = fold_batchnorm(model)
    torch.testing.assert_close(folded(x), model(x), **tol)
    assert not any(isinstance(m, BN_TYPES) for m in folded.modules())
    assert type(folded[6]) is nn.Conv2d and folded[0].bias is not None
    assert not folded.training
    # The original is untouched.
    assert type(model[1]) is nn.BatchNorm2d and model[0].bias is None
    for k, t in model.state_dict().items():
        assert torch.equal(t, state[k]), k


def test_fold_consecutive_children_of_any_module():
    torch.manual_seed(4)
    model = _net().eval()
    x = _x()
    folded = fold_batchnorm(model)
    torch.testing.assert_close(folded(x), model(x), **F32)
    assert isinstance(folded.blocks[0].bn1, nn.Identity)
    assert isinstance(folded.blocks[0].bn2, nn.Identity)
    assert isinstance(folded.heads["cls"][3], nn.Identity)
    only_seq = fold_batchnorm(model, consecutive_children=False)
    assert isinstance(only_seq.blocks[0].bn1, nnn.BatchNorm2d)
    assert isinstance(only_seq.stem[1], nn.Identity)
    torch.testing.assert_close(only_seq(x), model(x), **F32)


def test_fold_leaves_what_it_cannot_fold():
    torch.manual_seed(5)
    shared = nn.Conv2d(3, 3, 1)
    hooked = nn.Conv2d(3, 3, 1)
    hooked.register_forward_hook(lambda *args: None)
    model = nn.Sequential(
        nn.ReLU(), nn.BatchNorm2d(3),                 # not after a conv
        shared, nn.BatchNorm2d(3), shared,            # conv used twice
        hooked, nn.BatchNorm2d(3),                    # hook reads the conv output
        nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False),  # batch statistics
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),        # folds
    )
    model = _randomized(model).eval()
    folded = fold_batchnorm(model)
    kinds = [type(m).__name__ for m in folded]
    assert kinds[1] == kinds[3] == kinds[6] == kinds[8] == "BatchNorm2d"
    assert kinds[10] == "Identity"
    x = _x()
    torch.testing.assert_close(folded(x), model(x), **F32)


def test_fold_refuses_training_mode():
    model = _net()
    with pytest.raises(ValueError, match=r"the model is in training mode.*call model.eval"):
        fold_batchnorm(model)
    model.eval()
    model.blocks[0].bn1.train()
    with pytest.raises(ValueError, match=r"'blocks.0.bn1' \(BatchNorm2d\) is in training mode"):
        fold_batchnorm(model)
