"""Implicit differentiation against closed forms, in float64.

The inner problems have closed-form solutions: ridge regression,
``w* = (X^T X + diag(lam))^{-1} X^T y``, and a quadratic ``x* = (A + diag(theta))^{-1} b``.
The reference differentiates the closed form by autograd through ``torch.linalg.solve``; the
implicit version's solver runs with gradients off (``torch.no_grad``), so every derivative it
returns comes from the implicit function theorem, never from the solver's own operations.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor, nn
from torch.func import grad, hessian, jacfwd, jacrev, vmap

from higher_func.implicit import (
    custom_fixed_point,
    custom_root,
    solve_cg,
    solve_inv,
    solve_lu,
    solve_neumann,
    solve_normal_cg,
)

FEATURES = 4


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def rel_error(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|``, printed for the record (``pytest -s``)."""
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    print(f"max rel error {error:.1e}")
    return error


def data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(20, FEATURES, generator=g) / 20**0.5, torch.randn(20, generator=g)
    X_val, y_val = torch.randn(10, FEATURES, generator=g), torch.randn(10, generator=g)
    return X, y, X_val, y_val


def ridge_gradient(w: Tensor, lam: Tensor, X: Tensor, y: Tensor) -> Tensor:
    """The gradient of ``|X w - y|^2 / 2 + sum(lam w^2) / 2``: zero at the ridge solution."""
    return X.T @ (X @ w - y) + lam * w


def closed_form(lam: Tensor, X: Tensor, y: Tensor) -> Tensor:
    return torch.linalg.solve(X.T @ X + torch.diag(lam.expand(X.shape[1])), X.T @ y)


