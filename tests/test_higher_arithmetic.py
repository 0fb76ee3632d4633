"""The drop-in path computes higher's float32 numbers: a migrated program's trace does not move.

higher 0.2.1 (like hand-written MAML) updates with two-op forms (``p - lr * g``); torch.optim
uses fused ops (``torch.sub(p, g, alpha=lr)``), which round once where the former round twice.
The differentiable optimizers build their rules with ``arithmetic="higher"``; the pure rules
default to torch.optim's ops (see ``higher_func/_rules/_math.py``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import higher_func as hf

from optimizer_cases import CASES, LOW_PRECISION_DTYPES

STEPS = 10


def conv_bn_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 5),
    )


def task() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(8, 1, 10, 10, generator=generator), torch.randint(
        0, 5, (8,), generator=generator
    )


def loss_of(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, y)


def drop_in(library, opt_class, **options) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The unchanged higher program: ``STEPS`` inner steps, then the meta-loss."""
    x, y = task()
    model = conv_bn_net()
    opt = opt_class(model.parameters(), **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # higher's deprecation warnings
        with library.innerloop_ctx(model, opt) as (fmodel, diffopt):
            for _ in range(STEPS):
                diffopt.step(loss_of(fmodel(x), y))
            meta = loss_of(fmodel(x), y)
            return meta.detach(), [p.detach() for p in fmodel.parameters()]


def by_hand(update) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same loop written out, ``update(step, params, grads, state) -> params``."""
    x, y = task()
    model = conv_bn_net()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    state: dict = {}
    for step in range(STEPS):
        loss = loss_of(functional_call(model, params, (x,)), y)
        grads = dict(
            zip(
                params,
                torch.autograd.grad(loss, list(params.values()), create_graph=True),
                strict=True,
            )
        )
        params = update(step, params, grads, state)
    meta = loss_of(functional_call(model, params, (x,)), y)
    return meta.detach(), [p.detach() for p in params.values()]


def sgd_by_hand(lr: float, momentum: float = 0.0, fused: bool = False):
    def update(step, params, grads, state):
        new = {}
        for n, p in params.items():
            g = grads[n]
            if momentum:
                g = state[n] = g if step == 0 else state[n] * momentum + g
            new[n] = torch.sub(p, g, alpha=lr) if fused else p - lr * g
        return new

    return update


def adam_by_hand(lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
    """torch.optim.Adam's formula, in higher's two-op forms."""
    beta1, beta2 = betas

    def update(step, params, grads, state):
        t, new = step + 1, {}
        for n, p in params.items():
            g = grads[n]
            m, v = state.get(n, (torch.zeros_like(p), torch.zeros_like(p)))
            m = m * beta1 + (1 - beta1) * g
            v = v * beta2 + (1 - beta2) * g * g
            state[n] = (m, v)
            denom = torch.sqrt(v) / (1 - beta2**t) ** 0.5 + eps
            new[n] = p - lr / (1 - beta1**t) * (m / denom)
        return new

    return update


def assert_same_trace(ours, reference) -> None:
    (meta, params), (meta_ref, params_ref) = ours, reference
    assert torch.allclose(meta, meta_ref)
    assert all(torch.allclose(a, b) for a, b in zip(params, params_ref, strict=True))
    # In fact bit for bit: the same ops in the same order.
    assert torch.equal(meta, meta_ref)
    assert all(torch.equal(a, b) for a, b in zip(params, params_ref, strict=True))


@pytest.mark.parametrize(
    ("options", "reference"),
    [
        ({"lr": 0.37}, sgd_by_hand(0.37)),
        ({"lr": 0.3, "momentum": 0.9}, sgd_by_hand(0.3, momentum=0.9)),
    ],
    ids=["sgd", "momentum"],
)
def test_drop_in_sgd_equals_hand_written_maml(options, reference) -> None:
    assert_same_trace(drop_in(hf, torch.optim.SGD, **options), by_hand(reference))


def test_the_fused_op_would_move_the_trace() -> None:
    """What the test above guards against: the fused update is not the same program."""
    _, fused = by_hand(sgd_by_hand(0.37, fused=True))
    _, two_op = by_hand(sgd_by_hand(0.37))
    assert not all(torch.equal(a, b) for a, b in zip(fused, two_op, strict=True))


def test_drop_in_adam_equals_torch_formula_in_higher_forms() -> None:
    assert_same_trace(drop_in(hf, torch.optim.Adam, lr=0.05), by_hand(adam_by_hand(0.05)))


@pytest.mark.parametrize(
    ("opt_class", "options"),
    [
        (torch.optim.SGD, {"lr": 0.37}),
        (torch.optim.SGD, {"lr": 0.3, "momentum": 0.9}),
        (torch.optim.SGD, {"lr": 0.3, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}),
        *(
            pytest.param(opt_class, options, marks=pytest.mark.slow)
            for opt_class, options in [
                (torch.optim.Adagrad, {"lr": 0.1}),
                (torch.optim.Adadelta, {"lr": 1.0}),
                (torch.optim.Adamax, {"lr": 0.05}),
                (torch.optim.ASGD, {"lr": 0.1}),
                (torch.optim.RMSprop, {"lr": 0.01}),
            ]
        ),
    ],
    ids=[
        "sgd",
        "momentum",
        "nesterov-weight-decay",
        "adagrad",
        "adadelta",
        "adamax",
        "asgd",
        "rmsprop",
    ],
)
def test_drop_in_equals_higher_itself(opt_class, options) -> None:
    higher = pytest.importorskip("higher")
    assert_same_trace(drop_in(hf, opt_class, **options), drop_in(higher, opt_class, **options))


def test_drop_in_adam_has_highers_moments_and_torchs_eps() -> None:
    """higher 0.2.1's Adam adds eps before the bias correction (torch < 1.5's formula); the
    drop-in keeps torch.optim's. The moments are higher's bit for bit; the first step differs
    by the eps placement only."""
    higher = pytest.importorskip("higher")
    x, y = task()
    states = []
    for library in (hf, higher):
        model = conv_bn_net()
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        with library.innerloop_ctx(model, opt) as (fmodel, diffopt):
            diffopt.step(loss_of(fmodel(x), y))
            states.append(diffopt.state[0])
    ours, theirs = states
    for k in theirs:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ours[k][key], theirs[k][key])


# --------------------------------------------------------------------------- low precision

DROP_IN_LOW_PRECISION = [
    pytest.param(
        case,
        dtype,
        marks=()
        if case.name in {"adam", "nadam", "radam"} and dtype == torch.bfloat16
        else pytest.mark.slow,
        id=f"{case.name}-{str(dtype).removeprefix('torch.')}",
    )
    for case in CASES
    for dtype in LOW_PRECISION_DTYPES
]


@pytest.mark.parametrize(("case", "dtype"), DROP_IN_LOW_PRECISION)
def test_drop_in_low_precision_follows_torch_optim_over_1000_steps(case, dtype) -> None:
    """bfloat16/float16 weights through the differentiable optimizer: no stalled step
    counter, no bias correction rounded to 0. The drop-in rounds as higher does, so it is
    within a few units in the last place of torch.optim (a stall is 10 to 40 away)."""
    torch.manual_seed(0)
    options = case.option_sets[0]
    start = torch.randn(16).to(dtype)
    reference = start.clone().requires_grad_()
    torch_opt = case.torch_class([reference], **options)
    weight = start.clone().requires_grad_()
    opt = case.torch_class([weight], **options)
    diffopt = hf.optim.get_diff_optim(opt, [weight], track_higher_grads=False)
    fast = [weight]
    for g in torch.randn(1000, 16).to(dtype):
        reference.grad = g
        torch_opt.step()
        fast = diffopt.step((fast[0] * g).sum(), params=fast)  # its gradient is g
    ours, theirs = fast[0].detach().float(), reference.detach().float()
    assert fast[0].dtype == dtype and not ours.isnan().any()
    ulp = torch.finfo(dtype).eps * theirs.abs().max()
    assert (ours - theirs).abs().max() <= 4 * ulp


def test_mixed_precision_drop_in_equals_hand_written_loop() -> None:
    """float32 weights, a bfloat16 autocast forward: the gradients come back in float32
    (the weights' dtype), the weights stay float32, and the trace is the hand-written one."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = drop_in(hf, torch.optim.Adam, lr=0.05)
        reference = by_hand(adam_by_hand(0.05))
    assert all(p.dtype == torch.float32 for p in ours[1])
    assert_same_trace(ours, reference)


def _recorded_nodes(output: torch.Tensor) -> int:
    """The autograd nodes behind ``output`` (leaves' accumulators excluded)."""
    seen, todo = set(), [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen or type(node).__name__ == "AccumulateGrad":
            continue
        seen.add(node)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_a_factor_of_one_is_skipped_with_the_same_bits(dtype) -> None:
    """higher's momentum update ``buf * m + 1 * g`` (no dampening): ``1 * g`` is ``g`` bit for
    bit, so the higher arithmetic adds ``g`` itself, one autograd node fewer, same numbers and
    the same derivatives."""
    from higher_func._rules._math import HigherOps

    torch.manual_seed(0)
    x = torch.randn(50).to(dtype).requires_grad_()
    y = torch.randn(50).to(dtype).requires_grad_()
    for op, reference in ((HigherOps.add_scaled, x + 1.0 * y), (HigherOps.sub_scaled, x - 1 * y)):
        ours = op(x, y, 1.0)
        assert torch.equal(ours, reference)
        assert _recorded_nodes(ours) == _recorded_nodes(reference) - 1
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                torch.autograd.grad(ours.square().sum(), [x, y]),
                torch.autograd.grad(reference.square().sum(), [x, y]),
                strict=True,
            )
        )
    assert _recorded_nodes(HigherOps.add_scaled(x, y, 0.5)) == 2  # any other factor: two ops


@pytest.mark.parametrize("width", [128, 512], ids=["flat-group", "per-tensor"])
def test_drop_in_adam_on_large_tensors_keeps_the_trace_and_meta_gradient(width) -> None:
    """Large tensors take safe_sqrt's one-pass Function (``_execution.one_pass_sqrt_pays``),
    stepped flat (width 128) or per tensor (512): the inner trace and the meta-gradient are
    the hand-written loop's (plain ``torch.sqrt``) bit for bit."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    )
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    update = adam_by_hand(0.01)

    def mse(out: torch.Tensor) -> torch.Tensor:
        return ((out - y) ** 2).mean()

    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with hf.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(mse(fmodel(x)))
        ours = [p.detach() for p in fmodel.parameters()]
        ours_meta = torch.autograd.grad(mse(fmodel(x)), list(model.parameters()))
    params = dict(model.named_parameters())
    state: dict = {}
    for step in range(3):
        loss = mse(functional_call(model, params, (x,)))
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = update(step, params, dict(zip(params, grads, strict=True)), state)
    reference = [p.detach() for p in params.values()]
    meta = torch.autograd.grad(mse(functional_call(model, params, (x,))), list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(ours_meta, meta, strict=True))
