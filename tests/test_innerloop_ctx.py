"""innerloop_ctx end to end, and the helpers beyond higher: write-back, truncation,
first-order MAML, schedules and clipping.  Float64; exact checks at 1e-10."""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

import higher_func as hf

from optimizer_cases import OPTION_CASES, OPTION_IDS

TOL = 1e-10
FD_TOL = 1e-7


pytestmark = pytest.mark.usefixtures("float64_scalar_state")


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, bias=False)  # a bias before BatchNorm has no effect
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def make_convnet() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet().double()


def conv_task(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(6, 1, 6, 6, generator=g), torch.randn(6, 1, 6, 6, generator=g)
    ys, yq = torch.randint(0, 2, (6,), generator=g), torch.randint(0, 2, (6,), generator=g)
    return xs, ys, xq, yq


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def regression(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def central_difference(f: Callable[[float], float], x: float, h: float = 1e-6) -> float:
    return (f(x + h) - f(x - h)) / (2 * h)


def assert_all_close(actual, expected, tol: float = TOL) -> None:
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.detach(), e.detach(), rtol=0, atol=tol)


# --------------------------------------------------------------------------- MAML


INNER_STEPS = 5
GROUP_LRS = (0.1, 0.03)


def conv_groups(model: ConvNet) -> list[dict[str, Any]]:
    features = [*model.conv.parameters(), *model.bn.parameters()]
    return [{"params": features}, {"params": model.fc.parameters(), "lr": GROUP_LRS[1]}]


def hand_written_update(kind: str) -> Callable:
    """SGD with momentum and Adam written out by hand (not through higher_func's rules)."""

    def sgd_momentum(p, g, state, lr, t):
        buffer = g if t == 0 else 0.9 * state + g
        return p - lr * buffer, buffer

    def adam(p, g, state, lr, t):
        (b1, b2), eps = (0.9, 0.999), 1e-8
        m, v = state if t else (torch.zeros_like(p), torch.zeros_like(p))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        step = t + 1
        # Where a gradient is exactly zero (a dead ReLU feature) v == 0 and sqrt has an
        # infinite derivative; like higher_func, take it as 0 there (value unchanged).
        zero = v == 0
        root = torch.where(zero, 0.0, torch.sqrt(torch.where(zero, 1.0, v)))
        denom = root / (1 - b2**step) ** 0.5 + eps
        return p - lr / (1 - b1**step) * m / denom, (m, v)

    return sgd_momentum if kind == "sgd" else adam


def reference_meta_gradient(model: ConvNet, kind: str, tasks: list) -> dict[str, torch.Tensor]:
    """The MAML meta-gradient with torch.func: grad of the summed query losses w.r.t. theta."""
    reference = copy.deepcopy(model)
    reference.bn.track_running_stats = False  # train mode: batch statistics either way
    reference.bn.running_mean = reference.bn.running_var = None
    names = [n for n, _ in model.named_parameters()]
    group_of = {n: 0 if n.startswith(("conv", "bn")) else 1 for n in names}
    update = hand_written_update(kind)

    def loss(params, x, y):
        return nn.functional.cross_entropy(functional_call(reference, params, (x,)), y)

    def meta_loss(theta):
        total = 0.0
        for xs, ys, xq, yq in tasks:
            phi, state = dict(theta), dict.fromkeys(names)
            for t in range(INNER_STEPS):
                grads = torch.func.grad(loss)(phi, xs, ys)
                for n in names:
                    lr = GROUP_LRS[group_of[n]]
                    phi[n], state[n] = update(phi[n], grads[n], state[n], lr, t)
            total = total + loss(phi, xq, yq)
        return total

    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    return torch.func.grad(meta_loss)(theta)


@pytest.mark.parametrize(
    ("kind", "torch_class", "options"),
    [("sgd", torch.optim.SGD, {"momentum": 0.9}), ("adam", torch.optim.Adam, {})],
    ids=["sgd-momentum", "adam"],
)
def test_maml_meta_gradient_equals_a_hand_written_torch_func_reference(kind, torch_class, options):
    model = make_convnet()
    tasks = [conv_task(seed) for seed in (1, 2)]
    expected = reference_meta_gradient(model, kind, tasks)
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}

    opt = torch_class(conv_groups(model), lr=GROUP_LRS[0], **options)
    for xs, ys, xq, yq in tasks:
        with hf.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(INNER_STEPS):
                diffopt.step(nn.functional.cross_entropy(fmodel(xs), ys))
            nn.functional.cross_entropy(fmodel(xq), yq).backward()
            assert int(dict(fmodel.named_buffers())["bn.num_batches_tracked"]) == INNER_STEPS + 1

    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=0, atol=TOL, msg=name)
    for name, b in model.named_buffers():  # the fmodel's statistics are its own
        assert torch.equal(b, buffers_before[name])


