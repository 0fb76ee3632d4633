"""Every implementation of the workloads, side by side.

An implementation builds, for one problem of :mod:`workloads`, a :class:`Runner`: a
zero-argument ``iteration`` that performs one meta-iteration (inner loop, outer backward,
outer step) and ``check_values`` that returns the tensors compared across implementations
after the first iteration (the meta-gradients), so the report can
show that every implementation computed the same thing.

Implementations (``IMPLEMENTATIONS``, in report order):

* ``higher``: higher 0.2.1's ``innerloop_ctx``.
* ``higher_func.innerloop_ctx``: THE SAME functions as ``higher`` with the module swapped
  (``import higher_func as higher``): the drop-in promise, measured.
* ``torchopt``: torchopt's ``MetaSGD``/``MetaAdam`` with ``extract_state_dict`` and
  ``recover_state_dict``, as in torchopt's MAML examples.
* ``torch.func loop``: a hand-written per-task loop with ``torch.func.grad`` and hand-written
  update rules; the floor for an adapter.
* ``higher_func functional``: the same loop with ``higher_func.optim`` rules.
* ``torch.func vmap``: the hand-written loop vmapped over tasks (the floor of a batched path).
* ``higher_func vmap`` and ``higher_func compiled``: the batched and compiled paths of
  ``higher_func.func``, added when that module exists.

A builder raises :class:`Unavailable` with a message saying why when its library is
missing or cannot run a workload; the report prints the message instead of a time.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import math
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from workloads import HyperProblem, MamlProblem, SetupProblem, Workload


class Unavailable(Exception):
    """An implementation cannot run a workload; the message says why."""


@dataclass
class Runner:
    """One implementation of one workload, ready to run.

    Attributes:
        iteration: performs one meta-iteration; returns the meta-loss (or ``None``).
        check_values: the tensors compared across implementations after one iteration
            (the meta-gradients).
        compiled: whether the first iteration compiles (the report times it separately).
        notes: anything a reader of the table must know about this runner.
    """

    iteration: Callable[[], Any]
    check_values: Callable[[], list[Tensor]] = field(default=lambda: [])
    compiled: bool = False
    notes: str = ""


@dataclass(frozen=True)
class Implementation:
    """A named implementation and its builder per workload family."""

    key: str
    description: str
    builders: dict[str, Callable[[Any], Runner]]
    availability: Callable[[], str | None] = lambda: None
    compiled: bool = False

    def build(self, workload: Workload) -> Runner:
        """The runner for ``workload``, or :class:`Unavailable` saying why not."""
        missing = self.availability()
        if missing:
            raise Unavailable(missing)
        builder = self.builders.get(workload.family)
        if builder is None:
            raise Unavailable(f"not applicable to the {workload.family} workload")
        for name in getattr(workload.problem, "requires", ()):
            if _module(name) is None:
                raise Unavailable(f"the model needs {name}: pip install {name}")
        return builder(workload.problem)


# --------------------------------------------------------------------------- libraries


def _module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except Exception:  # an import of a third-party library may fail in any way
        return None


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _higher_missing() -> str | None:
    if _module("higher") is None:
        return "higher is not installed: pip install --no-deps higher==0.2.1 (extra 'bench')"
    return None


def _torchopt_missing() -> str | None:
    try:
        importlib.import_module("torchopt")
    except Exception as error:
        return (
            f"torchopt does not import with torch {torch.__version__} "
            f"({type(error).__name__}: {error}); pip install --no-deps torchopt graphviz"
        )
    return None


def _innerloop_ctx_missing() -> str | None:
    if not hasattr(_module("higher_func"), "innerloop_ctx"):
        return "higher_func.innerloop_ctx does not exist yet"
    return None


def _func_missing() -> str | None:
    if _module("higher_func.func") is None:
        return "higher_func.func (batched and compiled paths) does not exist yet"
    return None


def library_versions() -> dict[str, str]:
    """Versions of every library an implementation uses (``absent`` when missing)."""
    names = {"torch": "torch", "higher": "higher", "torchopt": "torchopt"}
    names["higher_func"] = "higher_func"
    return {
        key: (_version(dist) if _module(key) is not None else "absent")
        for key, dist in names.items()
    }


# --------------------------------------------------------------------------- shared pieces


def _params(model: torch.nn.Module) -> dict[str, Tensor]:
    return dict(model.named_parameters())


def _meta_adam(params: Any, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr)


def _grads_of(tensors: Any) -> Callable[[], list[Tensor]]:
    """The meta-gradients left in ``.grad`` by the last iteration (zeros where ``None``)."""
    tensors = list(tensors)

    def values() -> list[Tensor]:
        return [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in tensors]

    return values


def _task_loss(problem: MamlProblem, model: torch.nn.Module) -> Callable[..., Tensor]:
    """``loss(params, x, y)``: the model as a pure function of its parameters."""

    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return problem.loss(functional_call(model, params, (x,)), y)

    return loss


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt`` with a zero derivative at 0 (otherwise second-order Adam gives ``nan``)."""
    zero = x == 0
    return torch.where(zero, torch.zeros_like(x), torch.sqrt(torch.where(zero, 1.0, x)))


