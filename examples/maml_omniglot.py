"""Few-shot Omniglot classification with MAML: higher's flagship example, on higher_func.

The program is the one ``higher`` users know (a 4-block conv net with BatchNorm, 5 inner SGD
steps per task through ``innerloop_ctx(..., copy_initial_weights=False)``, an outer Adam),
with ``import higher_func as higher`` as its only change. It runs anywhere without a download:

* by default on synthetic Omniglot-shaped data: 28x28 "characters" drawn as a few random pen
  strokes, each class a new drawing and each example of it shifted and noised, N-way K-shot;
* with ``--data-dir DIR`` on real Omniglot images: every folder under DIR that holds image
  files is one character class (the layout of Omniglot's ``images_background/<alphabet>/
  <character>/*.png``). Needs Pillow. The first classes (sorted by path) meta-train, the rest
  (``--test-classes``) meta-test.

    python examples/maml_omniglot.py [--ways 5 --shots 1] [--data-dir omniglot/images_background]

It prints and plots (``--plot``) the query accuracy after adaptation on meta-training tasks
and on held-out classes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import HelpFormatter, progress, pyplot, write
from torch import Tensor, nn

import higher_func as higher

SIZE = 28
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--ways", type=int, default=5, help="classes per task (N-way)")
    parser.add_argument("--shots", type=int, default=1, help="support examples per class")
    parser.add_argument("--queries", type=int, default=5, help="query examples per class")
    parser.add_argument("--tasks", type=int, default=4, help="tasks per meta-batch")
    parser.add_argument("--iterations", type=int, default=80, help="meta-iterations")
    parser.add_argument("--inner-steps", type=int, default=5, help="inner SGD steps per task")
    parser.add_argument("--inner-lr", type=float, default=0.1, help="inner SGD learning rate")
    parser.add_argument("--meta-lr", type=float, default=3e-3, help="outer Adam learning rate")
    parser.add_argument("--channels", type=int, default=32, help="conv channels (higher: 64)")
    parser.add_argument("--eval-every", type=int, default=10, help="meta-test every N iterations")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder of Omniglot images")
    parser.add_argument("--test-classes", type=int, default=423, help="held-out real classes")
    parser.add_argument("--plot", default="maml_omniglot.png", help="accuracy curve file")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run (CI)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.iterations, args.tasks, args.channels, args.eval_every = 2, 2, 8, 1
        args.queries, args.inner_steps = 2, 2
    return args


# --------------------------------------------------------------------------- data


class SyntheticCharacters:
    """Omniglot-shaped tasks from random pen strokes, hard enough that learning shows.

    The classes of a task are characters of one "alphabet": they share two strokes and
    differ in one stroke of their own. Every drawing of a character moves each stroke end
    by up to 1.5 pixels, shifts the whole by up to 3 pixels and adds strong pixel noise,
    so one example of a class is a poor match for another: a random network's 5-step
    adaptation starts near chance, and meta-learning visibly improves it.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def strokes(self, count: int) -> Tensor:
        """``count`` random strokes, as ``(count, 2 ends, 2 coordinates)``."""
        return torch.rand(count, 2, 2, generator=self.generator) * (SIZE - 8) + 4

    def draw(self, strokes: Tensor) -> Tensor:
        """One 28x28 drawing of ``strokes``, each end jittered, shifted, with pixel noise."""
        image = torch.zeros(SIZE, SIZE)
        jittered = strokes + 1.5 * (2 * torch.rand(strokes.shape, generator=self.generator) - 1)
        t = torch.linspace(0, 1, 40).unsqueeze(1)
        for start, end in jittered:
            points = (start + t * (end - start)).round().long().clamp(0, SIZE - 1)
            image[points[:, 0], points[:, 1]] = 1.0
        dy, dx = torch.randint(-3, 4, (2,), generator=self.generator).tolist()
        noise = 0.4 * torch.randn(SIZE, SIZE, generator=self.generator)
        return torch.roll(image, (dy, dx), dims=(0, 1)) + noise

    def task(self, ways: int, count: int, train: bool) -> Tensor:
        """``(ways, count, 1, 28, 28)`` images (``train`` is irrelevant: classes never repeat)."""
        shared = self.strokes(2)
        classes = []
        for _ in range(ways):
            character = torch.cat([shared, self.strokes(1)])
            classes.append(torch.stack([self.draw(character) for _ in range(count)]))
        return torch.stack(classes).unsqueeze(2)