def implicit_ridge(solve=solve_cg):
    @custom_root(ridge_gradient, solve=solve)
    def ridge(init: Tensor, lam: Tensor, X: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            return closed_form(lam, X, y)

    return ridge


def validation_loss(solver, lam: Tensor, X: Tensor, y: Tensor, X_val, y_val) -> Tensor:
    w = solver(torch.zeros(X.shape[1]), lam, X, y)
    return ((X_val @ w - y_val) ** 2).sum()


def reference_loss(lam: Tensor, X: Tensor, y: Tensor, X_val, y_val) -> Tensor:
    return ((X_val @ closed_form(lam, X, y) - y_val) ** 2).sum()


SOLVES = {
    "cg": solve_cg,
    "normal_cg": solve_normal_cg,
    # the systems below have eigenvalues in [0.7, 3]: I - 0.4 A contracts by 0.72 at least
    "neumann": functools.partial(solve_neumann, steps=120, alpha=0.4, tol=1e-15),
    "lu": solve_lu,
    "inv": solve_inv,
}


# --- the linear solvers ---------------------------------------------------------------------


def spd_system(n: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    M = torch.randn(n, n, generator=g)
    return M @ M.T / n + 0.7 * torch.eye(n), torch.randn(n, generator=g)


@pytest.mark.parametrize("name", sorted(SOLVES))
def test_each_solver_converges_on_a_pytree(name: str) -> None:
    A, b = spd_system()
    split = {"head": b[:2], "tail": b[2:].reshape(2, 2)}

    def matvec(v: dict[str, Tensor]) -> dict[str, Tensor]:
        out = A @ torch.cat([v["head"], v["tail"].reshape(-1)])
        return {"head": out[:2], "tail": out[2:].reshape(2, 2)}

    x = SOLVES[name](matvec, split)
    assert x.keys() == split.keys() and x["tail"].shape == (2, 2)
    flat = torch.cat([x["head"], x["tail"].reshape(-1)])
    assert rel_error(flat, torch.linalg.solve(A, b)) < 1e-9


@pytest.mark.parametrize("solve", [solve_normal_cg, solve_lu, solve_inv])
def test_general_solvers_handle_a_non_symmetric_matrix(solve) -> None:
    A, b = spd_system()
    A = A + torch.triu(torch.ones_like(A), diagonal=1)  # no longer symmetric
    assert rel_error(solve(lambda v: A @ v, b), torch.linalg.solve(A, b)) < 1e-9


@pytest.mark.parametrize("name", sorted(SOLVES))
def test_damping_solves_the_shifted_system(name: str) -> None:
    A, b = spd_system()
    solve = functools.partial(SOLVES[name], damping=0.3)
    expected = torch.linalg.solve(A + 0.3 * torch.eye(len(b)), b)
    assert rel_error(solve(lambda v: A @ v, b), expected) < 1e-9


def test_converged_iterations_are_masked_per_vmapped_system() -> None:
    A, _ = spd_system()
    scales = torch.tensor([0.0, 1.0, 1e3])  # a zero right-hand side converges at once
    bs = scales[:, None] * torch.randn(3, len(A))
    xs = vmap(lambda b: solve_cg(lambda v: A @ v, b, maxiter=200))(bs)
    assert torch.isfinite(xs).all() and (xs[0] == 0).all()
    expected = torch.linalg.solve(A, bs.T).T
    assert rel_error(xs[1:], expected[1:]) < 1e-9
    # 200 iterations of which most are masked give the answer of just enough iterations:
    assert torch.allclose(xs, vmap(lambda b: solve_cg(lambda v: A @ v, b, maxiter=20))(bs))


def test_neumann_series_with_few_terms_is_the_truncated_sum() -> None:
    A, b = spd_system(3)
    alpha = 0.5 / torch.linalg.eigvalsh(A).max()
    x = solve_neumann(lambda v: A @ v, b, steps=2, alpha=alpha.item())
    M = torch.eye(3) - alpha * A
    assert rel_error(x, alpha * (b + M @ b + M @ M @ b)) < 1e-13


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda A, b: solve_cg(lambda v: A @ v, b, maxiter=0), "maxiter: expected an int >= 1"),
        (lambda A, b: solve_neumann(lambda v: A @ v, b, steps=1.5), "steps: expected an int"),
        (lambda A, b: solve_cg(lambda v: A @ v, b, damping=-1.0), "damping: expected a float"),
        (lambda A, b: solve_lu(lambda v: A @ v, b, damping=-1.0), "damping: expected a float"),
    ],
)
def test_bad_solver_options_raise(call, match: str) -> None:
    A, b = spd_system(3)
    with pytest.raises(ValueError, match=match):
        call(A, b)


# --- derivatives against the closed form ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(SOLVES))
def test_grad_matches_closed_form(name: str) -> None:
    X, y, X_val, y_val = data()
    lam = torch.tensor(0.7)
    ridge = implicit_ridge(SOLVES[name])
    actual = grad(validation_loss, argnums=1)(ridge, lam, X, y, X_val, y_val)
    expected = grad(reference_loss)(lam, X, y, X_val, y_val)
    assert rel_error(actual, expected) < 1e-9


def test_backward_matches_closed_form_for_hyperparameter_and_data() -> None:
    X, y, X_val, y_val = data()
    lam, X = torch.tensor(0.7, requires_grad=True), X.clone().requires_grad_()
    validation_loss(implicit_ridge(), lam, X, y, X_val, y_val).backward()
    expected = torch.autograd.grad(reference_loss(lam, X, y, X_val, y_val), (lam, X))
    assert rel_error(lam.grad, expected[0]) < 1e-10
    assert rel_error(X.grad, expected[1]) < 1e-10


def test_vmap_over_hyperparameters() -> None:
    X, y, X_val, y_val = data()
    lams = torch.tensor([0.01, 0.3, 1.0, 30.0])
    actual = vmap(grad(validation_loss, argnums=1), in_dims=(None, 0, None, None, None, None))(
        implicit_ridge(), lams, X, y, X_val, y_val
    )
    expected = vmap(grad(reference_loss), in_dims=(0, None, None, None, None))(
        lams, X, y, X_val, y_val
    )
    assert rel_error(actual, expected) < 1e-10


