"""Batched paths on models vmap cannot batch: the per-task loop (issue 12, part 2).

RNNs, training-mode spectral norms and models that branch on data run as a loop over tasks
(``batching="loop"``, or ``"auto"`` with a one-time warning); ``batching="vmap"`` raises an
error naming the module and the fix; the exact-norm hook never appears as the culprit.
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

import higher_func as hf
from higher_func import _batching
from higher_func.func import BatchingError, FunctionalModel, MetaObjective, batched_meta_loss

DTYPE = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}
TASKS, SHOTS = 2, 4


@pytest.fixture(autouse=True)
def _fresh_warnings() -> Iterator[None]:
    _batching._warned.clear()
    yield
    _batching._warned.clear()


class Recurrent(nn.Module):
    def __init__(self, layer: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = layer(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class Branching(nn.Module):
    """Python control flow on a tensor's value, which vmap cannot batch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(2)  # the exact-norm hook is active in its forward

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.linear(x.flatten(1)[:, :3]))
        return y if bool(x.sum() > 0) else -y


def spectral_model(style: str) -> nn.Module:
    wrap = parametrizations.spectral_norm if style == "parametrization" else nn.utils.spectral_norm
    return nn.Sequential(nn.Flatten(), wrap(nn.Linear(9, 6)), nn.Tanh(), nn.Linear(6, 2))


MODELS: dict[str, tuple[Callable[[], nn.Module], str, str]] = {
    # name: (model, module named in messages, words of the fix)
    "lstm": (lambda: Recurrent(nn.LSTM), "'rnn' (LSTM)", "batching='loop'"),
    "gru": (lambda: Recurrent(nn.GRU), "'rnn' (GRU)", "batching='loop'"),
    "spectral_norm": (lambda: spectral_model("parametrization"), "(_SpectralNorm)", "eval()"),
    "branching": (Branching, "the model", "torch.where"),
}


def tasks() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    def one() -> tuple[Tensor, Tensor]:
        return torch.randn(TASKS, SHOTS, 3, 3, dtype=DTYPE), torch.randint(0, 2, (TASKS, SHOTS))

    return one(), one()


def objective(model: nn.Module, **options: Any) -> MetaObjective:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return MetaObjective(model, opt, F.cross_entropy, steps=2, **options)


