"""The shapes world's gold judge: a per-cell attribute classifier that no reward uses.

A fine-tuned generator's image has no ground-truth scene, so gold evaluation parses the prompt back into the
scene it asks for (:func:`genalign.worlds.shapes.parse_caption`) and checks the image against it with a
classifier trained here on the renderer's own pixels. Keeping this classifier separate from every reward
model means a generator cannot score well on the gold metric by exploiting the reward it was tuned on.

Per-cell formulation. Shapes sit centred in distinct cells of a 3x3 grid, so one scene of any shape count is
exactly described by, for each of the 9 cells (row-major, the order of POSITIONS): its shape (``none`` or one
of SHAPES), and where it holds one, its colour and size; plus one background for the whole image. The
classifier predicts all of that at once, which handles single- and multi-shape scenes alike.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from genalign.worlds.schedules import warmup_cosine
from genalign.worlds.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    parse_caption,
    render,
    sample_scenes,
    vocabularies,
)

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: colour and size of an empty cell are undefined
CELL_SHAPES: tuple[str, ...] = ("none", *SHAPES)  # per-cell shape classes; 0 = empty cell
WORKING_SIZE = 48  # every input is resized to this: 16 pixels per grid cell, so cells align with the features
HELD_OUT_SCENES = 1000

_WEIGHTS_FILE = "judge.safetensors"
_CONFIG_FILE = "judge.json"


def scene_targets(scenes: Sequence[Scene]) -> dict[str, Tensor]:
    """Per-cell class indices of B scenes.

    Returns long tensors: ``shape`` [B, 9] (index into CELL_SHAPES, 0 = empty), ``colour`` [B, 9] (index into
    COLOURS) and ``size`` [B, 9] (index into SIZES), both IGNORE_INDEX in empty cells, and ``background`` [B]
    (index into BACKGROUNDS). Cells are in the order of POSITIONS. A colour, size or background a scene leaves
    unspecified (None, as in a short prompt's scene) is IGNORE_INDEX too.
    """
    batch = len(scenes)
    cells = len(POSITIONS)
    shape = torch.zeros(batch, cells, dtype=torch.long)
    colour = torch.full((batch, cells), IGNORE_INDEX, dtype=torch.long)
    size = torch.full((batch, cells), IGNORE_INDEX, dtype=torch.long)
    for b, scene in enumerate(scenes):
        for spec in scene.shapes:
            cell = POSITIONS.index(spec.position)
            # One label per cell cannot describe two shapes in it; the renderer never produces that either.
            if shape[b, cell] != 0:
                raise ValueError(f"scene {b} has two shapes at {spec.position!r}")
            shape[b, cell] = CELL_SHAPES.index(spec.shape)
            colour[b, cell] = IGNORE_INDEX if spec.colour is None else COLOURS.index(spec.colour)
            size[b, cell] = IGNORE_INDEX if spec.size is None else SIZES.index(spec.size)
    background = torch.tensor(
        [IGNORE_INDEX if s.background is None else BACKGROUNDS.index(s.background) for s in scenes], dtype=torch.long
    )
    return {"shape": shape, "colour": colour, "size": size, "background": background}


def _block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    # GroupNorm rather than BatchNorm: predictions then do not depend on train/eval mode or batch makeup.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.GroupNorm(min(8, out_channels), out_channels),
        nn.SiLU(),
    )


class AttributeClassifier(nn.Module):
    """Small CNN predicting each grid cell's shape/colour/size and the image's background.

    Input: images [B, 3, H, W] in [0, 1], H = W (16, 32 and 64 all work); they are resized to 48x48 so each
    grid cell covers exactly 2x2 positions of the final 6x6 feature map, which is average-pooled to one
    feature vector per cell. The per-cell heads are 1x1 convolutions, i.e. shared by all nine cells: a shape
    looks the same wherever it is, so every cell of every image trains the same head.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width = width
        self.features = nn.Sequential(
            _block(3, width, 1),  # 48x48
            _block(width, 2 * width, 2),  # 24x24
            _block(2 * width, 4 * width, 2),  # 12x12
            _block(4 * width, 4 * width, 2),  # 6x6; receptive field 17 px, about one cell
            _block(4 * width, 4 * width, 1),  # 6x6; context from neighbouring cells, e.g. the background
        )
        channels = 4 * width
        self.cell_hidden = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.SiLU())
        self.shape_head = nn.Conv2d(channels, len(CELL_SHAPES), 1)
        self.colour_head = nn.Conv2d(channels, len(COLOURS), 1)
        self.size_head = nn.Conv2d(channels, len(SIZES), 1)
        self.background_head = nn.Linear(channels, len(BACKGROUNDS))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images [B, 3, H, W] -> logits: shape [B, 9, 6], colour [B, 9, 8], size [B, 9, 2], background [B, 4]."""
        # Generator outputs may overshoot [0, 1] slightly; the renderer's never do.
        x = images.clamp(0.0, 1.0)
        if x.shape[-1] != WORKING_SIZE or x.shape[-2] != WORKING_SIZE:
            x = F.interpolate(
                x, size=(WORKING_SIZE, WORKING_SIZE), mode="bilinear", antialias=True, align_corners=False
            )
        features = self.features(x)
        cells = self.cell_hidden(F.adaptive_avg_pool2d(features, 3))  # [B, C, 3, 3]

        def per_cell(head: nn.Conv2d) -> Tensor:
            return head(cells).flatten(2).transpose(1, 2)  # [B, 9, classes], cells row-major like POSITIONS

        return {
            "shape": per_cell(self.shape_head),
            "colour": per_cell(self.colour_head),
            "size": per_cell(self.size_head),
            "background": self.background_head(features.mean(dim=(2, 3))),
        }

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """images [B, 3, H, W] -> long class indices: shape/colour/size [B, 9], background [B].

        Indices are into CELL_SHAPES, COLOURS, SIZES and BACKGROUNDS; colour and size are always filled in but
        only mean something where shape != 0.
        """
        logits = self(images.to(next(self.parameters()).device, torch.float32))
        return {name: value.argmax(dim=-1) for name, value in logits.items()}


def _loss(logits: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
    """Sum of the four cross-entropies; empty cells' colour and size are skipped through IGNORE_INDEX."""
    return sum(
        F.cross_entropy(logits[name].reshape(-1, logits[name].shape[-1]), targets[name].reshape(-1))
        for name in ("shape", "colour", "size", "background")
    )


