"""The machinery shared by every update rule: one per-tensor kernel, lifted over a pytree.

A rule is data (a :class:`RuleSpec`: defaults, a validator, the state fields and two
per-tensor functions) plus resolved hyperparameters.  Everything that is the same for
all optimizers lives here, once: pytree plumbing, ``None`` gradients, per-parameter
hyperparameters, step-time overrides and the error messages for bad input.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import optree
import torch
from torch import Tensor

from .. import _execution
from ._tensor_list import TensorList, is_number

__all__ = ["Rule", "RuleSpec", "safe_sqrt"]

#: Options of ``torch.optim`` that select an implementation, never the math.
IMPLEMENTATION_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})

Hyperparameters = Mapping[str, Any]
#: A tensor, or a :class:`TensorList` of them: kernels are written once for both.
TensorOrList = Any
InitFn = Callable[[Tensor, Hyperparameters], dict[str, Tensor]]
UpdateFn = Callable[
    [TensorOrList, TensorOrList, dict[str, TensorOrList], Hyperparameters],
    tuple[TensorOrList, dict[str, TensorOrList]],
]


@dataclass(frozen=True)
class RuleSpec:
    """Everything that makes one optimizer what it is.

    Attributes:
        name: the factory's name (``"adam"``).
        torch_class: the ``torch.optim`` class whose math the rule reproduces, if any.
        state_type: a ``NamedTuple`` class; its fields are ``torch.optim``'s state keys.
        defaults: every math option with ``torch.optim``'s default.
        fields: given the hyperparameters, the state fields this rule keeps (the others are
            ``None`` in the state), e.g. no ``momentum_buffer`` when ``momentum == 0``.
        init: per-tensor ``(param, hp) -> {field: tensor}``.
        update: per-tensor ``(param, grad, {field: tensor}, hp) -> (param, {field: tensor})``.
        validate: raises ``ValueError`` (with ``torch.optim``'s own wording) on bad values.
        static: options that fix the state's structure; they cannot be overridden per
            step or given per parameter.
        init_only: options read only by ``init`` (e.g. Adagrad's initial accumulator);
            overriding them per step would have no effect, so it is refused.
        import_state: ``(torch_state, fresh_state) -> state`` for one parameter: how a
            ``torch.optim`` state entry becomes this rule's (default: key for key).
        elementwise: the update treats every element on its own (only 0-d state, such as a
            step count, is shared within a parameter), so the differentiable optimizers may
            step a whole parameter group as one flat tensor while autograd records.

    Example (sign-SGD as a custom rule, built with :func:`higher_func.optim.make_rule`):
        >>> import torch, higher_func as hf
        >>> from typing import NamedTuple
        >>> class SignSGDState(NamedTuple):
        ...     pass
        >>> spec = hf.optim.RuleSpec(
        ...     name="sign_sgd", torch_class=None, state_type=SignSGDState, defaults={"lr": 0.1},
        ...     fields=lambda hp: (), init=lambda param, hp: {}, validate=lambda hp: None,
        ...     update=lambda param, grad, state, hp: (param - hp["lr"] * torch.sign(grad), state),
        ... )
        >>> rule = hf.optim.make_rule(spec, {"lr": 0.5})
        >>> params = {"w": torch.tensor([1.0, 1.0])}
        >>> rule.step(params, {"w": torch.tensor([3.0, -0.1])}, rule.init(params))[0]["w"]
        tensor([0.5000, 1.5000])
    """

    name: str
    torch_class: type | None
    state_type: type
    defaults: Mapping[str, Any]
    fields: Callable[[Hyperparameters], tuple[str, ...]]
    init: InitFn
    update: UpdateFn
    validate: Callable[[Hyperparameters], None]
    static: frozenset[str] = frozenset()
    init_only: frozenset[str] = frozenset()
    import_state: Callable[[Mapping[str, Any], dict[str, Tensor]], dict[str, Tensor]] | None = None
    elementwise: bool = False


class Rule:
    """A differentiable optimizer as a pure update rule over a pytree of tensors.

    ``state = rule.init(params)`` builds the optimizer state explicitly, and
    ``params, state = rule.step(params, grads, state)`` returns new parameters and a new
    state without touching its inputs.  ``params`` is a dict ``name -> tensor`` (or any
    pytree that :mod:`optree` handles); ``grads`` has the same structure and may hold
    ``None`` for a parameter that must stay unchanged (frozen or unused), exactly as
    ``torch.optim`` skips a parameter whose ``.grad`` is ``None``.

    Every numeric hyperparameter may be a number, a tensor (one that requires grad
    receives gradients through the step) or a dict keyed like ``params`` holding
    per-parameter values broadcastable to each parameter.  ``step(..., lr=t)`` overrides
    a hyperparameter for that call only.

    Rules are built by the factories in :mod:`higher_func.optim` (``sgd``, ``adam``, ...),
    never directly.

    Example:
        >>> import torch, higher_func as hf
        >>> rule = hf.optim.sgd(lr=0.5)
        >>> params = {"w": torch.ones(2)}
        >>> new_params, state = rule.step(params, {"w": torch.ones(2)}, rule.init(params))
        >>> isinstance(rule, hf.optim.Rule), new_params["w"], params["w"]  # input unchanged
        (True, tensor([0.5000, 0.5000]), tensor([1., 1.]))
    """

    __slots__ = ("hyperparameters", "spec")

    def __init__(self, spec: RuleSpec, hyperparameters: Hyperparameters) -> None:
        self.spec = spec
        self.hyperparameters: dict[str, Any] = dict(hyperparameters)

    @property
    def name(self) -> str:
        """The factory's name, e.g. ``"adam"``."""
        return self.spec.name

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={_short(v)}" for k, v in self.hyperparameters.items())
        return f"{self.name}({options})"

    def replace(self, **hyperparameters: Any) -> Rule:
        """A new rule with some hyperparameters changed (validated like the factory)."""
        return build_rule(self.spec, {**self.hyperparameters, **hyperparameters})

    def init(self, params: Any) -> Any:
        """The initial state for ``params``: a ``NamedTuple`` of pytrees shaped like ``params``."""
        leaves, treespec = _leaves("params", params)
        hps = _per_leaf_hyperparameters(self.hyperparameters, self.spec, treespec, len(leaves))
        per_leaf = [self.spec.init(p, hp) for p, hp in zip(leaves, hps, strict=True)]
        fields = self.spec.fields(self.hyperparameters)
        return _assemble_state(self.spec.state_type, fields, per_leaf, treespec)

    def step(self, params: Any, grads: Any, state: Any, **overrides: Any) -> tuple[Any, Any]:
        """One optimizer step: ``(new_params, new_state)``.  Inputs are never modified.

        Keyword arguments override numeric hyperparameters for this call only.  State
        fields these hyperparameters do not use pass through unchanged (as ``torch.optim``
        keeps a momentum buffer while the momentum is 0).
        """
        hyperparameters = self._with_overrides(overrides)
        leaves, treespec = _leaves("params", params)
        grad_leaves = _grads_like(grads, treespec)
        fields = self.spec.fields(hyperparameters)
        columns = _state_columns(state, self.spec.state_type, fields, treespec)
        active = [i for i, g in enumerate(grad_leaves) if g is not None]
        new_params, new_columns = list(leaves), {f: list(c) for f, c in columns.items()}
        shared = _is_shared(hyperparameters)
        if shared and self._plan(leaves, active, grad_leaves, columns, hyperparameters) is (
            _execution.Plan.FOREACH
        ):
            # All parameters at once: one foreach op per line of the kernel.
            p, s = self.spec.update(
                TensorList([leaves[i] for i in active]),
                TensorList([grad_leaves[i] for i in active]),
                {f: TensorList([c[i] for i in active]) for f, c in columns.items()},
                hyperparameters,
            )
            for position, i in enumerate(active):
                new_params[i] = p.items[position]
                for f in fields:
                    new_columns[f][i] = s[f].items[position]
        else:
            hps = _per_leaf_hyperparameters(hyperparameters, self.spec, treespec, len(leaves))
            for i in active:
                p, s = self.spec.update(
                    leaves[i], grad_leaves[i], {f: c[i] for f, c in columns.items()}, hps[i]
                )
                new_params[i] = p
                for f in fields:
                    new_columns[f][i] = s[f]
        if _may_broadcast(hyperparameters):
            _check_shapes_kept(leaves, new_params, active, treespec)
        if new_columns:
            state = state._replace(
                **{f: optree.tree_unflatten(treespec, c) for f, c in new_columns.items()}
            )
        return optree.tree_unflatten(treespec, new_params), state

    @staticmethod
    def _plan(
        leaves: list[Tensor],
        active: list[int],
        grads: list[Tensor | None],
        columns: dict[str, list[Tensor]],
        hyperparameters: Hyperparameters,
    ) -> _execution.Plan:
        def others() -> Iterable[Tensor]:  # read only when the plan depends on them
            yield from (t for column in columns.values() for t in column)
            hyper_leaves: list[Any] = optree.tree_leaves(hyperparameters)  # type: ignore[arg-type]
            yield from (v for v in hyper_leaves if isinstance(v, Tensor))

        return _execution.plan([leaves[i] for i in active], grads, others=others())

    def _with_overrides(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        if not overrides:
            return self.hyperparameters
        for key in overrides:
            if key not in self.spec.defaults:
                raise TypeError(
                    f"{self.name}.step() got an unknown hyperparameter override {key!r}; "
                    f"valid names are {sorted(set(self.spec.defaults) - self.spec.static)}."
                )
            if key in self.spec.init_only:
                raise TypeError(
                    f"{self.name}.step() cannot override {key!r}: only init() reads it. "
                    f"Build the rule with {key}=... before calling init()."
                )
            if key in self.spec.static:
                raise TypeError(
                    f"{self.name}.step() cannot override {key!r} per step: it fixes the "
                    f"state's structure. Build a new rule instead: "
                    f"{self.name}(..., {key}={overrides[key]!r})."
                )
        # Plain numbers are checked; tensor values are not read per step (see numbers_in).
        numeric = {k: v for k, v in overrides.items() if not _holds_tensor(v)}
        self.spec.validate({**self.hyperparameters, **numeric})
        return {**self.hyperparameters, **overrides}


def build_rule(spec: RuleSpec, options: Mapping[str, Any]) -> Rule:
    """Validate ``options`` against ``spec`` and build the rule (implementation flags dropped).

    Public as :func:`higher_func.optim.make_rule`; see :class:`RuleSpec` for a custom rule.

    Example (a sign-SGD rule; its update receives one tensor, or a list of them):
        >>> import torch, higher_func as hf
        >>> from typing import NamedTuple
        >>> spec = hf.optim.RuleSpec(
        ...     name="sign_sgd", torch_class=None, state_type=NamedTuple("SignSGDState", []),
        ...     defaults={"lr": 0.1}, fields=lambda hp: (), init=lambda param, hp: {},
        ...     update=lambda param, grad, state, hp: (param - hp["lr"] * torch.sign(grad), state),
        ...     validate=lambda hp: None,
        ... )
        >>> rule = hf.optim.make_rule(spec, {"lr": 0.5})
        >>> params = {"w": torch.tensor([1.0, 1.0])}
        >>> new_params, _ = rule.step(params, {"w": torch.tensor([3.0, -0.1])}, rule.init(params))
        >>> rule.name, new_params["w"]
        ('sign_sgd', tensor([0.5000, 1.5000]))
    """
    unknown = set(options) - set(spec.defaults) - IMPLEMENTATION_FLAGS
    if unknown:
        raise TypeError(
            f"{spec.name}() got unknown option(s) {sorted(unknown)}; "
            f"valid options are {sorted(spec.defaults)}."
        )
    hyperparameters = {k: options.get(k, v) for k, v in spec.defaults.items()}
    for key in spec.static:
        if isinstance(hyperparameters[key], Mapping):
            raise TypeError(f"{spec.name}(): {key!r} cannot be given per parameter.")
    spec.validate(hyperparameters)
    return Rule(spec, hyperparameters)


# --------------------------------------------------------------------------- pytrees


def _leaves(argument: str, tree: Any) -> tuple[list[Tensor], Any]:
    if type(tree) is list and all(type(t) is Tensor and not t.is_complex() for t in tree):
        return list(tree), _list_spec(len(tree))  # a plain list of tensors: no tree walk
    leaves, treespec = optree.tree_flatten(tree, none_is_leaf=True)
    if all(isinstance(leaf, Tensor) and not leaf.is_complex() for leaf in leaves):
        return leaves, treespec
    paths = optree.tree_paths(tree, none_is_leaf=True)  # only to name the bad leaf
    for path, leaf in zip(paths, leaves, strict=True):
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"{argument}{_format_path(path)} must be a torch.Tensor, got "
                f"{type(leaf).__name__}. Pass tensors (e.g. torch.tensor(value)) as {argument}."
            )
        if leaf.is_complex():
            raise TypeError(
                f"{argument}{_format_path(path)} is complex ({leaf.dtype}); the rules support "
                f"real tensors. Optimize torch.view_as_real({argument}...) instead."
            )
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=256)
def _list_spec(length: int) -> Any:
    return optree.tree_structure([0] * length, none_is_leaf=True)  # type: ignore[arg-type]


def _grads_like(grads: Any, treespec: Any) -> list[Tensor | None]:
    try:
        leaves = treespec.flatten_up_to(grads)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"grads must have the same structure as params. {_mismatch(treespec, grads)} "
            f"Pass one gradient (or None) per parameter, keyed like params."
        ) from error
    for leaf in leaves:
        if leaf is not None and not isinstance(leaf, Tensor):
            raise TypeError(f"grads must hold tensors or None, got {type(leaf).__name__}.")
    return leaves