def test_jacrev_with_respect_to_the_data_matrix() -> None:
    X, y, _, _ = data()
    lam, ridge = torch.tensor(0.7), implicit_ridge()
    actual = jacrev(lambda X: ridge(torch.zeros(FEATURES), lam, X, y))(X)
    expected = jacrev(lambda X: closed_form(lam, X, y))(X)
    assert actual.shape == (FEATURES, *X.shape)
    assert rel_error(actual, expected) < 1e-10


def test_jacfwd_uses_the_implicit_tangent() -> None:
    X, y, _, _ = data()
    lam, ridge = torch.tensor([0.2, 0.5, 1.0, 2.0]), implicit_ridge()
    actual = jacfwd(lambda lam: ridge(torch.zeros(FEATURES), lam, X, y))(lam)
    assert rel_error(actual, jacrev(closed_form)(lam, X, y)) < 1e-10


@pytest.mark.parametrize("name", ["cg", "lu"])
def test_hessian_is_exact(name: str) -> None:
    X, y, X_val, y_val = data()
    lam = torch.tensor([0.2, 0.5, 1.0, 2.0])  # one weight decay per feature
    ridge = implicit_ridge(SOLVES[name])
    actual = hessian(validation_loss, argnums=1)(ridge, lam, X, y, X_val, y_val)
    expected = hessian(reference_loss)(lam, X, y, X_val, y_val)
    assert rel_error(actual, expected) < 1e-9


def test_grad_of_grad_and_double_backward_are_exact() -> None:
    X, y, X_val, y_val = data()
    ridge = implicit_ridge()
    second = grad(grad(lambda lam: validation_loss(ridge, lam, X, y, X_val, y_val)))
    expected = grad(grad(reference_loss))(torch.tensor(0.7), X, y, X_val, y_val)
    assert rel_error(second(torch.tensor(0.7)), expected) < 1e-9
    lam = torch.tensor(0.7, requires_grad=True)
    (first,) = torch.autograd.grad(
        validation_loss(ridge, lam, X, y, X_val, y_val), lam, create_graph=True
    )
    assert rel_error(torch.autograd.grad(first, lam)[0], expected) < 1e-9


def test_gradcheck_and_gradgradcheck() -> None:
    X, y, X_val, y_val = (t[:6, :2] if t.dim() == 2 else t[:6] for t in data())  # small: fast
    ridge = implicit_ridge(solve_lu)
    lam, X = torch.tensor(0.7, requires_grad=True), X.clone().requires_grad_()

    def loss(lam: Tensor, X: Tensor) -> Tensor:
        return validation_loss(ridge, lam, X, y, X_val, y_val)

    assert torch.autograd.gradcheck(loss, (lam, X))
    assert torch.autograd.gradgradcheck(loss, (lam, X))