def _checks(model: AttributeClassifier, images: Tensor, scenes: Sequence[Scene]) -> dict[str, Tensor]:
    """Per-cell bool checks [B, 9] (``shape``, ``colour``, ``size``, ``present``: some shape in the cell,
    ``occupied``: the scene puts one there) and per-image ``background`` and ``all_correct`` [B].

    A colour, size or background the scene leaves unspecified (None) is not judged: it counts as correct."""
    if len(scenes) != len(images):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    predicted = {name: value.cpu() for name, value in model.predict(images).items()}
    target = scene_targets(scenes)
    occupied = target["shape"] != 0  # [B, 9]
    shape_ok = predicted["shape"] == target["shape"]
    # Occupied cells whose colour / size is IGNORE_INDEX are the unspecified ones (full captions have none).
    colour_ok = (predicted["colour"] == target["colour"]) | (occupied & (target["colour"] == IGNORE_INDEX))
    size_ok = (predicted["size"] == target["size"]) | (occupied & (target["size"] == IGNORE_INDEX))
    background_ok = (predicted["background"] == target["background"]) | (target["background"] == IGNORE_INDEX)
    # Per cell: an occupied cell must match in all three attributes, an empty one must be predicted empty.
    cell_ok = torch.where(occupied, shape_ok & colour_ok & size_ok, predicted["shape"] == 0)
    return {
        "shape": shape_ok,
        "colour": colour_ok,
        "size": size_ok,
        "present": predicted["shape"] != 0,
        "occupied": occupied,
        "background": background_ok,
        "all_correct": cell_ok.all(dim=1) & background_ok,
    }


