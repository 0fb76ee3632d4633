"""Mistakes a newcomer makes with the batched API get an error that says what to change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher_func as hf
from higher_func.func import MetaObjective, batched_meta_loss


def objective(model: nn.Module, **options) -> MetaObjective:
    return MetaObjective(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, **options)


def test_data_without_a_task_dimension_is_refused() -> None:
    """A (5, 1) tensor would silently be 5 tasks of one unbatched point each."""
    x, y = torch.randn(5, 1), torch.randn(5, 1)
    with pytest.raises(ValueError, match=r"support inputs has shape \(5, 1\)") as caught:
        objective(nn.Linear(1, 1))((x, y), (x, y))
    assert "x.unsqueeze(0) for one task of 5 examples" in str(caught.value)
    # The same data with the task dimension runs: one task of 5 points.
    objective(nn.Linear(1, 1))((x[None], y[None]), (x[None], y[None])).backward()


def test_token_ids_of_shape_tasks_by_examples_are_accepted() -> None:
    model = nn.Sequential(nn.Embedding(10, 3), nn.Linear(3, 1))
    ids, y = torch.randint(0, 10, (4, 6)), torch.randn(4, 6, 1)
    assert objective(model)((ids, y), (ids, y)).shape == ()


def test_dropout_names_the_randomness_argument_of_the_batched_api() -> None:
    model = nn.Sequential(nn.Linear(1, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    x, y = torch.randn(3, 4, 1), torch.randn(3, 4, 1)
    with pytest.raises(RuntimeError, match=r"randomness='different'.*MetaObjective\(\.\.\.\)"):
        objective(model)((x, y), (x, y))
    objective(model, randomness="different")((x, y), (x, y)).backward()  # the fix works
    f = hf.func.FunctionalModel(model)

    def loss(params, xs, ys):
        return F.mse_loss(f(params, None, xs), ys)

    with pytest.raises(RuntimeError, match="batched_meta_loss"):
        batched_meta_loss(loss, hf.optim.sgd(lr=0.1), f.params, (x, y), (x, y))