class ImageFolderCharacters:
    """Omniglot images from disk: each folder holding images is a class (Pillow needed)."""

    def __init__(self, root: Path, test_classes: int, generator: torch.Generator) -> None:
        classes = load_classes(root)
        if len(classes) < 2:
            raise ValueError(
                f"--data-dir {root} holds {len(classes)} image folder(s); expected one folder "
                f"per character class (e.g. omniglot/images_background/<alphabet>/<character>)."
            )
        test_classes = min(test_classes, len(classes) // 2)
        self.train_classes, self.test_classes = classes[:-test_classes], classes[-test_classes:]
        self.generator = generator
        print(
            f"read {len(classes)} classes from {root}: {len(self.train_classes)} to meta-train, "
            f"{len(self.test_classes)} held out"
        )

    def task(self, ways: int, count: int, train: bool) -> Tensor:
        pool = self.train_classes if train else self.test_classes
        if len(pool) < ways:
            raise ValueError(f"{len(pool)} classes available for {ways}-way tasks; lower --ways.")
        picked = torch.randperm(len(pool), generator=self.generator)[:ways].tolist()
        images = []
        for c in picked:
            if len(pool[c]) < count:
                raise ValueError(
                    f"a class has {len(pool[c])} images, fewer than --shots + --queries = {count}."
                )
            order = torch.randperm(len(pool[c]), generator=self.generator)[:count]
            images.append(pool[c][order])
        return torch.stack(images)


def load_classes(root: Path) -> list[Tensor]:
    """One ``(images, 1, 28, 28)`` tensor per folder of images under ``root``, ink as 1."""
    try:
        from PIL import Image
    except ImportError as error:
        raise SystemExit("--data-dir needs Pillow to read images: pip install pillow") from error
    folders = sorted({p.parent for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES})
    classes = []
    for folder in folders:
        images = []
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                image = Image.open(file).convert("L").resize((SIZE, SIZE))
                pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
                images.append(1.0 - pixels.view(1, SIZE, SIZE).float() / 255.0)
        classes.append(torch.stack(images))
    return classes


def split(images: Tensor, shots: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(ways, shots + queries, ...)`` images -> support/query inputs and labels."""
    ways, count = images.shape[:2]
    labels = torch.arange(ways).unsqueeze(1).expand(ways, count)
    x_support, x_query = images[:, :shots].flatten(0, 1), images[:, shots:].flatten(0, 1)
    y_support, y_query = labels[:, :shots].flatten(), labels[:, shots:].flatten()
    return x_support, y_support, x_query, y_query


# --------------------------------------------------------------------------- model and MAML


def make_net(ways: int, channels: int) -> nn.Sequential:
    """higher's Omniglot net: 3 x (conv 3x3, BatchNorm, ReLU, max-pool), then a linear head."""

    def block(in_channels: int) -> list[nn.Module]:
        return [
            nn.Conv2d(in_channels, channels, 3),
            nn.BatchNorm2d(channels, momentum=1.0, affine=True),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
        ]

    return nn.Sequential(
        *block(1), *block(channels), *block(channels), nn.Flatten(), nn.Linear(channels, ways)
    )


def adapt_and_query(
    net: nn.Module,
    inner_opt: torch.optim.Optimizer,
    task: tuple,
    args: argparse.Namespace,
    meta: bool,
) -> tuple[Tensor, float]:
    """Adapt to the support set, then return the query loss and accuracy.

    ``meta=True`` keeps the graph through the inner steps so the query loss back-propagates
    into ``net``; ``meta=False`` (meta-testing) keeps no graph at all.
    """
    x_support, y_support, x_query, y_query = task
    with higher.innerloop_ctx(
        net, inner_opt, copy_initial_weights=False, track_higher_grads=meta
    ) as (fnet, diffopt):
        for _ in range(args.inner_steps):
            diffopt.step(nn.functional.cross_entropy(fnet(x_support), y_support))
        logits = fnet(x_query)
        loss = nn.functional.cross_entropy(logits, y_query)
    accuracy = (logits.argmax(1) == y_query).float().mean().item()
    return loss, accuracy


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    if args.data_dir is None:
        data = SyntheticCharacters(generator)
    else:
        data = ImageFolderCharacters(args.data_dir, args.test_classes, generator)
    net = make_net(args.ways, args.channels)
    meta_opt = torch.optim.Adam(net.parameters(), lr=args.meta_lr)
    inner_opt = torch.optim.SGD(net.parameters(), lr=args.inner_lr)
    count = args.shots + args.queries
    # BatchNorm with momentum 1 and batch statistics in both phases, as in higher's example.
    net.train()
    train_curve, test_curve = [], []
    for iteration in progress(range(args.iterations), desc="meta-iterations"):
        meta_opt.zero_grad()
        accuracies = []
        for _ in range(args.tasks):
            task = split(data.task(args.ways, count, train=True), args.shots)
            loss, accuracy = adapt_and_query(net, inner_opt, task, args, meta=True)
            (loss / args.tasks).backward()
            accuracies.append(accuracy)
        meta_opt.step()
        train_curve.append(sum(accuracies) / len(accuracies))
        if (iteration + 1) % args.eval_every == 0 or iteration + 1 == args.iterations:
            test_curve.append((iteration, meta_test(net, inner_opt, data, args)))
            write(
                f"iteration {iteration:4d}  train query accuracy {train_curve[-1]:.3f}  "
                f"held-out query accuracy {test_curve[-1][1]:.3f}"
            )
    plot(train_curve, test_curve, args)


def meta_test(net: nn.Module, inner_opt: torch.optim.Optimizer, data, args) -> float:
    """Mean query accuracy after adaptation on ``4 * --tasks`` tasks of held-out classes."""
    accuracies = []
    for _ in range(4 * args.tasks):
        task = split(data.task(args.ways, args.shots + args.queries, train=False), args.shots)
        accuracies.append(adapt_and_query(net, inner_opt, task, args, meta=False)[1])
    return sum(accuracies) / len(accuracies)


def plot(train_curve: list[float], test_curve: list[tuple[int, float]], args) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(train_curve, alpha=0.3, color="C0", label="meta-train tasks")
    window = min(10, len(train_curve))
    smooth = torch.tensor(train_curve).unfold(0, window, 1).mean(1).tolist()
    ax.plot(range(window - 1, len(train_curve)), smooth, color="C0", label=f"mean of {window}")
    ax.plot(*zip(*test_curve, strict=True), "o-", color="C1", label="held-out tasks")
    ax.axhline(1 / args.ways, color="gray", linestyle=":", label="chance")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("query accuracy after adaptation")
    ax.set_title(f"MAML, {args.ways}-way {args.shots}-shot characters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
