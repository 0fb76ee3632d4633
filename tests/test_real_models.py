"""Real models on every path (issue 12, part 3): tiny random-init transformers and timm.

Each case is a float64 model with its own loss: BERT (a 0/1 padding mask), GPT-2 (tied
embeddings), Llama (grouped-query attention), a timm ViT (fused attention) and a timm
ResNet (BatchNorm in train()).  The drop-in path's second-order meta-gradient equals a
hand-written ``functional_call`` + ``autograd.grad(create_graph=True)`` MAML on math
attention; the batched path (``MetaObjective``: vmap, or the loop where vmap cannot batch)
equals the per-task loop and the drop-in path.  Cases whose package is missing (or fails
to import, as timm does beside a mismatched torchvision) are skipped with the reason.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from real_model_cases import (
    BUILDERS,
    TASKS,
    Case,
    batched_meta_gradient,
    drop_in_meta_gradient,
    import_or_reason,
    reference_meta_gradient,
)

CASES = [
    pytest.param(package, builder, id=builder.__name__)
    for package, builders in BUILDERS.items()
    for builder in builders
]


def build(package: str, builder) -> Case:
    module, reason = import_or_reason(package)
    if module is None:
        pytest.skip(reason)
    torch.manual_seed(0)
    try:
        return builder(module)
    except ImportError as error:  # e.g. transformers without its torch models on an old torch
        pytest.skip(f"{package}'s models are not importable here: {str(error).strip()[:200]}")


def assert_close(actual, expected, tol: float) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


@pytest.mark.parametrize(("package", "builder"), CASES)
def test_drop_in_equals_the_reference_and_batched_equals_the_loop(package: str, builder) -> None:
    case = build(package, builder)
    per_task = [drop_in_meta_gradient(case, t) for t in range(TASKS)]
    for t, (loss, grads) in enumerate(per_task):
        expected_loss, expected_grads = reference_meta_gradient(case, t)
        assert_close([loss, *grads], [expected_loss, *expected_grads], case.tol)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every case batches with vmap (BERT: 4-D float mask)
        losses, grads = batched_meta_gradient(case, "vmap")
    loop_losses, loop_grads = batched_meta_gradient(case, "loop")
    assert_close([losses, *grads], [loop_losses, *loop_grads], case.tol)
    summed = [torch.stack(g).sum(0) for g in zip(*(grads for _, grads in per_task), strict=True)]
    drop_in_losses = torch.stack([loss for loss, _ in per_task])
    assert_close([losses, *grads], [drop_in_losses, *summed], case.tol)
