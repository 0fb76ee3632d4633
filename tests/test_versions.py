"""Features an older torch lacks are refused with the version they need, on every torch.

Each test pretends the installed torch is 2.4 (the floor) by patching
``higher_func._versions.TORCH_VERSION``, so the refusals are checked everywhere, not only
in the floor's CI run.
"""

from __future__ import annotations

import pytest
import torch

import higher_func as hf
from higher_func import _versions
from higher_func.func import compiled, compiled_innerloop


@pytest.fixture
def torch_2_4(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_versions, "TORCH_VERSION", (2, 4))


def test_versions_are_read_from_torch() -> None:
    assert _versions._parse("2.4.1+cu121") == (2, 4)
    assert _versions._parse("2.14.0a0+git1234") == (2, 14)
    assert _versions._parse(torch.__version__) == _versions.TORCH_VERSION
    assert _versions.torch_at_least("2.4")
    with pytest.raises(ValueError, match="cannot read a torch version from 'nightly'"):
        _versions._parse("nightly")


def test_the_error_names_the_feature_the_version_and_the_way_out(torch_2_4: None) -> None:
    with pytest.raises(hf.TorchVersionError) as caught:
        _versions.require_torch("2.7", "feature X", instead="use Y")
    message = str(caught.value)
    assert message.startswith("feature X needs torch >= 2.7; this is torch ")
    assert "pip install 'torch>=2.7'" in message and message.endswith("or use Y.")
    assert isinstance(caught.value, RuntimeError)
    _versions.require_torch("2.4", "an old feature")  # no error at the floor


def test_adam_decoupled_weight_decay_is_refused_on_an_older_torch(torch_2_4: None) -> None:
    with pytest.raises(
        hf.TorchVersionError, match=r"decoupled_weight_decay=True needs torch >= 2\.7"
    ):
        hf.optim.adam(weight_decay=0.1, decoupled_weight_decay=True)
    with pytest.raises(hf.TorchVersionError, match="higher_func.optim.adamw"):
        hf.optim.adam().replace(decoupled_weight_decay=True)
    # What works on every torch: L2 weight decay in Adam, and AdamW (always decoupled).
    hf.optim.adam(weight_decay=0.1)
    hf.optim.adamw(weight_decay=0.1)
    hf.optim.nadam(weight_decay=0.1, decoupled_weight_decay=True)  # NAdam has it since 2.1


def test_a_torch_adam_group_with_decoupled_weight_decay_is_refused(torch_2_4: None) -> None:
    """An older torch.optim.Adam ignores the key in a group; higher_func must not differ."""
    model = torch.nn.Linear(2, 1)
    group = {"params": list(model.parameters()), "weight_decay": 0.1}
    opt = torch.optim.Adam([{**group, "decoupled_weight_decay": True}], lr=0.01)
    with pytest.raises(hf.TorchVersionError, match="torch >= 2.7"):
        hf.get_diff_optim(opt, model.parameters(), fmodel=hf.monkeypatch(model))


@pytest.mark.parametrize("wrapper", [compiled, compiled_innerloop])
def test_compiling_is_refused_on_an_older_torch(torch_2_4: None, wrapper) -> None:
    with pytest.raises(hf.TorchVersionError, match="compiling inner loops .* needs torch >= "):
        wrapper(lambda x: 2 * x, backend="eager")


def test_recompute_under_vmap_is_refused_on_an_older_torch(torch_2_4: None) -> None:
    """Refused under vmap; the batched API's automatic fallback then loops over the tasks."""
    params = {"w": torch.ones(2, requires_grad=True)}
    support = query = (torch.ones(3, 4, 2), torch.zeros(3, 4))

    def loss(p, x, y):
        return ((x @ p["w"] - y) ** 2).mean()

    def meta(recompute: bool, batching: str = "auto") -> torch.Tensor:
        return hf.func.batched_meta_loss(
            loss, hf.optim.sgd(lr=0.1), params, support, query, steps=2,
            recompute=recompute, batching=batching,
        )  # fmt: skip

    refusal = r"recompute=True under vmap needs torch >= 2\.7"
    with pytest.raises(hf.func.BatchingError, match=refusal):
        meta(True, batching="vmap")
    with pytest.warns(UserWarning, match=refusal):
        looped = meta(True)
    torch.testing.assert_close(looped, meta(False), rtol=0, atol=0)