def judge_scenes(model: AttributeClassifier, images: Tensor, scenes: Sequence[Scene]) -> dict[str, float | Tensor]:
    """Check B images [B, 3, H, W] against the B scenes they were meant to show.

    Returns floats, means over every intended shape of all scenes: ``shape`` (the right shape at its cell),
    ``colour``, ``size`` (the colour / size predicted at its cell), ``position`` (some shape at its cell);
    ``background`` (float, mean over images); and ``all_correct``: bool [B], True where every intended shape
    has the right shape, colour and size at its cell, the background is right and no cell the scene leaves
    empty holds a shape.
    """
    checks = _checks(model, images, scenes)
    occupied = checks["occupied"]

    def mean_over_shapes(correct: Tensor) -> float:
        return correct[occupied].float().mean().item()

    return {
        "shape": mean_over_shapes(checks["shape"]),
        "colour": mean_over_shapes(checks["colour"]),
        "size": mean_over_shapes(checks["size"]),
        "position": mean_over_shapes(checks["present"]),
        "background": checks["background"].float().mean().item(),
        "all_correct": checks["all_correct"],
    }


def judge_images(model: AttributeClassifier, images: Tensor, scenes: Sequence[Scene]) -> dict[str, Tensor]:
    """Per-image verdicts, float [B] each: ``shape``, ``colour``, ``size``, ``position`` (each the fraction
    of the image's intended shapes that pass, as in :func:`judge_scenes`), ``background`` and
    ``all_correct`` (0 or 1)."""
    checks = _checks(model, images, scenes)
    occupied = checks["occupied"].float()
    count = occupied.sum(dim=1).clamp(min=1)

    def per_image(correct: Tensor) -> Tensor:
        return (correct.float() * occupied).sum(dim=1) / count

    return {
        "shape": per_image(checks["shape"]),
        "colour": per_image(checks["colour"]),
        "size": per_image(checks["size"]),
        "position": per_image(checks["present"]),
        "background": checks["background"].float(),
        "all_correct": checks["all_correct"].float(),
    }


