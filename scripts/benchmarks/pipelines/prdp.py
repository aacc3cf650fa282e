"""PRDP on the shapes world against a plain loop: one epoch (sample and score each prompt's group, then K updates of
the proximal reward-difference-prediction loss over every pair of a group, all against the epoch-start model)."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.pipelines.harness import Case, Outcome, Stopwatch
from benchmarks.pipelines.models import ImageModels, load_image_models
from benchmarks.pipelines.plain_diffusion import gaussian_log_prob, sample_and_score
from benchmarks.pipelines.plain_training import EpochDraw, adamw, optimizer_step, read_prompts


def rdp_loss(log_ratios: torch.Tensor, rewards: list[float], group_size: int, beta: float,
             clip: float) -> torch.Tensor:
    """The proximal RDP loss written pair by pair: for each pair (a < b) of a group, max of the squared error of the
    implied reward difference against Δr/β with the step log-ratios as they are and clipped to ±clip; the sum over
    pairs divided by Σ_groups B²."""
    implied, implied_clipped = log_ratios.sum(1), log_ratios.clamp(-clip, clip).sum(1)
    groups = len(rewards) // group_size
    total = log_ratios.new_zeros(())
    for a in range(len(rewards)):
        for b in range(a + 1, len(rewards)):
            if a // group_size != b // group_size:
                continue
            target = (rewards[a] - rewards[b]) / beta
            plain = (implied[a] - implied[b] - target) ** 2
            clipped = (implied_clipped[a] - implied_clipped[b] - target) ** 2
            total = total + torch.maximum(plain, clipped)
    return total / (groups * group_size**2)


def reference(config, models: ImageModels) -> Outcome:
    """The epoch as a plain loop: each sample drawn and scored on its own (no log-probs recorded); π_old's
    log-probs recomputed for every step; then each update evaluates every step of every trajectory with gradients
    in one graph and backpropagates the pairwise loss through it."""
    parts, reward, s = models.parts, models.reward, config.sampling
    lora = config.trainer.lora
    optimizer = adamw(config.trainer, parts.add_lora(lora.rank, lora.alpha, lora.target_modules, config.trainer.seed))
    prompts = read_prompts(config.prompts.file)
    draw = EpochDraw.make(config.trainer.seed, 0, len(prompts), config.prompts_per_epoch, config.samples_per_prompt)
    timesteps = parts.timesteps(s.num_inference_steps)

    def log_probs(chain: list[torch.Tensor], prompt: str) -> torch.Tensor:
        """[S] log π(x_{t−1} | x_t, c) of every step of one trajectory under the current weights."""
        cond, uncond = parts.text(prompt), parts.text("")
        values = []
        for i, t in enumerate(timesteps):
            output = parts.guided(chain[i], torch.tensor([t]), cond, uncond, s.guidance_scale)
            mean, std = parts.ddim_step(chain[i], output, t, s.num_inference_steps, s.eta)
            values.append(gaussian_log_prob(chain[i + 1], mean, std, s.log_prob_reduction)[0])
        return torch.stack(values)

    with Stopwatch() as clock:
        chains, rewards = sample_and_score(parts, reward, prompts, draw, s)
        texts = [prompts[i] for i in draw.prompt_index]
        with torch.no_grad():
            old = torch.stack([log_probs(chain, text) for chain, text in zip(chains, texts)])
        losses, grad_norm = [], 0.0
        for _ in range(config.updates_per_epoch):
            current = torch.stack([log_probs(chain, text) for chain, text in zip(chains, texts)])
            loss = rdp_loss(current - old, rewards, config.samples_per_prompt, config.beta, config.clip_range)
            loss.backward()
            grad_norm = optimizer_step(optimizer, config.trainer.max_grad_norm)
            losses.append(float(loss.detach()))
    return Outcome(clock.seconds, {"reward_mean": float(np.mean(rewards)), "rdp_loss_first": losses[0],
                                   "rdp_loss": float(np.mean(losses)), "grad_norm": grad_norm})


CASE = Case(
    name="prdp",
    title="PRDP epoch, shapes world (prdp_shapes_small), 2 prompts × 4 samples, 10 DDIM steps, K = 2 updates, LoRA r16",
    config="prdp_shapes_small.yaml",
    overrides=["prompts_per_epoch=2", "samples_per_prompt=4", "updates_per_epoch=2", "train_batch_size=8",
               "probe_prompts=0", "eval.gold.name=null"],
    test_overrides=["samples_per_prompt=2", "train_batch_size=4", "sampling.num_inference_steps=2"],
    samples=lambda c: c.prompts_per_epoch * c.samples_per_prompt,
    updates=lambda c: c.updates_per_epoch,
    load_models=load_image_models,
    reference=reference,
    engine_values=lambda records: {key: records[0][key] for key in ("reward_mean", "rdp_loss_first", "rdp_loss",
                                                                    "grad_norm")},
    leaves_out="records no log-probs while sampling (π_old's recomputed in a no-grad pass); every update one graph "
               "over all M × S steps (the engine backpropagates Σ G·log π step by step after a no-grad values "
               "pass, and skips that pass on an epoch's first update); every UNet call one sample, every reward "
               "call one image",
)