def _state_columns(
    state: Any, state_type: type, fields: tuple[str, ...], treespec: Any
) -> dict[str, list[Tensor]]:
    """Each state field needed by ``fields`` as a list of leaves in ``treespec`` order."""
    if not isinstance(state, state_type):
        raise TypeError(
            f"state must be the {state_type.__name__} returned by init() or step(), got "
            f"{type(state).__name__}. Build it with rule.init(params)."
        )
    columns = {}
    for field in fields:
        tree = getattr(state, field)
        if tree is None:
            raise ValueError(
                f"state.{field} is None but these hyperparameters need it. Build the state "
                f"with init() from a rule with the same options."
            )
        try:
            columns[field] = treespec.flatten_up_to(tree)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"state.{field} must have the same structure as params. "
                f"{_mismatch(treespec, tree)} Build the state with rule.init(params)."
            ) from error
    return columns


def _may_broadcast(hyperparameters: Hyperparameters) -> bool:
    """Whether a hyperparameter holds a tensor with dimensions (it could grow a parameter)."""
    for value in hyperparameters.values():
        kind = type(value)
        if kind is float or kind is int or kind is bool:
            continue
        if any(isinstance(v, Tensor) and v.dim() > 0 for v in optree.tree_leaves(value)):
            return True
    return False


