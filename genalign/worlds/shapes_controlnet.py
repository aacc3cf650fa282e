"""The shapes world's base ControlNets, one per condition type: decent but imperfect, as Ctrl-U's starting point.

Each is initialised from the world's text-to-image UNet (diffusers' `ControlNetModel.from_unet`) and trained with
the ordinary ControlNet objective — the diffusion loss with the UNet, VAE and text encoder frozen — on freshly
rendered scenes with their captions and control images (`ShapesControlDataset`), 10 % of captions dropped to ""
as the T2I model was trained. The loss goes through the generator's own `noised_prediction`, the path Ctrl-U
trains through, so the base model and the fine-tuning see the same function. The result is a
StableDiffusionControlNetPipeline folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from genalign.generators.diffusion import DiffusionGenerator, SamplingOptions

from .schedules import warmup_cosine
from .shapes_control import ShapesControlDataset

CAPTION_DROPOUT = 0.1


def train_base_controlnet(
    t2i_folder: str | Path,
    condition: str,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[DiffusionGenerator, dict]:
    """Train a ControlNet for `condition` on the shapes T2I model in `t2i_folder`. Seeded; the caller's torch RNG
    is left as it was. Returns the generator (with its ControlNet) and the loss curve's summary."""
    generator = DiffusionGenerator.from_pretrained(t2i_folder, controlnet="unet")
    data = ShapesControlDataset(condition, seed=seed)
    controlnet = generator.controlnet.requires_grad_(True).train()
    rng = np.random.default_rng([seed, 1])
    losses: list[float] = []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        optimiser = torch.optim.AdamW(controlnet.parameters(), lr=lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(steps))
        for step in range(steps):
            examples = data.examples(rng.integers(0, data.size("train"), batch_size).tolist(), "train")
            examples.texts = ["" if rng.random() < CAPTION_DROPOUT else text for text in examples.texts]
            clean = generator.encode(examples.samples, seeds=rng.integers(0, 2**31 - 1, batch_size).tolist())
            timesteps = torch.randint(0, generator.num_train_timesteps, (batch_size,))
            prediction = generator.noised_prediction(clean, examples.conditions(), timesteps, torch.randn_like(clean),
                                                     decode=False)
            loss = prediction.loss.mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step, losses[-1])
    controlnet.eval().requires_grad_(False)
    tail = losses[-max(1, steps // 10):]
    return generator, {"steps": steps, "final_loss": float(np.mean(tail)), "train_seconds": time.perf_counter() - start}


@torch.no_grad()
def base_controllability(generator: DiffusionGenerator, condition: str, judge, *, examples: int = 64,
                         steps: int = 10, guidance: float = 3.0, seed: int = 10_000) -> float:
    """Mean controllability (by `judge`, a ConditionReward) of samples from the first held-out examples."""
    data = ShapesControlDataset(condition, seed=0)
    batch = data.examples(list(range(examples)), "eval")
    rollout = generator.sample(batch.conditions(), SamplingOptions(num_inference_steps=steps, guidance_scale=guidance),
                               seeds=[seed + i for i in range(examples)], batch_size=64, return_trajectory=False)
    return float(judge(rollout.outputs, list(batch.target)).rewards.mean())