# --------------------------------------------------------------------------- contracts


@pytest.mark.parametrize("copy_initial_weights", [True, False])
def test_copy_initial_weights_contract(copy_initial_weights):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = regression(0)
    with hf.innerloop_ctx(model, opt, copy_initial_weights=copy_initial_weights) as (fm, diffopt):
        initial = fm.init_fast_params
        for _ in range(2):
            diffopt.step(mse(fm(x), y))
        mse(fm(x), y).backward()
    if copy_initial_weights:
        assert all(p.grad is None for p in model.parameters())
        assert all(p.is_leaf and p.grad is not None for p in initial)
    else:
        assert all(p.grad is not None for p in model.parameters())
        assert all(p.grad is None for p in initial if p.is_leaf)  # the graph reaches model


@pytest.mark.parametrize("track", [True, False])
def test_track_higher_grads_contract(track):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x, y = regression(0)
    with hf.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=track) as (
        fm,
        diffopt,
    ):
        for _ in range(3):
            diffopt.step(mse(fm(x), y))
        assert fm.track_higher_grads is track and diffopt.track_higher_grads is track
        if track:
            assert len([fm.parameters(time=t) for t in range(4)]) == 4
            assert all(p.grad_fn is not None for p in fm.fast_params)
        else:
            with pytest.raises(ValueError, match="only kept when tracking"):
                fm.init_fast_params  # noqa: B018
            assert all(p.grad_fn is None and p.is_leaf for p in fm.fast_params)
        mse(fm(x), y).backward()
    assert all((p.grad is not None) is track for p in model.parameters())


def test_step_with_explicit_params_records_them_in_the_fmodel():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = regression(0)
    with hf.innerloop_ctx(model, opt) as (fm, diffopt):
        shifted = [p + 1 for p in fm.fast_params]
        new = diffopt.step(mse(fm(x, params=shifted), y), params=shifted)
        assert all(a is b for a, b in zip(fm.fast_params, new, strict=True))
        expected = [
            s - 0.1 * g
            for s, g in zip(
                shifted, torch.autograd.grad(mse(fm(x, params=shifted), y), shifted), strict=True
            )
        ]
        assert_all_close(new, expected)


# --------------------------------------------------------------------------- write-back


def test_write_back_module_copies_fast_weights_and_batchnorm_statistics():
    model = make_convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, ys, _, _ = conv_task(1)
    with hf.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(nn.functional.cross_entropy(fmodel(xs), ys))
        hf.write_back_module(fmodel, model)
        assert_all_close(model.parameters(), fmodel.fast_params, tol=0)
        for (name, b), (fname, fb) in zip(
            model.named_buffers(), fmodel.named_buffers(), strict=True
        ):
            assert name == fname and torch.equal(b, fb)
    assert int(model.bn.num_batches_tracked) == 3
    assert all(p.grad_fn is None for p in model.parameters())
    with pytest.raises(ValueError, match=r"module has no parameter\(s\) \['bn.bias'"):
        hf.write_back_module(fmodel, nn.Sequential())


