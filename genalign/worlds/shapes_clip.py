"""A tiny CLIP for the shapes world, trained contrastively on rendered (image, caption) pairs.

The model is a plain transformers ``CLIPModel`` with a real CLIP BPE tokenizer, so it saves and loads like a
public CLIP checkpoint: ``rewards.clip_rewards.ClipScore(model=folder)`` reads it as the shapes world's
CLIP-score reward, and its text tower can condition a tiny text-to-image model.

Tokenizer. :func:`shapes_clip_tokenizer` rebuilds OpenAI CLIP's BPE vocabulary (``vocab.json`` +
``merges.txt``) offline from the ``bpe_simple_vocab_16e6.txt.gz`` that open_clip ships, in the order
open_clip's ``SimpleTokenizer`` builds it, so ids equal those of open_clip and of the public CLIP
tokenizers. Shapes captions with up to two shapes measured at most 33 tokens (start and end included) over
thousands of samples, so the default context is 40.

Loss. Symmetric InfoNCE with soft multi-positive targets: a batch often holds several pairs of the same
scene (few attributes, many samples), and plain InfoNCE would push those true matches apart as negatives.
Each row's target spreads its mass uniformly over every column whose scene is equal, where scenes compare
as a background plus an unordered set of shapes (shapes never overlap, so drawing order is invisible).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from . import shapes
from .shapes import Scene

# Pixels in [0, 1] map to [-1, 1]; written into preprocessor_config.json so every loader normalises alike.
IMAGE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
IMAGE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
DEFAULT_MAX_LENGTH = 40
# The caption template used for zero-shot attribute probes: one fixed wording, so only the attribute varies.
PROBE_TEMPLATE = 0
EVAL_SCENES = 512
# Number of BPE merges CLIP uses from the file (open_clip's SimpleTokenizer: 49152 - 256 - 2).
_CLIP_MERGES = 49152 - 256 - 2


def _byte_to_unicode_alphabet() -> list[str]:
    """The 256 printable stand-ins for raw bytes, in the byte order CLIP's vocabulary starts with."""
    from open_clip.tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def shapes_clip_tokenizer(model_max_length: int = DEFAULT_MAX_LENGTH) -> CLIPTokenizer:
    """OpenAI CLIP's BPE tokenizer (49,408 tokens) as a transformers ``CLIPTokenizer``, built offline.

    The vocabulary order is open_clip's: bytes, bytes + ``</w>``, one token per merge, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (also the pad token, as in public CLIP checkpoints).
    """
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : _CLIP_MERGES + 1]  # line 0 is the version header
    alphabet = _byte_to_unicode_alphabet()
    tokens = alphabet + [ch + "</w>" for ch in alphabet] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = os.path.join(tmp, "vocab.json")
        merges_file = os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump({token: i for i, token in enumerate(tokens)}, f)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=model_max_length)


def tiny_clip_config(
    tokenizer: CLIPTokenizer | None = None,
    *,
    image_size: int = 32,
    hidden: int = 64,
    layers: int = 2,
    patch: int = 4,
    projection: int = 64,
) -> CLIPConfig:
    """A small ``CLIPConfig``: both towers ``layers`` deep and ``hidden`` wide with 4 heads.

    The vision tower sees (image_size / patch)^2 patches plus a class token; the text tower's context is
    the tokenizer's ``model_max_length`` and its vocabulary the tokenizer's (default:
    :func:`shapes_clip_tokenizer`).
    """
    tokenizer = tokenizer or shapes_clip_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        # Pooling reads the first end-of-text token; with pad == eos that is the caption's own end.
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
        num_channels=3,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


