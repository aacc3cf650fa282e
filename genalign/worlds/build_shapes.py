"""Build the whole shapes world from one seeded recipe, stage by stage, resumably.

Stages, in order, each written to its own subfolder of the world folder:

=========  ================================================================  ==================================
stage      what                                                              loaded back with
=========  ================================================================  ==================================
clip       tiny CLIP (CLIP-score reward, text encoder of the T2I model)      ``ClipScore(model=world/clip)``
judge      per-cell attribute classifier, the gold judge (no reward uses it)  ``load_judge(world/judge)``
aesthetic  aesthetic-style MLP head on the CLIP's image embeddings            ``ClipAesthetic(world/clip, ...)``
vae        AutoencoderKL, 32x32 <-> 8x8x8 (kept only until t2i is done)       ``AutoencoderKL.from_pretrained``
t2i        the text-to-image model as a diffusers folder                      ``DiffusionGenerator.from_pretrained``
pen        prompt-expansion network (Parrot): short prompt -> full caption    ``PromptExpansionNetwork.from_pretrained``
report     gold accuracy, CLIP score and aesthetic of the T2I model's samples  (numbers in world.json)
condition  per condition type (segmentation, edges, depth): a reward, an      ``controllability`` reward with
           evaluation and a noisy (few-scene) reward predictor (Ctrl-U)       ``predictor=world/condition/K/R``
controlnet per condition type, a base ControlNet trained on the T2I model     ``DiffusionGenerator.from_pretrained
           (decent but imperfect: what Ctrl-U fine-tunes)                     (world/t2i, controlnet=...)``
=========  ================================================================  ==================================

``world.json`` holds the recipe and each finished stage's metrics. A stage counts as done when it is listed
there and its folder exists, so an interrupted build resumes at the first unfinished stage; each stage
writes into a temporary folder that is renamed only when complete. A folder built with a different recipe
is refused rather than silently mixed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import read_partial_world, shapes, write_world_file

STAGES: tuple[str, ...] = ("clip", "judge", "aesthetic", "vae", "t2i", "pen", "report", "condition", "controlnet")


@dataclass(frozen=True)
class ShapesRecipe:
    """Every number the build depends on. ``full`` is the committed world; ``tiny`` is the test-sized one."""

    seed: int = 0
    clip_steps: int = 2000
    clip_batch: int = 64
    clip_hidden: int = 64
    clip_eval_scenes: int = 512
    judge_steps: int = 1500
    judge_batch: int = 64
    judge_width: int = 16
    aesthetic_steps: int = 400
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_width: int = 32
    unet_steps: int = 3500
    unet_batch: int = 32
    unet_width: int = 48
    unet_lr: float = 1e-3
    pen_steps: int = 4000
    pen_batch: int = 32
    pen_width: int = 64
    pen_layers: int = 2
    pen_lr: float = 5e-3
    # The report samples as the demo does: DDIM with eta = 1 (the stochastic policy RL trains), CFG.
    report_prompts: int = 128
    report_steps: int = 10
    report_guidance: float = 3.0
    report_eta: float = 1.0
    # Ctrl-U: condition predictors (reward, evaluation, noisy reward) and base ControlNets, per condition type.
    condition_steps: int = 600
    condition_eval_steps: int = 1200
    condition_noisy_scenes: int = 128
    condition_held_out: int = 512
    controlnet_steps: int = 800
    controlnet_batch: int = 32
    controlnet_lr: float = 1e-3
    controlnet_report_examples: int = 64


RECIPES: dict[str, ShapesRecipe] = {
    "full": ShapesRecipe(),
    "tiny": ShapesRecipe(
        clip_steps=3, clip_batch=8, clip_hidden=32, clip_eval_scenes=16,
        judge_steps=3, judge_batch=8, judge_width=8,
        aesthetic_steps=3,
        vae_steps=3, vae_batch=4, vae_width=8,
        unet_steps=3, unet_batch=4, unet_width=16,
        pen_steps=3, pen_batch=8, pen_width=16, pen_layers=1,
        report_prompts=4, report_steps=2,
        condition_steps=2, condition_eval_steps=2, condition_noisy_scenes=4, condition_held_out=4,
        controlnet_steps=2, controlnet_batch=4, controlnet_report_examples=2,
    ),  # fmt: skip
}


def shapes_prompts(n: int, *, seed: int, exclude: Sequence[str] = ()) -> list[str]:
    """n distinct single-shape captions (random scenes and templates), none of them in ``exclude``."""
    rng = np.random.default_rng(seed)
    taken = set(exclude)
    prompts: list[str] = []
    while len(prompts) < n:
        scene = shapes.sample_scenes(1, rng=rng, max_shapes=1)[0]
        text = shapes.caption(scene, rng=rng)
        if text not in taken:
            taken.add(text)
            prompts.append(text)
    return prompts


class _Bar:
    """One tqdm bar per stage, fed by the trainers' ``progress(step, loss)`` callbacks."""

    def __init__(self, desc: str, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc=desc, disable=not enabled, mininterval=1.0)

    def __call__(self, step: int, loss: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _stage_clip(recipe: ShapesRecipe, out: Path, world: Path, progress: bool) -> dict:
    from .shapes_clip import save_shapes_clip, train_shapes_clip, used_token_ids, zero_unused_token_embeddings

    bar = _Bar("clip", recipe.clip_steps, progress)
    model, tokenizer, metrics = train_shapes_clip(
        steps=recipe.clip_steps, batch_size=recipe.clip_batch, hidden=recipe.clip_hidden, seed=recipe.seed,
        eval_scenes=recipe.clip_eval_scenes,
        progress=bar,
    )
    bar.close()
    metrics["zeroed_token_rows"] = zero_unused_token_embeddings(model, used_token_ids(tokenizer))
    save_shapes_clip(model, tokenizer, out)
    return metrics


def _stage_judge(recipe: ShapesRecipe, out: Path, world: Path, progress: bool) -> dict:
    from .shapes_judge import save_judge, train_attribute_classifier

    bar = _Bar("judge", recipe.judge_steps, progress)
    model, metrics = train_attribute_classifier(
        steps=recipe.judge_steps, batch_size=recipe.judge_batch, width=recipe.judge_width, max_shapes=3,
        degrade=True, seed=recipe.seed + 1, progress=bar,
    )
    bar.close()
    save_judge(model, out)
    return metrics


def _stage_aesthetic(recipe: ShapesRecipe, out: Path, world: Path, progress: bool) -> dict:
    from transformers import CLIPModel

    from .shapes_aesthetic import save_aesthetic_head, train_aesthetic_head

    clip = CLIPModel.from_pretrained(world / "clip", dtype=torch.float32)
    bar = _Bar("aesthetic", recipe.aesthetic_steps, progress)
    head, metrics = train_aesthetic_head(clip, steps=recipe.aesthetic_steps, seed=recipe.seed + 2, progress=bar)
    bar.close()
    save_aesthetic_head(head, out)
    return metrics


def _stage_vae(recipe: ShapesRecipe, out: Path, world: Path, progress: bool) -> dict:
    from .shapes_t2i import train_shapes_vae

    bar = _Bar("vae", recipe.vae_steps, progress)
    vae, metrics = train_shapes_vae(
        steps=recipe.vae_steps, batch_size=recipe.vae_batch, width=recipe.vae_width, seed=recipe.seed + 3,
        progress=bar,
    )
    bar.close()
    vae.save_pretrained(out)
    return metrics


def _stage_t2i(recipe: ShapesRecipe, out: Path, world: Path, progress: bool) -> dict:
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPTokenizer

    from .shapes_t2i import assemble_pipeline, save_shapes_t2i, text_encoder_from_clip, train_shapes_unet

    clip = CLIPModel.from_pretrained(world / "clip", dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(world / "clip")
    text_encoder = text_encoder_from_clip(clip)
    # After a finished build only the T2I folder's copy of the VAE is kept.
    vae_folder = world / "vae" if (world / "vae").exists() else world / "t2i" / "vae"
    vae = AutoencoderKL.from_pretrained(vae_folder, torch_dtype=torch.float32).eval().requires_grad_(False)
    bar = _Bar("t2i", recipe.unet_steps, progress)
    result = train_shapes_unet(
        vae, text_encoder, tokenizer, steps=recipe.unet_steps, batch_size=recipe.unet_batch,
        width=recipe.unet_width, lr=recipe.unet_lr, seed=recipe.seed + 4, progress=bar,
    )
    bar.close()
    save_shapes_t2i(assemble_pipeline(vae, result.unet, text_encoder, tokenizer), out)
    tail = result.losses[-max(1, len(result.losses) // 10) :]
    return {
        "unet_parameters": sum(p.numel() for p in result.unet.parameters()),
        "final_loss": float(np.mean(tail)),
        "train_seconds": result.train_seconds,
    }


def _stage_pen(recipe: ShapesRecipe, out: Path, world: Path, progress: bool) -> dict:
    from .shapes_expansion import evaluate_pen, held_out_short_prompts, train_shapes_pen

    bar = _Bar("pen", recipe.pen_steps, progress)
    pen, metrics = train_shapes_pen(
        steps=recipe.pen_steps, batch_size=recipe.pen_batch, width=recipe.pen_width, layers=recipe.pen_layers,
        lr=recipe.pen_lr, seed=recipe.seed + 5, progress=bar,
    )
    bar.close()
    pen.save_pretrained(out)
    metrics.update(evaluate_pen(pen, held_out_short_prompts(recipe.seed + 5), seed=recipe.seed + 3000))
    return metrics


def _stage_report(recipe: ShapesRecipe, out: Path, world: Path, progress: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    prompts = shapes_prompts(recipe.report_prompts, seed=recipe.seed + 1000)
    metrics = evaluate_world_model(
        world / "t2i", world, prompts, seed=recipe.seed + 2000, num_inference_steps=recipe.report_steps,
        guidance_scale=recipe.report_guidance, eta=recipe.report_eta,
    )
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return metrics


def _stage_condition(recipe: ShapesRecipe, out: Path, world: Path, progress: bool) -> dict:
    from diffusers import AutoencoderKL

    from .shapes_control import build_condition_models

    vae = AutoencoderKL.from_pretrained(world / "t2i" / "vae", torch_dtype=torch.float32)
    return build_condition_models(
        out, steps=recipe.condition_steps, evaluation_steps=recipe.condition_eval_steps,
        noisy_scenes=recipe.condition_noisy_scenes, held_out=recipe.condition_held_out, seed=recipe.seed + 6,
        vae=vae, progress=progress,
    )


def _stage_controlnet(recipe: ShapesRecipe, out: Path, world: Path, progress: bool) -> dict:
    from rewards.controllability import ConditionReward

    from .shapes_control import CONDITION_KINDS
    from .shapes_controlnet import base_controllability, train_base_controlnet

    metrics: dict[str, dict] = {}
    for kind in CONDITION_KINDS:
        bar = _Bar(f"controlnet/{kind}", recipe.controlnet_steps, progress)
        generator, metrics[kind] = train_base_controlnet(
            world / "t2i", kind, steps=recipe.controlnet_steps, batch_size=recipe.controlnet_batch,
            lr=recipe.controlnet_lr, seed=recipe.seed + 7, progress=bar,
        )
        bar.close()
        generator.controlnet.save_pretrained(out / kind)
        for role in ("reward", "evaluation"):
            judge = ConditionReward(str(world / "condition" / kind / role), kind)
            metrics[kind][f"controllability_{role}"] = base_controllability(
                generator, kind, judge, examples=recipe.controlnet_report_examples,
                steps=recipe.report_steps, guidance=recipe.report_guidance,
            )
    return metrics


@torch.no_grad()
def evaluate_world_model(
    model: str | os.PathLike,
    world: str | os.PathLike,
    prompts: Sequence[str],
    *,
    seed: int,
    num_inference_steps: int = 10,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    batch_size: int = 64,
) -> dict[str, float]:
    """Sample one image per prompt from a diffusers folder and judge it with the world's parts.

    Returns the gold judge's per-attribute accuracies (``gold_shape``, ``gold_colour``, ``gold_size``,
    ``gold_position``, ``gold_background``), ``gold_all_correct``, their chance levels (``chance_*``), the
    mean ``clip_score`` and, when the world has one, the mean ``aesthetic``.
    """
    from genalign.generators.diffusion import DiffusionGenerator, SamplingOptions
    from rewards.clip_rewards import ClipScore

    from .shapes_judge import ShapesGold

    world = Path(world)
    generator = DiffusionGenerator.from_pretrained(model, torch_dtype=torch.float32)
    options = SamplingOptions(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta)
    rollout = generator.sample(
        list(prompts), options, seeds=[seed + i for i in range(len(prompts))], batch_size=batch_size,
        return_trajectory=False,
    )
    verdict = ShapesGold(world / "judge")(rollout.outputs, prompts)
    metrics = {f"gold_{name}": float(value.mean()) for name, value in verdict.items()}
    metrics.update(
        chance_shape=1 / len(shapes.SHAPES),
        chance_colour=1 / (len(shapes.COLOURS) - 1),
        chance_size=1 / len(shapes.SIZES),
        chance_position=1 / len(shapes.POSITIONS),
        chance_background=1 / len(shapes.BACKGROUNDS),
    )
    metrics["clip_score"] = float(ClipScore(model=str(world / "clip"))(rollout.outputs, list(prompts)).rewards.mean())
    if (world / "aesthetic").exists():
        from rewards.clip_rewards import ClipAesthetic

        aesthetic = ClipAesthetic(model=str(world / "clip"), head=str(world / "aesthetic"))
        metrics["aesthetic"] = float(aesthetic(rollout.outputs).rewards.mean())
    return metrics


_STAGE_FUNCTIONS: dict[str, Callable[[ShapesRecipe, Path, Path, bool], dict]] = {
    "clip": _stage_clip,
    "judge": _stage_judge,
    "aesthetic": _stage_aesthetic,
    "vae": _stage_vae,
    "t2i": _stage_t2i,
    "pen": _stage_pen,
    "report": _stage_report,
    "condition": _stage_condition,
    "controlnet": _stage_controlnet,
}


def build_shapes_world(
    folder: str | os.PathLike,
    recipe: ShapesRecipe = RECIPES["full"],
    *,
    stages: Sequence[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Build (or finish building) the shapes world in ``folder``; returns the contents of world.json.

    Args:
        stages: run only these (default: all, in order); a stage whose inputs are missing raises.
        force: rebuild the requested stages even if done, and accept a folder built with another recipe (the
            new recipe is recorded; stages not rebuilt keep their outputs, so force only the stages whose
            recipe fields changed).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    world = read_partial_world(folder)
    if world and world.get("recipe") != asdict(recipe) and not force:
        raise ValueError(
            f"{folder} holds a shapes world built with another recipe; pass force=True (--force) to rebuild it "
            "with this one, or choose another folder"
        )
    if force:
        world["recipe"] = asdict(recipe)
    world.setdefault("recipe", asdict(recipe))
    world.setdefault("stages", {})
    unknown = [s for s in stages or () if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the shapes world's stages are {list(STAGES)}")
    for name in [s for s in STAGES if stages is None or s in stages]:
        out = folder / name
        done = name in world["stages"] and (out.exists() or name == "vae" and (folder / "t2i").exists())
        if done and not force:
            continue
        tmp = folder / f".tmp_{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        metrics = _STAGE_FUNCTIONS[name](recipe, tmp, folder, progress)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        world["stages"][name] = metrics
        write_world_file(folder, world)
        if progress:
            print(f"[shapes] {name}: " + json.dumps({k: _round(v) for k, v in metrics.items()}), flush=True)
    # The T2I folder carries its own copy of the VAE; the stage folder was only its input.
    if "t2i" in world["stages"] and (folder / "t2i").exists():
        shutil.rmtree(folder / "vae", ignore_errors=True)
    return world


def _round(value):
    return round(value, 4) if isinstance(value, float) else value


