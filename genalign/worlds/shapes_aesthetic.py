"""The shapes world's aesthetic-style head: an MLP on the tiny CLIP's image embeddings, trained on a rule.

This mirrors the LAION improved aesthetic predictor, an MLP on L2-normalised CLIP ViT-L/14 image embeddings
regressing human ratings on a 1-10 scale. Here the ratings come from :func:`aesthetic_rule`, a fixed
"composition quality" score of the scene, so how well the head (and a generator tuned on it) does can be
checked against the rule itself. The head has exactly the released layout
(:class:`rewards.clip_rewards.AestheticHead`, state-dict keys ``layers.0.weight`` ... ``layers.7.bias``),
and ``rewards.clip_rewards.ClipAesthetic(model=clip_folder, head=head_folder)`` loads it as a reward.

The rule (version 1). Every term is in [0, 1] and reads only what the CLIP sees: positions, sizes,
colours and the background. For shape i of a scene:

* ``p_i`` is its centre relative to the image centre in image-side units: each coordinate is
  ``(cell + 0.5) / 3 - 0.5``, i.e. -1/3, 0 or 1/3 (x from column, y from row of POSITIONS);
* ``m_i = SIZE_FRACTION[size] ** 2`` is its visual weight (proportional to the area of its bounding
  square, so a large shape weighs 2.56 times a small one);
* ``k_i = 0.5 * |Y(colour) - Y(background)| + 0.5 * ||rgb(colour) - rgb(background)|| / sqrt(3)`` is its
  contrast with the background, from COLOUR_RGB and BACKGROUND_RGB, with Rec. 709 luma
  ``Y = 0.2126 R + 0.7152 G + 0.0722 B``: half luminance contrast, half colour distance.

Scene terms:

* balance ``B = 1 - ||sum_i m_i p_i / sum_i m_i|| / (sqrt(2) / 3)``: 1 when the visual-weight centroid is
  the image centre (one centred shape, or shapes placed symmetrically about the centre, such as equal
  shapes left and right), 0 when it sits on a corner cell's centre, the farthest it can be;
* contrast ``K = sum_i m_i k_i / sum_i m_i``: the weight-averaged contrast;
* size ``S`` = the fraction of the scene's shapes that are large.

``score = 1 + 9 * (0.45 * B + 0.40 * K + 0.15 * S)``, in [1, 10] like LAION's rating scale. A large white
shape centred on black scores 10; the same shape in a corner 5.95; a large black shape centred on dark
blue, where contrast is poor, 7.05.

What the head can learn is capped by the CLIP, as a real aesthetic head inherits its CLIP's blind spots.
Measured on held-out scenes with tiny CLIPs of 150 x 32 and 600 x 64 training steps: a least-squares fit on
the embeddings reaches pearson 0.58 / 0.59 with the score; per term, contrast 0.91 / 0.96, size 0.46 / 0.64
but balance only 0.23 / 0.29, because these embeddings hardly encode grid position (an MLP probe finds a
single shape's cell 21% / 23% of the time, chance 11%). The head is therefore a proxy that sees contrast and
size but little of the composition, and the rule measures what tuning on it misses.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor
from transformers import CLIPModel

from genalign.worlds.schedules import warmup_cosine
from genalign.worlds.shapes import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZE_FRACTION,
    SIZES,
    Scene,
    render,
    sample_scenes,
    vocabularies,
)
from genalign.worlds.shapes_clip import image_embeddings
from genalign.worlds.aesthetic_heads import load_head, save_head
from rewards.clip_rewards import AestheticHead

RULE_NAME = "shapes_composition"
RULE_VERSION = 1
# Term weights of the rule; they sum to 1, so the score spans [SCORE_MIN, SCORE_MAX].
RULE_WEIGHTS: dict[str, float] = {"balance": 0.45, "contrast": 0.40, "size": 0.15}
SCORE_MIN, SCORE_MAX = 1.0, 10.0
LUMA = (0.2126, 0.7152, 0.0722)  # Rec. 709
HELD_OUT_SCENES = 1000

_MAX_CENTROID_DISTANCE = math.sqrt(2) / 3  # a corner cell's centre


def _luma(rgb: tuple[float, float, float]) -> float:
    return sum(w * c for w, c in zip(LUMA, rgb, strict=True))


def _contrast(colour: str, background: str) -> float:
    """k in [0, 1]: half luma difference, half RGB distance (normalised by the cube's diagonal)."""
    shape_rgb, background_rgb = COLOUR_RGB[colour], BACKGROUND_RGB[background]
    luma = abs(_luma(shape_rgb) - _luma(background_rgb))
    distance = math.dist(shape_rgb, background_rgb) / math.sqrt(3)
    return 0.5 * luma + 0.5 * distance


def _offset(position: str) -> tuple[float, float]:
    """(x, y) of a grid cell's centre relative to the image centre, in image-side units."""
    row, column = divmod(POSITIONS.index(position), 3)
    return (column + 0.5) / 3 - 0.5, (row + 0.5) / 3 - 0.5


def rule_terms(scene: Scene) -> dict[str, float]:
    """The rule's three terms of one scene, each in [0, 1]: ``balance``, ``contrast`` and ``size``."""
    weights = [SIZE_FRACTION[spec.size] ** 2 for spec in scene.shapes]
    total = sum(weights)
    offsets = [_offset(spec.position) for spec in scene.shapes]
    centroid_x = sum(w * x for w, (x, _) in zip(weights, offsets, strict=True)) / total
    centroid_y = sum(w * y for w, (_, y) in zip(weights, offsets, strict=True)) / total
    contrast = sum(w * _contrast(spec.colour, scene.background) for w, spec in zip(weights, scene.shapes, strict=True))
    return {
        # max(): at a corner the ratio is 1 up to rounding, which must not push the term below 0.
        "balance": max(0.0, 1.0 - math.hypot(centroid_x, centroid_y) / _MAX_CENTROID_DISTANCE),
        "contrast": contrast / total,
        "size": sum(spec.size == "large" for spec in scene.shapes) / len(scene.shapes),
    }


def aesthetic_rule(scenes: Sequence[Scene]) -> Tensor:
    """B scenes -> float32 [B] composition scores in [1, 10] (the rule in the module docstring)."""
    quality = [sum(RULE_WEIGHTS[name] * value for name, value in rule_terms(scene).items()) for scene in scenes]
    return SCORE_MIN + (SCORE_MAX - SCORE_MIN) * torch.tensor(quality, dtype=torch.float32)


@torch.no_grad()
def evaluate_aesthetic_head(
    head: AestheticHead,
    clip_model: CLIPModel,
    *,
    seed: int,
    max_shapes: int = 2,
    image_size: int = 32,
    n: int = HELD_OUT_SCENES,
) -> dict[str, float]:
    """How well the head reproduces the rule on ``n`` scenes drawn with ``seed``.

    Returns ``pearson`` and ``spearman`` correlations of prediction with rule, the ``mse``, and
    ``rule_std`` (the rule's standard deviation: the RMSE of always predicting its mean, to read mse against).
    """
    scenes = sample_scenes(n, rng=np.random.default_rng(seed), max_shapes=max_shapes)
    target = aesthetic_rule(scenes)
    was_training = head.training
    head.eval()
    predicted = head(image_embeddings(clip_model, render(scenes, size=image_size).images))
    head.train(was_training)
    return {
        "pearson": float(stats.pearsonr(predicted.numpy(), target.numpy()).statistic),
        "spearman": float(stats.spearmanr(predicted.numpy(), target.numpy()).statistic),
        "mse": F.mse_loss(predicted, target).item(),
        "rule_std": target.std().item(),
    }


def train_aesthetic_head(
    clip_model: CLIPModel,
    *,
    steps: int,
    batch_size: int = 256,
    seed: int = 0,
    max_shapes: int = 2,
    image_size: int = 32,
    lr: float = 1e-3,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[AestheticHead, dict[str, float]]:
    """Regress :func:`aesthetic_rule` from the frozen CLIP's image embeddings with the LAION head layout.

    Every step renders ``batch_size`` new scenes (1..max_shapes shapes, image_size pixels), embeds them with
    the CLIP under no_grad (it is never updated) and takes one Adam step on the MSE, as the LAION predictor
    was trained; dropout is on while training, as in its layout. The learning rate warms up linearly over the
    first 5% of steps and decays with a cosine to zero; ``progress(step, loss)`` is called after every step. Seeded: the same arguments give the same weights, and
    the caller's global torch RNG is left untouched.

    Returns:
        ``(head in eval mode, metrics)``: :func:`evaluate_aesthetic_head` on 1,000 scenes of ``seed + 1``
        plus ``train_seconds``.
    """
    rng = np.random.default_rng(seed)
    was_training = clip_model.training
    clip_model.eval()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AestheticHead(clip_model.config.projection_dim)
        head.train()
        optimiser = torch.optim.Adam(head.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(steps))
        for step in range(steps):
            scenes = sample_scenes(batch_size, rng=rng, max_shapes=max_shapes)
            with torch.no_grad():
                embeddings = image_embeddings(clip_model, render(scenes, size=image_size).images)
            loss = F.mse_loss(head(embeddings), aesthetic_rule(scenes))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            if progress is not None:
                progress(step, loss.item())
    train_seconds = time.perf_counter() - start
    head.eval()
    metrics = evaluate_aesthetic_head(head, clip_model, seed=seed + 1, max_shapes=max_shapes, image_size=image_size)
    clip_model.train(was_training)
    metrics["train_seconds"] = train_seconds
    return head, metrics


def save_aesthetic_head(head: AestheticHead, folder: str | os.PathLike) -> Path:
    """Write the head with this world's rule and vocabularies (see `genalign.worlds.aesthetic_heads.save_head`)."""
    rule = {"name": RULE_NAME, "version": RULE_VERSION, "weights": RULE_WEIGHTS}
    return save_head(head, folder, rule, vocabularies())


def load_aesthetic_head(folder: str | os.PathLike) -> AestheticHead:
    """Rebuild a head written by :func:`save_aesthetic_head` (on the CPU, in eval mode); a head of another rule
    or world is a ValueError."""
    return load_head(folder, RULE_NAME, RULE_VERSION, vocabularies(), "shapes", "train_aesthetic_head")
