"""DDPO on the shapes world against a plain loop: one epoch (sample and score the epoch's images, normalise the rewards
per prompt, one PPO-clip update over every step of every trajectory)."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.pipelines.harness import Case, Outcome, Stopwatch
from benchmarks.pipelines.models import ImageModels, load_image_models
from benchmarks.pipelines.plain_diffusion import gaussian_log_prob, sample_and_score
from benchmarks.pipelines.plain_training import EpochDraw, adamw, normalised_per_prompt, optimizer_step, read_prompts


def reference(config, models: ImageModels) -> Outcome:
    """The epoch as a plain loop: each sample drawn and scored on its own (no log-probs recorded), then for every
    sample and step the old log-prob recomputed without gradients and the new one with them."""
    parts, reward, s = models.parts, models.reward, config.sampling
    lora = config.trainer.lora
    optimizer = adamw(config.trainer, parts.add_lora(lora.rank, lora.alpha, lora.target_modules, config.trainer.seed))
    prompts = read_prompts(config.prompts.file)
    draw = EpochDraw.make(config.trainer.seed, 0, len(prompts), config.prompts_per_epoch, config.samples_per_prompt)
    with Stopwatch() as clock:
        chains, rewards = sample_and_score(parts, reward, prompts, draw, s)
        advantages = normalised_per_prompt(rewards, draw.prompt_index, config.adv_clip_max)
        timesteps = parts.timesteps(s.num_inference_steps)
        terms = len(chains) * len(timesteps)
        for chain, prompt_index, advantage in zip(chains, draw.prompt_index, advantages):
            cond, uncond = parts.text(prompts[prompt_index]), parts.text("")
            for i, t in enumerate(timesteps):
                def log_prob() -> torch.Tensor:
                    output = parts.guided(chain[i], torch.tensor([t]), cond, uncond, s.guidance_scale)
                    mean, std = parts.ddim_step(chain[i], output, t, s.num_inference_steps, s.eta)
                    return gaussian_log_prob(chain[i + 1], mean, std, s.log_prob_reduction)

                with torch.no_grad():
                    old = log_prob()
                ratio = torch.exp(log_prob() - old)
                clipped = torch.clamp(ratio, 1 - config.clip_range, 1 + config.clip_range)
                loss = torch.maximum(-advantage * ratio, -advantage * clipped).sum() / terms
                loss.backward()
        grad_norm = optimizer_step(optimizer, config.trainer.max_grad_norm)
    return Outcome(clock.seconds, {"reward_mean": float(np.mean(rewards)), "grad_norm": grad_norm})


CASE = Case(
    name="ddpo",
    title="DDPO epoch, shapes world, 4 prompts × 4 samples, 10 DDIM steps (CFG 3, η = 1), all steps trained, LoRA r16",
    config="ddpo_shapes.yaml",
    overrides=["prompts_per_epoch=4", "samples_per_prompt=4", "stat_min_count=4", "train_batch_size=8",
               "timestep_fraction=1.0", "eval.gold.name=null"],
    test_overrides=["prompts_per_epoch=2", "samples_per_prompt=2", "stat_min_count=2", "train_batch_size=2",
                    "sampling.num_inference_steps=2"],
    samples=lambda c: c.prompts_per_epoch * c.samples_per_prompt,
    updates=lambda c: c.updates_per_epoch * c.inner_epochs,
    load_models=load_image_models,
    reference=reference,
    engine_values=lambda records: {"reward_mean": records[0]["reward_mean"], "grad_norm": records[0]["grad_norm"]},
    leaves_out="records no log-probs while sampling (recomputes the old ones in the update, one extra no-grad UNet "
               "call per step); every UNet call is one sample (batch 2 with CFG), every reward call one image; "
               "the engine also runs its after-update KL probe (one no-grad call)",
)
