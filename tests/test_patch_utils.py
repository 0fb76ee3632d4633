"""``higher_func.utils``: the helpers higher's users call, and the package's higher-style names."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

import higher_func as higher
from higher_func import utils
from higher_func.patch import FunctionalModule, monkeypatch


class Pair(NamedTuple):
    a: torch.Tensor
    b: int


def test_get_func_params_gives_detached_leaf_copies() -> None:
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    copies = utils.get_func_params(model)
    for copied, param in zip(copies, model.parameters(), strict=True):
        assert copied.is_leaf and copied.requires_grad == param.requires_grad
        assert torch.equal(copied, param) and copied.data_ptr() != param.data_ptr()
    shared = utils.get_func_params(model, safe_copy=False)
    assert all(
        s.data_ptr() == p.data_ptr() for s, p in zip(shared, model.parameters(), strict=True)
    )
    moved = utils.get_func_params(model, device="meta")
    assert all(m.is_meta and m.is_leaf for m in moved)
    assert moved[0].requires_grad and not moved[1].requires_grad


def test_flatten_and_recursive_helpers() -> None:
    t = torch.ones(2, requires_grad=True)
    nested = {"x": [1, (2, t)], "y": {"z": {3}}, "p": Pair(t * 2, 4)}
    flat = utils.flatten(nested)
    assert flat[:2] == [1, 2] and flat[2] is t and flat[3] == 3 and flat[5] == 4
    assert utils.recursive_map([1, (2, {"a": 3})], lambda v: v + 1) == [2, (3, {"a": 4})]
    detached = utils.recursive_detach(nested)
    assert isinstance(detached["p"], Pair) and detached["p"].a.grad_fn is None
    assert detached["x"][1][1].requires_grad is False
    cast = utils.recursive_copy_and_cast(nested, "meta")
    assert cast["x"][1][1].is_meta and cast["x"][1][1].is_leaf and cast["y"] == {"z": {3}}
    assert utils.is_container((1,)) and not utils.is_container(t)


def test_param_mapping_and_find_param_match_parameters_order() -> None:
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.Tanh(), nn.Linear(2, 1), shared)
    params = list(model.parameters())
    assert utils.get_param_mapping(model) == [0, 1, 2, 3, 0, 1]
    assert utils.find_param_in_list(params[2], params) == 2
    assert utils.find_param_in_list(torch.ones(1), params) is None


def test_higher_names_exist() -> None:
    assert higher.monkeypatch is monkeypatch
    assert higher.patch.monkeypatch is monkeypatch
    assert callable(higher.patch.make_functional) and callable(higher.patch.buffer_sync)
    for name in ("_copy_tensor", "_recursive_map", "_recursive_detach", "_get_param_mapping"):
        assert callable(getattr(higher.utils, name))
    fmodel = FunctionalModule(nn.Sequential(nn.Linear(2, 2)))
    assert isinstance(fmodel, higher.patch._MonkeyPatchBase)
    assert isinstance(fmodel[0], higher.patch._MonkeyPatchBase)
    assert fmodel.param_names == ("0.weight", "0.bias")