def _check_shapes_kept(
    old: list[Tensor], new: list[Tensor], active: list[int], treespec: Any
) -> None:
    for i in active:
        if new[i].shape != old[i].shape:
            path = _format_path(treespec.paths()[i]) if treespec.num_leaves else ""
            raise ValueError(
                f"the step changed the shape of params{path} from {tuple(old[i].shape)} to "
                f"{tuple(new[i].shape)}: a hyperparameter tensor was broadcast against it. "
                f"Give hyperparameters as numbers, 0-d tensors or tensors no larger than the "
                f"parameter (torch.optim's in-place update refuses this too)."
            )


def _state_from_columns(state_type: Any, columns: dict[str, list[Tensor]], treespec: Any) -> Any:
    trees = {field: optree.tree_unflatten(treespec, column) for field, column in columns.items()}
    return state_type(**{f: trees.get(f) for f in state_type._fields})


def _assemble_state(
    state_type: Any, fields: tuple[str, ...], per_leaf: list[dict[str, Tensor]], treespec: Any
) -> Any:
    columns = {field: [s[field] for s in per_leaf] for field in fields}
    return _state_from_columns(state_type, columns, treespec)


def _is_shared(hyperparameters: Hyperparameters) -> bool:
    """No per-parameter values: every parameter sees the same hyperparameters."""
    return not any(_is_mapping(v) for v in hyperparameters.values())