def _normalise_pixels(images: Tensor) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> the same shape normalised with IMAGE_MEAN / IMAGE_STD."""
    mean = torch.tensor(IMAGE_MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def image_embeddings(model: CLIPModel, images: Tensor) -> Tensor:
    """[B, 3, H, W] images in [0, 1] -> [B, projection] unit-norm image embeddings."""
    # Written out rather than get_image_features, whose return type differs across transformers versions.
    pooled = model.vision_model(pixel_values=_normalise_pixels(images)).pooler_output
    return F.normalize(model.visual_projection(pooled), dim=-1)


def text_embeddings(model: CLIPModel, tokenizer: CLIPTokenizer, texts: Sequence[str]) -> Tensor:
    """B captions -> [B, projection] unit-norm text embeddings."""
    tokens = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    pooled = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
    return F.normalize(model.text_projection(pooled), dim=-1)


def _scene_key(scene: Scene) -> tuple[str, frozenset]:
    # Shapes never overlap, so their order does not change the picture: compare them as a set.
    return scene.background, frozenset(scene.shapes)


def _same_scene(scenes: Sequence[Scene]) -> Tensor:
    """B scenes -> bool [B, B], True where two scenes look identical (the diagonal included)."""
    keys = [_scene_key(s) for s in scenes]
    ids = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    index = torch.tensor([ids[k] for k in keys])
    return index[:, None] == index[None, :]


def soft_clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, positives: Tensor) -> Tensor:
    """Symmetric InfoNCE with multi-positive targets.

    Args:
        image_emb, text_emb: [B, D] unit-norm embeddings of matching pairs (row i with row i).
        logit_scale: scalar log temperature (the logits are ``exp(logit_scale) * cosine``).
        positives: bool [B, B]; True where image i and caption j describe the same scene.

    Returns:
        Scalar: mean of the image->text and text->image cross-entropies against targets that share each
        row's mass equally among its positives.
    """
    logits = logit_scale.exp().clamp(max=100.0) * image_emb @ text_emb.T
    targets = positives.float() / positives.sum(dim=1, keepdim=True)
    # positives is symmetric, so the same targets serve the transposed (text->image) logits.
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def _batch(
    n: int, rng: np.random.Generator, image_size: int, max_shapes: int
) -> tuple[Tensor, list[str], list[Scene]]:
    scenes = shapes.sample_scenes(n, rng=rng, max_shapes=max_shapes)
    captions = [shapes.caption(scene, rng=rng) for scene in scenes]
    return shapes.render(scenes, size=image_size).images, captions, scenes


def _attribute_options(scene: Scene, attribute: str) -> list[str]:
    # Colours exclude the background's own name, as sample_scenes never draws them.
    if attribute == "colour":
        return [c for c in shapes.COLOURS if c != scene.background]
    return list({"shape": shapes.SHAPES, "size": shapes.SIZES, "position": shapes.POSITIONS}[attribute])


@torch.no_grad()
def evaluate_shapes_clip(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    *,
    seed: int,
    image_size: int = 32,
    max_shapes: int = 2,
    group: int = 64,
    n: int = EVAL_SCENES,
) -> dict[str, float]:
    """Retrieval and zero-shot attribute accuracy on ``n`` scenes drawn with ``seed``.

    Retrieval is top-1 within groups of ``group`` pairs (chance about 1 / group); a pick counts as right
    when its scene equals the query's. Attribute probes use the single-shape scenes only: the candidates
    are fixed-template captions of the scene with that one attribute changed to each possible value.

    Returns:
        ``text_to_image_top1``, ``image_to_text_top1``, ``retrieval_chance`` and, per attribute in
        colour / shape / size / position, ``probe_<attribute>`` with its ``probe_<attribute>_chance``.
    """
    was_training = model.training
    model.eval()
    images, captions, scenes = _batch(n, np.random.default_rng(seed), image_size, max_shapes)
    image_emb = image_embeddings(model, images)
    text_emb = text_embeddings(model, tokenizer, captions)
    hits = {"text_to_image_top1": 0.0, "image_to_text_top1": 0.0}
    for start in range(0, n, group):
        sim = image_emb[start : start + group] @ text_emb[start : start + group].T
        same = _same_scene(scenes[start : start + group])
        rows = torch.arange(sim.shape[0])
        hits["image_to_text_top1"] += same[rows, sim.argmax(dim=1)].float().sum().item()
        hits["text_to_image_top1"] += same[sim.argmax(dim=0), rows].float().sum().item()
    metrics = {name: value / n for name, value in hits.items()}
    metrics["retrieval_chance"] = 1.0 / group

    single = [i for i, s in enumerate(scenes) if len(s.shapes) == 1]
    for attribute in ("colour", "shape", "size", "position"):
        correct, chance = 0, 0.0
        for i in single:
            scene = scenes[i]
            options = _attribute_options(scene, attribute)
            prompts = [
                shapes.caption(
                    replace(scene, shapes=(replace(scene.shapes[0], **{attribute: value}),)),
                    rng=np.random.default_rng(0),  # unused with a fixed template
                    template=PROBE_TEMPLATE,
                )
                for value in options
            ]
            scores = text_embeddings(model, tokenizer, prompts) @ image_emb[i]
            correct += options[int(scores.argmax())] == getattr(scene.shapes[0], attribute)
            chance += 1.0 / len(options)
        metrics[f"probe_{attribute}"] = correct / max(len(single), 1)
        metrics[f"probe_{attribute}_chance"] = chance / max(len(single), 1)
    model.train(was_training)
    return metrics


def train_shapes_clip(
    *,
    steps: int,
    batch_size: int = 64,
    image_size: int = 32,
    max_shapes: int = 2,
    lr: float = 1e-3,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    patch: int = 4,
    eval_scenes: int = EVAL_SCENES,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[CLIPModel, CLIPTokenizer, dict[str, float]]:
    """Train a tiny CLIP from scratch on freshly rendered shapes batches.

    Every step draws ``batch_size`` new scenes (1..max_shapes shapes) with random-template captions and
    takes one AdamW step on :func:`soft_clip_loss` (learnable logit scale), with a linear warm-up over the
    first 10% of steps and cosine decay after; ``progress(step, loss)`` is called after every step. Torch's
    global RNG is forked, so the caller's stays as it was.

    Returns:
        ``(model in eval mode, tokenizer, metrics)``: metrics from :func:`evaluate_shapes_clip` on
        ``eval_scenes`` held-out scenes of ``seed + 1``, plus ``final_loss`` (mean of the last 10% of steps) and
        ``train_seconds``.
    """
    tokenizer = shapes_clip_tokenizer()
    config = tiny_clip_config(tokenizer, image_size=image_size, hidden=hidden, layers=layers, patch=patch)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
        model.train()
        optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
        warmup = max(1, steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser,
            lambda t: min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)),
        )
        losses = []
        for step in range(steps):
            images, captions, scenes = _batch(batch_size, rng, image_size, max_shapes)
            loss = soft_clip_loss(
                image_embeddings(model, images),
                text_embeddings(model, tokenizer, captions),
                model.logit_scale,
                _same_scene(scenes),
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step, loss.item())
    train_seconds = time.perf_counter() - start
    model.eval()
    metrics = evaluate_shapes_clip(
        model, tokenizer, seed=seed + 1, image_size=image_size, max_shapes=max_shapes, group=batch_size,
        n=eval_scenes,
    )
    tail = losses[-max(1, steps // 10) :]
    metrics["final_loss"] = float(np.mean(tail)) if tail else float("nan")
    metrics["train_seconds"] = train_seconds
    return model, tokenizer, metrics


def save_shapes_clip(model: CLIPModel, tokenizer: CLIPTokenizer, folder: str | os.PathLike) -> None:
    """Write ``folder`` in the Hugging Face CLIP layout: weights + config, tokenizer files and a
    ``preprocessor_config.json`` whose size, crop and mean/std are those the model was trained with."""
    folder = os.fspath(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    size = model.config.vision_config.image_size
    CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": size},
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        resample=3,  # bicubic; a no-op at the native size, which is what the shapes world renders
    ).save_pretrained(folder)


def used_token_ids(tokenizer: CLIPTokenizer) -> set[int]:
    """Every token id a shapes-world caption can contain: all templates with every attribute value (both
    articles, the multi-shape joiner), plus the start and end tokens."""
    texts = [
        shapes.caption(
            Scene(shapes=(shapes.ShapeSpec(shape, colour, size, position),), background=background),
            rng=np.random.default_rng(0),  # unused with a fixed template
            template=template,
        )
        for template in range(len(shapes.TEMPLATES))
        for shape in shapes.SHAPES
        for colour in shapes.COLOURS
        for size in shapes.SIZES
        for position in shapes.POSITIONS
        for background in shapes.BACKGROUNDS
    ]
    texts.append(shapes._SHAPE_JOIN)
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    for row in tokenizer(texts)["input_ids"]:
        ids.update(row)
    return ids


@torch.no_grad()
def zero_unused_token_embeddings(model: CLIPModel, keep: set[int]) -> int:
    """Zero the text tower's token-embedding rows outside ``keep``; returns how many rows were zeroed.

    No world caption ever reads those rows, so training never moved them from their random start (weight
    decay aside) and zeroing them changes no shapes-world output. It makes the saved weights compress: the
    49,408-row vocabulary is most of the model's size.
    """
    weight = model.text_model.embeddings.token_embedding.weight
    unused = torch.ones(weight.shape[0], dtype=torch.bool)
    unused[sorted(keep)] = False
    weight[unused] = 0.0
    return int(unused.sum())