def degrade_images(images: Tensor, max_noise: float = 0.05) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> the same, each image mixed with its 3x3 box blur by a random amount in
    [0, 1] and given Gaussian pixel noise of a random std in [0, max_noise] (torch's global RNG).

    A decoded latent is softer and noisier than a render; a judge that saw only crisp renders would mark
    correct but soft shapes wrong, which would read as the generator's fault.
    """
    batch = images.shape[0]
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(batch, 1, 1, 1)
    noise = torch.randn_like(images) * torch.rand(batch, 1, 1, 1) * max_noise
    return ((1 - mix) * images + mix * blurred + noise).clamp(0.0, 1.0)


def train_attribute_classifier(
    *,
    steps: int,
    batch_size: int = 128,
    size: int = 32,
    max_shapes: int = 3,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 16,
    degrade: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[AttributeClassifier, dict[str, float]]:
    """Train a judge on freshly rendered scenes (1..max_shapes shapes, size x size pixels) every step.

    Data are unlimited, so there is no overfitting to guard against and no epochs. AdamW with a short linear
    warm-up then cosine decay to zero. Seeded: the same arguments give the same weights, and the caller's
    global torch RNG is left untouched. With ``degrade``, training images are blurred and noised at random
    (:func:`degrade_images`), so the judge also reads a generator's softer images; ``progress(step, loss)``
    is called after every step. Returns the model (on the CPU) and :func:`judge_scenes`' accuracies on 1,000
    new clean scenes drawn with seed + 1, ``all_correct`` as its mean, plus ``train_seconds``.
    """
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AttributeClassifier(width=width)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
        for step in range(steps):
            scenes = sample_scenes(batch_size, rng=rng, max_shapes=max_shapes)
            images = render(scenes, size=size).images
            if degrade:
                images = degrade_images(images)
            loss = _loss(model(images), scene_targets(scenes))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if progress is not None:
                progress(step, loss.item())
    train_seconds = time.perf_counter() - start

    held_out = sample_scenes(HELD_OUT_SCENES, rng=np.random.default_rng(seed + 1), max_shapes=max_shapes)
    result = judge_scenes(model, render(held_out, size=size).images, held_out)
    metrics = {
        name: float(value.float().mean()) if isinstance(value, Tensor) else value for name, value in result.items()
    }
    metrics["train_seconds"] = train_seconds
    return model, metrics


def save_judge(model: AttributeClassifier, folder: str | os.PathLike) -> Path:
    """Write judge.safetensors and judge.json (architecture and class vocabularies) into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()},
        str(folder / _WEIGHTS_FILE),
    )
    config = {"width": model.width, "working_size": WORKING_SIZE, "vocabularies": _vocabularies()}
    (folder / _CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return folder


def load_judge(folder: str | os.PathLike) -> AttributeClassifier:
    """Rebuild a judge written by :func:`save_judge` (on the CPU)."""
    folder = Path(folder)
    config = json.loads((folder / _CONFIG_FILE).read_text())
    # A judge trained on other class lists would silently map its outputs to the wrong names.
    if config["vocabularies"] != _vocabularies() or config["working_size"] != WORKING_SIZE:
        raise ValueError(f"judge in {folder} was trained for a different shapes world")
    model = AttributeClassifier(width=config["width"])
    model.load_state_dict(load_file(str(folder / _WEIGHTS_FILE)))
    return model.eval()


def _vocabularies() -> dict[str, list[str]]:
    return {**vocabularies(), "shape": list(CELL_SHAPES)}


def scenes_from_prompts(prompts: Sequence[str]) -> list[Scene]:
    """The scenes B prompts ask for: full captions (:func:`~genalign.worlds.shapes.parse_caption`) or short
    prompts (:func:`~genalign.worlds.shapes_expansion.parse_short_caption`, size and background None, so not
    judged); raises ValueError naming the first prompt that is neither, since such a prompt has no gold answer."""
    from genalign.worlds.shapes_expansion import parse_short_caption

    scenes = []
    for prompt in prompts:
        scene = parse_caption(prompt) or parse_short_caption(prompt)
        if scene is None:
            raise ValueError(
                f"prompt {prompt!r} is not a shapes-world caption, so the gold judge cannot check it; use captions "
                "made by genalign.worlds.shapes.caption (e.g. configs/prompts/shapes_eval.txt) or short prompts "
                "made by genalign.worlds.shapes_expansion.short_caption (e.g. configs/prompts/shapes_short_eval.txt)"
            )
        scenes.append(scene)
    return scenes


class ShapesGold:
    """The shapes world's gold evaluator: ``gold(images, prompts)`` -> per-image verdicts (see
    :func:`judge_images`), judged against the scenes the prompts ask for (full captions or short prompts,
    whose unspecified size and background count as correct; see :func:`scenes_from_prompts`).

    Args:
        judge: folder written by :func:`save_judge` (e.g. ``genalign/worlds/assets/shapes/judge``).
    """

    def __init__(self, judge: str | os.PathLike) -> None:
        if not (Path(judge) / _CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"no shapes judge in '{judge}' (expected {_CONFIG_FILE}); pass the judge folder of a built shapes "
                "world, e.g. genalign/worlds/assets/shapes/judge, or build one with scripts/build_worlds.py shapes"
            )
        self.model = load_judge(judge)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """images [B, 3, H, W] in [0, 1] + B prompts -> name -> float [B] on the CPU."""
        return judge_images(self.model, images.detach(), scenes_from_prompts(prompts))
