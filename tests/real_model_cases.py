"""Tiny random-init real models (transformers, timm) and the references they are checked on.

Shared by ``tests/test_real_models.py`` and ``benchmarks/real_models.py`` (which prints the
case table of ``docs/models.md``).  Each case builds a float64 model, a loss and a batch of
tasks; the references are a hand-written MAML (``functional_call`` +
``autograd.grad(create_graph=True)`` on math attention) and the drop-in path task by task.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import higher_func as hf

DTYPE = torch.float64
LR = 0.1
STEPS = 2
TASKS = 2
VOCAB, LENGTH, SHOTS = 32, 6, 3


def import_or_reason(name: str) -> tuple[Any, str]:
    """``(module, "")``, or ``(None, why)`` where the package is missing or fails to import."""
    try:
        return importlib.import_module(name), ""
    except Exception as error:  # e.g. timm with a torchvision built for another torch
        return None, f"{name} is not importable here: {type(error).__name__}: {error}"


class Logits(nn.Module):
    """A transformers model as ``f(input_ids, attention_mask=None) -> logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@dataclass
class Case:
    """A real model and its tasks.

    ``inputs[t]`` / ``targets[t]`` are task ``t``'s support (the query is the support
    reversed along the shots); ``batched_inputs`` replaces a 0/1 attention mask with the
    4-D float mask ``vmap`` can batch (``None``: same inputs).  ``tol`` is the float64
    tolerance the model's own float32 internals allow.
    """

    name: str
    model: nn.Module
    loss: Callable[[Any, Tensor], Tensor]
    inputs: tuple[Tensor, ...]
    targets: Tensor
    batched_inputs: tuple[Tensor, ...] | None = None
    tol: float = 1e-10

    def task(self, t: int, query: bool = False) -> tuple[tuple[Tensor, ...], Tensor]:
        def pick(x: Tensor) -> Tensor:
            return x[t].flip(0) if query else x[t]

        return tuple(pick(x) for x in self.inputs), pick(self.targets)

    def tasks(self, batched: bool = False) -> tuple[Any, Any]:
        inputs = self.batched_inputs if batched and self.batched_inputs else self.inputs
        flip = [x.flip(1) for x in inputs]
        return (tuple(inputs), self.targets), (tuple(flip), self.targets.flip(1))


def _ids(*shape: int) -> Tensor:
    return torch.randint(0, VOCAB, shape)


def _padding_masks() -> tuple[Tensor, Tensor]:
    """A 0/1 mask (the last two tokens of the first sequence padded) and its 4-D float twin."""
    mask = torch.ones(TASKS, SHOTS, LENGTH, dtype=torch.long)
    mask[:, 0, -2:] = 0
    blocked = (mask == 0)[:, :, None, None, :].expand(TASKS, SHOTS, 1, LENGTH, LENGTH)
    float_mask = torch.zeros(blocked.shape, dtype=DTYPE).masked_fill(
        blocked, torch.finfo(DTYPE).min
    )
    return mask, float_mask


def bert(transformers: Any) -> Case:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = Logits(transformers.BertForSequenceClassification(config)).to(DTYPE)
    ids, (mask, float_mask) = _ids(TASKS, SHOTS, LENGTH), _padding_masks()
    targets = torch.randint(0, 3, (TASKS, SHOTS))
    return Case("BERT", model, F.cross_entropy, (ids, mask), targets, (ids, float_mask))


def gpt2(transformers: Any) -> Case:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = Logits(transformers.GPT2LMHeadModel(config)).to(DTYPE)  # tied embeddings
    ids = _ids(TASKS, SHOTS, LENGTH)
    return Case("GPT-2", model, next_token_loss, (ids,), ids)


def llama(transformers: Any) -> Case:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    model = Logits(transformers.LlamaForCausalLM(config)).to(DTYPE)
    ids = _ids(TASKS, SHOTS, LENGTH)
    # LlamaRMSNorm computes in float32 whatever the model's dtype.
    return Case("Llama", model, next_token_loss, (ids,), ids, tol=1e-6)


def _images() -> Tensor:
    return torch.randn(TASKS, SHOTS, 3, 8, 8, dtype=DTYPE)


def vit(timm: Any) -> Case:
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
        num_classes=3,
    ).to(DTYPE)  # fmt: skip
    return Case(
        "timm ViT", model, F.cross_entropy, (_images(),), torch.randint(0, 3, (TASKS, SHOTS))
    )


def resnet(timm: Any) -> Case:
    from timm.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, (1, 1, 1, 1), num_classes=3, stem_width=4, channels=(4, 8, 8, 8)).to(
        DTYPE
    )  # BatchNorm2d in train(): batch statistics, running statistics updated
    return Case("timm ResNet (BatchNorm)", model, F.cross_entropy, (_images(),),
                torch.randint(0, 3, (TASKS, SHOTS)))  # fmt: skip


def bert_01_mask(transformers: Any) -> Case:
    """BERT batched with its 0/1 mask (``vmap`` cannot: the loop runs it)."""
    case = bert(transformers)
    case.name, case.batched_inputs = "BERT, 0/1 mask batched", None
    return case