@pytest.mark.parametrize(("case", "options"), OPTION_CASES, ids=OPTION_IDS)
def test_write_back_optimizer_lets_torch_continue_where_the_inner_loop_ended(case, options):
    data = [regression(seed) for seed in range(7)]

    def torch_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Any) -> None:
        opt.zero_grad()
        mse(model(batch[0]), batch[1]).backward()
        opt.step()

    reference = mlp()
    ref_opt = case.torch_class(reference.parameters(), **options)
    for batch in data:
        torch_step(reference, ref_opt, batch)

    model = mlp()
    opt = case.torch_class(model.parameters(), **options)
    with hf.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for x, y in data[:4]:
            diffopt.step(mse(fmodel(x), y))
    hf.write_back_module(fmodel, model)
    hf.write_back_optimizer(diffopt, opt)
    for batch in data[4:]:
        torch_step(model, opt, batch)
    assert_all_close(model.parameters(), reference.parameters())
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert opt.state[p].keys() == ref_opt.state[q].keys()
        for key, value in opt.state[p].items():
            expected = ref_opt.state[q][key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == expected.dtype and value.device == expected.device, key


def test_write_back_optimizer_refuses_another_optimizer():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with hf.innerloop_ctx(model, opt) as (_, diffopt):
        pass
    other = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    with pytest.raises(ValueError, match=r"groups of sizes \[2, 2\] but diffopt has \[4\]"):
        hf.write_back_optimizer(diffopt, other)


# --------------------------------------------------------------------------- truncation


def test_truncation_cuts_gradients_at_the_truncation_point():
    data = [regression(seed) for seed in range(5)]

    def run(lr_early: Any, lr_late: Any, cut: bool) -> torch.Tensor:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with hf.innerloop_ctx(model, opt) as (fmodel, diffopt):
            for i, (x, y) in enumerate(data[:4]):
                if i == 2 and cut:
                    hf.truncate(fmodel, diffopt)
                    assert all(p.grad_fn is None for p in fmodel.parameters(time=0))
                    assert all(
                        not t.requires_grad
                        for s in diffopt.state
                        for e in s.values()
                        for t in e.values()
                    )
                lr = lr_early if i < 2 else lr_late
                diffopt.step(mse(fmodel(x), y), override={"lr": [lr]})
            return mse(fmodel(data[4][0]), data[4][1])

    lr = torch.tensor(0.1, requires_grad=True)
    (truncated,) = torch.autograd.grad(run(lr, lr, cut=True), [lr])
    (full,) = torch.autograd.grad(run(lr, lr, cut=False), [lr])
    # Truncated: only the late steps' use of lr counts.
    late_only = central_difference(lambda v: run(0.1, v, cut=False).item(), 0.1)
    assert abs(truncated.item() - late_only) < FD_TOL
    assert abs(full.item() - late_only) > 1e-4


def test_truncation_keeps_frozen_weights_frozen_and_restarts_the_history():
    model = mlp()
    model[0].bias.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = regression(0)
    with hf.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(mse(fmodel(x), y))
        latest = fmodel.fast_params
        hf.truncate(fmodel, diffopt)
        assert [p.requires_grad for p in fmodel.fast_params] == [True, False, True, True]
        assert_all_close(fmodel.parameters(time=0), latest, tol=0)
        with pytest.raises(IndexError):
            list(fmodel.parameters(time=1))


# --------------------------------------------------------------------------- first-order MAML


def test_first_order_maml_gives_the_initial_weights_the_first_order_meta_gradient():
    tasks = [(regression(2 * s), regression(2 * s + 1)) for s in range(3)]

    def expected_first_order() -> list[torch.Tensor]:
        total = [torch.zeros_like(p) for p in mlp().parameters()]
        for (xs, ys), (xq, yq) in tasks:
            model = mlp()
            opt = torch.optim.Adam(model.parameters(), lr=0.05)
            for _ in range(3):
                opt.zero_grad()
                mse(model(xs), ys).backward()
                opt.step()
            grads = torch.autograd.grad(mse(model(xq), yq), list(model.parameters()))
            total = [t + g for t, g in zip(total, grads, strict=True)]
        return total

    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for (xs, ys), (xq, yq) in tasks:
        with hf.innerloop_ctx(model, opt, copy_initial_weights=False, first_order=True) as (
            fmodel,
            diffopt,
        ):
            assert not fmodel.track_higher_grads and not diffopt.track_higher_grads
            for _ in range(3):
                diffopt.step(mse(fmodel(xs), ys))
            mse(fmodel(xq), yq).backward()
    assert_all_close([p.grad for p in model.parameters()], expected_first_order())

    second_order = mlp()
    opt = torch.optim.Adam(second_order.parameters(), lr=0.05)
    (xs, ys), (xq, yq) = tasks[0]
    with hf.innerloop_ctx(second_order, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(mse(fmodel(xs), ys))
        mse(fmodel(xq), yq).backward()
    assert not torch.allclose(second_order[0].weight.grad, model[0].weight.grad)


def test_first_order_needs_copy_initial_weights_false():
    model = mlp()
    with (
        pytest.raises(ValueError, match="Pass copy_initial_weights=False"),
        hf.innerloop_ctx(model, torch.optim.SGD(model.parameters()), first_order=True),
    ):
        pass


# --------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_grad_norm_equals_torch_and_works_as_a_grad_callback(norm_type):
    data = [regression(seed) for seed in range(4)]
    reference = mlp()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.5)
    for x, y in data:
        ref_opt.zero_grad()
        (10 * mse(reference(x), y)).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.3, norm_type=norm_type)
        ref_opt.step()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    clip = hf.clip_grad_norm(0.3, norm_type=norm_type)
    with hf.innerloop_ctx(model, opt, grad_callback=clip) as (fmodel, diffopt):
        for x, y in data:
            diffopt.step(10 * mse(fmodel(x), y))
    assert_all_close(fmodel.fast_params, reference.parameters())