def drop_in_losses_and_grads(model: nn.Module, support: Any, query: Any) -> tuple[Tensor, list]:
    """The reference: innerloop_ctx code, one task after the other."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.zero_grad()
    losses = []
    for task in range(TASKS):
        with hf.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(F.cross_entropy(fmodel(support[0][task]), support[1][task]))
            loss = F.cross_entropy(fmodel(query[0][task]), query[1][task])
            (loss / TASKS).backward()
            losses.append(loss.detach())
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return torch.stack(losses), grads


@pytest.mark.parametrize("name", MODELS)
def test_auto_falls_back_to_the_loop_with_one_warning_and_equals_innerloop_ctx(
    name: str,
) -> None:
    make, module, _ = MODELS[name]
    model = make().to(DTYPE)
    support, query = tasks()
    expected_losses, expected_grads = drop_in_losses_and_grads(model, support, query)
    meta = objective(model)
    with pytest.warns(UserWarning, match="in a loop") as caught:
        losses = meta(support, query, reduction="none")
    assert module in str(caught[0].message)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    torch.testing.assert_close(losses.detach(), expected_losses, **TOL)
    losses.mean().backward()
    for p, expected in zip(model.parameters(), expected_grads, strict=True):
        torch.testing.assert_close(p.grad, expected, **TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is shown once
        meta(support, query)


@pytest.mark.parametrize("name", MODELS)
def test_forced_loop_equals_innerloop_ctx_without_warning(name: str) -> None:
    model = MODELS[name][0]().to(DTYPE)
    support, query = tasks()
    expected_losses, expected_grads = drop_in_losses_and_grads(model, support, query)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value, grads = objective(model, batching="loop").value_and_grad(support, query)
    torch.testing.assert_close(value.detach(), expected_losses.mean(), **TOL)
    for actual, expected in zip(grads.values(), expected_grads, strict=True):
        torch.testing.assert_close(actual, expected, **TOL)


@pytest.mark.parametrize("name", MODELS)
def test_vmap_only_raises_an_error_naming_the_module_and_the_fix(name: str) -> None:
    _, module, fix = MODELS[name]
    model = MODELS[name][0]().to(DTYPE)
    with pytest.raises(BatchingError, match="cannot batch the tasks with vmap") as caught:
        objective(model, batching="vmap")(*tasks())
    message = str(caught.value)
    assert module in message
    assert fix in message
    assert "Fix:" in message


def test_vmap_only_names_a_hook_based_spectral_norm() -> None:
    """torch.nn.utils.spectral_norm (hooks; the drop-in path refuses it) fails alike."""
    with pytest.raises(BatchingError, match=r"module '1' \(Linear\).*out=.*eval\(\)"):
        objective(spectral_model("hook").to(DTYPE), batching="vmap")(*tasks())


@pytest.mark.parametrize("name", MODELS)
def test_the_exact_norm_hook_is_never_the_last_frame(name: str) -> None:
    model = MODELS[name][0]().to(DTYPE)
    with pytest.raises(BatchingError) as caught:
        objective(model, batching="vmap")(*tasks())
    original = caught.value.__cause__
    assert original is not None
    frames = traceback.extract_tb(original.__traceback__)
    assert all(frame.name != "__torch_function__" for frame in frames)
    assert not frames[-1].filename.endswith("_norm.py")


def test_an_error_inside_exact_norms_ends_at_the_failing_line() -> None:
    model = nn.Sequential(nn.LayerNorm(3), nn.Linear(4, 2))  # wrong input size for Linear
    f = FunctionalModel(model)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as caught:
        f(f.params, None, torch.randn(2, 3))
    last = traceback.extract_tb(caught.value.__traceback__)[-1]
    assert last.filename.endswith("linear.py")
    assert last.name == "forward"


def test_batched_meta_loss_falls_back_and_equals_vmap_on_a_batchable_model() -> None:
    """The loop is the same computation as vmap: compared where both run."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    f = FunctionalModel(model.to(DTYPE))
    support, query = tasks()

    def loss(p: Any, buffers: Any, x: Tensor, y: Tensor) -> Any:
        out, buffers = f.with_buffers(p, buffers, x)
        return F.cross_entropy(out, y), buffers

    def run(batching: str) -> tuple[Tensor, tuple[Tensor, ...]]:
        value = batched_meta_loss(
            loss,
            hf.optim.adam(lr=0.1),
            f.params,
            support,
            query,
            steps=2,
            buffers=f.buffers,
            batching=batching,
        )
        return value, torch.autograd.grad(value, list(f.params.values()))

    vmapped, looped = run("vmap"), run("loop")
    torch.testing.assert_close(looped[0], vmapped[0], **TOL)
    for a, b in zip(looped[1], vmapped[1], strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_batched_meta_loss_names_the_module_of_a_data_dependent_model() -> None:
    model = Branching().to(DTYPE)
    f = FunctionalModel(model)
    support, query = tasks()

    def loss(p: Any, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(f(p, None, x), y)

    rule = hf.optim.sgd(lr=0.1)
    with pytest.raises(BatchingError, match=r"the model \(Branching\) at .*test_batching.py:\d+"):
        batched_meta_loss(loss, rule, f.params, support, query, batching="vmap")
    with pytest.warns(UserWarning, match="batched_meta_loss could not batch"):
        auto = batched_meta_loss(loss, rule, f.params, support, query, reduction="none")
    looped = batched_meta_loss(
        loss, rule, f.params, support, query, batching="loop", reduction="none"
    )
    torch.testing.assert_close(auto, looped, **TOL)


def test_randomness_errors_are_not_hidden_by_the_loop() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    with pytest.raises(RuntimeError, match="randomness"):
        objective(model.to(DTYPE))(*tasks())


def test_loop_with_same_randomness_gives_every_task_the_same_draw() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    (x, y), _ = tasks()
    same = (x[:1].expand_as(x), y[:1].expand_as(y))
    for randomness, equal in (("same", True), ("different", False)):
        meta = objective(model.to(DTYPE), randomness=randomness, batching="loop")
        losses = meta(same, same, reduction="none").detach()
        assert torch.allclose(losses, losses[:1].expand(TASKS), **TOL) is equal


def test_an_error_of_the_model_itself_is_raised_from_the_loop() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(7, 2)).to(DTYPE)  # wrong input size
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as caught:
        objective(model)(*tasks())
    assert not isinstance(caught.value, BatchingError)


@pytest.mark.parametrize("where", ["batched_meta_loss", "MetaObjective"])
def test_bad_batching_values_are_rejected(where: str) -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"batching must be one of \['auto', 'vmap', 'loop'\]"):
        if where == "MetaObjective":
            objective(model, batching="serial")
        else:
            batched_meta_loss(
                lambda p, x: x.sum(),
                hf.optim.sgd(lr=0.1),
                {},
                torch.zeros(2, 1),
                torch.zeros(2, 1),
                batching="serial",
            )
