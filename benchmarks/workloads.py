"""The benchmark workloads: models, data and settings shared by every implementation.

Every implementation in :mod:`implementations` runs exactly these problems, built from
fixed seeds in float32, so that the times it reports compare the same computation.  Data
is synthetic (no download): sinusoid regression tasks, Omniglot-shaped image tasks and a
small regression problem for hyperparameter learning.

Workloads (the keys used in tables, JSON and on the command line):

* ``1`` sinusoid MAML, MLP 1-40-40-1, 10-shot, 25 tasks, 5 inner SGD steps, second order,
  outer Adam; ``2`` the same with an inner Adam; ``2b`` inner SGD with momentum 0.9.
* ``3`` Omniglot-shaped MAML: 4 x [conv 3x3 64 channels, BatchNorm, ReLU, max-pool 2] +
  linear, 28x28x1 inputs, 5-way 1-shot, 15 queries per class, 4 tasks, 5 inner SGD steps.
* ``4`` hyperparameter learning: 20 unrolled Adam steps of a small MLP whose learning rate
  and weight decay are learned tensors (``exp`` of learned logarithms).
* ``5`` set-up: entering (and leaving) ``innerloop_ctx`` for a model of about 10 million
  parameters, with the default ``copy_initial_weights=True``; ``5b`` with ``False`` (MAML).
* ``6`` memory: peak memory of one meta-iteration for 5, 20 and 50 inner steps, with the
  graph through the inner loop kept (tracked) and without it (first order).
* Real models, each with an inner SGD (key without suffix), SGD-momentum 0.9 (``m``) and
  Adam (``a``), second order, outer Adam: ``3m``/``3a`` the Omniglot conv net of workload
  3; ``7`` a ResNet-18-shaped conv net with BatchNorm (11.2M parameters in 62 tensors) at
  64x64 px, 5-way 1-shot, 5 queries, 2 tasks, 3 inner steps; ``8`` a BERT-tiny-shaped
  transformer (``transformers``' ``BertForSequenceClassification``, 2 layers, hidden 128,
  4.4M parameters, random initialisation, no dropout), 5-way sentence classification,
  32 tokens, 2 tasks, 3 inner steps; ``9`` an LSTM language model (embedding 2000 x 128,
  one LSTM layer of 256, decoder to the vocabulary), next-token loss over 4 x 16 tokens, 2
  tasks, 3 inner steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

SEED = 0


class Tasks(NamedTuple):
    """A batch of tasks, stacked on the first dimension (``[tasks, examples, ...]``)."""

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor

    @property
    def count(self) -> int:
        return self.x_support.shape[0]

    def task(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (
            self.x_support[index],
            self.y_support[index],
            self.x_query[index],
            self.y_query[index],
        )


@dataclass(frozen=True)
class InnerOptimizer:
    """The inner optimizer: a ``torch.optim`` name and its hyperparameters.

    ``name`` is ``"sgd"`` or ``"adam"``; every implementation maps it to its own optimizer
    (``torch.optim.SGD`` for higher, ``higher_func.optim.sgd`` for the functional loop, ...).
    """

    name: str
    hyperparameters: dict[str, Any]

    def torch_optimizer(self, params: Any) -> torch.optim.Optimizer:
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[self.name]
        return cls(params, **self.hyperparameters)

    def describe(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.hyperparameters.items())
        return f"{self.name}({options})"


@dataclass(frozen=True)
class MamlProblem:
    """A MAML workload: meta-learn a model's initialisation over a batch of tasks.

    One meta-iteration adapts the model to every task with ``inner_steps`` steps of
    ``inner`` on the support set, sums the query losses (graph through the inner loop
    kept unless ``first_order``), back-propagates to the initial weights and takes one
    outer Adam step.
    """

    key: str
    title: str
    build_model: Callable[[], nn.Module]
    tasks: Tasks
    loss: Callable[[Tensor, Tensor], Tensor]
    inner: InnerOptimizer
    inner_steps: int
    outer_lr: float = 1e-3
    first_order: bool = False
    device: str = "cpu"
    #: a real (large) model: compiled paths are skipped unless asked for
    large: bool = False
    #: modules the model needs (an optional benchmark extra), checked before building
    requires: tuple[str, ...] = ()
    #: why ``torch.func.vmap`` cannot batch the model ("": it can)
    no_vmap: str = ""

    def model(self) -> nn.Module:
        """A fresh model, identical for every implementation (seeded), on the device."""
        torch.manual_seed(SEED)
        return self.build_model().to(self.device)


@dataclass(frozen=True)
class HyperProblem:
    """Hyperparameter learning: the validation loss after ``steps`` unrolled Adam steps.

    The learning rate and weight decay are ``exp(log_lr)`` and ``exp(log_weight_decay)``
    of two learned scalar tensors; one iteration unrolls the training from the same initial
    weights, back-propagates the validation loss to the two logarithms and takes one outer
    Adam step on them.
    """

    key: str
    title: str
    build_model: Callable[[], nn.Module]
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    steps: int = 20
    initial_lr: float = 1e-2
    initial_weight_decay: float = 1e-3
    outer_lr: float = 1e-2
    device: str = "cpu"

    def model(self) -> nn.Module:
        torch.manual_seed(SEED)
        return self.build_model().to(self.device)

    def log_hyperparameters(self) -> tuple[Tensor, Tensor]:
        """Fresh learned leaves ``(log_lr, log_weight_decay)``."""
        make = lambda value: torch.tensor(  # noqa: E731
            math.log(value), device=self.device, requires_grad=True
        )
        return make(self.initial_lr), make(self.initial_weight_decay)


@dataclass(frozen=True)
class SetupProblem:
    """The cost of entering ``innerloop_ctx`` (and leaving it) for a large model."""

    key: str
    title: str
    build_model: Callable[[], nn.Module]
    inner: InnerOptimizer
    copy_initial_weights: bool = True
    device: str = "cpu"

    def model(self) -> nn.Module:
        torch.manual_seed(SEED)
        return self.build_model().to(self.device)


@dataclass(frozen=True)
class Workload:
    """One row group of the report: a key, a family and the problem it runs."""

    key: str
    family: str  # "maml", "hyper", "setup" or "memory"
    problem: Any
    notes: tuple[str, ...] = field(default_factory=tuple)


# --------------------------------------------------------------------------- models


def sinusoid_mlp() -> nn.Module:
    """MLP 1-40-40-1 with ReLU (Finn et al., 2017)."""
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def omniglot_convnet(ways: int = 5) -> nn.Module:
    """4 x [conv 3x3 64ch, BatchNorm, ReLU, max-pool 2] + linear, for 28x28x1 inputs.

    BatchNorm uses batch statistics only (``track_running_stats=False``), as in MAML, so no
    implementation has buffers to update: the benchmark times the same computation for all.
    """
    blocks: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        blocks += [
            nn.Conv2d(channels, 64, 3, padding=1),
            nn.BatchNorm2d(64, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = 64
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(64, ways))


def hyper_mlp() -> nn.Module:
    """A small MLP 20-64-64-1 for the hyperparameter-learning workload."""
    return nn.Sequential(
        nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )


def large_mlp() -> nn.Module:
    """About 10 million parameters in 20 tensors (ten 1000x1000 linear layers)."""
    layers: list[nn.Module] = []
    for _ in range(10):
        layers += [nn.Linear(1000, 1000), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def memory_mlp() -> nn.Module:
    """MLP 784-256-256-10 (about 270k parameters) for the memory workload."""
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs with BatchNorm, identity or 1x1 shortcut."""

    def __init__(self, channels_in: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.bn1 = _batch_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = _batch_norm(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels, 1, stride, bias=False), _batch_norm(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, track_running_stats=False)


def resnet18(ways: int = 5) -> nn.Module:
    """ResNet-18's layout (He et al., 2016): 7x7 stem, 4 stages of 2 basic blocks (64-512
    channels), global average pool, linear; 11.2M parameters in 62 tensors.  BatchNorm uses
    batch statistics only, as in :func:`omniglot_convnet`."""
    stages: list[nn.Module] = []
    channels_in = 64
    for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        stages += [BasicBlock(channels_in, channels, stride), BasicBlock(channels, channels, 1)]
        channels_in = channels
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        _batch_norm(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        *stages,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, ways),
    )