def test_clipping_is_differentiable():
    data = [regression(seed) for seed in range(3)]

    def meta_loss(max_norm: Any, clip_value: Any) -> torch.Tensor:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        by_norm, by_value = hf.clip_grad_norm(max_norm), hf.clip_grad_value(clip_value)
        with hf.innerloop_ctx(model, opt, grad_callback=lambda g: by_value(by_norm(g))) as (
            fmodel,
            diffopt,
        ):
            for x, y in data[:2]:
                diffopt.step(10 * mse(fmodel(x), y))
            return mse(fmodel(data[2][0]), data[2][1])

    max_norm = torch.tensor(0.4, requires_grad=True)
    clip_value = torch.tensor(0.05, requires_grad=True)
    g_norm, g_value = torch.autograd.grad(meta_loss(max_norm, clip_value), [max_norm, clip_value])
    fd_norm = central_difference(lambda v: meta_loss(v, 0.05).item(), 0.4)
    fd_value = central_difference(lambda v: meta_loss(0.4, v).item(), 0.05)
    assert abs(g_norm.item() - fd_norm) < FD_TOL and g_norm != 0
    assert abs(g_value.item() - fd_value) < FD_TOL and g_value != 0


def test_clip_grad_value_equals_torch():
    grads = [torch.randn(3, 4), None, torch.randn(5)]
    expected = [g.clone() for g in grads if g is not None]
    params = [torch.zeros_like(g, requires_grad=True) for g in expected]
    for p, g in zip(params, expected, strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_value_(params, 0.5)
    clipped = hf.clip_grad_value(0.5)(grads)
    assert clipped[1] is None
    assert_all_close([clipped[0], clipped[2]], [p.grad for p in params], tol=0)


def test_clipping_helpers_reject_gradients_as_their_first_argument():
    with pytest.raises(TypeError, match=r"pass grad_callback=clip_grad_norm\(1.0\)"):
        hf.clip_grad_norm([torch.ones(2)])
    with pytest.raises(TypeError, match="clip_value must be a number"):
        hf.clip_grad_value("0.5")


# --------------------------------------------------------------------------- memory


def live_tensors() -> int:
    gc.collect()
    return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


@pytest.mark.parametrize("mode", ["tracked", "first_order"])
@pytest.mark.parametrize("loops", [150, pytest.param(1000, marks=pytest.mark.slow)])
def test_many_inner_loops_leave_the_live_tensors_flat(mode, loops):
    model = mlp()
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = regression(0, n=4)
    first_order = mode == "first_order"
    early_weights: list[weakref.ref] = []

    def meta_step(record: bool) -> None:
        meta_opt.zero_grad()
        with hf.innerloop_ctx(
            model, inner_opt, copy_initial_weights=False, first_order=first_order
        ) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(mse(fmodel(x), y))
            if record:
                early_weights.extend(weakref.ref(p) for p in fmodel.fast_params)
            mse(fmodel(x), y).backward()
        meta_opt.step()

    for i in range(50):
        meta_step(record=i == 0)
    count = live_tensors()
    for _ in range(loops - 50):
        meta_step(record=False)
    assert live_tensors() <= count  # no growth (other tests' tensors may be freed meanwhile)
    assert all(ref() is None for ref in early_weights)  # their graphs were freed


def test_untracked_steps_leave_the_live_tensors_flat_in_the_number_of_steps():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = regression(0, n=4)
    with hf.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(20):
            diffopt.step(mse(fmodel(x), y))
        count = live_tensors()
        for _ in range(200):
            diffopt.step(mse(fmodel(x), y))
        assert live_tensors() <= count  # no growth (other tests' tensors may be freed meanwhile)


# --------------------------------------------------------------------------- device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_moves_fast_weights_and_optimizer_state_and_write_back_returns_them():
    data = [regression(seed) for seed in range(6)]
    reference = mlp()
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.05)
    for x, y in data:
        ref_opt.zero_grad()
        mse(reference(x), y).backward()
        ref_opt.step()
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for x, y in data[:2]:
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    with hf.innerloop_ctx(model, opt, device="cuda") as (fmodel, diffopt):
        for x, y in data[2:]:
            diffopt.step(mse(fmodel(x.cuda()), y.cuda()))
        assert all(p.is_cuda for p in fmodel.fast_params)
        assert all(t.is_cuda for s in diffopt.state for e in s.values() for t in e.values())
    assert_all_close([p.cpu() for p in fmodel.fast_params], reference.parameters())
    hf.write_back_module(fmodel, model)
    hf.write_back_optimizer(diffopt, opt)
    assert_all_close(model.parameters(), reference.parameters())
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        for key, value in opt.state[p].items():
            assert value.device == ref_opt.state[q][key].device
            torch.testing.assert_close(value, ref_opt.state[q][key], rtol=0, atol=TOL)