def _is_mapping(value: Any) -> bool:
    kind = type(value)
    if kind is float or kind is int or kind is bool or kind is tuple or kind is Tensor:
        return False  # the common cases, without the slower ABC check
    return isinstance(value, Mapping)


def _per_leaf_hyperparameters(
    hyperparameters: Hyperparameters, spec: RuleSpec, treespec: Any, count: int
) -> list[Hyperparameters]:
    if _is_shared(hyperparameters):
        return [hyperparameters] * count
    per_parameter = {}
    for key, value in hyperparameters.items():
        if isinstance(value, Mapping):
            try:
                per_parameter[key] = treespec.flatten_up_to(value)
            except (ValueError, TypeError) as error:
                raise ValueError(
                    f"{spec.name}: per-parameter {key!r} must be keyed like params. "
                    f"{_mismatch(treespec, value)}"
                ) from error
    if not per_parameter:
        return [hyperparameters] * count
    return [
        {**hyperparameters, **{k: v[i] for k, v in per_parameter.items()}} for i in range(count)
    ]


def _holds_tensor(value: Any) -> bool:
    return any(isinstance(leaf, Tensor) for leaf in optree.tree_leaves(value))


def _format_path(path: tuple[Any, ...]) -> str:
    return "".join(f"[{key!r}]" for key in path)