class _Pool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(1)[:, :3]


def transformer_encoder(torch_module: Any) -> Case:
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    model = nn.Sequential(encoder, _Pool()).to(DTYPE)
    inputs = torch.randn(TASKS, SHOTS, LENGTH, 16, dtype=DTYPE)
    return Case("nn.TransformerEncoder", model, F.cross_entropy, (inputs,),
                torch.randint(0, 3, (TASKS, SHOTS)))  # fmt: skip


class _LanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.lstm(self.embed(ids))[0])


def lstm(torch_module: Any) -> Case:
    ids = _ids(TASKS, SHOTS, LENGTH)
    return Case("nn.LSTM language model", _LanguageModel().to(DTYPE), next_token_loss, (ids,), ids)


def spectral_norm(torch_module: Any) -> Case:
    wrap = nn.utils.parametrizations.spectral_norm
    model = nn.Sequential(wrap(nn.Linear(8, 16)), nn.Tanh(), nn.Linear(16, 3)).to(DTYPE)
    inputs = torch.randn(TASKS, SHOTS, 8, dtype=DTYPE)
    return Case("spectral_norm MLP, train()", model, F.cross_entropy, (inputs,),
                torch.randint(0, 3, (TASKS, SHOTS)))  # fmt: skip


#: package -> the case builders that need it (the test tier).
BUILDERS: dict[str, list[Callable[[Any], Case]]] = {
    "transformers": [bert, gpt2, llama],
    "timm": [vit, resnet],
}

#: Further cases of the docs' table (benchmarks/real_models.py); their tests are
#: tests/test_attention.py and tests/test_batching.py.
TABLE_BUILDERS: dict[str, list[Callable[[Any], Case]]] = {
    "transformers": [bert, bert_01_mask, gpt2, llama],
    "timm": [vit, resnet],
    "torch": [transformer_encoder, lstm, spectral_norm],
}


# --------------------------------------------------------------------------- references


def reference_meta_gradient(case: Case, t: int) -> tuple[Tensor, list[Tensor]]:
    """Task ``t``'s query loss and meta-gradient by hand (math attention, second order).

    Buffers (BatchNorm statistics) are threaded from step to step as the drop-in path does.
    """
    model = case.model
    params = dict(model.named_parameters())
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    (x, y), (qx, qy) = case.task(t), case.task(t, query=True)
    fast = params
    with sdpa_kernel(SDPBackend.MATH):
        for _ in range(STEPS):
            out = functional_call(model, (fast, buffers), x)
            grads = torch.autograd.grad(case.loss(out, y), list(fast.values()), create_graph=True)
            fast = {name: p - LR * g for (name, p), g in zip(fast.items(), grads, strict=True)}
        query_loss = case.loss(functional_call(model, (fast, buffers), qx), qy)
        return query_loss.detach(), list(torch.autograd.grad(query_loss, list(params.values())))


def drop_in_meta_gradient(case: Case, t: int) -> tuple[Tensor, list[Tensor]]:
    """Task ``t``'s query loss and meta-gradient through ``innerloop_ctx``."""
    model = case.model
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    (x, y), (qx, qy) = case.task(t), case.task(t, query=True)
    with hf.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(STEPS):
            diffopt.step(case.loss(fmodel(*x), y))
        query_loss = case.loss(fmodel(*qx), qy)
        query_loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return query_loss.detach(), grads


def functional_meta_gradient(case: Case, t: int) -> tuple[Tensor, list[Tensor]]:
    """Task ``t``'s query loss and meta-gradient through ``FunctionalModel`` + ``meta_loss``."""
    f = hf.func.FunctionalModel(case.model)

    def loss(params: Any, buffers: Any, inputs: Any, targets: Tensor) -> Any:
        out, buffers = f.with_buffers(params, buffers, *inputs)
        return case.loss(out, targets), buffers

    (x, y), (qx, qy) = case.task(t), case.task(t, query=True)
    rule = hf.optim.sgd(lr=LR)
    value = hf.func.meta_loss(
        loss, rule, f.params, (x, y), (qx, qy), steps=STEPS, buffers=f.buffers
    )
    return value.detach(), list(torch.autograd.grad(value, list(f.params.values())))


def batched_meta_gradient(case: Case, batching: str) -> tuple[Tensor, list[Tensor]]:
    """Every task's query loss and the summed meta-gradient through ``MetaObjective``."""
    opt = torch.optim.SGD(case.model.parameters(), lr=LR)
    objective = hf.MetaObjective(case.model, opt, case.loss, steps=STEPS, batching=batching)
    support, query = case.tasks(batched=batching != "loop")
    losses = objective(support, query, reduction="none")
    grads = torch.autograd.grad(losses.sum(), list(case.model.parameters()))
    return losses.detach(), list(grads)


def max_abs_diff(actual: list[Tensor], expected: list[Tensor]) -> float:
    return max(float((a - e).abs().max()) for a, e in zip(actual, expected, strict=True))