def quadratic_gradient(x: dict[str, Tensor], params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The gradient of ``x^T (A + diag(theta)) x / 2 - b^T x`` with ``x = [x_a, x_b]``."""
    flat = torch.cat([x["a"], x["b"]])
    g = (params["A"] + torch.diag(params["theta"])) @ flat - params["b"]
    return {"a": g[:2], "b": g[2:]}


def test_dict_shaped_solution_and_args() -> None:
    A, b = spd_system(5)
    theta = torch.rand(5)

    @custom_root(quadratic_gradient, solve=solve_cg)
    def minimise(init: dict[str, Tensor], params: dict[str, Tensor]) -> dict[str, Tensor]:
        with torch.no_grad():
            x = torch.linalg.solve(params["A"] + torch.diag(params["theta"]), params["b"])
        return {"a": x[:2], "b": x[2:]}

    def objective(params: dict[str, Tensor]) -> Tensor:
        x = minimise({"a": torch.zeros(2), "b": torch.zeros(3)}, params)
        return (x["a"] ** 2).sum() + x["b"].sum()

    def reference(params: dict[str, Tensor]) -> Tensor:
        x = torch.linalg.solve(params["A"] + torch.diag(params["theta"]), params["b"])
        return (x[:2] ** 2).sum() + x[2:].sum()

    params = {"A": A, "b": b, "theta": theta}
    actual, expected = grad(objective)(params), grad(reference)(params)
    assert actual.keys() == params.keys()
    for key in params:
        assert rel_error(actual[key], expected[key]) < 1e-10


@pytest.mark.parametrize(
    "solve", [solve_cg, functools.partial(solve_neumann, steps=400), solve_normal_cg]
)
def test_fixed_point_of_gradient_descent(solve) -> None:
    X, y, X_val, y_val = data()
    eta = 1.0 / torch.linalg.eigvalsh(X.T @ X).max().item()  # a contraction

    def descent_step(w: Tensor, lam: Tensor, X: Tensor, y: Tensor) -> Tensor:
        return w - eta * ridge_gradient(w, lam, X, y)

    @custom_fixed_point(descent_step, solve=solve)
    def descend(w: Tensor, lam: Tensor, X: Tensor, y: Tensor) -> Tensor:
        for _ in range(3000):
            w = descent_step(w, lam, X, y)
        return w

    lam = torch.tensor(0.7)
    actual = grad(validation_loss, argnums=1)(descend, lam, X, y, X_val, y_val)
    assert rel_error(actual, grad(reference_loss)(lam, X, y, X_val, y_val)) < 1e-8


def test_has_aux_returns_aux_without_gradient() -> None:
    X, y, X_val, y_val = data()

    @custom_root(ridge_gradient, solve=solve_cg, has_aux=True)
    def ridge(init, lam, X, y):
        w = closed_form(lam, X, y)
        return w, {"residual": ridge_gradient(w, lam, X, y).norm(), "method": "closed form"}

    lam = torch.tensor(0.7, requires_grad=True)
    w, aux = ridge(torch.zeros(FEATURES), lam, X, y)
    assert aux["method"] == "closed form" and aux["residual"] < 1e-12
    assert not aux["residual"].requires_grad
    ((X_val @ w - y_val) ** 2).sum().backward()
    assert rel_error(lam.grad, grad(reference_loss)(lam.detach(), X, y, X_val, y_val)) < 1e-10


def test_solver_iterations_and_init_are_not_differentiated() -> None:
    X, y, _, _ = data()
    seen = []

    @custom_root(ridge_gradient, solve=solve_lu)
    def few_steps(init, lam, X, y):  # deliberately inexact: 5 steps of gradient descent
        seen.append(torch.is_grad_enabled())
        w = init
        for _ in range(5):
            w = w - 0.01 * ridge_gradient(w, lam, X, y)
        return w

    lam, init = torch.tensor(0.7, requires_grad=True), torch.ones(FEATURES, requires_grad=True)
    w = few_steps(init, lam, X, y)
    (d_lam, d_init) = torch.autograd.grad(w.sum(), (lam, init), allow_unused=True)
    assert seen == [False] and d_init is None
    # The implicit derivative at the returned point: -1^T (X^T X + lam I)^{-1} w.
    A = X.T @ X + lam.detach() * torch.eye(FEATURES)
    assert rel_error(d_lam, -torch.linalg.solve(A, w.detach()).sum()) < 1e-12


def test_a_solver_returning_its_init_unchanged() -> None:
    X, y, X_val, y_val = data()
    lam = torch.tensor(0.7)
    ridge = custom_root(ridge_gradient, solve=solve_lu)(lambda init, lam, X, y: init)
    start = closed_form(lam, X, y)  # already the solution: the solver has nothing to do

    def loss(lam: Tensor) -> Tensor:
        return ((X_val @ ridge(start, lam, X, y) - y_val) ** 2).sum()

    assert rel_error(grad(loss)(lam), grad(reference_loss)(lam, X, y, X_val, y_val)) < 1e-10


def test_non_tensor_arguments_pass_through() -> None:
    X, y, _, _ = data()

    def optimality(w, lam, X, y, scale):
        return ridge_gradient(w, lam * scale, X, y)

    @custom_root(optimality, solve=solve_lu)
    def ridge(init, lam, X, y, scale):
        return closed_form(lam * scale, X, y)

    lam = torch.tensor(0.35)
    actual = jacrev(lambda lam: ridge(torch.zeros(FEATURES), lam, X, y, 2.0))(lam)
    assert rel_error(actual, 2.0 * jacrev(closed_form)(2.0 * lam, X, y)) < 1e-10


# --- errors that would otherwise be silently wrong numbers ----------------------------------


CAPTURED = torch.tensor(0.7, requires_grad=True)


def test_a_tensor_captured_by_the_closure_raises() -> None:
    X, y, _, _ = data()
    lam = torch.tensor(0.7, requires_grad=True)

    def captures(w, X, y):
        return ridge_gradient(w, lam, X, y)

    def reads_global(w, X, y):
        return ridge_gradient(w, CAPTURED, X, y)

    partial = functools.partial(ridge_gradient, lam=lam)

    def solver(init, X, y):
        return closed_form(torch.tensor(0.7), X, y)

    for fn, name in ((captures, "lam"), (reads_global, "CAPTURED"), (partial, "keywords")):
        with pytest.raises(ValueError, match=rf"captures a tensor that requires grad \(.*{name}"):
            custom_root(fn)(solver)(torch.zeros(FEATURES), X, y)


def test_a_tensor_captured_inside_torch_func_grad_raises() -> None:
    X, y, _, _ = data()

    def loss(lam: Tensor) -> Tensor:
        def captures(w, X, y):
            return ridge_gradient(w, lam, X, y)

        solver = custom_root(captures)(lambda init, X, y: closed_form(lam.detach(), X, y))
        return solver(torch.zeros(FEATURES), X, y).sum()

    with pytest.raises(ValueError, match="Pass it as an argument instead"):
        grad(loss)(torch.tensor(0.7))


def test_a_module_parameter_used_directly_raises_and_functional_call_is_fine() -> None:
    X, y, _, _ = data()
    model = nn.Linear(FEATURES, 1, bias=False)

    def uses_parameter(w, X, y):
        return X.T @ (X @ w - y) + model.weight[0] * w  # the module's own weight: not in args

    def solver(init, X, y):
        return closed_form(model.weight[0].detach(), X, y)

    ridge = custom_root(uses_parameter, solve=solve_lu)(solver)
    with pytest.raises(ValueError, match="reads a tensor that requires grad from outside"):
        ridge(torch.zeros(FEATURES), X, y)  # no argument requires grad: checked at once
    w = ridge(torch.zeros(FEATURES), X.clone().requires_grad_(), y)
    with pytest.raises(ValueError, match="reads a tensor that requires grad from outside"):
        w.sum().backward()  # checked in the backward

    def through_functional_call(w, params, X, y):
        lam = torch.func.functional_call(model, params, (torch.eye(FEATURES),))[:, 0]
        return ridge_gradient(w, lam, X, y)

    @custom_root(through_functional_call, solve=solve_lu)
    def ridge(init, params, X, y):
        return closed_form(params["weight"][0], X, y)

    params = {"weight": model.weight.detach().abs() + 0.1}
    actual = jacrev(lambda p: ridge(torch.zeros(FEATURES), p, X, y))(params)["weight"]
    expected = jacrev(lambda weight: closed_form(weight[0], X, y))(params["weight"])
    assert rel_error(actual, expected) < 1e-10


def test_an_optimality_function_of_the_wrong_shape_raises() -> None:
    X, y, _, _ = data()

    def wrong(w, lam, X, y):
        return ridge_gradient(w, lam, X, y)[:2]

    solver = custom_root(wrong)(lambda init, lam, X, y: closed_form(lam, X, y))
    with pytest.raises(ValueError, match=r"optimality_fn\(solution, \*args\): expected"):
        grad(lambda lam: solver(torch.zeros(FEATURES), lam, X, y).sum())(torch.tensor(0.7))


def test_a_solver_returning_another_structure_raises() -> None:
    X, y, _, _ = data()
    solver = custom_root(ridge_gradient)(lambda init, lam, X, y: {"w": closed_form(lam, X, y)})
    with pytest.raises(ValueError, match="the solver's solution: expected a pytree"):
        solver(torch.zeros(FEATURES), torch.tensor(0.7), X, y)


def test_a_linear_solve_returning_another_structure_raises() -> None:
    X, y, _, _ = data()
    ridge = implicit_ridge(solve=lambda matvec, b: (b,))
    with pytest.raises(ValueError, match=r"solve\(matvec, b\): expected"):
        grad(validation_loss, argnums=1)(ridge, torch.tensor(0.7), X, y, *data()[2:])


def test_has_aux_without_a_pair_raises() -> None:
    X, y, _, _ = data()
    solver = custom_root(ridge_gradient, has_aux=True)(lambda i, lam, X, y: closed_form(lam, X, y))
    with pytest.raises(TypeError, match=r"has_aux=True: expected the solver to return a pair"):
        solver(torch.zeros(FEATURES), torch.tensor(0.7), X, y)


# --- torch.compile ---------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_function_then_backward_matches_closed_form() -> None:
    torch._dynamo.reset()
    X, y, X_val, y_val = data()
    lam = torch.tensor(0.7, requires_grad=True)
    ridge = implicit_ridge()
    loss = torch.compile(validation_loss)(ridge, lam, X, y, X_val, y_val)
    loss.backward()
    assert rel_error(lam.grad, grad(reference_loss)(lam.detach(), X, y, X_val, y_val)) < 1e-10


@pytest.mark.slow
def test_compiled_grad_matches_closed_form() -> None:
    torch._dynamo.reset()
    X, y, X_val, y_val = data()
    lam, ridge = torch.tensor(0.7), implicit_ridge()
    hypergradient = torch.compile(grad(lambda lam: validation_loss(ridge, lam, X, y, X_val, y_val)))
    expected = grad(reference_loss)(lam, X, y, X_val, y_val)
    assert rel_error(hypergradient(lam), expected) < 1e-10
    batched = torch.compile(vmap(grad(lambda lam: validation_loss(ridge, lam, X, y, X_val, y_val))))
    lams = torch.tensor([0.3, 3.0])
    expected = vmap(grad(reference_loss), in_dims=(0, None, None, None, None))(
        lams, X, y, X_val, y_val
    )
    assert rel_error(batched(lams), expected) < 1e-10


class _TripleBackward(torch.autograd.Function):
    """Forward ``1.5 x`` with a deliberately different backward, ``3 g``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return 1.5 * x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        return 3 * g


@pytest.mark.slow
def test_compiled_grad_keeps_the_custom_backward() -> None:
    """The graph break of ``check_optimality_fn`` is what keeps the custom backward."""
    from higher_func._implicit_checks import check_optimality_fn

    def plain(x: Tensor) -> Tensor:
        return _TripleBackward.apply(x)

    def guarded(x: Tensor) -> Tensor:
        check_optimality_fn(torch.sin, x, ())  # custom_root's check before the Function
        return _TripleBackward.apply(x)

    x = torch.tensor(1.0)
    torch._dynamo.reset()
    without_guard = torch.compile(grad(plain))(x)
    print(f"compiled grad without the guard: {without_guard.item()} (the custom backward: 3.0)")
    torch._dynamo.reset()
    assert torch.compile(grad(guarded))(x).item() == 3.0
    torch._dynamo.reset()
    x = x.clone().requires_grad_()
    torch.compile(guarded)(x).backward()  # the working form: no error, the custom backward
    assert x.grad.item() == 3.0
