"""Misuse caught inside the rules: the same error from ``rule.step`` and ``diffopt.step``.

Each row of ``ERROR_CASES`` (in ``optimizer_cases.py``) runs through both entry points and
is matched by message; sparse gradients, where torch.optim accepts them, give its numbers.
"""

from __future__ import annotations

import pytest
import torch

import higher_func as hf

from optimizer_cases import ERROR_CASES, ERROR_IDS, ErrorCase


def weight() -> torch.Tensor:
    return torch.randn(3, 1)


def through_rule(case: ErrorCase) -> None:
    factory = hf.optim.rule_factory(case.torch_class)
    rule = factory(**{**case.options, **case.bad_options})
    params = {"w": weight()}
    grad = torch.randn(3, 1)
    if case.bad_grad is not None:
        grad = case.bad_grad(grad)
    rule.step(params, {"w": grad}, rule.init(params))


def through_diffopt(case: ErrorCase) -> None:
    """The weight gets the bad gradient; with the bias, a stateful group could be stepped as
    one flat tensor, which must not hide the mistake."""
    model = torch.nn.Linear(1, 3)
    opt = case.torch_class(model.parameters(), **case.options)
    bad_grad = case.bad_grad
    callback = None if bad_grad is None else (lambda grads: [bad_grad(grads[0]), grads[1]])
    diffopt = hf.optim.get_diff_optim(opt, model.parameters(), grad_callback=callback)
    diffopt.param_groups[0].update(case.bad_options)
    loss = model(torch.ones(2, 1)).pow(2).sum()
    assert len(list(model.parameters())) == 2
    diffopt.step(loss, params=list(model.parameters()))


@pytest.mark.parametrize("case", ERROR_CASES, ids=ERROR_IDS)
@pytest.mark.parametrize("entry_point", [through_rule, through_diffopt], ids=["rule", "diffopt"])
def test_misuse_gets_the_same_clear_error_from_every_entry_point(case, entry_point) -> None:
    with pytest.raises(case.error, match=case.match):
        entry_point(case)


def test_override_of_the_wrong_type_is_refused_per_step() -> None:
    rule = hf.optim.sgd(lr=0.1)
    params = {"w": weight()}
    with pytest.raises(TypeError, match=r"sgd.step\(\): lr must be a number .*got NoneType"):
        rule.step(params, {"w": torch.ones(3, 1)}, rule.init(params), lr=None)


def test_a_generator_of_params_is_refused_with_the_fix() -> None:
    rule = hf.optim.sgd(lr=0.1)
    model = torch.nn.Linear(1, 3)
    with pytest.raises(TypeError, match=r"params must be a dict .* got a generator.*list\(model"):
        rule.init(model.parameters())


def test_grads_of_another_structure_say_what_was_expected() -> None:
    rule = hf.optim.sgd(lr=0.1)
    params = {"w": weight(), "b": torch.zeros(3)}
    with pytest.raises(
        ValueError,
        match=r"Expected a dict with 2 key\(s\) \['b', 'w'\], got a list of 2 item\(s\)",
    ):
        rule.step(params, [torch.ones(3, 1), torch.ones(3)], rule.init(params))


def test_unknown_arithmetic_is_refused() -> None:
    with pytest.raises(ValueError, match=r"arithmetic must be one of \['torch', 'higher'\]"):
        hf.optim.sgd(arithmetic="fused")


# --------------------------------------------------------------------------- sparse gradients


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # torch.optim.Adagrad's own
@pytest.mark.usefixtures("float64_scalar_state")
@pytest.mark.parametrize(
    ("torch_class", "options"),
    [
        (torch.optim.SGD, {"lr": 0.1}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01}),
    ],
    ids=["sgd", "momentum", "nesterov", "adagrad"],
)
def test_sparse_gradients_give_torch_optims_numbers(torch_class, options) -> None:
    """An embedding with sparse gradients (repeated indices included), 5 steps, through the
    rule and through the drop-in, against torch.optim stepping the same sparse gradients."""
    embedding = torch.nn.Embedding(6, 2, sparse=True).double()
    start = embedding.weight.detach().clone()
    reference = torch.nn.Embedding(6, 2, sparse=True).double()
    reference.weight.data.copy_(start)
    torch_opt = torch_class(reference.parameters(), **options)
    rule = hf.optim.rule_factory(torch_class)(**options)
    params = {"weight": start.clone()}
    state = rule.init(params)
    drop_in_opt = torch_class(embedding.parameters(), **options)
    diffopt = hf.optim.get_diff_optim(drop_in_opt, embedding.parameters())
    fast = [start.clone().requires_grad_()]
    for step in range(5):
        indices = torch.tensor([step % 6, 3, 3])
        torch_opt.zero_grad()
        reference(indices).pow(2).sum().backward()
        assert reference.weight.grad.is_sparse
        torch_opt.step()
        grad = reference.weight.grad.clone()
        params, state = rule.step(params, {"weight": grad}, state)
        loss = torch.nn.functional.embedding(indices, fast[0], sparse=True).pow(2).sum()
        fast = diffopt.step(loss, params=fast)
        for ours in (params["weight"], fast[0]):
            assert ours.layout == torch.strided
            torch.testing.assert_close(
                ours.detach(), reference.weight.detach(), rtol=1e-12, atol=1e-14
            )
