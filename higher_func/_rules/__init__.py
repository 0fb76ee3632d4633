"""Pure, differentiable update rules reproducing ``torch.optim`` (private; see ``optim``)."""