BERT_VOCAB = 30522


class BertClassifier(nn.Module):
    """BERT-tiny's shape (2 layers, hidden 128, 2 heads, feed-forward 512) from
    ``transformers``, randomly initialised, dropout off; returns the logits."""

    def __init__(self, ways: int = 5) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=BERT_VOCAB,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=512,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=ways,
            attn_implementation="eager",  # CPU flash attention has no second derivative
        )
        self.bert = BertForSequenceClassification(config)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.bert(input_ids=tokens).logits


def bert_tiny() -> nn.Module:
    return BertClassifier()


LSTM_VOCAB = 2000


class LSTMLanguageModel(nn.Module):
    """Embedding 2000 x 128, one LSTM layer of 256 units, linear decoder to the vocabulary;
    ``forward(tokens)`` gives next-token logits ``[batch, vocab, time]`` (cross-entropy's
    layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(LSTM_VOCAB, 128)
        self.lstm = nn.LSTM(128, 256, batch_first=True)
        self.decoder = nn.Linear(256, LSTM_VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden, _ = self.lstm(self.embedding(tokens))
        return self.decoder(hidden).transpose(1, 2)


def lstm_lm() -> nn.Module:
    return LSTMLanguageModel()


#: The real models by name (``benchmarks/plan_thresholds.py`` reads their shapes).
MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": resnet18,
    "bert_tiny": bert_tiny,
    "lstm_lm": lstm_lm,
    "omniglot": omniglot_convnet,
}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- data


def sinusoid_tasks(tasks: int, shots: int, generator: torch.Generator) -> Tasks:
    """Regression tasks ``y = a sin(x - phase)``, ``a ~ U[0.1, 5]``, ``phase ~ U[0, pi]``."""
    amplitude = 0.1 + 4.9 * torch.rand(tasks, 1, 1, generator=generator)
    phase = math.pi * torch.rand(tasks, 1, 1, generator=generator)

    def sample() -> tuple[Tensor, Tensor]:
        x = -5.0 + 10.0 * torch.rand(tasks, shots, 1, generator=generator)
        return x, amplitude * torch.sin(x - phase)

    x_s, y_s = sample()
    x_q, y_q = sample()
    return Tasks(x_s, y_s, x_q, y_q)


def image_tasks(
    tasks: int, ways: int, shots: int, queries: int, generator: torch.Generator
) -> Tasks:
    """Omniglot-shaped classification tasks: 28x28x1 images, class prototypes plus noise."""
    prototypes = torch.rand(tasks, ways, 1, 28, 28, generator=generator)

    def sample(per_class: int) -> tuple[Tensor, Tensor]:
        noise = 0.3 * torch.randn(tasks, ways, per_class, 1, 28, 28, generator=generator)
        images = (prototypes.unsqueeze(2) + noise).reshape(tasks, ways * per_class, 1, 28, 28)
        labels = torch.arange(ways).repeat_interleave(per_class).expand(tasks, -1)
        return images, labels.contiguous()

    x_s, y_s = sample(shots)
    x_q, y_q = sample(queries)
    return Tasks(x_s, y_s, x_q, y_q)


def _resized(tasks: Tasks, size: int, channels: int) -> Tasks:
    """Image tasks at ``size`` px with ``channels`` channels (bilinear, repeated channels)."""

    def resize(images: Tensor) -> Tensor:
        t, n = images.shape[:2]
        flat = F.interpolate(images.reshape(t * n, *images.shape[2:]), size=size, mode="bilinear")
        return flat.repeat(1, channels, 1, 1).reshape(t, n, channels, size, size)

    return Tasks(resize(tasks.x_support), tasks.y_support, resize(tasks.x_query), tasks.y_query)


def token_tasks(
    tasks: int, ways: int, shots: int, queries: int, length: int, generator: torch.Generator
) -> Tasks:
    """Sentence-classification tasks: each class a random token distribution over a slice of
    the vocabulary; labels 0..ways-1."""
    starts = torch.randint(0, BERT_VOCAB - 200, (tasks, ways, 1, 1), generator=generator)

    def sample(per_class: int) -> tuple[Tensor, Tensor]:
        offsets = torch.randint(0, 200, (tasks, ways, per_class, length), generator=generator)
        tokens = (starts + offsets).reshape(tasks, ways * per_class, length)
        labels = torch.arange(ways).repeat_interleave(per_class).expand(tasks, -1)
        return tokens, labels.contiguous()

    x_s, y_s = sample(shots)
    x_q, y_q = sample(queries)
    return Tasks(x_s, y_s, x_q, y_q)


def text_tasks(tasks: int, batch: int, length: int, generator: torch.Generator) -> Tasks:
    """Language-model tasks: each task a random first-order Markov chain over the vocabulary
    (a few likely successors per token); targets are the next tokens."""
    successors = torch.randint(0, LSTM_VOCAB, (tasks, LSTM_VOCAB, 4), generator=generator)

    def sample() -> tuple[Tensor, Tensor]:
        tokens = torch.empty(tasks, batch, length + 1, dtype=torch.long)
        tokens[..., 0] = torch.randint(0, LSTM_VOCAB, (tasks, batch), generator=generator)
        for t in range(length):
            choice = torch.randint(0, 4, (tasks, batch, 1), generator=generator)
            rows = successors.gather(1, tokens[..., t : t + 1].expand(-1, -1, 4))
            tokens[..., t + 1] = rows.gather(2, choice).squeeze(2)
        return tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous()

    x_s, y_s = sample()
    x_q, y_q = sample()
    return Tasks(x_s, y_s, x_q, y_q)


def _to(tasks: Tasks, device: str) -> Tasks:
    return Tasks(*(t.to(device) for t in tasks))


# --------------------------------------------------------------------------- the suite


SINUSOID_SGD = InnerOptimizer("sgd", {"lr": 0.01})
SINUSOID_ADAM = InnerOptimizer("adam", {"lr": 0.01})
SINUSOID_MOMENTUM = InnerOptimizer("sgd", {"lr": 0.01, "momentum": 0.9})
OMNIGLOT_SGD = InnerOptimizer("sgd", {"lr": 0.4})
MEMORY_STEPS = (5, 20, 50)


def sinusoid_problem(key: str, title: str, inner: InnerOptimizer, device: str) -> MamlProblem:
    tasks = sinusoid_tasks(25, 10, torch.Generator().manual_seed(SEED))
    return MamlProblem(
        key=key,
        title=title,
        build_model=sinusoid_mlp,
        tasks=_to(tasks, device),
        loss=F.mse_loss,
        inner=inner,
        inner_steps=5,
        device=device,
    )


def omniglot_problem(device: str) -> MamlProblem:
    tasks = image_tasks(4, 5, 1, 15, torch.Generator().manual_seed(SEED))
    return MamlProblem(
        key="3",
        title="Omniglot-shaped MAML, conv net, 5-way 1-shot, 4 tasks, 5 inner SGD steps",
        build_model=omniglot_convnet,
        tasks=_to(tasks, device),
        loss=F.cross_entropy,
        inner=OMNIGLOT_SGD,
        inner_steps=5,
        device=device,
    )


def hyper_problem(device: str) -> HyperProblem:
    generator = torch.Generator().manual_seed(SEED)
    teacher = torch.randn(20, 1, generator=generator)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, 20, generator=generator)
        y = torch.tanh(x @ teacher) + 0.1 * torch.randn(n, 1, generator=generator)
        return x.to(device), y.to(device)

    x_train, y_train = sample(256)
    x_val, y_val = sample(256)
    return HyperProblem(
        key="4",
        title="Hyperparameter learning, 20 unrolled Adam steps, learned lr and weight decay",
        build_model=hyper_mlp,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        device=device,
    )


def setup_problem(device: str, copy_initial_weights: bool = True) -> SetupProblem:
    copy = "copies the weights" if copy_initial_weights else "copy_initial_weights=False"
    return SetupProblem(
        key="5" if copy_initial_weights else "5b",
        title=f"Set-up: enter and leave innerloop_ctx, 10M-parameter MLP, SGD, {copy}",
        build_model=large_mlp,
        inner=InnerOptimizer("sgd", {"lr": 0.1}),
        copy_initial_weights=copy_initial_weights,
        device=device,
    )


def memory_problem(steps: int, first_order: bool, device: str) -> MamlProblem:
    """One task, 100 support and 100 query images of 784 features, 10 classes."""
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(1, 200, 784, generator=generator)
    y = torch.randint(0, 10, (1, 200), generator=generator)
    tasks = Tasks(x[:, :100], y[:, :100], x[:, 100:], y[:, 100:])
    mode = "first order" if first_order else "tracked"
    return MamlProblem(
        key=f"6-{'fo' if first_order else 'tracked'}-{steps}",
        title=f"Memory: MLP 784-256-256-10, 1 task, {steps} inner SGD steps, {mode}",
        build_model=memory_mlp,
        tasks=_to(tasks, device),
        loss=F.cross_entropy,
        inner=InnerOptimizer("sgd", {"lr": 0.1}),
        inner_steps=steps,
        first_order=first_order,
        device=device,
    )


#: The inner optimizers of the real-model workloads, by key suffix.
REAL_MODEL_INNER = {
    "": ("SGD", InnerOptimizer("sgd", {"lr": 0.1})),
    "m": ("SGD-momentum", InnerOptimizer("sgd", {"lr": 0.01, "momentum": 0.9})),
    "a": ("Adam", InnerOptimizer("adam", {"lr": 1e-3})),
}


#: torch has no batching rule for the fused LSTM kernel (higher_func's batched paths fall
#: back to a per-task loop; a hand-written ``vmap`` cannot).
_NO_LSTM_VMAP = "torch has no vmap batching rule for aten::lstm"


def real_model_problems(device: str) -> list[MamlProblem]:
    """Workloads 3m, 3a, 7, 7m, 7a, 8, 8m, 8a, 9, 9m, 9a (see the module docstring)."""
    generator = torch.Generator().manual_seed(SEED)
    omniglot = image_tasks(4, 5, 1, 15, generator)
    images = _resized(image_tasks(2, 5, 1, 1, generator), 64, 3)
    sentences = token_tasks(2, 5, 1, 2, 32, generator)
    text = text_tasks(2, 4, 16, generator)
    models = [
        ("3", "Omniglot-shaped MAML, conv net, 4 tasks, 5 inner", omniglot_convnet, omniglot, 5),
        ("7", "ResNet-18-shaped, BatchNorm, 64 px, 2 tasks, 3 inner", resnet18, images, 3),
        (
            "8",
            "BERT-tiny-shaped (transformers), 32 tokens, 2 tasks, 3 inner",
            bert_tiny,
            sentences,
            3,
        ),
        ("9", "LSTM language model, 4 x 16 tokens, 2 tasks, 3 inner", lstm_lm, text, 3),
    ]
    problems = []
    for key, title, build, tasks, steps in models:
        for suffix, (label, inner) in REAL_MODEL_INNER.items():
            if key == "3" and not suffix:
                continue  # workload 3 itself (inner SGD at lr 0.4) is defined above
            problems.append(
                MamlProblem(
                    key=key + suffix,
                    title=f"{title} {label} steps",
                    build_model=build,
                    tasks=_to(tasks, device),
                    loss=F.cross_entropy,
                    inner=inner,
                    inner_steps=steps,
                    device=device,
                    large=key != "3",
                    requires=("transformers",) if build is bert_tiny else (),
                    no_vmap=_NO_LSTM_VMAP if build is lstm_lm else "",
                )
            )
    return problems


def suite(device: str = "cpu", memory_steps: tuple[int, ...] = MEMORY_STEPS) -> list[Workload]:
    """Every workload, in report order."""
    timed = [
        Workload(
            "1",
            "maml",
            sinusoid_problem(
                "1",
                "Sinusoid MAML, MLP 1-40-40-1, 25 tasks, 5 inner SGD steps",
                SINUSOID_SGD,
                device,
            ),
        ),
        Workload(
            "2",
            "maml",
            sinusoid_problem(
                "2", "Sinusoid MAML, 25 tasks, 5 inner Adam steps", SINUSOID_ADAM, device
            ),
        ),
        Workload(
            "2b",
            "maml",
            sinusoid_problem(
                "2b",
                "Sinusoid MAML, 25 tasks, 5 inner SGD-momentum steps",
                SINUSOID_MOMENTUM,
                device,
            ),
        ),
        Workload("3", "maml", omniglot_problem(device)),
        Workload("4", "hyper", hyper_problem(device)),
        Workload("5", "setup", setup_problem(device)),
        Workload("5b", "setup", setup_problem(device, copy_initial_weights=False)),
    ]
    memory = [
        memory_problem(steps, first_order, device)
        for first_order in (False, True)
        for steps in memory_steps
    ]
    real = [Workload(p.key, "maml", p) for p in real_model_problems(device)]
    after_3 = next(i for i, w in enumerate(timed) if w.key == "3") + 1
    timed = timed[:after_3] + real[:2] + timed[after_3:] + real[2:]
    return timed + [Workload(p.key, "memory", p) for p in memory]
