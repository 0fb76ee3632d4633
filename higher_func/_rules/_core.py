"""The machinery shared by every update rule: one per-tensor kernel, lifted over a pytree.

A rule is data (a :class:`RuleSpec`: defaults, a validator, the state fields and two
per-tensor functions) plus resolved hyperparameters.  Everything that is the same for
all optimizers lives here, once: pytree plumbing, ``None`` gradients, per-parameter
hyperparameters, step-time overrides and the error messages for bad input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import optree
import torch
from torch import Tensor

from .. import _execution
from .._errors import unknown_override
from ._checks import check_grad, check_hyperparameter_types
from ._math import ARITHMETIC_KEY, ARITHMETICS, TORCH, safe_sqrt
from ._tensor_list import TensorList
from ._trees import (
    grads_like,
    list_spec,
    mismatch,
    path_of,
    state_columns,
    tensor_leaves,
)

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
        torch_class: the ``torch.optim`` class whose math the rule reproduces, if any (the
            built-in rules are registered for theirs; a rule of one's own is registered with
            :func:`higher_func.optim.register_rule`).
        state_type: a ``NamedTuple`` class; its fields are ``torch.optim``'s state keys.
        defaults: every math option with ``torch.optim``'s default (keyword only).  The
            built-in rules write their defaults once, in their factory's signature; their
            specs give only what the factory does not take (AdamW's fixed
            ``decoupled_weight_decay=True``), and the factory completes them.
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
        sparse_grads: a sparse gradient is accepted (stepped as the equal dense one), as
            the ``torch.optim`` counterpart accepts it (SGD, Adagrad); else it is refused.

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
    fields: Callable[[Hyperparameters], tuple[str, ...]]
    init: InitFn
    update: UpdateFn
    validate: Callable[[Hyperparameters], None]
    static: frozenset[str] = frozenset()
    init_only: frozenset[str] = frozenset()
    import_state: Callable[[Mapping[str, Any], dict[str, Tensor]], dict[str, Tensor]] | None = None
    elementwise: bool = False
    sparse_grads: bool = False
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict, kw_only=True)


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

    ``arithmetic`` is ``"torch"`` (torch.optim's fused ops; the default) or ``"higher"``
    (higher's two-op forms, what the drop-in optimizers use); see :mod:`higher_func.optim`.

    Rules are built by the factories in :mod:`higher_func.optim` (``sgd``, ``adam``, ...),
    never directly.

    Example:
        >>> import torch, higher_func as hf
        >>> rule = hf.optim.sgd(lr=0.5)
        >>> params = {"w": torch.ones(2)}
        >>> new_params, state = rule.step(params, {"w": torch.ones(2)}, rule.init(params))
        >>> isinstance(rule, hf.optim.Rule), new_params["w"], params["w"]  # input unchanged
        (True, tensor([0.5000, 0.5000]), tensor([1., 1.]))
        >>> hf.optim.sgd(lr=0.5, arithmetic="higher").arithmetic  # higher's p - lr * g
        'higher'
    """

    __slots__ = ("arithmetic", "hyperparameters", "spec")

    def __init__(
        self, spec: RuleSpec, hyperparameters: Hyperparameters, arithmetic: str = TORCH
    ) -> None:
        self.spec = spec
        self.hyperparameters: dict[str, Any] = dict(hyperparameters)
        self.arithmetic = arithmetic

    @property
    def name(self) -> str:
        """The factory's name, e.g. ``"adam"``."""
        return self.spec.name

    def __repr__(self) -> str:
        options = [f"{k}={_short(v)}" for k, v in self.hyperparameters.items()]
        if self.arithmetic != TORCH:
            options.append(f"arithmetic={self.arithmetic!r}")
        return f"{self.name}({', '.join(options)})"

    def replace(self, **hyperparameters: Any) -> Rule:
        """A new rule with some hyperparameters (or ``arithmetic``) changed, validated like
        the factory."""
        options = {"arithmetic": self.arithmetic, **self.hyperparameters, **hyperparameters}
        return build_rule(self.spec, options)

    def init(self, params: Any) -> Any:
        """The initial state for ``params``: a ``NamedTuple`` of pytrees shaped like ``params``."""
        leaves, treespec = tensor_leaves("params", params)
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
        leaves, treespec = tensor_leaves("params", params)
        grad_leaves = grads_like(grads, treespec)
        new_params, state = self._step_leaves(leaves, grad_leaves, state, treespec, hyperparameters)
        return optree.tree_unflatten(treespec, new_params), state

    def step_list(
        self,
        params: list[Tensor],
        grads: list[Tensor | None],
        state: Any,
        plan: _execution.Plan | None,
    ) -> tuple[list[Tensor], Any]:
        """:meth:`step` over a list of tensors, with the plan already made: what a
        differentiable optimizer's group step calls.  ``params`` are tensors (the fast
        weights), ``grads`` one tensor or ``None`` each (checked here, as in :meth:`step`);
        ``plan`` is the planner's answer for the group (``None``: decide here).  The new
        state's fields are lists, as ``step`` would give for a list."""
        if len(grads) != len(params):
            grads_like(grads, list_spec(len(params)))  # raises, naming the mismatch
        return self._step_leaves(
            params, list(grads), state, list_spec(len(params)), self.hyperparameters, plan
        )

    def _step_leaves(
        self,
        leaves: list[Tensor],
        grad_leaves: list[Tensor | None],
        state: Any,
        treespec: Any,
        hyperparameters: Hyperparameters,
        plan: _execution.Plan | None = None,
    ) -> tuple[list[Tensor], Any]:
        """The step over flattened leaves (``grad_leaves`` is checked, and may be changed in
        place); the new parameters as a list of leaves."""
        if self.arithmetic != TORCH:
            hyperparameters = {**hyperparameters, ARITHMETIC_KEY: self.arithmetic}
        self._check_grads(leaves, grad_leaves, treespec)
        fields = self.spec.fields(hyperparameters)
        columns = state_columns(state, self.spec.state_type, fields, treespec)
        active = [i for i, g in enumerate(grad_leaves) if g is not None]
        new_params, new_columns = list(leaves), {f: list(c) for f, c in columns.items()}
        shared = _is_shared(hyperparameters)
        if plan is None and shared:
            plan = self._plan(leaves, active, grad_leaves, columns, hyperparameters)
        if shared and plan is _execution.Plan.FOREACH:
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
            hps = (
                [hyperparameters] * len(leaves)
                if shared
                else _per_leaf_hyperparameters(hyperparameters, self.spec, treespec, len(leaves))
            )
            update, items = self.spec.update, columns.items()
            for i in active:
                cells = {f: c[i] for f, c in items} if columns else {}  # plain SGD: none
                p, s = update(leaves[i], grad_leaves[i], cells, hps[i])
                new_params[i] = p
                for f in fields:
                    new_columns[f][i] = s[f]
        if _may_broadcast(hyperparameters):
            _check_shapes_kept(leaves, new_params, active, treespec)
        if new_columns:
            is_list = treespec is list_spec(len(leaves))
            state = state._replace(
                **{
                    f: c if is_list else optree.tree_unflatten(treespec, c)
                    for f, c in new_columns.items()
                }
            )
        return new_params, state

    def _check_grads(self, leaves: list[Tensor], grads: list[Tensor | None], treespec: Any) -> None:
        """Each gradient shaped and typed like its parameter (sparse ones densified where
        the rule accepts them); the paths are formatted only for an error."""
        sparse = self.spec.sparse_grads
        for i, (p, g) in enumerate(zip(leaves, grads, strict=True)):
            if g is not None and (
                g.shape != p.shape or g.dtype != p.dtype or g.layout is not torch.strided
            ):
                grads[i] = check_grad(self.name, path_of(treespec, i), p, g, sparse)

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
                valid = set(self.spec.defaults) - self.spec.static
                raise unknown_override(f"{self.name}.step()", key, valid)
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
        check_hyperparameter_types(
            f"{self.name}.step", {k: self.spec.defaults[k] for k in overrides}, overrides
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
    unknown = set(options) - set(spec.defaults) - IMPLEMENTATION_FLAGS - {"arithmetic"}
    if unknown:
        raise TypeError(
            f"{spec.name}() got unknown option(s) {sorted(unknown)}; "
            f"valid options are {sorted(spec.defaults)}."
        )
    arithmetic = options.get("arithmetic", TORCH)
    if arithmetic not in ARITHMETICS:
        raise ValueError(
            f"{spec.name}(): arithmetic must be one of {list(ARITHMETICS)}, got {arithmetic!r}. "
            f"'torch' runs torch.optim's fused ops, 'higher' higher 0.2.1's two-op forms."
        )
    hyperparameters = {k: options.get(k, v) for k, v in spec.defaults.items()}
    for key in spec.static:
        if isinstance(hyperparameters[key], Mapping):
            raise TypeError(f"{spec.name}(): {key!r} cannot be given per parameter.")
    check_hyperparameter_types(spec.name, spec.defaults, hyperparameters)
    spec.validate(hyperparameters)
    return Rule(spec, hyperparameters, arithmetic)


# --------------------------------------------------------------- hyperparameters and state


def _may_broadcast(hyperparameters: Hyperparameters) -> bool:
    """Whether a hyperparameter holds a tensor with dimensions (it could grow a parameter)."""
    for value in hyperparameters.values():
        kind = type(value)
        if kind is float or kind is int or kind is bool or kind is str:
            continue
        if kind is tuple and all(type(v) is float or type(v) is int for v in value):
            continue  # numbers such as Adam's betas
        if any(isinstance(v, Tensor) and v.dim() > 0 for v in optree.tree_leaves(value)):
            return True
    return False


def _check_shapes_kept(
    old: list[Tensor], new: list[Tensor], active: list[int], treespec: Any
) -> None:
    for i in active:
        if new[i].shape != old[i].shape:
            path = path_of(treespec, i)
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


#: The types of most hyperparameters: read without the slower ABC check of ``Mapping``.
_NEVER_MAPPINGS: frozenset[type] = frozenset({float, int, bool, str, tuple, Tensor})


def _is_mapping(value: Any) -> bool:
    kind = type(value)
    if kind in _NEVER_MAPPINGS:
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
                    f"{mismatch(treespec, value)}"
                ) from error
    if not per_parameter:
        return [hyperparameters] * count
    return [
        {**hyperparameters, **{k: v[i] for k, v in per_parameter.items()}} for i in range(count)
    ]


def _holds_tensor(value: Any) -> bool:
    return any(isinstance(leaf, Tensor) for leaf in optree.tree_leaves(value))


def _short(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor(shape={tuple(value.shape)})" if value.dim() else f"tensor({value.item():g})"
    if isinstance(value, Mapping):
        return "{per-parameter}"
    return repr(value)