def _mismatch(treespec: Any, other: Any) -> str:
    if treespec.kind == optree.PyTreeKind.DICT and isinstance(other, Mapping):
        expected = set(optree.tree_unflatten(treespec, [0] * treespec.num_leaves))
        missing = sorted(map(str, expected - set(other)))
        unexpected = sorted(map(str, set(other) - expected))
        return f"Missing key(s): {missing}. Unexpected key(s): {unexpected}."
    got = optree.tree_structure(other, none_is_leaf=True)
    return f"Expected structure {treespec}, got {got}."


def _short(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor(shape={tuple(value.shape)})" if value.dim() else f"tensor({value.item():g})"
    if isinstance(value, Mapping):
        return "{per-parameter}"
    return repr(value)


# --------------------------------------------------------------------------- math helpers


def safe_sqrt(x: Any) -> Any:
    """``sqrt(x)`` whose derivative at ``x == 0`` is 0 instead of infinity.

    ``torch.sqrt`` has an infinite derivative at 0; through an optimizer step that
    becomes ``inf * 0 = nan`` for a parameter whose gradient (hence second moment) is
    exactly zero.  The value is unchanged everywhere, the derivative too for ``x > 0``,
    and negative inputs still give ``nan`` as in ``torch.sqrt``.  No hooks are involved,
    so it holds to every order, under ``vmap`` and under ``torch.compile``.

    Example:
        >>> import torch
        >>> from higher_func.optim import safe_sqrt
        >>> x = torch.tensor([0.0, 4.0], requires_grad=True)
        >>> torch.autograd.grad(safe_sqrt(x).sum(), x)[0]
        tensor([0.0000, 0.2500])
    """
    if isinstance(x, TensorList):
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in x.items)):
            return TensorList(torch._foreach_sqrt(x.items))  # no derivative wanted
        return TensorList([_safe_sqrt(t) for t in x.items])
    return _safe_sqrt(x)


def _safe_sqrt(x: Tensor) -> Tensor:
    if not _is_traced(x) and not (torch.is_grad_enabled() and x.requires_grad):
        return torch.sqrt(x)  # nothing records a derivative (functorch wrappers may not say)
    zero = x == 0
    return torch.where(zero, 0.0, torch.sqrt(torch.where(zero, 1.0, x)))


def add_scaled(x: Any, y: Any, alpha: Any) -> Any:
    """``x + alpha * y``: torch.optim's ``x.add_(y, alpha=alpha)``, one op when ``alpha`` is a
    number (fused multiply-add on the CPU, so the same rounding as torch.optim's in-place
    update), two when it is a tensor (a learned, differentiable hyperparameter)."""
    if is_number(alpha):
        return torch.add(x, y, alpha=alpha)
    return x + alpha * y