# --------------------------------------------------------------------------- hand-written rules
# What a careful user writes without a library: dict comprehensions, torch.optim's math.


def handwritten_init(name: str, params: dict[str, Tensor]) -> dict[str, Any]:
    if name == "adam":
        return {
            "exp_avg": {k: torch.zeros_like(p) for k, p in params.items()},
            "exp_avg_sq": {k: torch.zeros_like(p) for k, p in params.items()},
        }
    return {}


def handwritten_step(
    name: str,
    hp: dict[str, Any],
    params: dict[str, Tensor],
    grads: dict[str, Tensor],
    state: dict[str, Any],
    step: int,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One step of SGD (with momentum) or Adam (with weight decay) at update ``step`` (0-based)."""
    lr, weight_decay = hp["lr"], hp.get("weight_decay", 0.0)
    if not (isinstance(weight_decay, float) and weight_decay == 0.0):
        grads = {k: g + weight_decay * params[k] for k, g in grads.items()}
    if name == "sgd":
        momentum = hp.get("momentum", 0.0)
        if momentum == 0.0:
            return {k: p - lr * grads[k] for k, p in params.items()}, state
        if step == 0:
            buffers = dict(grads)
        else:
            buffers = {k: momentum * b + grads[k] for k, b in state["momentum_buffer"].items()}
        return {k: p - lr * buffers[k] for k, p in params.items()}, {"momentum_buffer": buffers}
    beta1, beta2 = hp.get("betas", (0.9, 0.999))
    eps = hp.get("eps", 1e-8)
    m = {k: beta1 * v + (1 - beta1) * grads[k] for k, v in state["exp_avg"].items()}
    v = {k: beta2 * s + (1 - beta2) * grads[k] * grads[k] for k, s in state["exp_avg_sq"].items()}
    step_size = lr / (1 - beta1 ** (step + 1))
    root_correction = math.sqrt(1 - beta2 ** (step + 1))
    new = {
        k: p - step_size * m[k] / (safe_sqrt(v[k]) / root_correction + eps)
        for k, p in params.items()
    }
    return new, {"exp_avg": m, "exp_avg_sq": v}


def _handwritten_adapt(problem: MamlProblem, loss: Callable[..., Tensor]) -> Callable[..., Any]:
    inner = problem.inner
    gradient = grad(loss)

    def adapt(params: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
        fast, state = params, handwritten_init(inner.name, params)
        for step in range(problem.inner_steps):
            grads = gradient(fast, x, y)
            if problem.first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            fast, state = handwritten_step(
                inner.name, inner.hyperparameters, fast, grads, state, step
            )
        return fast

    return adapt


def _functional_adapt(problem: MamlProblem, loss: Callable[..., Tensor]) -> Callable[..., Any]:
    import higher_func

    rule = getattr(higher_func.optim, problem.inner.name)(**problem.inner.hyperparameters)
    gradient = grad(loss)

    def adapt(params: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
        fast, state = params, rule.init(params)
        for _ in range(problem.inner_steps):
            grads = gradient(fast, x, y)
            if problem.first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            fast, state = rule.step(fast, grads, state)
        return fast

    return adapt


# --------------------------------------------------------------------------- MAML


def maml_innerloop_ctx(higher: ModuleType, problem: MamlProblem) -> Runner:
    """MAML written for higher's API; ``higher`` is the module (higher or higher_func)."""
    model = problem.model()
    meta_opt = _meta_adam(model.parameters(), problem.outer_lr)
    inner_opt = problem.inner.torch_optimizer(model.parameters())
    tasks = problem.tasks

    def iteration() -> Tensor:
        meta_opt.zero_grad()
        total = torch.zeros(())
        for i in range(tasks.count):
            x_s, y_s, x_q, y_q = tasks.task(i)
            with higher.innerloop_ctx(
                model,
                inner_opt,
                copy_initial_weights=False,
                track_higher_grads=not problem.first_order,
            ) as (fmodel, diffopt):
                for _ in range(problem.inner_steps):
                    diffopt.step(problem.loss(fmodel(x_s), y_s))
                query_loss = problem.loss(fmodel(x_q), y_q)
                query_loss.backward()
            total = total + query_loss.detach().cpu()
        meta_opt.step()
        return total

    notes = ""
    if higher.__name__ == "higher" and problem.inner.name == "adam":
        notes = "higher 0.2.1's Adam adds eps before the bias correction (torch: after)"
    return Runner(iteration, _grads_of(model.parameters()), notes=notes)


def maml_torchopt(problem: MamlProblem) -> Runner:
    import torchopt

    model = problem.model()
    meta_opt = _meta_adam(model.parameters(), problem.outer_lr)
    hp = problem.inner.hyperparameters
    if problem.inner.name == "sgd":
        inner_opt = torchopt.MetaSGD(model, lr=hp["lr"], momentum=hp.get("momentum", 0.0))
    else:
        inner_opt = torchopt.MetaAdam(model, lr=hp["lr"])
    tasks = problem.tasks

    def iteration() -> Tensor:
        meta_opt.zero_grad()
        total = torch.zeros(())
        model_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
        optimizer_state = torchopt.extract_state_dict(inner_opt, by="reference")
        for i in range(tasks.count):
            x_s, y_s, x_q, y_q = tasks.task(i)
            for _ in range(problem.inner_steps):
                inner_opt.step(problem.loss(model(x_s), y_s))
                if problem.first_order:
                    torchopt.stop_gradient(model)
                    torchopt.stop_gradient(inner_opt)
            query_loss = problem.loss(model(x_q), y_q)
            query_loss.backward()
            total = total + query_loss.detach().cpu()
            torchopt.recover_state_dict(model, model_state)
            torchopt.recover_state_dict(inner_opt, optimizer_state)
        meta_opt.step()
        return total

    notes = "first order: stop_gradient after each step" if problem.first_order else ""
    if problem.inner.name == "adam" and not problem.first_order:
        notes = (
            "nan meta-gradient: torchopt's Adam differentiates sqrt at a zero second moment "
            "(eps_root=0 by default)"
        )
    return Runner(iteration, _grads_of(model.parameters()), notes=notes)


def _maml_per_task_loop(problem: MamlProblem, make_adapt: Callable[..., Any]) -> Runner:
    model = problem.model()
    params = _params(model)
    meta_opt = _meta_adam(params.values(), problem.outer_lr)
    loss = _task_loss(problem, model)
    adapt = make_adapt(problem, loss)
    tasks = problem.tasks

    def iteration() -> Tensor:
        meta_opt.zero_grad()
        total = torch.zeros(())
        for i in range(tasks.count):
            x_s, y_s, x_q, y_q = tasks.task(i)
            query_loss = loss(adapt(params, x_s, y_s), x_q, y_q)
            query_loss.backward()
            total = total + query_loss.detach().cpu()
        meta_opt.step()
        return total

    return Runner(iteration, _grads_of(params.values()))


def maml_torch_func(problem: MamlProblem) -> Runner:
    return _maml_per_task_loop(problem, _handwritten_adapt)


def maml_functional(problem: MamlProblem) -> Runner:
    return _maml_per_task_loop(problem, _functional_adapt)


def maml_torch_func_vmap(problem: MamlProblem) -> Runner:
    """The hand-written loop vmapped over tasks, meta-parameters shared (``in_dims=None``)."""
    if problem.no_vmap:
        raise Unavailable(problem.no_vmap)
    model = problem.model()
    params = _params(model)
    meta_opt = _meta_adam(params.values(), problem.outer_lr)
    loss = _task_loss(problem, model)
    adapt = _handwritten_adapt(problem, loss)

    def query_loss(p: dict[str, Tensor], x_s: Tensor, y_s: Tensor, x_q: Tensor, y_q: Tensor):
        return loss(adapt(p, x_s, y_s), x_q, y_q)

    batched = vmap(query_loss, in_dims=(None, 0, 0, 0, 0))

    def iteration() -> Tensor:
        meta_opt.zero_grad()
        meta_loss = batched(params, *problem.tasks).sum()
        meta_loss.backward()
        meta_opt.step()
        return meta_loss.detach().cpu()

    notes = ""
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        notes = "vmap through BatchNorm: torch's meta-gradient is wrong (functorch#534)"
    return Runner(iteration, _grads_of(params.values()), notes=notes)


def maml_inner_loop(problem: MamlProblem) -> Runner:
    """Per-task loop over ``higher_func.func.meta_loss`` (the library's functional loop)."""
    import higher_func

    func = higher_func.func
    rule = getattr(higher_func.optim, problem.inner.name)(**problem.inner.hyperparameters)

    def make_adapt(problem: MamlProblem, loss: Callable[..., Tensor]) -> Callable[..., Any]:
        def adapt(params: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
            result = func.inner_loop(
                loss, rule, params, x, y, steps=problem.inner_steps, first_order=problem.first_order
            )
            return result.params

        return adapt

    return _maml_per_task_loop(problem, make_adapt)


def _meta_objective(problem: MamlProblem) -> tuple[Any, torch.nn.Module]:
    import higher_func

    model = problem.model()
    inner_opt = problem.inner.torch_optimizer(model.parameters())
    objective = higher_func.func.MetaObjective(
        model, inner_opt, problem.loss, steps=problem.inner_steps, first_order=problem.first_order
    )
    return objective, model


def maml_hf_vmap(problem: MamlProblem) -> Runner:
    """``higher_func.func.MetaObjective``: the innerloop_ctx pieces, vmapped over tasks."""
    objective, model = _meta_objective(problem)
    meta_opt = _meta_adam(model.parameters(), problem.outer_lr)
    t = problem.tasks
    support, query = (t.x_support, t.y_support), (t.x_query, t.y_query)

    def iteration() -> Tensor:
        meta_opt.zero_grad()
        meta_loss = objective(support, query, reduction="sum")
        meta_loss.backward()
        meta_opt.step()
        return meta_loss.detach().cpu()

    return Runner(iteration, _grads_of(model.parameters()))


#: Compile the conv workload too (``report.py --compile-conv``): on a 2-core CPU compiling
#: its vmapped second-order meta-gradient takes longer than the whole rest of the run.
COMPILE_CONV = False


def maml_hf_compiled(problem: MamlProblem) -> Runner:
    """``torch.compile(MetaObjective.value_and_grad, fullgraph=True)``, as documented."""
    model = problem.model()
    if not COMPILE_CONV and (
        problem.large or any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    ):
        raise Unavailable(
            "compiling the conv and real-model workloads' meta-gradients takes more than 10 "
            "minutes on a 2-core CPU (one attempt on workload 3 was stopped after 11); pass "
            "--compile-conv (report.py) or --bench-compile-conv (pytest)"
        )
    objective, model = _meta_objective(problem)
    meta_opt = _meta_adam(model.parameters(), problem.outer_lr)
    compiled = torch.compile(objective.value_and_grad, fullgraph=True)
    params = dict(model.named_parameters())
    t = problem.tasks
    support, query = (t.x_support, t.y_support), (t.x_query, t.y_query)

    def iteration() -> Tensor:
        value, grads = compiled(support, query)
        # value_and_grad is the mean over tasks; the other implementations sum.
        for name, p in params.items():
            p.grad = grads[name] * t.count
        meta_opt.step()
        return value.detach().cpu() * t.count

    return Runner(iteration, _grads_of(params.values()), compiled=True)


# --------------------------------------------------------------------------- hyperparameters


def hyper_innerloop_ctx(higher: ModuleType, problem: HyperProblem) -> Runner:
    """Learned lr and weight decay through ``override``, written for higher's API."""
    model = problem.model()
    log_lr, log_wd = problem.log_hyperparameters()
    meta_opt = _meta_adam([log_lr, log_wd], problem.outer_lr)
    inner_opt = torch.optim.Adam(
        model.parameters(), lr=problem.initial_lr, weight_decay=problem.initial_weight_decay
    )

    def iteration() -> Tensor:
        meta_opt.zero_grad()
        override = {"lr": [log_lr.exp()], "weight_decay": [log_wd.exp()]}
        with higher.innerloop_ctx(model, inner_opt, override=override) as (fmodel, diffopt):
            for _ in range(problem.steps):
                diffopt.step(F.mse_loss(fmodel(problem.x_train), problem.y_train))
            val_loss = F.mse_loss(fmodel(problem.x_val), problem.y_val)
            val_loss.backward()
        meta_opt.step()
        return val_loss.detach().cpu()

    return Runner(iteration, _grads_of([log_lr, log_wd]))


def _hyper_functional_loop(problem: HyperProblem, use_rules: bool) -> Runner:
    model = problem.model()
    initial = {k: p.detach() for k, p in model.named_parameters()}
    log_lr, log_wd = problem.log_hyperparameters()
    meta_opt = _meta_adam([log_lr, log_wd], problem.outer_lr)

    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(functional_call(model, params, (x,)), y)

    gradient = grad(loss)

    def iteration() -> Tensor:
        meta_opt.zero_grad()
        hp = {"lr": log_lr.exp(), "weight_decay": log_wd.exp()}
        fast = initial
        if use_rules:
            import higher_func

            rule = higher_func.optim.adam(**hp)
            state = rule.init(fast)
            for _ in range(problem.steps):
                fast, state = rule.step(
                    fast, gradient(fast, problem.x_train, problem.y_train), state
                )
        else:
            state = handwritten_init("adam", fast)
            for step in range(problem.steps):
                grads = gradient(fast, problem.x_train, problem.y_train)
                fast, state = handwritten_step("adam", hp, fast, grads, state, step)
        val_loss = loss(fast, problem.x_val, problem.y_val)
        val_loss.backward()
        meta_opt.step()
        return val_loss.detach().cpu()

    return Runner(iteration, _grads_of([log_lr, log_wd]))


def hyper_torch_func(problem: HyperProblem) -> Runner:
    return _hyper_functional_loop(problem, use_rules=False)


def hyper_functional(problem: HyperProblem) -> Runner:
    return _hyper_functional_loop(problem, use_rules=True)


def hyper_inner_loop(problem: HyperProblem) -> Runner:
    """``higher_func.func.inner_loop`` with tensor hyperparameters."""
    import higher_func

    model = problem.model()
    initial = {k: p.detach() for k, p in model.named_parameters()}
    log_lr, log_wd = problem.log_hyperparameters()
    meta_opt = _meta_adam([log_lr, log_wd], problem.outer_lr)
    rule = higher_func.optim.adam(lr=problem.initial_lr, weight_decay=problem.initial_weight_decay)

    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(functional_call(model, params, (x,)), y)

    def iteration() -> Tensor:
        meta_opt.zero_grad()
        hp = {"lr": log_lr.exp(), "weight_decay": log_wd.exp()}
        result = higher_func.func.inner_loop(
            loss,
            rule,
            initial,
            problem.x_train,
            problem.y_train,
            steps=problem.steps,
            hyperparameters=hp,
        )
        val_loss = loss(result.params, problem.x_val, problem.y_val)
        val_loss.backward()
        meta_opt.step()
        return val_loss.detach().cpu()

    return Runner(iteration, _grads_of([log_lr, log_wd]))


def _torchopt_tensor_hyperparameters_error() -> str | None:
    """Why torchopt's MetaAdam cannot take a learned weight decay (``None`` if it can).

    A tensor ``lr`` works; a tensor ``weight_decay`` fails in torchopt 0.7.3.
    """
    import torchopt

    probe = torch.nn.Linear(1, 1)
    lr, weight_decay = (torch.tensor(0.1, requires_grad=True) for _ in range(2))
    try:
        optimizer = torchopt.MetaAdam(probe, lr=lr, weight_decay=weight_decay)
        optimizer.step(probe(torch.ones(1, 1)).sum())
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def hyper_torchopt(problem: HyperProblem) -> Runner:
    import torchopt

    error = _torchopt_tensor_hyperparameters_error()
    if error:
        raise Unavailable(
            f"torchopt {_version('torchopt')} MetaAdam cannot step with a learned (tensor "
            f"requiring grad) weight_decay: {error}"
        )
    model = problem.model()
    log_lr, log_wd = problem.log_hyperparameters()
    meta_opt = _meta_adam([log_lr, log_wd], problem.outer_lr)

    def iteration() -> Tensor:
        meta_opt.zero_grad()
        model_state = torchopt.extract_state_dict(model, by="reference")
        inner_opt = torchopt.MetaAdam(model, lr=log_lr.exp(), weight_decay=log_wd.exp())
        for _ in range(problem.steps):
            inner_opt.step(F.mse_loss(model(problem.x_train), problem.y_train))
        val_loss = F.mse_loss(model(problem.x_val), problem.y_val)
        val_loss.backward()
        torchopt.recover_state_dict(model, model_state)
        meta_opt.step()
        return val_loss.detach().cpu()

    return Runner(iteration, _grads_of([log_lr, log_wd]))


# --------------------------------------------------------------------------- set-up


def setup_innerloop_ctx(higher: ModuleType, problem: SetupProblem) -> Runner:
    model = problem.model()
    inner_opt = problem.inner.torch_optimizer(model.parameters())

    def iteration() -> None:
        with higher.innerloop_ctx(
            model, inner_opt, copy_initial_weights=problem.copy_initial_weights
        ) as (fmodel, diffopt):
            del fmodel, diffopt

    return Runner(iteration)


def setup_torchopt(problem: SetupProblem) -> Runner:
    import torchopt

    model = problem.model()

    by = "copy" if problem.copy_initial_weights else "reference"

    def iteration() -> None:
        model_state = torchopt.extract_state_dict(model, by=by)
        inner_opt = torchopt.MetaSGD(model, lr=problem.inner.hyperparameters["lr"])
        torchopt.recover_state_dict(model, model_state)
        del inner_opt

    return Runner(iteration, notes=f"extract_state_dict(by={by!r}) + MetaSGD")


def _initial_params(model: torch.nn.Module, copy: bool) -> dict[str, Tensor]:
    """The starting point of a functional loop: detached copies (as higher copies) or views."""
    if copy:
        return {k: p.detach().clone() for k, p in model.named_parameters()}
    return {k: p.detach() for k, p in model.named_parameters()}


def setup_torch_func(problem: SetupProblem) -> Runner:
    model = problem.model()

    def iteration() -> None:
        params = _initial_params(model, problem.copy_initial_weights)
        handwritten_init(problem.inner.name, params)

    return Runner(iteration)


def setup_functional(problem: SetupProblem) -> Runner:
    import higher_func

    model = problem.model()
    rule = getattr(higher_func.optim, problem.inner.name)(**problem.inner.hyperparameters)

    def iteration() -> None:
        params = _initial_params(model, problem.copy_initial_weights)
        rule.init(params)

    return Runner(iteration)


# --------------------------------------------------------------------------- the registry


def _drop_in(module_name: str) -> dict[str, Callable[[Any], Runner]]:
    """Builders running the higher-API functions on ``module_name`` (imported when built)."""

    def bind(function: Callable[[ModuleType, Any], Runner]) -> Callable[[Any], Runner]:
        return lambda problem: function(importlib.import_module(module_name), problem)

    return {
        "maml": bind(maml_innerloop_ctx),
        "memory": bind(maml_innerloop_ctx),
        "hyper": bind(hyper_innerloop_ctx),
        "setup": bind(setup_innerloop_ctx),
    }


IMPLEMENTATIONS: list[Implementation] = [
    Implementation(
        "higher",
        f"higher {_version('higher')}: innerloop_ctx, per-task loop",
        _drop_in("higher"),
        _higher_missing,
    ),
    Implementation(
        "higher_func.innerloop_ctx",
        "the same code as 'higher' with `import higher_func as higher`",
        _drop_in("higher_func"),
        _innerloop_ctx_missing,
    ),
    Implementation(
        "torchopt",
        "torchopt MetaSGD/MetaAdam + extract/recover_state_dict, per-task loop",
        {
            "maml": maml_torchopt,
            "memory": maml_torchopt,
            "hyper": hyper_torchopt,
            "setup": setup_torchopt,
        },
        _torchopt_missing,
    ),
    Implementation(
        "torch.func loop",
        "hand-written: torch.func.grad + hand-written update rules, per-task loop (the floor)",
        {
            "maml": maml_torch_func,
            "memory": maml_torch_func,
            "hyper": hyper_torch_func,
            "setup": setup_torch_func,
        },
    ),
    Implementation(
        "higher_func functional",
        "torch.func.grad + higher_func.optim rules, per-task loop",
        {
            "maml": maml_functional,
            "memory": maml_functional,
            "hyper": hyper_functional,
            "setup": setup_functional,
        },
    ),
    Implementation(
        "torch.func vmap",
        "hand-written: the torch.func loop vmapped over tasks",
        {"maml": maml_torch_func_vmap},
    ),
    Implementation(
        "higher_func inner_loop",
        "higher_func.func.inner_loop (the library's functional loop), per-task loop",
        {
            "maml": maml_inner_loop,
            "memory": maml_inner_loop,
            "hyper": hyper_inner_loop,
        },
        _func_missing,
    ),
    Implementation(
        "higher_func vmap",
        "higher_func.func.MetaObjective(model, inner_opt, loss_fn): vmapped over tasks",
        {"maml": maml_hf_vmap},
        _func_missing,
    ),
    Implementation(
        "higher_func compiled",
        "torch.compile(MetaObjective.value_and_grad, fullgraph=True): vmapped and compiled",
        {"maml": maml_hf_compiled},
        _func_missing,
        compiled=True,
    ),
]

REFERENCE = "torch.func loop"
BASELINE = "higher"


def by_key() -> dict[str, Implementation]:
    return {impl.key: impl for impl in IMPLEMENTATIONS}


def add_revision(revision: str, repository: Path) -> str:
    """Add the drop-in implementation of higher_func at git ``revision`` to the registry.

    The revision's ``higher_func`` package is exported (``git archive``) into a temporary
    directory under the name ``higher_func_at_<short hash>`` (the package imports itself
    only relatively), so the old and the new code run in the same process, interleaved in
    the same rounds: a before/after comparison of one change.  Returns the new key.
    """
    short = subprocess.run(
        ["git", "-C", str(repository), "rev-parse", "--short", revision],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    name = f"higher_func_at_{short}"
    target = Path(tempfile.mkdtemp(prefix="higher_func_rev_"))
    archive = subprocess.run(
        ["git", "-C", str(repository), "archive", short, "higher_func"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    (target / "higher_func").rename(target / name)
    sys.path.insert(0, str(target))
    key = f"higher_func.innerloop_ctx @{short}"
    position = next(i for i, impl in enumerate(IMPLEMENTATIONS) if impl.key == BASELINE) + 2
    IMPLEMENTATIONS.insert(
        position,
        Implementation(
            key, f"the 'higher' code on higher_func at {revision} ({short})", _drop_in(name)
        ),
    )
    return key