def sub_scaled(x: Any, y: Any, alpha: Any) -> Any:
    """``x - alpha * y``, as :func:`add_scaled` (no extra negation of a tensor ``alpha``)."""
    if is_number(alpha):
        return torch.sub(x, y, alpha=alpha)
    return x - alpha * y


def add_product(x: Any, a: Any, b: Any, value: Any) -> Any:
    """``x + value * a * b``: torch.optim's ``addcmul_``, one op when ``value`` is a number."""
    if is_number(value):
        return torch.addcmul(x, a, b, value=value)
    return x + value * a * b


def sub_ratio(x: Any, a: Any, b: Any, value: Any) -> Any:
    """``x - value * (a / b)``: torch.optim's ``x.addcdiv_(a, b, value=-value)``, one op when
    ``value`` is a number."""
    if is_number(value):
        return torch.addcdiv(x, a, b, value=-value)
    return x - value * (a / b)


def step_value(step: Any) -> Any:
    """The step count as a Python float where reading it is free, else the tensor itself.

    Bias corrections such as ``1 - beta1 ** t`` then cost Python arithmetic instead of
    several tiny tensor ops per parameter, with the same double-precision result that
    ``torch.optim`` computes.  Accelerator tensors (reading them would synchronise),
    tensors inside ``vmap``/``torch.compile`` and tensor lists stay tensors.
    """
    if isinstance(step, Tensor) and step.device.type == "cpu" and not _is_traced(step):
        return step.item()
    return step


def is_zero(value: Any) -> bool:
    """Whether a hyperparameter is the number 0 (tensors never count: they may be learned)."""
    kind = type(value)
    if kind is float or kind is int:  # the common case, without the slower ABC check
        return value == 0
    return isinstance(value, numbers.Number) and value == 0


def new_step(param: Tensor) -> Tensor:
    """A fresh per-parameter step counter: a 0-d tensor of the parameter's dtype."""
    return torch.zeros((), dtype=_real_dtype(param), device=param.device)


def _real_dtype(param: Tensor) -> torch.dtype:
    return param.dtype if param.dtype.is_floating_point else torch.get_default_dtype()


# --------------------------------------------------------------------------- validation


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``."""
    if not condition:
        raise ValueError(message)


def numbers_in(value: Any) -> Iterable[float]:
    """The numbers in a hyperparameter value that torch.optim would check.

    Python numbers are always checked.  One-element CPU tensors are checked when a rule is
    built (as torch checks a tensor ``lr``), not in per-step overrides: a learned value may
    cross a bound during meta-training, and reading it every step costs a device sync on
    an accelerator.  Larger tensors (per-element values), accelerator tensors and tensors
    inside ``vmap``/``torch.compile`` are the caller's responsibility.
    """
    values = value.values() if _is_mapping(value) else [value]
    for item in values:
        if is_number(item):
            yield float(item)
        elif (
            isinstance(item, Tensor)
            and item.device.type == "cpu"  # reading a GPU value would synchronise
            and not _is_traced(item)
            and item.numel() == 1
        ):
            yield float(item.detach())


def _is_traced(t: Tensor) -> bool:
    return torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t)


def check_nonnegative(hp: Hyperparameters, key: str, label: str) -> None:
    """torch.optim's ``Invalid <label>: <value>`` check for ``0 <= value``."""
    for v in numbers_in(hp[key]):
        check(v >= 0.0 and not math.isnan(v), f"Invalid {label}: {v}")


def check_betas(hp: Hyperparameters, key: str = "betas") -> None:
    """torch.optim's check that both betas lie in ``[0, 1)``."""
    values = hp[key].values() if isinstance(hp[key], Mapping) else [hp[key]]
    for pair in values:
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise ValueError(f"{key} must be a pair (beta1, beta2), got {pair!r}.")
        for index, beta in enumerate(pair):
            for v in numbers_in(beta):
                check(0.0 <= v < 1.0, f"Invalid beta parameter at index {index}: {v}")


def check_type(hp: Hyperparameters, key: str, kind: type) -> None:
    """A static option must be a plain value of ``kind`` (e.g. ``amsgrad`` a bool)."""
    if not isinstance(hp[key], kind):
        raise TypeError(f"{key} must be a {kind.__name__}, got {type(hp[key]).__name__}.")
